"""Compile the engine for a TPU slice on a host without one: does a configuration fit, and how
close do its decode and prefill steps come to the chip's HBM and compute rooflines?

The engine is built abstract (`Engine.abstract`: weights, KV cache and slot state are
ShapeDtypeStructs with the shardings the real ones get), on a mesh of the devices of a TPU
topology from `jax.experimental.topologies`. Its own jitted prefill and decode are then lowered
and compiled by libtpu; the executable's memory and cost analyses are the instruments. Nothing
runs on a TPU and no weights are read: every figure is the TPU compiler's estimate for the
engine's code as it is.

Per chip (the SPMD program is one chip's):
  - bytes: arguments, outputs, temporaries and the peak of each function, against the chip's HBM;
  - decode, per step: bytes accessed against the ideal (the weights a step reads + the live KV).
    On the TPU path decode compiles once and its attention kernel reads each slot's live blocks:
    its cache bytes are counted from the blocks it fetches for each --live_fraction (cost
    analysis cannot see inside a kernel), the rest from cost analysis. Cost analysis counts a
    loop's body once, so the layer loop's cost comes from 1- and 2-layer copies of the model
    compiled unrolled. (--hot_path cpu compiles the CPU path instead: one decode per count of
    live KV chunks);
  - prefill: flops against the ideal (matmuls + causal attention) and the compute roofline;
  - compile seconds of each function and, with --warmup, of everything Engine.warmup() compiles.

Run:  python -m launch.aot --model llama-3.1-8b --topology v5e:2x4 --mesh 1,8 \\
          --max_slots 128 --max_len 4096 --live_fraction 0.25,0.5,1 --json aot.json
Needs the `libtpu` package (requirements-dev.txt). Its warning about TPU_ACCELERATOR_TYPE on a
host without TPUs is harmless.
"""

from __future__ import annotations

import os

# The host only traces; the TPU devices come from the topology, not from a backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Workaround: libtpu on a host without TPUs logs an INVALID_ARGUMENT error about this variable
# (harmless); on a TPU VM the platform sets it.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# Workaround: libtpu takes a host-wide lock file even to compile, so a second process on the host
# (another compile, a test) fails with "libtpu multi-process lockfile". Compiling opens no TPU.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from model import ragged_attention as ragged  # noqa: E402
from model.config import PRESETS, ModelConfig  # noqa: E402
from model.engine import Engine, resolve_checkpoint  # noqa: E402
from model.sampling import CANDIDATES  # noqa: E402
from model.sharding import bytes_per_device, make_mesh, split_experts  # noqa: E402

GiB = 2 ** 30
# For the cost copies (whole_model_cost): XLA's TPU cost analysis counts the bytes of every memory
# space, so an operand that memory-space assignment prefetches into VMEM counts its HBM read, the
# VMEM write and the VMEM reads (a lone [8, 4096] x [4096, 1792] bf16 matmul: 73.5 MB for a 14.7
# MB weight). With prefetching off every operand is read from HBM at each use (14.8 MB there):
# the HBM traffic of the program without VMEM reuse, an upper bound on the real program's.
# The compiler also splits a matmul whose input is all-gathered, or whose output is
# reduce-scattered, into a loop over the devices' shards (a windowed einsum, overlapping the
# transfers with the matmul); cost analysis counts a loop's body once, so it would see 1/4 of
# those matmuls. The cost copies compile them whole: the same matmuls, counted in full.
COST_OPTIONS = {"xla_msa_enable": False, "xla_max_cross_program_prefetches": 0,
                "xla_tpu_enable_windowed_einsum_for_all_gather": False,
                "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
ESTIMATES = ("TPU compiler estimates (libtpu, deviceless): memory_analysis() and cost_analysis() of the "
             "engine's own jitted functions; nothing ran on a TPU")


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    hbm_bytes_per_s: float
    peak_bf16_flops: float


# Per chip, as Google Cloud publishes them.
CHIPS: dict[str, Chip] = {
    "v4": Chip(32 * GiB, 1228e9, 275e12),
    "v5e": Chip(16 * GiB, 819e9, 197e12),
    "v5p": Chip(95 * GiB, 2765e9, 459e12),
    "v6e": Chip(32 * GiB, 1640e9, 918e12),
}


def chip_of(topology: str) -> tuple[str, Chip]:
    kind = topology.split(":")[0]
    if kind not in CHIPS:
        raise ValueError(f"topology {topology!r}: chip {kind!r} is not in the chip table; known: {sorted(CHIPS)}")
    return kind, CHIPS[kind]


def tpu_devices(topology: str) -> list:
    """The devices of a TPU slice, e.g. "v5e:2x4" (a whole number of hosts: "v5e:2x2" is the
    smallest v5e)."""
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001  (libtpu missing, or a topology it refuses)
        raise SystemExit(f"cannot describe TPU topology {topology!r}: {type(e).__name__}: {str(e).splitlines()[0]}")


def model_config(name_or_path: str) -> ModelConfig:
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = resolve_checkpoint(name_or_path)
    if "://" in path or os.path.isdir(path):
        from model.weights import read_hf_config
        return ModelConfig.from_hf_config(read_hf_config(path))
    raise SystemExit(f"--model {name_or_path!r} is neither a preset nor a checkpoint directory; "
                     f"presets: {', '.join(sorted(PRESETS))}")


# ---------------------------------------------------------------- sizes from the abstract engine

def decode_weight_bytes(engine: Engine) -> int:
    """Weight bytes per chip a decode step reads: all of them, except that an untied embedding
    table is only gathered from (one row per slot), and of a mixture of experts only the experts
    some row of the chip picks (expected_experts_hit)."""
    total = bytes_per_device(engine.params)
    if not engine.cfg.tie_word_embeddings:
        total -= bytes_per_device(engine.params["embed"])
    cfg = engine.cfg
    if cfg.num_experts:
        experts = bytes_per_device([engine.params[n] for n in ("w_gate", "w_up", "w_down")])
        hit = expected_experts_hit(cfg, engine.max_slots // engine.mesh.shape["data"])
        total -= round(experts * (1 - hit / cfg.num_experts))
    return total


def expected_experts_hit(cfg: ModelConfig, rows: int) -> float:
    """Distinct experts per layer that `rows` tokens pick, num_experts_per_tok each, if the router
    picked uniformly: E (1 - (1 - k/E)^rows). Mixtral (top-2 of 8) at 64 rows: 8.0 (all of them);
    Qwen3-30B-A3B (top-8 of 128): 125.9. A trained router is not uniform, so the real count is
    somewhat lower."""
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    return e * (1 - (1 - k / e) ** rows)


def prefill_ideal_flops(cfg: ModelConfig, rows: int, length: int) -> float:
    """The flops a prefill of `rows` prompts of `length` tokens must do: 2 per weight per token in
    the layers' matmuls (of a mixture of experts, the router's and the chosen experts'), the head
    on each row's last token only (as the engine does), and causal attention (scores and values:
    4 flops per query head, head dim and visible key)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    mlp = 3 * d * f * cfg.num_experts_per_tok + d * cfg.num_experts if cfg.num_experts else 3 * d * f  # + router
    layer = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + mlp
    def visible(window):  # keys each query of a layer sees, summed
        return sum(min(i + 1, window or length) for i in range(length))
    attention = 4 * cfg.num_heads * hd * sum(visible(w) for w in cfg.layer_windows)
    return rows * (2 * layer * cfg.num_layers * length + 2 * d * cfg.vocab_size + attention)


def kernel_cache_bytes(engine: Engine, starts: Sequence[int], t: int) -> int:
    """Cache bytes per chip the attention kernel fetches in one pass over all layers, for rows on
    one chip in slots 0.. at positions starts + [0, t): its block fetches (blocks_fetched, checked
    against the kernel in tests/test_ragged_attention.py) times the bytes of a key block plus a
    value block (and their scales when int8). Cost analysis cannot see inside the kernel."""
    k = engine.cache.k
    layers, slots, heads, max_len, head_dim = k.sharding.shard_shape(k.shape)
    block_q, block_k = ragged.default_blocks(t, max_len, engine.cfg.num_heads // engine.cfg.num_kv_heads)
    blocks = sum(ragged.blocks_fetched(np.asarray(starts), t, window=window, block_k=block_k, block_q=block_q,
                                       max_len=max_len, slots=np.arange(len(starts)) % slots, num_slots=slots)
                 for window in engine.cfg.layer_windows)  # per layer: Gemma's alternate windows
    block = block_k * head_dim * np.dtype(k.dtype).itemsize + (4 * block_k if engine.cache.k_scale is not None else 0)
    return heads * blocks * 2 * block


def whole_model_cost(small_engine, lower_of, num_layers: int) -> tuple[float, float, float]:
    """(flops, bytes accessed, compile s) per chip of a function of the stacked path for the whole
    model. Cost analysis counts a loop's body once, and the stacked path runs the layers as one,
    so two small copies of the model (1 and 2 layers, the loop unrolled) are compiled and the
    per-layer difference extrapolated: c(1) + (layers - 1) * (c(2) - c(1))."""
    c1, c2 = (compile_lowered(f"{n} layer(s)", lambda n=n: lower_of(small_engine(n)), COST_OPTIONS) for n in (1, 2))
    per_layer = (c2.flops - c1.flops, c2.bytes_accessed - c1.bytes_accessed)
    return (c1.flops + (num_layers - 1) * per_layer[0], c1.bytes_accessed + (num_layers - 1) * per_layer[1],
            c1.compile_s + c2.compile_s)


def sampler_bytes(engine: Engine) -> float:
    """Bytes accessed per chip by one decode step's sampler when some row samples (temperature >
    0): compiled on its own, since the engine's decode copies used for costs sample greedily."""
    from model.sampling import sample
    from model.sharding import named_sharding
    s = engine.max_slots
    def struct(shape, dtype, axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=named_sharding(axes, shape, engine.mesh))
    rows = lambda dtype: struct((s,), dtype, ("slots",))  # noqa: E731
    args = (struct((s, engine.cfg.vocab_size), np.float32, ("slots", "vocab")), rows(np.float32), rows(np.int32),
            rows(np.float32), rows(np.uint32), rows(np.int32))
    common = functools.partial(sample, exact_fallback=False)  # the rare exact fallback left out
    return compile_lowered("sampler", lambda: jax.jit(common).lower(*args), COST_OPTIONS).bytes_accessed


# ---------------------------------------------------------------- compiling

@dataclasses.dataclass
class Compiled:
    name: str
    compile_s: float
    memory: dict[str, int] | None = None
    flops: float = 0.0
    bytes_accessed: float = 0.0
    error: str | None = None  # the compiler's refusal, e.g. out of HBM

    @property
    def peak_bytes(self) -> int:
        m = self.memory or {}
        return (m.get("argument_bytes", 0) + m.get("output_bytes", 0) - m.get("alias_bytes", 0)
                + m.get("temp_bytes", 0) + m.get("generated_code_bytes", 0))


def compile_lowered(name: str, lower, options: dict[str, Any] | None = None) -> Compiled:
    start = time.perf_counter()
    try:
        exe = lower().compile(compiler_options=options)
    except Exception as e:  # noqa: BLE001  (XLA reports running out of HBM as a runtime error)
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        return Compiled(name, time.perf_counter() - start, error=_oom_summary(text))
    seconds = time.perf_counter() - start
    m = exe.memory_analysis()
    memory = dict(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
                  alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
                  generated_code_bytes=m.generated_code_size_in_bytes)
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Compiled(name, seconds, memory, float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)))


def _oom_summary(text: str) -> str:
    """The compiler's own line, e.g. "Ran out of memory on HBM, the total memory required for HLO
    temporaries (30.78G) exceeds available HBM (15.75G)"."""
    line = next((ln for ln in text.splitlines() if "RESOURCE_EXHAUSTED" in ln), text.splitlines()[0])
    return re.sub(r"^.*RESOURCE_EXHAUSTED:\s*", "", line).strip().rstrip(".")[:300]


class Compiler:
    """Compiles the engine's functions once per shape, remembering each result."""

    def __init__(self, engine: Engine, log=print):
        self.engine, self.log, self.done = engine, log, {}

    def decode(self, chunks: int) -> Compiled:
        return self._get(("decode", chunks), f"decode {chunks} chunks", lambda: self.engine.lower_decode(chunks))

    def verify(self, chunks: int) -> Compiled:
        return self._get(("verify", chunks), f"verify {chunks} chunks", lambda: self.engine.lower_verify(chunks))

    def prefill(self, rows: int, bucket: int) -> Compiled:
        return self._get(("prefill", rows, bucket), f"prefill {rows}x{bucket}",
                         lambda: self.engine.lower_prefill(rows, bucket))

    def first(self, rows: int) -> Compiled:
        return self._get(("first", rows), f"first tokens of {rows} rows", lambda: self.engine.lower_first(rows))

    def _get(self, key, name, lower) -> Compiled:
        if key not in self.done:
            self.log(f"  compiling {name} ...", flush=True)
            self.done[key] = compile_lowered(name, lower)
            c = self.done[key]
            self.log(f"    {c.compile_s:.1f} s" + (f"; does not fit: {c.error}" if c.error else ""), flush=True)
        return self.done[key]


# ---------------------------------------------------------------- the report

def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    cfg = model_config(args.model)
    chip_name, chip = chip_of(args.topology)
    devices = tpu_devices(args.topology)
    mesh = make_mesh(args.mesh or (1, len(devices)), devices)
    spec = dict(speculative="ngram", num_speculative_tokens=args.speculative) if args.speculative else {}

    def abstract_engine(cfg, **kw):
        return Engine.abstract(cfg, mesh, dtype=args.dtype, quantize=args.quantize, max_len=args.max_len,
                               kv_cache_dtype=args.kv_cache_dtype, decode_steps=args.decode_steps,
                               hbm_bytes=chip.hbm_bytes, hbm_utilization=args.hbm_utilization,
                               hot_path=args.hot_path, **spec, **kw)

    engine = abstract_engine(cfg, max_slots=args.max_slots)
    stacked, kernel = engine.path.stacked, engine.path.attention == "pallas"

    def small_engine(layers: int) -> Engine:
        return abstract_engine(dataclasses.replace(cfg, num_layers=layers), max_slots=engine.max_slots,
                               cost_model=True)
    bucket = args.prefill_len or min(2048, args.max_len)
    if bucket not in engine.buckets:
        raise SystemExit(f"--prefill_len {bucket} is not one of the engine's prompt buckets {engine.buckets}")
    warmup_shapes = engine.warmup_functions()
    warmup = {"functions": len(warmup_shapes), "compile_s": None}
    weights = bytes_per_device(engine.params)
    cache, state = bytes_per_device(engine.cache), bytes_per_device(engine.state)
    resident = weights + cache + state
    step_weights = decode_weight_bytes(engine)
    result: dict[str, Any] = {
        "note": ESTIMATES,
        "versions": {pkg: importlib.metadata.version(pkg) for pkg in ("jax", "jaxlib", "libtpu")},
        "model": args.model, "params": cfg.num_params, "dtype": args.dtype, "quantize": args.quantize,
        "kv_cache_dtype": args.kv_cache_dtype, "topology": args.topology, "chip": chip_name,
        "mesh": {"data": mesh.shape["data"], "model": mesh.shape["model"]},
        "hot_path": engine.path.name, "max_slots": engine.max_slots, "max_slots_asked": args.max_slots, "max_len": args.max_len, "decode_steps": engine.decode_steps,
        "hbm_bytes_per_chip": chip.hbm_bytes, "hbm_bytes_per_s": chip.hbm_bytes_per_s,
        "peak_bf16_flops_per_chip": chip.peak_bf16_flops,
        "resident_bytes_per_chip": {"weights": weights, "kv_cache": cache, "slot_state": state, "total": resident},
        "decode_weight_bytes_per_chip": step_weights,
    }
    if cfg.num_experts:
        result.update(active_params=cfg.num_active_params, experts=cfg.num_experts,
                      experts_per_token=cfg.num_experts_per_tok,
                      experts_split=split_experts(cfg.num_experts, cfg.intermediate_size, mesh),
                      expected_experts_hit_per_step=expected_experts_hit(cfg, engine.max_slots // mesh.shape["data"]))
    errors = []
    if resident > chip.hbm_bytes:
        errors.append(f"weights {_gib(weights)} + KV cache {_gib(cache)} + slot state {_gib(state)} per chip "
                      f"= {_gib(resident)} > "
                      f"{_gib(chip.hbm_bytes)} HBM of a {chip_name} chip")
        return _finish(result, errors, [], None, warmup, log)

    compiler = Compiler(engine, log)
    decode = []
    fractions = sorted(set(args.live_fraction) | {1.0})
    if stacked:  # one decode for every live length; its XLA part costed once, from the small copies
        decode_cost = whole_model_cost(small_engine, lambda e: e.lower_decode(1), cfg.num_layers)
        result["sampler_bytes_per_step"] = int(sampler_bytes(engine))
    local_slots = engine.cache.k.sharding.shard_shape(engine.cache.k.shape)[1] if stacked else 0
    for frac in fractions:
        live = max(1, math.ceil(frac * args.max_len))
        chunks = engine.decode_chunks(live)
        c = compiler.decode(chunks)
        ideal = step_weights + round(cache * live / args.max_len)
        entry = {"live_fraction": frac, "live_positions": live, "chunks": chunks,
                 "chunks_total": len(engine.cache.sizes), "positions_read": engine.cache.span(chunks),
                 "compile_s": round(c.compile_s, 2), "ideal_bytes_per_chip": ideal}
        if c.error:
            errors.append(f"decode at {frac:.0%} live: {c.error}")
            entry["error"] = c.error
            decode.append(entry)
            continue
        flops, accessed = c.flops, c.bytes_accessed
        if stacked:
            flops, accessed = decode_cost[:2]
            entry["cost_compile_s"] = round(decode_cost[2], 2)
        if kernel:  # every slot at position live - 1
            fetched = kernel_cache_bytes(engine, [live - 1] * local_slots, 1)
            accessed += fetched
            block_k = ragged.default_blocks(1, args.max_len)[1]
            entry.update(kernel_cache_bytes=fetched, positions_read=-(-live // block_k) * block_k)
        entry.update(bytes_accessed_per_chip=int(accessed), ratio_to_ideal=accessed / ideal,
                     flops_per_chip=flops, step_s_at_hbm_bandwidth=accessed / chip.hbm_bytes_per_s,
                     ideal_step_s_at_hbm_bandwidth=ideal / chip.hbm_bytes_per_s, memory=c.memory,
                     peak_bytes=c.peak_bytes)
        decode.append(entry)

    if args.speculative and decode and "error" not in decode[-1]:
        result["verify"] = verify_entry(engine, compiler, small_engine, decode[-1], args, chip, errors)

    rows = min(args.prefill_batch, engine.max_slots)
    c = compiler.prefill(rows, bucket)
    ideal_flops = prefill_ideal_flops(cfg, rows, bucket) / mesh.size
    prefill = {"rows": rows, "bucket": bucket, "tokens": rows * bucket, "compile_s": round(c.compile_s, 2),
               "ideal_flops_per_chip": ideal_flops}
    if c.error:
        errors.append(f"prefill {rows}x{bucket}: {c.error}")
        prefill["error"] = c.error
    else:
        flops, accessed = c.flops, c.bytes_accessed
        if stacked:
            flops, accessed, seconds = whole_model_cost(small_engine, lambda e: e.lower_prefill(rows, bucket),
                                                        cfg.num_layers)
            prefill["cost_compile_s"] = round(seconds, 2)
        if kernel:  # prompts from position 0
            prefill["kernel_cache_bytes"] = kernel_cache_bytes(engine, [0] * rows, bucket)
            accessed += prefill["kernel_cache_bytes"]
        prefill.update(flops_per_chip=flops, ratio_to_ideal=flops / ideal_flops,
                       bytes_accessed_per_chip=int(accessed),
                       s_at_peak_flops=flops / chip.peak_bf16_flops,
                       s_at_hbm_bandwidth=accessed / chip.hbm_bytes_per_s,
                       memory=c.memory, peak_bytes=c.peak_bytes)

    if args.warmup:
        done = [getattr(compiler, kind)(*shape) for kind, *shape in warmup_shapes]
        warmup["compile_s"] = round(sum(c.compile_s for c in done), 1)
        failed = [c.name for c in done if c.error]
        if failed:
            errors.append(f"warm-up: {len(failed)} of {len(done)} functions do not fit ({', '.join(failed[:4])})")
    return _finish(result, errors, decode, prefill, warmup, log, compiler)


def verify_entry(engine: Engine, compiler: "Compiler", small_engine, full: dict, args, chip, errors) -> dict:
    """Speculative decoding's verify step (prompt lookup, k = --speculative) with every slot's
    cache full: its bytes and flops per step against the plain decode step's (`full`). A step
    yields 1 + (proposals kept) tokens per row, so speculation pays on the chip when that beats
    the ratio of their times, about the ratio of bytes while both stay memory-bound."""
    k, live = args.speculative, full["live_positions"]
    c = compiler.verify(full["chunks"])
    entry = {"k": k, "positions_per_row": k + 1, "compile_s": round(c.compile_s, 2)}
    if c.error:
        errors.append(f"verify step: {c.error}")
        return {**entry, "error": c.error}
    flops, accessed = c.flops, c.bytes_accessed
    if engine.path.stacked:
        flops, accessed, seconds = whole_model_cost(small_engine, lambda e: e.lower_verify(1), engine.cfg.num_layers)
        entry["cost_compile_s"] = round(seconds, 2)
    if engine.path.attention == "pallas":
        local_slots = engine.cache.k.sharding.shard_shape(engine.cache.k.shape)[1]
        entry["kernel_cache_bytes"] = kernel_cache_bytes(engine, [live - 1 - k] * local_slots, k + 1)
        accessed += entry["kernel_cache_bytes"]
    return {**entry, "bytes_accessed_per_chip": int(accessed), "flops_per_chip": flops,
            "bytes_vs_decode_step": accessed / full["bytes_accessed_per_chip"],
            "flops_vs_decode_step": flops / full["flops_per_chip"] if full["flops_per_chip"] else None,
            "s_at_hbm_bandwidth": accessed / chip.hbm_bytes_per_s, "s_at_peak_flops": flops / chip.peak_bf16_flops,
            "memory": c.memory, "peak_bytes": c.peak_bytes}


def _finish(result, errors, decode, prefill, warmup, log, compiler=None) -> dict[str, Any]:
    compiled = list(compiler.done.values()) if compiler else []
    peaks = [c.peak_bytes for c in compiled if not c.error]
    result["peak_bytes_per_chip"] = max(peaks) if peaks else result["resident_bytes_per_chip"]["total"]
    result["fits"] = not errors and result["peak_bytes_per_chip"] <= result["hbm_bytes_per_chip"]
    if not errors and not result["fits"]:
        errors.append(f"peak {_gib(result['peak_bytes_per_chip'])} per chip > "
                      f"{_gib(result['hbm_bytes_per_chip'])} HBM of a {result['chip']} chip")
    result.update(decode=decode, prefill=prefill, warmup=warmup, errors=errors)
    log(format_report(result))
    return result


def _gb(n: float) -> str:
    """Bytes moved, in decimal units like bandwidths."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _gib(n: float) -> str:
    """Bytes held, in binary units like HBM capacities."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.1f} MiB"


def format_report(r: dict[str, Any]) -> str:
    mesh, res = r["mesh"], r["resident_bytes_per_chip"]
    params = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e9 else f"{r['params'] / 1e6:.1f}M"
    out = [
        f"{r['model']} ({params} params, {r['dtype']}"
        + (", int8 weights" if r["quantize"] else "") + (", int8 KV" if r["kv_cache_dtype"] else "")
        + f") on {r['topology']}, mesh data={mesh['data']} x model={mesh['model']}; "
        f"{r['max_slots']} slots x {r['max_len']} tokens",
        f"per {r['chip']} chip: {_gib(r['hbm_bytes_per_chip'])} HBM, {r['hbm_bytes_per_s'] / 1e9:.0f} GB/s, "
        f"{r['peak_bf16_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16",
        f"{r['note']}.",
    ] + ([f"mixture of experts: {r['experts_per_token']} of {r['experts']} experts per token, "
           f"{r['active_params'] / 1e9:.2f}B active params, "
           f"{'whole experts' if r['experts_split'] else 'a slice of every expert'} on each chip; "
           f"a decode step's ideal bytes count the "
           f"{r['expected_experts_hit_per_step']:.1f} experts per layer its rows are expected to hit (uniform routing)"]
         if "experts" in r else []) + [
        f"resident per chip: weights {_gib(res['weights'])} + KV cache {_gib(res['kv_cache'])} "
        f"+ slot state {_gib(res['slot_state'])} = {_gib(res['total'])}",
    ]
    if r["decode"]:
        out += ["", f"decode, per step ({r['decode_steps']} steps per dispatch; cost analysis counts the loop "
                "body once; the stacked path's layer loop is extrapolated from 1- and 2-layer copies). "
                "Positions: what a step reads per slot, the live blocks (TPU kernel), all of max_len (XLA "
                "attention) or the live chunks (the CPU path):",
                f"{'live':>5} {'chunks':>7} {'positions':>9} {'compile s':>9} {'peak':>10} {'temp':>10} "
                f"{'accessed':>9} {'ideal':>9} {'ratio':>6} {'ms at HBM BW':>12}"]
        for d in r["decode"]:
            head = (f"{d['live_fraction']:>5.0%} {d['chunks']:>3}/{d['chunks_total']:<3} {d['positions_read']:>9} "
                    f"{d['compile_s']:>9.1f} ")
            if "error" in d:
                out.append(head + f"does not fit: {d['error']}")
                continue
            out.append(head + f"{_gib(d['peak_bytes']):>10} {_gib(d['memory']['temp_bytes']):>10} "
                       f"{_gb(d['bytes_accessed_per_chip']):>9} {_gb(d['ideal_bytes_per_chip']):>9} "
                       f"{d['ratio_to_ideal']:>6.2f} {1e3 * d['step_s_at_hbm_bandwidth']:>12.2f}")
    if "sampler_bytes_per_step" in r:
        out.append(f"(greedy rows; a step where some row samples (top-k among {CANDIDATES} candidates, or the "
                   f"whole vocabulary) also runs the sampler: {_gb(r['sampler_bytes_per_step'])} more)")
    v = r.get("verify")
    if v:
        out += ["", f"speculative verify step (prompt lookup, {v['k']} proposals: {v['positions_per_row']} positions "
                f"per row, every slot full), compiled in {v['compile_s']:.1f} s:"]
        if "error" in v:
            out.append(f"  does not fit: {v['error']}")
        else:
            out.append(f"  {_gb(v['bytes_accessed_per_chip'])} accessed ({v['bytes_vs_decode_step']:.2f}x a decode "
                       f"step), {v['flops_per_chip'] / 1e12:.3f} TFLOP ({v['flops_vs_decode_step'] or 0:.2f}x); "
                       f"{v['s_at_hbm_bandwidth'] * 1e3:.2f} ms at HBM bandwidth, {v['s_at_peak_flops'] * 1e3:.2f} ms "
                       f"at peak flops; peak {_gib(v['peak_bytes'])}")
    p = r["prefill"]
    if p:
        out += ["", f"prefill {p['rows']} x {p['bucket']} tokens ({p['tokens']} tokens), compiled in {p['compile_s']:.1f} s:"]
        if "error" in p:
            out.append(f"  does not fit: {p['error']}")
        else:
            out.append(f"  {p['flops_per_chip'] / 1e12:.3f} TFLOP per chip, ideal {p['ideal_flops_per_chip'] / 1e12:.3f} "
                       f"(ratio {p['ratio_to_ideal']:.2f}); {_gb(p['bytes_accessed_per_chip'])} accessed; "
                       f"peak {_gib(p['peak_bytes'])}, temp {_gib(p['memory']['temp_bytes'])}")
            out.append(f"  {p['s_at_peak_flops'] * 1e3:.2f} ms at peak flops, {p['s_at_hbm_bandwidth'] * 1e3:.2f} ms "
                       "at HBM bandwidth")
    w = r["warmup"]
    if w["functions"]:
        out += ["", f"warm-up: {w['functions']} functions"
                + (f", compiled in {w['compile_s']:.1f} s" if w["compile_s"] is not None else " (--warmup compiles them)")]
    if r["fits"]:
        out += ["", f"fits: yes (peak {_gib(r['peak_bytes_per_chip'])} of {_gib(r['hbm_bytes_per_chip'])} per chip)"]
    else:
        out += ["", "fits: NO"] + [f"  {e}" for e in r["errors"]]
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a preset name or a checkpoint directory (only config.json is read)")
    p.add_argument("--topology", default="v5e:2x4", help="TPU slice, e.g. v5e:2x4, v6e:2x4 (whole hosts)")
    p.add_argument("--mesh", default=None, help="data,model (default: every chip on model)")
    p.add_argument("--max_slots", type=lambda v: v if v == "auto" else int(v), default=32,
                   help="cache slots, or 'auto': as many as fit --hbm_utilization of the chip's HBM after the weights")
    p.add_argument("--hbm_utilization", type=float, default=0.9,
                   help="with --max_slots auto: the share of HBM that weights and KV cache may take")
    p.add_argument("--max_len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--quantize", default=None, choices=("int8",))
    p.add_argument("--kv_cache_dtype", default=None, choices=("int8",))
    p.add_argument("--decode_steps", type=int, default=8, help="tokens per decode dispatch (the engine's default)")
    p.add_argument("--live_fraction", default="0.25,0.5,1",
                   help="comma-separated fractions of max_len that every slot holds; 1 is always added")
    p.add_argument("--prefill_batch", type=int, default=8)
    p.add_argument("--prefill_len", type=int, default=None, help="a prompt bucket (default: min(2048, max_len))")
    p.add_argument("--hot_path", default="auto", choices=("auto", "cpu", "gpu"),
                   help="auto: the TPU path; cpu or gpu: compile that platform's code for the TPU instead, to compare")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="also compile the speculative verify step (prompt lookup, K proposals per row)")
    p.add_argument("--warmup", action="store_true", help="also compile everything Engine.warmup() would (slow)")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    args.live_fraction = [float(x) for x in args.live_fraction.split(",") if x.strip()]
    if not all(0 < f <= 1 for f in args.live_fraction):
        p.error(f"--live_fraction {args.live_fraction}: each must be in (0, 1]")
    args.mesh = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except ValueError as e:  # e.g. max_slots auto with no room for one slot: the numbers are in the message
        print(f"error: {args.model} on {args.topology}: {e}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if result["errors"]:
        more = len(result["errors"]) - 1
        print(f"error: {args.model} does not fit {args.max_slots} slots x {args.max_len} on {args.topology}: "
              f"{result['errors'][0]}" + (f" (and {more} more above)" if more else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
