"""The RunInference ModelHandler: one engine per worker process, shared by its threads."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Iterable, Sequence

import yaml
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from model import PRESETS, Engine, EngineConfig
from model.engine import CHECKPOINTS
from pipeline.records import Request, Result

log = logging.getLogger(__name__)
NAMESPACE = "llm_batch"
# The engine last loaded in this process, by spec: the successive pipelines of one job
# (--shards_per_pass) on the in-process runner reuse it instead of loading and tracing it again.
_last_engine: dict["ModelSpec", Engine] = {}
_loading = threading.Lock()  # several Beam threads may ask for the engine at once: load it once
# Engine.stats() keys -> the Beam counters that add them up (seconds as whole milliseconds)
ENGINE_STATS = {"compile_s": "engine_compile_ms", "prefill_s": "engine_prefill_ms", "decode_s": "engine_decode_ms",
                "compiled_functions": "engine_compiled_functions", "prefill_calls": "engine_prefill_calls",
                "decode_calls": "engine_decode_calls", "spec_proposed": "engine_spec_proposed",
                "spec_accepted": "engine_spec_accepted", "spec_steps": "engine_spec_steps"}


@dataclasses.dataclass
class _Counted:
    """An engine of this process, its load time, its cumulative numbers as last added to the Beam
    counters (the handler threads that share the engine each add only what is new since), and the
    job runs that have counted it in their "engines" counter."""

    engine: Any
    load_s: float | None
    counted: dict[str, int] = dataclasses.field(default_factory=dict)
    runs: set[str] = dataclasses.field(default_factory=set)


_counted: dict[int, _Counted] = {}  # by id(engine)
_counting = threading.Lock()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which checkpoint to serve and how; parsed once from --model (a name, a path, or YAML). A
    YAML is flat: ModelSpec's own keys and EngineConfig's (max_slots, max_len, decode_steps, ...)."""

    checkpoint: str = "demo"
    dtype: str = "bfloat16"
    mesh_shape: tuple[int, int] | None = None
    quantize: str | None = None  # "int8": int8 weights
    engine: EngineConfig = EngineConfig()

    @classmethod
    def parse(cls, model: str, **overrides: Any) -> "ModelSpec":
        """overrides: values that win over the YAML's (None: not given), of either kind of key."""
        own = {f.name for f in dataclasses.fields(cls)} - {"engine"}
        served = {f.name for f in dataclasses.fields(EngineConfig)}
        fields: dict[str, Any] = {"checkpoint": model}
        if model.endswith((".yaml", ".yml")):
            with open(model) as f:
                fields = yaml.safe_load(f) or {}
            unknown = set(fields) - own - served
            if unknown:
                raise ValueError(f"{model}: unknown keys {sorted(unknown)}; expected {sorted(own | served)}")
            fields.setdefault("checkpoint", "demo")
            for key in ("checkpoint", "draft"):  # paths relative to the YAML
                ckpt = fields.get(key)
                if isinstance(ckpt, str) and not ("://" in ckpt or os.path.isabs(ckpt) or ckpt in CHECKPOINTS
                                                  or ckpt in PRESETS):
                    fields[key] = os.path.normpath(os.path.join(os.path.dirname(model), ckpt))
        fields.update({k: v for k, v in overrides.items() if v is not None})
        if fields.get("mesh_shape") is not None:
            fields["mesh_shape"] = tuple(fields["mesh_shape"])
        engine = EngineConfig(**{k: v for k, v in fields.items() if k in served})
        return cls(**{k: v for k, v in fields.items() if k in own}, engine=engine)

    def load(self) -> Engine:
        return Engine.from_pretrained(self.checkpoint, mesh_shape=self.mesh_shape, dtype=self.dtype,
                                      quantize=self.quantize, config=self.engine)

    def flat(self) -> dict[str, Any]:
        """The spec as a YAML would hold it: its own keys and the engine's, side by side."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "engine"}
        return {**own, **dataclasses.asdict(self.engine)}


class EngineHandler(ModelHandler[Sequence[Request], Result, Engine]):
    """Runs pre-batched Requests (token ids filled in) through the engine's loop; never fails a
    batch for one bad record. Batches from several threads share the engine's slots."""

    def __init__(self, spec: ModelSpec, share_across_processes: bool = False, run_id: str = ""):
        """run_id: the job run's id; each engine counts once per run in the "engines" counter."""
        super().__init__()
        self.spec, self.run_id = spec, run_id
        self._share = share_across_processes
        self._latency = Metrics.distribution(NAMESPACE, "batch_latency_ms")
        self._tokens_per_s = Metrics.distribution(NAMESPACE, "batch_tokens_per_s")
        self._batch_records = Metrics.distribution(NAMESPACE, "batch_records")
        self._engine_wait = Metrics.distribution(NAMESPACE, "batch_engine_wait_us")
        self._host = Metrics.distribution(NAMESPACE, "batch_host_us")

    def load_model(self) -> Engine:
        with _loading:
            if self.spec in _last_engine:
                return _last_engine[self.spec]
            start = time.perf_counter()
            engine = self.spec.load()
            load_s = time.perf_counter() - start
            log.info("loaded %s in %.1fs", self.spec.checkpoint, load_s)
            _last_engine.clear()
            _last_engine[self.spec] = engine
            with _counting:
                _counted.clear()
                _counted[id(engine)] = _Counted(engine, load_s)
            return engine

    def share_model_across_processes(self) -> bool:
        return self._share

    def batch_elements_kwargs(self):
        return {"max_batch_size": 1}  # batches arrive pre-formed by token budget (see job.py)

    def run_inference(self, batch: Sequence[Sequence[Request]], engine: Engine,
                      inference_args: dict | None = None) -> Iterable[list[Result]]:
        return [self._generate(list(requests), engine) for requests in batch]

    def _generate(self, requests: list[Request], engine: Engine) -> list[Result]:
        """Submits the batch to the engine's loop, where it joins whatever other threads submitted,
        and waits for it. A request refused at submission or failed on the device is retried alone,
        so one bad request fails only itself."""
        start, waited = time.perf_counter(), 0.0

        def wait(future: concurrent.futures.Future):
            nonlocal waited
            t = time.perf_counter()
            try:
                return future.result()
            finally:
                waited += time.perf_counter() - t

        scoring = [(i, r) for i, r in enumerate(requests) if r.score_choices is not None]
        done, sampling = self._score(scoring, engine), []  # results of requests that need no generation
        for i, r in enumerate(requests):
            if i in done:
                continue
            try:
                sampling.append(r.sampling(engine))
            except ValueError as e:  # a constraint that does not compile fails its own record
                done[i] = r.fail("invalid_parameter", f"{_constraint_field(r)}: {e}")
        ready = [r for i, r in enumerate(requests) if i not in done]
        try:
            futures = iter(engine.submit([r.token_ids for r in ready], sampling) if ready else [])
        except Exception:  # noqa: BLE001 (one bad request refuses the whole call: submit one by one)
            futures = iter([self._submit_one(r, engine, sp) for r, sp in zip(ready, sampling)])
        results = []
        for i, r in enumerate(requests):
            if i in done:
                results.append(done[i])
                continue
            f = next(futures)
            try:
                out = wait(f)
            except Exception:  # noqa: BLE001 (a failed step fails all it held: retry this one alone)
                try:
                    out = wait(self._submit_one(r, engine, r.sampling(engine)))
                except Exception as e:  # noqa: BLE001
                    log.warning("record %s failed: %s: %s", r.id, type(e).__name__, e)
                    results.append(r.fail("generation_failed", f"{type(e).__name__}: {e}"))
                    continue
            results.append(r.result(out))
        self._prompt_logprobs(requests, results, engine)
        elapsed = time.perf_counter() - start
        generated = sum(res.completion_tokens for res in results)
        self._latency.update(int(elapsed * 1000))
        self._tokens_per_s.update(int(generated / max(elapsed, 1e-9)))
        self._batch_records.update(len(requests))
        self._engine_wait.update(round(waited * 1e6))
        self._host.update(round((elapsed - waited) * 1e6))
        for name, n in _new_engine_numbers(engine, self.run_id).items():
            Metrics.counter(NAMESPACE, name).inc(n)
        return results

    @staticmethod
    def _prompt_logprobs(requests: list[Request], results: list[Result], engine: Engine) -> None:
        """Adds the prompt tokens' log-probabilities to the results of the requests that asked; a
        record whose prompt logprobs fail becomes a generation_failed error."""
        want = [k for k, (r, res) in enumerate(zip(requests, results)) if r.prompt_logprobs and res.error is None]
        found = _batch_or_alone(want, lambda ks: engine.prompt_logprobs([requests[k].token_ids for k in ks]))
        for k, out in zip(want, found):
            if isinstance(out, Exception):
                results[k] = requests[k].fail("generation_failed", f"prompt_logprobs: {_why(out)}")
            else:
                results[k].prompt_logprobs = out

    @staticmethod
    def _score(scoring: list[tuple[int, Request]], engine: Engine) -> dict[int, Result]:
        """The results of the score_choices requests, by index."""
        found = _batch_or_alone([r for _, r in scoring],
                                lambda rs: engine.score([r.token_ids for r in rs], [r.choice_ids for r in rs]))
        return {i: r.fail("generation_failed", _why(out)) if isinstance(out, Exception) else r.scored(out)
                for (i, r), out in zip(scoring, found)}

    @staticmethod
    def _submit_one(r: Request, engine: Engine, sampling) -> concurrent.futures.Future:
        try:
            return engine.submit([r.token_ids], sampling)[0]
        except Exception as e:  # noqa: BLE001
            failed = concurrent.futures.Future()
            failed.set_exception(e)
            return failed


def _batch_or_alone(items: list, call) -> list:
    """call(items) -> one output per item, in order. If the batched call fails, each item is
    called alone, so a bad one fails (its output is the exception) and the others do not."""
    if not items:
        return []
    try:
        return list(call(items))
    except Exception:  # noqa: BLE001
        pass
    found = []
    for item in items:
        try:
            found.append(call([item])[0])
        except Exception as e:  # noqa: BLE001
            log.warning("a record failed alone: %s", _why(e))
            found.append(e)
    return found


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _constraint_field(r: Request) -> str:
    """How a request's constraint was asked for, for its error message."""
    kind, _ = r.constraint
    return {"regex": "guided_regex", "choice": "guided_choice"}.get(kind, "the JSON schema")


def engine_numbers(engine: Any, load_s: float | None) -> dict[str, int]:
    """The engine's cumulative numbers under their Beam counter names: its load time when this
    process loaded it, and whatever of ENGINE_STATS its `stats()` reports (an engine without
    `stats`, or whose `stats()` fails, reports none of them)."""
    numbers = {} if load_s is None else {"engine_load_ms": round(load_s * 1000)}
    stats = getattr(engine, "stats", None)
    try:
        found = stats() if callable(stats) else {}
        return {**numbers, **{name: round(found[key] * 1000) if key.endswith("_s") else int(found[key])
                              for key, name in ENGINE_STATS.items() if key in found}}
    except Exception as e:  # noqa: BLE001 (numbers about a batch never fail it)
        log.debug("Engine.stats() failed: %s: %s", type(e).__name__, e)
        return numbers


def _new_engine_numbers(engine: Any, run_id: str) -> dict[str, int]:
    """What the engine did since its numbers were last counted in this process, and "engines": 1
    the first time this run counts it. Counted as deltas of cumulative whole-ms values, so the
    counters add up to the engine's totals exactly."""
    with _counting:
        entry = _counted.get(id(engine))
        if entry is None or entry.engine is not engine:  # a shared engine loaded by another process
            entry = _counted[id(engine)] = _Counted(engine, None)
        now = engine_numbers(engine, entry.load_s)
        new = {k: v - entry.counted.get(k, 0) for k, v in now.items()}
        new["engines"] = int(run_id not in entry.runs)
        entry.counted = now
        entry.runs.add(run_id)
    return new
