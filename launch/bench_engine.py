"""Greedy generation throughput: this engine vs HF transformers, on the same weights, with a roofline.

What it measures, in one process on the local machine:
  1. A random-initialized HF `LlamaForCausalLM` (float32, ~100M parameters by default: the shape of
     the `llama-100m` preset) is saved as safetensors and loaded into `Engine.from_pretrained`,
     so both implementations run the same weights.
  2. For each batch size, random prompts (fixed seed, no EOS ids) of `--prompt-len` tokens each get
     `--new-tokens` greedy tokens from both. One warm-up run (the engine compiles there), then
     `--runs` timed runs; tokens/s = batch * new_tokens / median wall time (prefill included).
     The generated ids are compared row by row.
  3. The machine's roofline, measured in the same run: memory bandwidth (a jitted and a numpy sum
     over a large float32 array) and matmul rate (jitted jnp.dot and torch.mm of n x n float32).
     A decode step must read every weight but the embedding table (4 bytes each) plus the live
     KV cache once and do 2 FLOPs per weight per row; prefill must do 2 FLOPs per layer weight
     per prompt token. Achieved tokens/s is reported as a % of the decode-only roofline and of
     the end-to-end one (prefill + decode, the workload actually timed).

torch runs with torch.set_num_threads(cpu count); XLA uses all cores by default.

--moe compares instead a random mixture of experts (Mixtral's architecture: --experts experts of
width --ffw, --top-k per token) with the dense model of the same active parameters (Llama, MLP
width top_k * ffw; the same attention, embedding and head), in this engine only, side by side in
one run: greedy tokens/s, medians of --runs runs, and their ratio.

Run:  python -m launch.bench_engine                 # full run: batches 1 and 16, 128 + 128 tokens
      python -m launch.bench_engine --quick         # tiny smoke run, < 1 minute
      python -m launch.bench_engine --batches 1 4 --runs 5 --out /tmp/bench.json
      python -m launch.bench_engine --moe           # MoE vs its dense active-parameter equivalent, batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import model  # noqa: E402,F401  (first: its start-up defaults must precede jax's import)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from model import Engine, SamplingParams  # noqa: E402
from model.config import ModelConfig  # noqa: E402

EOS_ID = 2  # token ids 0..2 (pad, bos, eos) never appear in prompts

FULL = dict(vocab=32000, hidden=768, layers=8, heads=12, kv_heads=4, ffw=2048, batches=[1, 16],
            prompt_len=128, new_tokens=128, runs=3, bandwidth_mb=1024, matmul_n=2048)
QUICK = dict(vocab=1024, hidden=128, layers=2, heads=4, kv_heads=2, ffw=256, batches=[1, 4],
             prompt_len=16, new_tokens=16, runs=3, bandwidth_mb=128, matmul_n=512)


def parse_preset_args(p: argparse.ArgumentParser, full: dict, quick: dict, argv: list[str] | None) -> argparse.Namespace:
    """Adds --quick and one integer flag per preset key (a list-valued key takes several) to p,
    parses argv, and fills each flag left unset from the quick or the full preset."""
    p.add_argument("--quick", action="store_true", help="tiny model and workload: a smoke run")
    for name, value in full.items():
        nargs = "+" if isinstance(value, list) else None
        p.add_argument("--" + name.replace("_", "-"), type=int, nargs=nargs, default=None, help=f"default {value}")
    args = p.parse_args(argv)
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


MOE_FULL = dict(vocab=8000, hidden=512, layers=4, heads=8, kv_heads=4, ffw=1024, experts=8, top_k=2, batches=[16],
                prompt_len=16, new_tokens=64, runs=3)
MOE_QUICK = dict(vocab=512, hidden=128, layers=2, heads=4, kv_heads=2, ffw=128, experts=8, top_k=2, batches=[16],
                 prompt_len=16, new_tokens=16, runs=3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_engine.json", help="where the JSON results go")
    p.add_argument("--moe", action="store_true", help="a mixture of experts vs its dense active-parameter equivalent")
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--moe", action="store_true")
    if first.parse_known_args(argv)[0].moe:  # its own shape flags and defaults
        return parse_preset_args(p, MOE_FULL, MOE_QUICK, argv)
    return parse_preset_args(p, FULL, QUICK, argv)


# ---------------------------------------------------------------- the two implementations

def hf_model(args: argparse.Namespace) -> transformers.LlamaForCausalLM:
    """Random float32 Llama in eval mode, the llama-100m preset's shape by default."""
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffw,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=0)
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(config).eval()


def random_prompts(args: argparse.Namespace, batch: int) -> np.ndarray:
    """[batch, prompt_len] int token ids in [EOS_ID + 1, vocab)."""
    rng = np.random.default_rng(args.seed + batch)
    return rng.integers(EOS_ID + 1, args.vocab, size=(batch, args.prompt_len))


def engine_generate(engine: Engine, prompts: np.ndarray, new_tokens: int) -> Callable[[], np.ndarray]:
    """A no-argument function returning the engine's generated ids [batch, new_tokens]."""
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    rows = prompts.tolist()
    return lambda: np.array([o.token_ids for o in engine.generate(rows, sampling)])


def hf_generate(model: transformers.PreTrainedModel, prompts: np.ndarray,
                new_tokens: int) -> Callable[[], np.ndarray]:
    """A no-argument function returning HF's greedy ids [batch, new_tokens] (no padding needed)."""
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run() -> np.ndarray:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        return out[:, ids.shape[1]:].numpy()

    return run


def timed_runs(generate: Callable[[], np.ndarray], runs: int) -> tuple[np.ndarray, float, list[float]]:
    """(ids of the last run, warm-up seconds, [seconds per timed run]). The warm-up compiles."""
    start = time.perf_counter()
    generate()
    warmup = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        ids = generate()
        times.append(time.perf_counter() - start)
    return ids, warmup, times


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Fraction of identical rows and mean length of the identical prefix, of two [b, n] id arrays."""
    same = a == b
    prefix = np.where(same.all(1), a.shape[1], np.argmin(same, axis=1))
    return {"identical_rows": float(same.all(1).mean()), "mean_identical_prefix": float(prefix.mean())}


# ---------------------------------------------------------------- roofline

def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth_gbs(megabytes: int) -> dict[str, float]:
    """Read bandwidth in GB/s of a float32 sum: jitted (XLA threads) and numpy (one thread).

    On this VM one buffer can read at 30 GB/s and the next at 45: the jitted figure is the best
    of three fresh buffers (the median of 7 sums each), since a roofline is what the machine allows."""
    total = jax.jit(jnp.sum)
    n = megabytes * 2**20 // 4
    jax_s = min(median_seconds(lambda: total(dev).block_until_ready(), 7)
                for dev in (jnp.full((n,), i, jnp.float32) for i in range(3)))
    host = np.ones(n, np.float32)
    np_s = median_seconds(lambda: host.sum(), 7)
    return {"jax_sum": host.nbytes / jax_s / 1e9, "numpy_sum": host.nbytes / np_s / 1e9}


def matmul_gflops(n: int) -> dict[str, float]:
    """float32 n x n matmul rate in GFLOP/s: jitted jnp.dot and torch.mm."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax_s = median_seconds(lambda: dot(a, a).block_until_ready(), 5)
    t = torch.randn(n, n)
    torch_s = median_seconds(lambda: torch.mm(t, t), 5)
    flops = 2 * n**3
    return {"jax_dot": flops / jax_s / 1e9, "torch_mm": flops / torch_s / 1e9}


def roofline(cfg: ModelConfig, args: argparse.Namespace, batch: int, bw_gbs: float,
             gflops: float) -> dict[str, float]:
    """Best-case seconds and tokens/s from bandwidth and matmul rate alone.

    A decode step reads every weight but the input embedding table (it gathers `batch` rows; a
    tied table is read whole as the head) plus the KV cache at its mean live length, and does
    2 FLOPs per weight read and 4 * layers * heads * head_dim * context for attention, per row.
    Prefill reads the weights once, runs the layers on every prompt token and the head on the
    last. Counting the embedding table as multiplied (2 * all params) would put the prefill
    "roofline" below what the engine measures here."""
    embed = cfg.vocab_size * cfg.hidden_size
    step_params = cfg.num_params - (0 if cfg.tie_word_embeddings else embed)
    layer_params = step_params - embed  # minus the head
    attn_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # per token per context position
    mean_context = args.prompt_len + args.new_tokens / 2
    kv_bytes = batch * cfg.num_layers * mean_context * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    weight_bytes = step_params * 4
    step_flops = batch * (2 * step_params + attn_flops * mean_context)
    prefill_flops = batch * (args.prompt_len * 2 * layer_params + 2 * embed
                             + attn_flops * args.prompt_len ** 2 / 2)
    step_s = max((weight_bytes + kv_bytes) / (bw_gbs * 1e9), step_flops / (gflops * 1e9))
    prefill_s = max(weight_bytes / (bw_gbs * 1e9), prefill_flops / (gflops * 1e9))
    total_s = prefill_s + (args.new_tokens - 1) * step_s
    return {"params": cfg.num_params, "weight_bytes_per_step": weight_bytes, "kv_bytes_per_step": kv_bytes,
            "flops_per_step": step_flops, "prefill_flops": prefill_flops,
            "min_step_s": step_s, "decode_tokens_s": batch / step_s,
            "min_prefill_s": prefill_s, "end_to_end_tokens_s": batch * args.new_tokens / total_s}


# ---------------------------------------------------------------- report

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def engine_version() -> str:
    """The repository's commit, with "-dirty" when model/ has uncommitted changes."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = ["git", "-C", repo]
    try:
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "model"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def machine_info() -> dict[str, object]:
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "numpy": np.__version__}


def table(rows: list[dict]) -> str:
    """A markdown table: one row per (implementation, batch)."""
    head = ("| implementation | batch | tokens/s (median) | runs | identical rows | "
            "% of decode roofline | % of end-to-end roofline |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['batch']} | {r['tokens_s']:.1f} | {len(r['times_s'])} | "
                     f"{100 * r['identical_rows']:.0f}% | {r['pct_decode_roofline']:.1f}% | "
                     f"{r['pct_end_to_end_roofline']:.1f}% |")
    return "\n".join(lines)


def bench_batch(engine: Engine, model, args: argparse.Namespace, batch: int,
                roof: dict[str, float]) -> list[dict]:
    """Times both implementations on one batch size; one result dict per implementation."""
    prompts = random_prompts(args, batch)
    results = {}
    for impl, generate in (("engine", engine_generate(engine, prompts, args.new_tokens)),
                           ("hf", hf_generate(model, prompts, args.new_tokens))):
        ids, warmup, times = timed_runs(generate, args.runs)
        assert ids.shape == (batch, args.new_tokens), f"{impl} returned ids of shape {ids.shape}"
        tokens_s = batch * args.new_tokens / statistics.median(times)
        results[impl] = dict(impl=impl, batch=batch, ids=ids, warmup_s=warmup, times_s=times, tokens_s=tokens_s,
                             pct_decode_roofline=100 * tokens_s / roof["decode_tokens_s"],
                             pct_end_to_end_roofline=100 * tokens_s / roof["end_to_end_tokens_s"])
        print(f"  batch {batch} {impl}: {tokens_s:.1f} tokens/s, runs {[round(t, 3) for t in times]} s, "
              f"warm-up {warmup:.1f} s", flush=True)
    match = agreement(results["engine"].pop("ids"), results["hf"].pop("ids"))
    for r in results.values():
        r.update(match)
    return list(results.values())


def bench_all(args: argparse.Namespace, bw_gbs: float, gflops: float) -> tuple[list[dict], dict, str]:
    """(result rows, roofline per batch, HF attention implementation) for every batch size."""
    model = hf_model(args)
    rows, roofs = [], {}
    with tempfile.TemporaryDirectory() as ckpt:
        model.save_pretrained(ckpt, safe_serialization=True)
        for batch in args.batches:
            start = time.perf_counter()
            engine = Engine.from_pretrained(ckpt, mesh_shape=(1, 1), dtype="float32", max_slots=batch,
                                            max_len=args.prompt_len + args.new_tokens)
            load_s = time.perf_counter() - start
            roofs[str(batch)] = roofline(engine.cfg, args, batch, bw_gbs, gflops)
            batch_rows = bench_batch(engine, model, args, batch, roofs[str(batch)])
            batch_rows[0]["load_s"] = load_s
            rows += batch_rows
            del engine
    return rows, roofs, model.config._attn_implementation


# ---------------------------------------------------------------- --moe: a mixture of experts vs dense

def moe_configs(args: argparse.Namespace) -> dict[str, ModelConfig]:
    """The random mixture of experts and the dense model with its active parameters."""
    from model.config import llama_preset
    shape = dict(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                 max_position_embeddings=4096, eos_token_ids=(EOS_ID,))
    return {
        f"moe {args.experts} experts top-{args.top_k}": llama_preset(
            ffw=args.ffw, num_experts=args.experts, num_experts_per_tok=args.top_k,
            architecture="MixtralForCausalLM", **shape),
        "dense, same active params": llama_preset(ffw=args.top_k * args.ffw, **shape),
    }


def bench_moe(args: argparse.Namespace) -> dict:
    from model.config import EngineConfig
    from model.engine import random_params
    from model.sharding import make_mesh

    mesh, rows = make_mesh((1, 1)), []
    for batch in args.batches:
        prompts = random_prompts(args, batch)
        for name, cfg in moe_configs(args).items():
            config = EngineConfig(max_slots=batch, max_len=args.prompt_len + args.new_tokens)
            engine = Engine(cfg, random_params(cfg, jnp.float32, mesh, args.seed), mesh, config)
            _, warmup, times = timed_runs(engine_generate(engine, prompts, args.new_tokens), args.runs)
            tokens_s = batch * args.new_tokens / statistics.median(times)
            rows.append(dict(model=name, batch=batch, params=cfg.num_params, active_params=cfg.num_active_params,
                             tokens_s=tokens_s, times_s=times, warmup_s=warmup))
            print(f"  batch {batch} {name}: {tokens_s:.1f} tokens/s, runs {[round(t, 3) for t in times]} s, "
                  f"warm-up {warmup:.1f} s", flush=True)
            del engine
    ratios = {str(b): rows[2 * i]["tokens_s"] / rows[2 * i + 1]["tokens_s"] for i, b in enumerate(args.batches)}
    lines = [f"| model | batch | params | active params | tokens/s (median of {args.runs}) |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['params'] / 1e6:.1f}M | {r['active_params'] / 1e6:.1f}M | "
              f"{r['tokens_s']:.1f} |" for r in rows]
    print("\n" + "\n".join(lines))
    print("\n".join(f"batch {b}: moe / dense = {r:.2f}x" for b, r in ratios.items()))
    return {"args": vars(args), "engine_commit": engine_version(), "machine": machine_info(),
            "results": rows, "moe_over_dense": ratios}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.moe:
        print(f"machine: {os.cpu_count()} CPUs, jax backend {jax.default_backend()}; engine at {engine_version()}; "
              f"1-minute load average {os.getloadavg()[0]:.2f}", flush=True)
        result = bench_moe(args)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
        return result
    torch.set_num_threads(os.cpu_count())
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: 1-minute load average is {load_before:.2f}; other processes share the CPUs "
              "and the timings will be low and noisy", flush=True)
    print(f"machine: {os.cpu_count()} CPUs, jax backend {jax.default_backend()}, "
          f"torch threads {torch.get_num_threads()}; engine at {engine_version()}", flush=True)
    bw, mm = bandwidth_gbs(args.bandwidth_mb), matmul_gflops(args.matmul_n)
    print(f"bandwidth GB/s {bw}; matmul GFLOP/s {mm}", flush=True)
    rows, roofs, attn = bench_all(args, max(bw.values()), max(mm.values()))

    ratios = {}
    for batch in args.batches:
        eng, hf = (r["tokens_s"] for r in rows if r["batch"] == batch)
        ratios[str(batch)] = eng / hf
    print("\n" + table(rows))
    print("\n".join(f"batch {b}: engine / HF = {r:.2f}x" for b, r in ratios.items()))
    result = {"args": vars(args), "engine_commit": engine_version(), "machine": machine_info(),
              "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
              "bandwidth_gbs": bw, "matmul_gflops": mm, "roofline": roofs, "results": rows,
              "engine_over_hf": ratios, "hf_attn_implementation": attn}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
