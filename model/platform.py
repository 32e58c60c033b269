"""Which accelerators this host has, judged from device files, and quiet start-up defaults.

Asking JAX would open the accelerator, and a TPU opens in one process only; so the launching
process of a job, and this module, look at /dev instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import sys
import threading

TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*",)


def has_tpu() -> bool:
    return any(glob.glob(p) for p in TPU_DEVICE_FILES)


def has_gpu() -> bool:
    return any(glob.glob(p) for p in GPU_DEVICE_FILES)


def quiet_defaults() -> None:
    """Environment defaults, set before jax and tensorflow are imported (an explicit setting wins).

    Workaround, CPU hosts: with libtpu installed (for deviceless TPU compilation) JAX probes for a
    TPU and logs libtpu's host-discovery errors, and TensorFlow (imported only to tokenize) logs
    its CUDA probe; none of it means anything on a host without accelerators. So there JAX runs on
    the CPU alone and TensorFlow logs only fatal errors. With accelerators, TensorFlow still logs
    errors, not its info and warnings.
    """
    accelerated = has_tpu() or has_gpu()
    if not accelerated:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if accelerated else "3")


_silenced = {"depth": 0, "saved": -1}
_silenced_lock = threading.Lock()


@contextlib.contextmanager
def native_stderr_silenced():
    """Workaround: TensorFlow 2.21 and sentencepiece print C++ start-up logs (oneDNN, the CUDA
    stub probe, "precompiled_charsmap is empty") straight to file descriptor 2, before any log
    level applies. On a host without accelerators, this sends fd 2 to /dev/null for the duration
    (an import, a model load); Python exceptions still propagate. Elsewhere it does nothing.
    Threads may overlap: the first to enter saves fd 2, the last to leave restores it."""
    if has_tpu() or has_gpu() or os.environ.get("LLM_BATCH_NATIVE_LOGS"):
        yield
        return
    with _silenced_lock:
        if _silenced["depth"] == 0:
            sys.stderr.flush()
            _silenced["saved"] = os.dup(2)
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 2)
        _silenced["depth"] += 1
    try:
        yield
    finally:
        with _silenced_lock:
            _silenced["depth"] -= 1
            if _silenced["depth"] == 0:
                os.dup2(_silenced["saved"], 2)
                os.close(_silenced["saved"])


# ---------------------------------------------------------------- the hot path per platform

@dataclasses.dataclass(frozen=True)
class HotPath:
    """How the engine runs on one platform: the one place that chooses it.

    stacked: each per-layer weight is one [layers, ...] array and the layers run as a `lax.scan`,
        with one stacked KV cache [layers, slots, kv_heads, len, head_dim] carried through it and
        written in place (compile time independent of depth; decode compiles once). False is the
        XLA:CPU path: one array per layer in an unrolled loop, and a cache split into per-layer
        chunks with one decode compile per count of live chunks (slicing a stacked array copies
        it on XLA:CPU).
    attention: over the stacked cache, "pallas" (model/ragged_attention.py: reads only each row's
        live blocks) or "xla" (the reference: masks all of max_len).
    interpret: run Pallas kernels in interpret mode (the TPU path on a CPU host, for tests).
    min_prefill_tokens: a prefill call runs at least this many tokens (rows x bucket), padding
        rows added. Below about this many, a prefill only streams the weights once: at bf16 a
        chip does 2 flops per weight byte per token, and its peak flops over its HBM bandwidth
        is about 240 (v5e), 560 (v6e), 300 (H100), 200 (H200) flops per byte, so fewer tokens
        take the weights' read time whatever their count. Each row count left out is a function
        fewer to compile at warm-up. 0 on the CPU, whose compute is the bound.
    buckets_per_octave: prompt lengths a prefill pads to per doubling (config.buckets_for). 4 on
        the CPU, where a prefill's time follows its padded tokens and a compile takes seconds: a
        65-token prompt runs 80 tokens, not 128. 1 on TPU and GPU, where each prefill
        shape is a compile of 6-20 s at warm-up (an 8B on v5e-8).
    outputs_first: matmul weights stored with their output dims first ([out, in]), and matmuls of
        up to decoder.FEATURES_MAX_ROWS rows run as w @ x^T. True on the CPU, where that form of
        a 16-row product runs about twice as fast as x @ w over [in, out] weights (both XLA:CPU;
        launch/bench_matmul.py's jax-outputs-first); the TPU and GPU compilers pick their own layouts.
    cost_model: a copy of the engine for cost analysis only (launch/aot.py): the stacked path's
        layers run unrolled over one weight array per layer (cost analysis counts a loop's body
        once, and a static slice of a stacked weight as a read of the whole stack), with the
        stacked cache and kernel as they are, and every row sampled greedily (it counts a
        conditional's most expensive branch).
    """

    name: str
    stacked: bool
    attention: str = "xla"
    interpret: bool = False
    cost_model: bool = False
    min_prefill_tokens: int = 0
    buckets_per_octave: int = 1
    outputs_first: bool = False

    @property
    def stacked_weights(self) -> bool:
        """Per-layer weights as one [layers, ...] array each, run as a lax.scan."""
        return self.stacked and not self.cost_model


HOT_PATHS = ("auto", "cpu", "tpu", "gpu")


def hot_path(platform: str, choice: str = "auto") -> HotPath:
    """The hot path for devices of `platform` ("cpu", "tpu", "gpu"). `choice` other than "auto"
    forces one: "tpu" on a CPU runs the TPU code with its kernels interpreted."""
    if choice not in HOT_PATHS:
        raise ValueError(f"hot_path={choice!r}; expected one of {HOT_PATHS}")
    name = platform if choice == "auto" else choice
    if name == "tpu":
        return HotPath("tpu", stacked=True, attention="pallas", interpret=platform != "tpu", min_prefill_tokens=256)
    if name == "gpu":
        return HotPath("gpu", stacked=True, attention="xla", min_prefill_tokens=256)
    return HotPath("cpu", stacked=False, buckets_per_octave=4, outputs_first=True)
