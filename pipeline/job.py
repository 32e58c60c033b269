"""The job: read -> parse + tokenize -> batch by token budget and length bucket -> generate ->
detokenize -> write one output shard per input shard.

Every input record ends as exactly one output line, a completion or an error with a reason.
"""

from __future__ import annotations

import bisect
import collections
import json
import logging
import time
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from model import ModelConfig, load_tokenizer, read_hf_config, resolve_checkpoint
from model.tokenizer import decode_completions
from pipeline import io
from pipeline.handler import NAMESPACE, EngineHandler, ModelSpec
from pipeline.options import DEFAULT_RUNNER, JobOptions
from pipeline.records import Request, Result, error, parse

log = logging.getLogger(__name__)
BUCKETS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def context_length(spec: ModelSpec) -> int:
    """Tokens a sequence may hold: the engine's max_len (the same default as Engine.from_pretrained)."""
    cfg = ModelConfig.from_hf_config(read_hf_config(resolve_checkpoint(spec.checkpoint)))
    return spec.max_len or min(2048, cfg.max_position_embeddings)


class ReadAndTokenize(beam.DoFn):
    """One input shard -> a Request per good record (tokenized) and an error Result per bad one."""

    ERRORS = "errors"

    def __init__(self, spec: ModelSpec, fmt: str, defaults: dict[str, Any], chunk: int = 512):
        self.spec, self.fmt, self.defaults, self.chunk = spec, fmt, defaults, chunk
        self.records_in = Metrics.counter(NAMESPACE, "records_in")
        self.prompt_tokens = Metrics.counter(NAMESPACE, "prompt_tokens")

    def setup(self):
        self.tokenizer = load_tokenizer(resolve_checkpoint(self.spec.checkpoint))
        if self.tokenizer is None:
            raise ValueError(f"checkpoint {self.spec.checkpoint!r} has no tokenizer.model or tokenizer.json")
        self.max_len = context_length(self.spec)

    def process(self, shard: tuple[int, str]):
        index, url = shard
        name = url.rsplit("/", 1)[-1]
        fmt = io.shard_format(url, self.fmt)
        pending: list[Request] = []
        for line, raw in io.read_lines(url):
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
        for req, ids in zip(requests, self.tokenizer.encode_batch([r.prompt for r in requests])):
            req.token_ids = ids
            room = self.max_len - len(ids)
            if room < 1:
                yield beam.pvalue.TaggedOutput(self.ERRORS, error(
                    req.id, req.shard, req.line, "prompt_too_long",
                    f"prompt has {len(ids)} tokens; the model's context is {self.max_len}"))
            elif req.max_tokens > room and req.max_tokens_given:
                yield beam.pvalue.TaggedOutput(self.ERRORS, error(
                    req.id, req.shard, req.line, "invalid_parameter",
                    f"max_tokens={req.max_tokens} but the prompt's {len(ids)} tokens leave room for {room} "
                    f"in the model's context of {self.max_len}"))
            else:
                req.max_tokens = min(req.max_tokens, room)
                self.prompt_tokens.inc(len(ids))
                yield req


class BatchByTokens(beam.DoFn):
    """Groups Requests of one length bucket until their prompt + max_tokens reach a token budget.

    Beam's BatchElements offers either a size function (a token budget) or length buckets, not
    both at once; this small DoFn does both within a bundle.
    """

    def __init__(self, budget: int):
        self.budget = budget

    def start_bundle(self):
        self._open: dict[int, list[Request]] = collections.defaultdict(list)
        self._size: dict[int, int] = collections.defaultdict(int)

    def process(self, req: Request):
        bucket = bisect.bisect_left(BUCKETS, len(req.token_ids))
        self._open[bucket].append(req)
        self._size[bucket] += len(req.token_ids) + req.max_tokens
        if self._size[bucket] >= self.budget:
            yield self._open.pop(bucket)
            self._size.pop(bucket)

    def finish_bundle(self):
        for batch in self._open.values():
            yield WindowedValue(batch, GlobalWindow().max_timestamp(), [GlobalWindow()])


class Detokenize(beam.DoFn):
    """Token ids -> text; cuts at the first stop string (not included), finish_reason "stop"."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.completion_tokens = Metrics.counter(NAMESPACE, "completion_tokens")

    def setup(self):
        self.tokenizer = load_tokenizer(resolve_checkpoint(self.spec.checkpoint))

    def process(self, results: list[Result]):
        ok = [r for r in results if r.error is None]
        texts = decode_completions(self.tokenizer, [r.prompt_ids for r in ok], [r.token_ids for r in ok])
        it = iter(texts)
        for r in results:
            if r.error is None:
                r.completion = next(it)
                self.completion_tokens.inc(r.completion_tokens)
                cut = min((i for i in (r.completion.find(s) for s in r.stop) if i >= 0), default=-1)
                if cut >= 0:
                    r.completion, r.finish_reason = r.completion[:cut], "stop"
            r.token_ids, r.prompt_ids = [], []
            yield r


class WriteShard(beam.DoFn):
    """All results of one input shard -> its output shard, in input line order, written atomically."""

    def __init__(self, output_urls: list[str]):
        self.output_urls = output_urls
        self.records_out = Metrics.counter(NAMESPACE, "records_out")
        self.errors = Metrics.counter(NAMESPACE, "errors")

    def process(self, keyed: tuple[int, Iterable[Result | None]]):
        shard, results = keyed
        results = sorted((r for r in results if r is not None), key=lambda r: r.line)
        io.write_atomic(self.output_urls[shard], [r.to_json() for r in results])
        self.records_out.inc(len(results))
        self.errors.inc(sum(r.error is not None for r in results))
        yield shard, len(results)


def build(p: beam.Pipeline, opts: JobOptions, spec: ModelSpec, shards: list[str]) -> beam.PCollection:
    """Adds the job's steps to `p`; returns (shard index, records written) per shard."""
    defaults = {"max_tokens": opts.max_tokens, "temperature": opts.temperature, "top_p": opts.top_p,
                "top_k": opts.top_k}
    share = opts.share_model == "true" or (opts.share_model == "auto" and _on_accelerator())
    output_urls = [io.output_url(opts.output, s) for s in shards]

    indexed = p | "ListShards" >> beam.Create(list(enumerate(shards)))
    parsed = (indexed | "SpreadShards" >> beam.Reshuffle()
              | "ReadAndTokenize" >> beam.ParDo(ReadAndTokenize(spec, opts.format, defaults)).with_outputs(
                  ReadAndTokenize.ERRORS, main="requests"))
    completions = (parsed.requests
                   | "BatchByTokens" >> beam.ParDo(BatchByTokens(opts.batch_tokens))
                   | "Generate" >> RunInference(EngineHandler(spec, share))
                   | "Detokenize" >> beam.ParDo(Detokenize(spec)))
    # every shard gets a marker, so an input shard with no records still gets an (empty) output shard
    markers = indexed | "ShardMarkers" >> beam.Map(lambda s: (s[0], None))
    keyed = ((completions, parsed[ReadAndTokenize.ERRORS]) | "AllResults" >> beam.Flatten()
             | "KeyByShard" >> beam.Map(lambda r: (r.shard, r)))
    return ((keyed, markers) | "WithMarkers" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(WriteShard(output_urls)))


def _on_accelerator() -> bool:
    import jax

    return jax.default_backend() != "cpu"


def parse_options(argv: list[str] | None) -> tuple[JobOptions, ModelSpec]:
    opts = PipelineOptions(argv).view_as(JobOptions)
    if opts.view_as(StandardOptions).runner is None:
        opts.view_as(StandardOptions).runner = DEFAULT_RUNNER
    spec = ModelSpec.parse(opts.model, dtype=opts.dtype, max_len=opts.max_len, max_slots=opts.max_slots)
    if opts.batch_tokens < 1:
        raise ValueError(f"--batch_tokens={opts.batch_tokens}; must be >= 1")
    return opts, spec


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Runs the job to completion; returns a summary read back from the output shards."""
    opts, spec = parse_options(argv)
    shards = io.discover_shards(opts.input)
    start = time.perf_counter()
    p = test_pipeline or beam.Pipeline(options=opts)
    build(p, opts, spec, shards)
    p.run().wait_until_finish()
    return summarize([io.output_url(opts.output, s) for s in shards], time.perf_counter() - start)


def summarize(output_urls: list[str], wall_s: float) -> dict[str, Any]:
    import fsspec

    s = collections.Counter()
    samples, errors_by_type = [], collections.Counter()
    for url in output_urls:
        with fsspec.open(url, "r", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                s["records"] += 1
                if "error" in rec:
                    errors_by_type[rec["error"]["type"]] += 1
                    continue
                s["completions"] += 1
                s["prompt_tokens"] += rec["prompt_tokens"]
                s["completion_tokens"] += rec["completion_tokens"]
                if len(samples) < 3:
                    samples.append(rec)
    return {**s, "errors": sum(errors_by_type.values()), "errors_by_type": dict(errors_by_type),
            "shards": len(output_urls), "wall_s": round(wall_s, 2),
            "completion_tokens_per_s": round(s["completion_tokens"] / max(wall_s, 1e-9), 1), "samples": samples}
