"""The job's configuration hash, per-shard counts, and the run manifest (`OUT/_manifest.json`).

The manifest describes the output directory after a run: counts over every shard the run covers
(written now or skipped as already complete), what this run did (shards, records, wall time,
tokens/s), the configuration with its hash, package versions, duplicate ids, where the time went
(timings), and the Beam metrics.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import platform
from importlib import metadata
from typing import Any, Iterable

from pipeline.handler import ENGINE_STATS, ModelSpec
from pipeline.options import NOT_IN_CONFIG, JobOptions
from pipeline.records import Result

PACKAGES = ("jax", "flax", "apache-beam", "numpy", "tensorflow-text")
COUNTS = ("records", "completions", "errors", "prompt_tokens", "completion_tokens")
# timings: steps of the pipelines -> the Beam distributions (microseconds) that time them
STEPS = {"tokenize": "tokenize_us", "engine_wait": "batch_engine_wait_us", "handler_host": "batch_host_us",
         "detokenize": "detokenize_us", "write": "write_shard_us"}
# timings: the engines' numbers -> the Beam counters that add them up (times in milliseconds)
ENGINE = {"engines": "engines", "load_s": "engine_load_ms", **ENGINE_STATS}


def job_config(opts: JobOptions, spec: ModelSpec) -> dict[str, Any]:
    """What decides an output shard's content: the model spec and every job flag except those in
    options.NOT_IN_CONFIG (the model flags are folded into the spec). JSON types only."""
    parser = argparse.ArgumentParser()
    JobOptions._add_argparse_args(parser)
    flags = {a.dest for a in parser._actions} - {"help"} - NOT_IN_CONFIG - {"model", "dtype", "max_len", "max_slots"}
    values = opts.get_all_options()
    config = {"model": spec.flat(), "job": {k: values.get(k) for k in sorted(flags)}}
    return json.loads(json.dumps(config))  # tuples -> lists, as a marker read back has them


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def shard_counts(results: Iterable[Result]) -> dict[str, Any]:
    """The counts a shard's completion marker carries (read back by the manifest, whatever the
    output format). Token counts are over completions."""
    c, by_type = collections.Counter(), collections.Counter()
    for r in results:
        c["records"] += 1
        if r.error is None:
            c["completions"] += 1
            c["prompt_tokens"] += r.prompt_tokens
            c["completion_tokens"] += r.completion_tokens
        else:
            by_type[r.error_type or "unknown"] += 1
    return {**{k: c[k] for k in COUNTS if k != "errors"}, "errors": sum(by_type.values()),
            "errors_by_type": dict(sorted(by_type.items()))}


def add_up(counts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several shard_counts."""
    total, by_type = collections.Counter(), collections.Counter()
    for c in counts:
        total.update({k: c.get(k, 0) for k in COUNTS})
        by_type.update(c.get("errors_by_type", {}))
    return {**{k: total[k] for k in COUNTS}, "errors_by_type": dict(sorted(by_type.items()))}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def duplicate_ids(counts: collections.Counter, examples: int = 5) -> dict[str, Any]:
    """Ids that more than one record carries: how many, the extra records they add, a few examples."""
    dups = [(i, n) for i, n in counts.items() if n > 1]
    return {"ids": len(dups), "extra_records": sum(n - 1 for _, n in dups),
            "examples": [{"id": i, "records": n} for i, n in dups[:examples]]}


def timings(metrics: dict[str, Any], phases_s: dict[str, float], passes: int) -> dict[str, Any]:
    """Where the run's time went, in seconds. phases_s: the launching process's wall time by phase.
    steps_s: the pipelines' steps, summed over batches, shards and threads (which overlap, so the
    sum can exceed the wall time). engine: the numbers of the engines the workers used, summed over
    workers, with how many there were ("engines"); with speculative decoding also the share of
    proposals kept (spec_acceptance_rate) and the proposals kept per row and verify step
    (spec_mean_accepted; each step also yields one token of its own). A key is absent where the run did not measure
    it (no batches ran, or the engine reports no stats())."""
    counters, dists = metrics.get("counters", {}), metrics.get("distributions", {})
    engine = {k: (counters[c] / 1000 if k.endswith("_s") else counters[c]) for k, c in ENGINE.items()
              if c in counters}
    if engine.get("spec_steps"):  # speculative decoding: proposals kept, and kept per row and verify step
        engine["spec_acceptance_rate"] = round(engine["spec_accepted"] / max(engine["spec_proposed"], 1), 4)
        engine["spec_mean_accepted"] = round(engine["spec_accepted"] / engine["spec_steps"], 4)
    return {"passes": passes, "phases_s": {k: round(v, 3) for k, v in phases_s.items()},
            "batches": dists.get("batch_latency_ms", {}).get("count", 0),
            "steps_s": {k: round(dists[d]["sum"] / 1e6, 3) for k, d in STEPS.items() if d in dists},
            "engine": engine}


def build_manifest(*, argv: list[str], opts: JobOptions, config: dict[str, Any], summary: dict[str, Any],
                   this_run: dict[str, Any], shard_names: dict[str, list[str]], input_shards: int,
                   limit: dict[str, Any] | None, metrics: dict[str, Any], timings: dict[str, Any],
                   started: str, finished: str, wall_s: float) -> dict[str, Any]:
    """The manifest as a JSON-ready dict; the top-level counts cover every shard of the run."""
    tokens_per_s = this_run["completion_tokens"] / max(wall_s, 1e-9)
    return {
        "input": opts.input, "output": opts.output, "argv": list(argv),
        "started": started, "finished": finished, "wall_s": round(wall_s, 2),
        **{k: summary[k] for k in COUNTS}, "errors_by_type": summary["errors_by_type"],
        "completion_tokens_per_s": round(tokens_per_s, 1),
        "duplicate_ids": summary["duplicate_ids"],
        "shards": len(shard_names["done"]) + len(shard_names["skipped"]), "input_shards": input_shards,
        "shards_done": shard_names["done"], "shards_skipped": shard_names["skipped"],
        "this_run": this_run, "limit": limit,
        "config_hash": config_hash(config), "config": config,
        "versions": package_versions(), "timings": timings, "metrics": metrics,
    }

