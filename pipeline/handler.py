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
            ckpt = fields.get("checkpoint", "demo")
            if not ("://" in ckpt or os.path.isabs(ckpt) or ckpt in CHECKPOINTS or ckpt in PRESETS):
                fields["checkpoint"] = os.path.normpath(os.path.join(os.path.dirname(model), ckpt))
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

    def __init__(self, spec: ModelSpec, share_across_processes: bool = False):
        super().__init__()
        self.spec = spec
        self._share = share_across_processes
        self._latency = Metrics.distribution(NAMESPACE, "batch_latency_ms")
        self._tokens_per_s = Metrics.distribution(NAMESPACE, "batch_tokens_per_s")
        self._batch_records = Metrics.distribution(NAMESPACE, "batch_records")

    def load_model(self) -> Engine:
        with _loading:
            if self.spec in _last_engine:
                return _last_engine[self.spec]
            start = time.perf_counter()
            engine = self.spec.load()
            log.info("loaded %s in %.1fs", self.spec.checkpoint, time.perf_counter() - start)
            _last_engine.clear()
            _last_engine[self.spec] = engine
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
        start = time.perf_counter()
        try:
            futures = engine.submit([r.token_ids for r in requests], [r.sampling() for r in requests])
        except Exception:  # noqa: BLE001 (one bad request refuses the whole call: submit one by one)
            futures = [self._submit_one(r, engine) for r in requests]
        results = []
        for r, f in zip(requests, futures):
            try:
                out = f.result()
            except Exception:  # noqa: BLE001 (a failed step fails all it held: retry this one alone)
                try:
                    out = self._submit_one(r, engine).result()
                except Exception as e:  # noqa: BLE001
                    log.warning("record %s failed: %s: %s", r.id, type(e).__name__, e)
                    results.append(r.fail("generation_failed", f"{type(e).__name__}: {e}"))
                    continue
            results.append(r.result(out))
        elapsed = time.perf_counter() - start
        generated = sum(res.completion_tokens for res in results)
        self._latency.update(int(elapsed * 1000))
        self._tokens_per_s.update(int(generated / max(elapsed, 1e-9)))
        self._batch_records.update(len(requests))
        return results

    @staticmethod
    def _submit_one(r: Request, engine: Engine) -> concurrent.futures.Future:
        try:
            return engine.submit([r.token_ids], r.sampling())[0]
        except Exception as e:  # noqa: BLE001
            failed = concurrent.futures.Future()
            failed.set_exception(e)
            return failed
