"""The job: read -> parse + tokenize -> batch by token budget and length bucket -> generate ->
detokenize -> write one output shard per input shard.

Every input record ends as exactly one output line, a completion or an error with a reason.
"""

from __future__ import annotations

import bisect
import collections
import datetime
import functools
import json
import logging
import os
import sys
import time
import uuid
from typing import Any, Iterable

import apache_beam as beam
import yaml
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from model import ModelConfig, load_tokenizer, read_hf_config, resolve_checkpoint
from model.config import buckets_for
from model.platform import has_gpu, has_tpu
from model.tokenizer import TOKENIZER_FILES, has_tokenizer
from pipeline import formats, io, manifest, progress
from pipeline.errors import JobError
from pipeline.handler import NAMESPACE, EngineHandler, ModelSpec
from pipeline.options import DEFAULT_RUNNER, JobOptions
from pipeline.progress import CountResults
from pipeline.records import (Request, Result, chat_template_for, check_sampling, choice_token_ids, finish_completions,
                              model_name, output_view, parse, prompt_token_ids, serialize)

log = logging.getLogger(__name__)
LOCAL_WORKER_THREADS = 4  # the in-process runner's default: bundles feeding the engine at once


@functools.lru_cache(maxsize=4)
def model_config(spec: ModelSpec) -> ModelConfig:
    """The architecture of the spec's checkpoint, from its config.json (read once per process:
    option checks, each pass's build and each worker's setup all ask)."""
    return ModelConfig.from_hf_config(read_hf_config(resolve_checkpoint(spec.checkpoint)))


def context_length(spec: ModelSpec) -> int:
    """Tokens a sequence may hold: the engine's own resolved max_len (EngineConfig.context_length)."""
    return spec.engine.context_length(model_config(spec))


class ReadAndTokenize(beam.DoFn):
    """One input shard -> a Request per good record (tokenized) and an error Result per bad one."""

    ERRORS = "errors"

    def __init__(self, spec: ModelSpec, fmt: str, defaults: dict[str, Any], chunk: int = 512,
                 max_record_bytes: int | None = None, last_lines: dict[int, int | None] | None = None,
                 columns: formats.Columns = formats.Columns()):
        """last_lines: {shard index: the last line to read} under --limit (absent or None: all)."""
        self.spec, self.fmt, self.defaults, self.chunk, self.columns = spec, fmt, defaults, chunk, columns
        self.max_record_bytes, self.last_lines = max_record_bytes, last_lines or {}
        self.records_in = Metrics.counter(NAMESPACE, "records_in")
        self.prompt_tokens = Metrics.counter(NAMESPACE, "prompt_tokens")
        self.tokenize_us = Metrics.distribution(NAMESPACE, "tokenize_us")

    def setup(self):
        self.tokenizer = load_tokenizer(resolve_checkpoint(self.spec.checkpoint))
        if self.tokenizer is None:
            raise ValueError(f"checkpoint {self.spec.checkpoint!r} has no tokenizer.model or tokenizer.json")
        self.max_len = context_length(self.spec)
        self.chat_template = chat_template_for(resolve_checkpoint(self.spec.checkpoint), self.tokenizer)

    def process(self, shard: tuple[int, str]):
        index, url = shard
        name = url.rsplit("/", 1)[-1]
        fmt = formats.shard_format(url, self.fmt)
        pending: list[Request] = []
        last = self.last_lines.get(index)
        for line, raw in formats.read_records(url, fmt, self.columns, self.max_record_bytes):
            if last is not None and line > last:
                break
            self.records_in.inc()
            rec = parse(raw, index, name, line, fmt, self.defaults)
            if isinstance(rec, Result):
                yield beam.pvalue.TaggedOutput(self.ERRORS, rec)
                continue
            pending.append(rec)
            if len(pending) == self.chunk:
                yield from self._tokenize(pending)
                pending = []
        yield from self._tokenize(pending)

    def _tokenize(self, requests: list[Request]):
        if not requests:
            return
        start = time.perf_counter()
        token_ids = prompt_token_ids(self.tokenizer, self.chat_template, requests)
        self.tokenize_us.update(round((time.perf_counter() - start) * 1e6))
        for req, ids in zip(requests, token_ids):
            if isinstance(ids, Result):
                yield beam.pvalue.TaggedOutput(self.ERRORS, ids)
                continue
            req.token_ids = ids
            room = self.max_len - len(ids)
            if not ids:  # a tokenizer without BOS can turn a prompt of, say, only a zero-width space into nothing
                yield beam.pvalue.TaggedOutput(self.ERRORS, req.fail("invalid_prompt", "the prompt has no tokens"))
            elif req.score_choices is not None:
                if (failed := self._check_choices(req)) is not None:
                    yield beam.pvalue.TaggedOutput(self.ERRORS, failed)
                else:
                    self.prompt_tokens.inc(len(ids))
                    yield req
            elif room < 1:
                yield beam.pvalue.TaggedOutput(self.ERRORS, req.fail(
                    "prompt_too_long", f"prompt has {len(ids)} tokens; the model's context is {self.max_len}"))
            elif req.max_tokens > room and req.max_tokens_given:
                yield beam.pvalue.TaggedOutput(self.ERRORS, req.fail(
                    "invalid_parameter",
                    f"max_tokens={req.max_tokens} but the prompt's {len(ids)} tokens leave room for {room} "
                    f"in the model's context of {self.max_len}"))
            else:
                req.max_tokens = min(req.max_tokens, room)
                self.prompt_tokens.inc(len(ids))
                yield req

    def _check_choices(self, req: Request) -> Result | None:
        """Tokenizes a request's score_choices (into req.choice_ids); the error if one has no
        tokens or the prompt and its choices do not fit the context together."""
        req.choice_ids = choice_token_ids(self.tokenizer, req)
        empty = next((c for c, ids in zip(req.score_choices, req.choice_ids) if not ids), None)
        if empty is not None:
            return req.fail("invalid_parameter", f"score_choices: {empty!r} has no tokens")
        held = len(req.token_ids) + sum(map(len, req.choice_ids))
        if held > self.max_len:
            return req.fail("prompt_too_long", f"the prompt's {len(req.token_ids)} tokens and its score_choices' "
                            f"{held - len(req.token_ids)} take {held}; the model's context is {self.max_len}")
        return None


class BatchByTokens(beam.DoFn):
    """Groups Requests of one length bucket until their prompt + max_tokens reach a token budget;
    what is left when the bundle ends goes out as one batch, whatever its buckets.

    Beam's BatchElements offers either a size function (a token budget) or length buckets, not
    both at once; this small DoFn does both within a bundle.
    """

    def __init__(self, budget: int, buckets: list[int]):
        """budget: tokens per batch; buckets: the engine's prompt-length groups (octaves, as it
        batches prefills)."""
        self.budget, self.buckets = budget, buckets

    def start_bundle(self):
        self._open: dict[int, list[Request]] = collections.defaultdict(list)
        self._size: dict[int, int] = collections.defaultdict(int)

    def process(self, req: Request):
        bucket = bisect.bisect_left(self.buckets, len(req.token_ids))
        self._open[bucket].append(req)
        self._size[bucket] += len(req.token_ids) + req.max_tokens
        if self._size[bucket] >= self.budget:
            yield self._open.pop(bucket)
            self._size.pop(bucket)

    def finish_bundle(self):
        # one batch, not one per bucket: a thread waits on each batch it hands the engine before it
        # hands the next, so each extra batch here would run alone at the end, on a few slots
        # (the engine groups prefills by length itself)
        leftovers = [req for batch in self._open.values() for req in batch]
        if leftovers:
            yield WindowedValue(leftovers, GlobalWindow().max_timestamp(), [GlobalWindow()])


class Detokenize(beam.DoFn):
    """Token ids -> text, cut at stop strings; see records.finish_completions."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.completion_tokens = Metrics.counter(NAMESPACE, "completion_tokens")
        self.detokenize_us = Metrics.distribution(NAMESPACE, "detokenize_us")

    def setup(self):
        self.tokenizer = load_tokenizer(resolve_checkpoint(self.spec.checkpoint))

    def process(self, results: list[Result]):
        start = time.perf_counter()
        finished = finish_completions(self.tokenizer, results)
        self.detokenize_us.update(round((time.perf_counter() - start) * 1e6))
        for r in finished:
            self.completion_tokens.inc(r.completion_tokens)
            yield r


class WriteShard(beam.DoFn):
    """All results of one input shard -> its output shard, in input line order, written atomically;
    then its completion marker: what produced the shard (`markers[shard]`) and its counts."""

    def __init__(self, output_urls: list[str], markers: dict[int, dict[str, Any]]):
        self.output_urls, self.markers = output_urls, markers
        self.records_out = Metrics.counter(NAMESPACE, "records_out")
        self.shards_written = Metrics.counter(NAMESPACE, "shards_written")
        self.write_us = Metrics.distribution(NAMESPACE, "write_shard_us")

    def process(self, keyed: tuple[int, Iterable[Result | None]]):
        start = time.perf_counter()
        shard, results = keyed
        results = sorted((r for r in results if r is not None), key=lambda r: r.line)
        url = self.output_urls[shard]
        written = [serialize(r) for r in results]  # (line, the result it reports)
        io.write_atomic(url, [line for line, _ in written])
        io.write_marker(url, {**self.markers[shard], **manifest.shard_counts(r for _, r in written)})
        self.records_out.inc(len(results))
        self.shards_written.inc()
        self.write_us.update(round((time.perf_counter() - start) * 1e6))
        yield shard, len(results)


def build(p: beam.Pipeline, opts: JobOptions, spec: ModelSpec, shards: list[str], todo: list[int] | None = None,
          last_lines: dict[int, int | None] | None = None, markers: dict[int, dict[str, Any]] | None = None,
          run_id: str | None = None, started: float | None = None) -> beam.PCollection:
    """Adds the job's steps to `p` for the shards numbered `todo` (default: all); returns (shard
    index, records written) per shard. last_lines: see ReadAndTokenize; markers: what each shard's
    completion marker records besides its counts (default: shard_markers)."""
    defaults = {"max_tokens": opts.max_tokens, "temperature": opts.temperature, "top_p": opts.top_p,
                "top_k": opts.top_k, "model": model_name(spec.checkpoint)}
    columns = formats.Columns(opts.prompt_column, opts.id_column, opts.prompt_feature, opts.id_feature)
    share = opts.share_model == "true" or (opts.share_model == "auto" and (has_tpu() or has_gpu()))
    output_urls = [io.output_url(opts.output, s) for s in shards]
    arch, served = model_config(spec), spec.engine
    budget = opts.batch_tokens or served.batch_tokens(arch)  # Beam batches sized and bucketed as the engine runs them
    todo = list(range(len(shards))) if todo is None else todo
    last_lines = last_lines or {}
    if markers is None:
        markers = shard_markers(shards, {i: last_lines.get(i) for i in todo}, manifest.job_config(opts, spec))
    run_id = run_id or uuid.uuid4().hex
    counter = CountResults(run_id, opts.progress_interval_s, started or time.time())

    # SpreadShards redistributes the shards: Create's own reshuffle would be a second one (a stage
    # of its own, 0.2 s of each run on the in-process runner)
    indexed = p | "ListShards" >> beam.Create([(i, shards[i]) for i in todo], reshuffle=False)
    parsed = (indexed | "SpreadShards" >> beam.Reshuffle()
              | "ReadAndTokenize" >> beam.ParDo(ReadAndTokenize(
                  spec, opts.format, defaults, max_record_bytes=opts.max_record_bytes,
                  last_lines=last_lines, columns=columns)).with_outputs(ReadAndTokenize.ERRORS, main="requests"))
    completions = (parsed.requests
                   | "BatchByTokens" >> beam.ParDo(BatchByTokens(budget, buckets_for(served.context_length(arch))))
                   | "Generate" >> RunInference(EngineHandler(spec, share, run_id))
                   | "Detokenize" >> beam.ParDo(Detokenize(spec)))
    # every shard gets a None, so an input shard with no records still gets an (empty) output shard
    empty = indexed | "ShardMarkers" >> beam.Map(lambda s: (s[0], None))
    # counted on each branch, in the stage that produces the results: the FnApiRunner runs what
    # follows a Flatten as a later stage, so counting there would see a pass's results all at its end
    counted = (completions | "CountCompletions" >> beam.ParDo(counter),
               parsed[ReadAndTokenize.ERRORS] | "CountErrors" >> beam.ParDo(counter))
    keyed = (counted | "AllResults" >> beam.Flatten()
             | "KeyByShard" >> beam.Map(lambda r: (r.shard, r)))
    return ((keyed, empty) | "WithMarkers" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(WriteShard(output_urls, markers)))


def shard_markers(shards: list[str], last_lines: dict[int, int | None],
                  config: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """For the shards numbered in last_lines ({index: last line to read, None for all}): what the
    shard's completion marker records about how it was produced; a rerun compares it with the
    existing marker (io.shard_status)."""
    digest = manifest.config_hash(config)
    return {i: {"input": shards[i], "input_size": io.input_size(shards[i]),
                "input_fingerprint": io.input_fingerprint(shards[i]), "last_line": last,
                "config_hash": digest, "config": config} for i, last in last_lines.items()}


def _let_worker_processes_import_project() -> None:
    """The FnApiRunner's multi_processing workers are fresh interpreters that inherit only the
    environment: put this project on their PYTHONPATH, whatever directory the job started from."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def parse_options(argv: list[str] | None) -> tuple[JobOptions, ModelSpec]:
    """The job's options and model spec, checked: a bad flag value, a model YAML or checkpoint that
    is not there, or an architecture the engine does not support is a JobError here, in the
    launching process, before anything is read or loaded."""
    opts = PipelineOptions(argv).view_as(JobOptions)
    if opts.view_as(StandardOptions).runner is None:
        opts.view_as(StandardOptions).runner = DEFAULT_RUNNER
    direct = opts.view_as(DirectOptions)
    given = opts.get_all_options(drop_default=True)
    if opts.view_as(StandardOptions).runner == DEFAULT_RUNNER and "direct_num_workers" not in given:
        # several bundles at once, each feeding its batches to the one engine's loop: the slots stay
        # full across Beam batches instead of draining at each batch's tail (launch/bench_pipeline.py)
        direct.direct_num_workers, direct.direct_running_mode = LOCAL_WORKER_THREADS, "multi_threading"
    if direct.direct_running_mode == "multi_processing":
        _let_worker_processes_import_project()
    for flag, value, least in (("batch_tokens", opts.batch_tokens, 1), ("shards_per_pass", opts.shards_per_pass, 0),
                               ("limit", opts.limit, 1), ("max_record_bytes", opts.max_record_bytes, 1),
                               ("progress_interval_s", opts.progress_interval_s, 0),
                               ("max_slots", opts.max_slots, 1), ("max_len", opts.max_len, 2)):
        if value is not None and value < least:
            raise JobError(f"--{flag}={value} is out of range", "command line", f"pass --{flag} >= {least}")
    # the per-record defaults: checked here once rather than as the same error on every record
    problem = check_sampling({"max_tokens": opts.max_tokens, "temperature": opts.temperature, "top_p": opts.top_p,
                              "top_k": opts.top_k, "seed": 0, "stop": None})
    if problem:
        raise JobError(f"a default is out of range: {problem}", "command line", "fix the flag of that name")
    where = f"--model {opts.model}"
    try:
        spec = ModelSpec.parse(opts.model, dtype=opts.dtype, max_len=opts.max_len, max_slots=opts.max_slots)
    except (OSError, ValueError, yaml.YAMLError) as e:
        reason = f"no model YAML at {opts.model}" if isinstance(e, FileNotFoundError) else f"bad model YAML: {e}"
        raise JobError(reason, where, "pass 'demo', a checkpoint directory (local or gs://), or an existing "
                       "configs/models/X.yaml with the keys of ModelSpec") from e
    try:
        context_length(spec)  # reads config.json: the workers would fail on it later, one by one
    except FileNotFoundError as e:
        raise JobError(f"no checkpoint at {spec.checkpoint}: {e}", where, "pass 'demo', a checkpoint directory "
                       "(local or gs://) with config.json and *.safetensors, or a model YAML naming one") from e
    except (ValueError, KeyError) as e:
        reason = f"config.json has no {e}" if isinstance(e, KeyError) else str(e)
        raise JobError(f"cannot serve checkpoint {spec.checkpoint}: {reason}", where,
                       "pass a checkpoint of a supported architecture and configuration") from e
    if not has_tokenizer(resolve_checkpoint(spec.checkpoint)):  # else every worker fails on it in setup
        raise JobError(f"checkpoint {spec.checkpoint} has no tokenizer ({' or '.join(TOKENIZER_FILES)})", where,
                       "the job reads and writes text: put the model's tokenizer file in the checkpoint directory")
    return opts, spec


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Runs the job over the shards of --input that --output does not hold complete yet, in
    pipelines of --shards_per_pass shards; writes OUT/_manifest.json and returns it, with a few
    sample output records under "samples"."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opts, spec = parse_options(argv)
    started, start = time.time(), time.perf_counter()
    shards = io.discover_shards(opts.input)
    io.check_output_writable(opts.output)  # before reading inputs for markers, and before any model loads
    outputs = [io.output_url(opts.output, s) for s in shards]
    if opts.limit:  # read as far as the limit, the way ReadAndTokenize reads
        columns = formats.Columns(opts.prompt_column, opts.id_column, opts.prompt_feature, opts.id_feature)
        last_lines = io.limit_plan(shards, opts.limit, lambda url: formats.read_records(
            url, formats.shard_format(url, opts.format), columns, opts.max_record_bytes))
    else:
        last_lines = dict.fromkeys(range(len(shards)))
    config = manifest.job_config(opts, spec)
    markers = shard_markers(shards, last_lines, config)
    todo, skipped = io.plan_shards({i: outputs[i] for i in last_lines}, markers, opts.overwrite)
    if skipped:
        log.info("%d of %d shards already complete in %s; skipping them", len(skipped), len(last_lines), opts.output)

    run_id, metrics = uuid.uuid4().hex, {}
    planned = time.perf_counter()
    per_pass = opts.shards_per_pass or max(len(todo), 1)
    passes = [todo[i:i + per_pass] for i in range(0, len(todo), per_pass)]
    if test_pipeline is not None and len(passes) > 1:
        raise ValueError("a test_pipeline runs one pipeline; leave --shards_per_pass at 0")
    for n, group in enumerate(passes, start=1):
        p = test_pipeline or beam.Pipeline(options=opts)
        build(p, opts, spec, shards, group, last_lines, markers, run_id, started)
        result = p.run()
        result.wait_until_finish()
        metrics = progress.merge_metrics(metrics, progress.pipeline_metrics(result))
        if len(passes) > 1:
            log.info("pass %d/%d wrote %s", n, len(passes), ", ".join(_name(outputs[i]) for i in group))

    ran = time.perf_counter()
    wall_s = ran - start
    summary = summarize([outputs[i] for i in sorted(last_lines)], wall_s)
    limit = None if not opts.limit else {
        "records": opts.limit, "shards": [_name(shards[i]) for i in sorted(last_lines)],
        "last_line": last_lines[max(last_lines)]}
    phases = {"setup": planned - start, "pipelines": ran - planned, "summary": time.perf_counter() - ran}
    out = manifest.build_manifest(
        argv=argv, opts=opts, config=config, summary=summary,
        this_run=manifest.add_up(io.read_marker(outputs[i]) for i in todo),
        shard_names={"done": [_name(outputs[i]) for i in todo], "skipped": [_name(outputs[i]) for i in skipped]},
        input_shards=len(shards), limit=limit, metrics=metrics, timings=manifest.timings(metrics, phases, len(passes)),
        started=_iso(started), finished=_iso(time.time()), wall_s=wall_s)
    out_dir = opts.output.rstrip("/")
    io.write_json_atomic(out_dir + "/" + io.MANIFEST, out)
    from pipeline import prometheus, report  # here, not at the top: only `run` uses them

    # views of the manifest: the job's output is complete, so neither failing fails the job
    try:
        prometheus.write_metrics(out_dir + "/" + prometheus.METRICS, out)
    except Exception as e:  # noqa: BLE001
        log.warning("could not write the metrics file: %s: %s", type(e).__name__, e)
    data = {**{k: summary[k] for k in ("prompt_lengths", "completion_lengths", "error_examples")},
            "timeline": progress.timeline(run_id)}
    try:
        io.write_json_atomic(out_dir + "/" + report.DATA, data)
        report.write_report(out_dir + "/" + report.REPORT, out, data)
    except Exception as e:  # noqa: BLE001
        log.warning("could not write the run report: %s: %s", type(e).__name__, e)
    return {**out, "samples": summary["samples"]}


def _name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def summarize(output_urls: list[str], wall_s: float) -> dict[str, Any]:
    """Counts over the given output shards, from their completion markers (whatever the output
    format), checked against the shards' line counts; duplicate ids, a few sample records, and for
    the run report the completions' prompt and completion lengths ({tokens: completions}) and up
    to 3 examples per error type, read from the shards themselves in the same pass."""
    import fsspec

    ids, samples, counts = collections.Counter(), [], []
    prompt_lengths, completion_lengths = collections.Counter(), collections.Counter()
    error_examples: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for url in output_urls:
        marker = io.read_marker(url)
        if marker is None:
            raise RuntimeError(f"{url} has no completion marker {io.marker_url(url)}; the shard is not complete")
        lines = 0
        with fsspec.open(url, "r", encoding="utf-8") as f:
            for line in f:
                view = output_view(json.loads(line))  # the project's shape or OpenAI's
                lines += 1
                if view["id"] is not None:  # None: an OpenAI line that was not a request
                    ids[str(view["id"])] += 1
                if view["error_type"] is None:
                    prompt_lengths[view["prompt_tokens"]] += 1
                    completion_lengths[view["completion_tokens"]] += 1
                    if len(samples) < 3:
                        samples.append(view)
                elif len(error_examples[view["error_type"]]) < 3:
                    error_examples[view["error_type"]].append({"id": view["id"], "message": view["error_message"]})
        if lines != marker["records"]:
            raise RuntimeError(f"{url} has {lines} lines; its marker says {marker['records']} records")
        counts.append(marker)
    s = manifest.add_up(counts)
    return {**s, "shards": len(output_urls), "wall_s": round(wall_s, 2),
            "completion_tokens_per_s": round(s["completion_tokens"] / max(wall_s, 1e-9), 1),
            "duplicate_ids": manifest.duplicate_ids(ids), "samples": samples,
            "prompt_lengths": prompt_lengths, "completion_lengths": completion_lengths,
            "error_examples": dict(error_examples)}
