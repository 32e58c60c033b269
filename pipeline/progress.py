"""Per-record metrics, the periodic progress line, and reading a finished pipeline's metrics back.

Beam metrics of the job (namespace "llm_batch"): counters records_in, records_out, completions,
errors, errors_<type> (one per error type), prompt_tokens, completion_tokens, shards_written, and
the engines' numbers (engines, engine_load_ms and Engine.stats() as handler.ENGINE_STATS names them);
distributions batch_latency_ms, batch_tokens_per_s, batch_records, batch_engine_wait_us,
batch_host_us (per batch), tokenize_us (per chunk read), detokenize_us (per batch) and
write_shard_us (per shard). manifest.timings adds them up for the manifest.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from pipeline.handler import NAMESPACE
from pipeline.records import Result

log = logging.getLogger("pipeline.progress")


class Progress:
    """Records finished by this process since the job started; logs one line per interval.

    One per (job run, process), shared by the threads and the successive pipelines (passes) of the
    run, so the counts of a run with --shards_per_pass add up across passes. Also keeps, per whole
    second since the start, the records finished and their completion tokens (for the run report).
    """

    _runs: dict[str, "Progress"] = {}
    _lock = threading.Lock()

    def __init__(self, interval_s: float, started: float):
        self.interval_s, self.started = interval_s, started
        self.last_log = time.time()
        self.records = self.completions = self.errors = self.completion_tokens = 0
        self.per_second: dict[int, list[int]] = {}  # second since start -> [records, completion tokens]
        self.lock = threading.Lock()

    @classmethod
    def of_run(cls, run_id: str, interval_s: float, started: float) -> "Progress":
        with cls._lock:
            if run_id not in cls._runs:
                cls._runs[run_id] = cls(interval_s, started)
            return cls._runs[run_id]

    def add(self, result: Result) -> None:
        now = time.time()
        with self.lock:
            self.records += 1
            if result.error is None:
                self.completions += 1
                self.completion_tokens += result.completion_tokens
            else:
                self.errors += 1
            second = self.per_second.setdefault(max(int(now - self.started), 0), [0, 0])
            second[0] += 1
            second[1] += result.completion_tokens if result.error is None else 0
            due = now - self.last_log >= self.interval_s
            if due:
                self.last_log = now
                line = self.line(now)
        if due:
            log.info(line)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.time()) - self.started, 1e-9)
        return (f"progress: {self.records:,} records done ({self.completions:,} completions, "
                f"{self.errors:,} errors), {self.completion_tokens:,} completion tokens, "
                f"{self.completion_tokens / elapsed:,.1f} tokens/s, {elapsed:,.0f} s")


def timeline(run_id: str) -> list[tuple[int, int, int]] | None:
    """[(second since the job started, records finished in it, their completion tokens)] as this
    process counted them, in time order; None where this process counted none of the run (the
    records were counted in worker processes: another runner, or multi_processing)."""
    found = Progress._runs.get(run_id)
    if found is None:
        return None
    with found.lock:
        return [(t, n, tokens) for t, (n, tokens) in sorted(found.per_second.items())]


class CountResults(beam.DoFn):
    """Counts every finished record (a completion or an error) as it comes, before shards are
    grouped for writing, so that metrics and the progress line move while the job runs."""

    def __init__(self, run_id: str, interval_s: float, started: float):
        self.run_id, self.interval_s, self.started = run_id, interval_s, started
        self.completions = Metrics.counter(NAMESPACE, "completions")
        self.errors = Metrics.counter(NAMESPACE, "errors")
        self._by_type: dict[str, Any] = {}

    def setup(self):
        self.progress = Progress.of_run(self.run_id, self.interval_s, self.started)

    def process(self, result: Result):
        if result.error is None:
            self.completions.inc()
        else:
            self.errors.inc()
            kind = result.error_type or "unknown"
            if kind not in self._by_type:
                self._by_type[kind] = Metrics.counter(NAMESPACE, f"errors_{kind}")
            self._by_type[kind].inc()
        self.progress.add(result)
        yield result


def pipeline_metrics(result) -> dict[str, Any]:
    """{"counters": {name: n}, "distributions": {name: {count, sum, min, max}}} of the job's
    namespace, committed values where the runner has them; {} where it cannot be queried."""
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except Exception as e:  # some runners report no metrics; the manifest does without
        log.warning("could not read pipeline metrics: %s", e)
        return {}
    value = lambda m: m.committed if m.committed is not None else m.attempted  # noqa: E731
    counters: dict[str, int] = {}
    for m in found.get("counters", []):
        counters[m.key.metric.name] = counters.get(m.key.metric.name, 0) + int(value(m))
    dists: dict[str, dict[str, int]] = {}
    for m in found.get("distributions", []):
        d = value(m)
        if d is None or not d.count:
            continue
        dists = merge_metrics({"distributions": dists}, {"distributions": {m.key.metric.name: {
            "count": d.count, "sum": d.sum, "min": d.min, "max": d.max}}})["distributions"]
    return {"counters": counters, "distributions": dists}


def merge_metrics(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The metrics of two pipelines (passes) of one run, added up."""
    counters = dict(a.get("counters", {}))
    for k, v in b.get("counters", {}).items():
        counters[k] = counters.get(k, 0) + v
    dists = {k: dict(v) for k, v in a.get("distributions", {}).items()}
    for k, v in b.get("distributions", {}).items():
        if k not in dists:
            dists[k] = dict(v)
            continue
        d = dists[k]
        d["count"], d["sum"] = d["count"] + v["count"], d["sum"] + v["sum"]
        d["min"], d["max"] = min(d["min"], v["min"]), max(d["max"], v["max"])
    return {"counters": counters, "distributions": dists}
