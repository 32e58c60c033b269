"""Each throughput feature on and off, in one run, on one model: the numbers behind docs/benchmarks.md.

Workloads (random prompts, fixed seeds, EOS ignored so lengths are what the workload says):
  (a) uniform:   every prompt `--prompt-len` tokens, every completion `--uniform-new` tokens;
  (b) hetero:    completion lengths log-uniform in [16, --max-new] (a long tail, like EOS-driven
                 answers), prompts 32-128 tokens;
  (c) labeling:  one shared `--prefix-len`-token instruction + 8-32 varied tokens, short answers.
Comparisons, all measured here in this run (median of `--runs` after a warm-up run):
  in-flight vs static waves on (b); prefix cache on vs off on (c); int8 vs float weights
  (bytes, speed, logit error, greedy agreement); the engine vs HF transformers `generate` on (a)
  and (b) in batches of `--slots` (HF cannot refill a row: each batch runs to its longest
  completion); batch-1 decode vs the memory-bandwidth roofline and large-batch decode vs the
  matmul roofline.

Run:  python -m launch.bench_features               # ~25M-parameter Llama, float32, CPU
      python -m launch.bench_features --quick       # smoke run
      python -m launch.bench_features --prefill-chunk off   # whole-prompt prefill (chunking off)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from launch.bench_engine import bandwidth_gbs, machine_info, matmul_gflops, parse_preset_args  # noqa: E402
from model import Engine, SamplingParams  # noqa: E402
from model.quantize import weight_bytes  # noqa: E402

FULL = dict(vocab=8000, hidden=512, layers=6, heads=8, kv_heads=4, ffw=1408, slots=16, n=48, prompt_len=64,
            uniform_new=64, max_new=512, prefix_len=512, runs=3)
QUICK = dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, ffw=128, slots=4, n=8, prompt_len=16,
             uniform_new=8, max_new=64, prefix_len=64, runs=2)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_features.json")
    p.add_argument("--plot", default="docs/bench_features.png", help="PNG of the comparisons ('' = none)")
    p.add_argument("--prefill-chunk", default="default",
                   help="the engines' prefill_chunk: a token count, 'off' (whole prompts), or 'default' (EngineConfig's)")
    return parse_preset_args(p, FULL, QUICK, argv)


# ---------------------------------------------------------------- workloads

def workloads(args, rng: np.random.Generator) -> dict[str, list[tuple[list[int], int]]]:
    """name -> [(prompt ids, completion length)]. Ids avoid 0-2 (pad, bos, eos)."""
    ids = lambda n: rng.integers(3, args.vocab, size=int(n)).tolist()  # noqa: E731
    lo, hi = math.log(16), math.log(args.max_new)
    prefix = ids(args.prefix_len)
    return {
        "uniform": [(ids(args.prompt_len), args.uniform_new) for _ in range(args.n)],
        "hetero": [(ids(rng.integers(32, 129)), int(math.exp(rng.uniform(lo, hi)))) for _ in range(args.n)],
        "labeling": [(prefix + ids(rng.integers(8, 33)), 16) for _ in range(args.n)],
    }


def timed(fn, runs: int) -> tuple[float, list[float], object]:
    out = fn()  # warm-up: compiles
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def engine_run(engine: Engine, work):
    sp = [SamplingParams(max_new_tokens=n, ignore_eos=True) for _, n in work]
    return lambda: [o.token_ids for o in engine.generate([p for p, _ in work], sp)]


def hf_run(model, work, batch: int):
    """HF generate in batches of `batch` (left-padded); each batch runs to its longest completion
    and each row is cut to its own length afterwards."""
    def run():
        out = []
        for start in range(0, len(work), batch):
            chunk = work[start:start + batch]
            width = max(len(p) for p, _ in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (p, _) in enumerate(chunk):
                ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=mask, max_new_tokens=max(n for _, n in chunk),
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
            out += [gen[r, width:width + n].tolist() for r, (_, n) in enumerate(chunk)]
        return out
    return run


def tokens_of(work) -> int:
    return sum(n for _, n in work)


def ideal_step_ratios(work, slots: int) -> dict[str, float]:
    """Decode steps of static waves over those of in-flight batching, counting steps only (free
    prefill, no dispatch granularity): the most either order can gain on this workload."""
    import heapq

    # the engine's "arrival" order: input order, stably grouped by prompt-length bucket
    lengths = [n for p, n in sorted(work, key=lambda w: max(16, 1 << (len(w[0]) - 1).bit_length()))]

    def makespan(order):
        ends = [0] * slots
        for n in order:
            heapq.heappush(ends, heapq.heappop(ends) + n)
        return max(ends)

    static = sum(max(lengths[i:i + slots]) for i in range(0, len(lengths), slots))
    return {"arrival": round(static / makespan(lengths), 3),
            "longest_first": round(static / makespan(sorted(lengths, reverse=True)), 3)}


# ---------------------------------------------------------------- comparisons

def row(name, variant, work, seconds, times, extra=None):
    return {"comparison": name, "variant": variant, "median_s": round(seconds, 3),
            "runs_s": [round(t, 3) for t in times], "tokens_per_s": round(tokens_of(work) / seconds, 1),
            **(extra or {})}


def random_checkpoint(args, work: dict, prefix: str):
    """(HF model, its checkpoint directory, a max_len that fits every request of `work`): the
    benchmark's random Llama (seed 0), saved so that the engine loads the same weights."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffw, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    path = tempfile.mkdtemp(prefix=prefix)
    hf.save_pretrained(path, safe_serialization=True)
    longest = max(len(p) + n for w in work.values() for p, n in w)
    return hf, path, 1 << (longest - 1).bit_length()


def bench(args) -> dict:
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    work = workloads(args, rng)
    hf, path, max_len = random_checkpoint(args, work, "bench_features_")
    if args.prefill_chunk != "default":
        chunk = {"prefill_chunk": None if args.prefill_chunk == "off" else int(args.prefill_chunk)}
    else:
        chunk = {}
    make = lambda **kw: Engine.from_pretrained(path, mesh_shape=(1, 1), dtype="float32", max_len=max_len,  # noqa: E731
                                               max_slots=kw.pop("slots", args.slots), **chunk, **kw)
    rows, checks = [], {}

    # in-flight vs static waves (b); engine vs HF on (a) and (b)
    inflight = make()
    outs = {}
    for wname in ("uniform", "hetero"):
        s, t, outs[wname] = timed(engine_run(inflight, work[wname]), args.runs)
        rows.append(row(f"engine vs HF ({wname})", "engine in-flight", work[wname], s, t))
        s, t, ref = timed(hf_run(hf, work[wname], args.slots), args.runs)
        rows.append(row(f"engine vs HF ({wname})", "HF generate", work[wname], s, t))
        checks[f"identical_to_hf_{wname}"] = float(np.mean([a == b for a, b in zip(outs[wname], ref)]))
    static = make(batching="static", order="arrival")
    s, t, got = timed(engine_run(static, work["hetero"]), args.runs)
    rows.append(row("in-flight vs static (hetero)", "static waves", work["hetero"], s, t))
    checks["static_equals_inflight"] = got == outs["hetero"]
    del static
    arrival = make(order="arrival")
    s, t, got = timed(engine_run(arrival, work["hetero"]), args.runs)
    rows.append(row("in-flight vs static (hetero)", "in-flight, arrival", work["hetero"], s, t))
    rows.append({**next(r for r in rows if r["variant"] == "engine in-flight" and "hetero" in r["comparison"]),
                 "comparison": "in-flight vs static (hetero)", "variant": "in-flight, longest 1st"})
    checks["arrival_equals_longest_first"] = got == outs["hetero"]
    checks["ideal_static_over_inflight_steps"] = ideal_step_ratios(work["hetero"], args.slots)
    del arrival

    # prefix cache off vs on (c)
    s, t, plain = timed(engine_run(inflight, work["labeling"]), args.runs)
    rows.append(row("prefix cache (labeling)", "off", work["labeling"], s, t))
    cached = make(prefix_cache_entries=4, prefix_block=64)
    s, t, got = timed(engine_run(cached, work["labeling"]), args.runs)
    rows.append(row("prefix cache (labeling)", "on", work["labeling"], s, t,
                    {"tokens_reused": cached.prefix_cache.stats.tokens_reused}))
    checks["prefix_equals_plain"] = got == plain
    del cached

    # int8 weights vs float32; bf16 bytes for the ratio
    q8 = make(quantize="int8")
    s, t, got = timed(engine_run(q8, work["uniform"]), args.runs)
    rows.append(row("int8 weights (uniform)", "int8", work["uniform"], s, t))
    rows.append({**next(r for r in rows if r["variant"] == "engine in-flight" and "uniform" in r["comparison"]),
                 "comparison": "int8 weights (uniform)", "variant": "float32"})
    bf16 = Engine.from_pretrained(path, mesh_shape=(1, 1), dtype="bfloat16", max_len=64, max_slots=1)
    seqs = [p + o for (p, _), o in zip(work["uniform"][:8], outs["uniform"][:8])]
    ref_logits, q_logits = inflight.logits(seqs), q8.logits(seqs)
    valid = ~np.isnan(ref_logits[..., 0])
    checks["int8"] = {
        "weight_bytes_vs_bf16": weight_bytes(q8.params) / weight_bytes(bf16.params),
        "weight_bytes_vs_f32": weight_bytes(q8.params) / weight_bytes(inflight.params),
        "max_logit_error_rel": float(np.abs(q_logits - ref_logits)[valid].max() / np.abs(ref_logits[valid]).max()),
        "greedy_agreement_teacher_forced": float((q_logits.argmax(-1) == ref_logits.argmax(-1))[valid].mean()),
        "identical_completions": float(np.mean([a == b for a, b in zip(got, outs["uniform"])])),
    }
    del q8, bf16

    # roofline: batch-1 decode (memory bound) and full-batch decode (compute bound)
    bw = max(bandwidth_gbs(1024 if not args.quick else 64).values())
    mm = max(matmul_gflops(2048 if not args.quick else 256).values())
    nbytes = weight_bytes(inflight.params)
    # a decode step reads every weight but the embedding table, of which it gathers one row per
    # token (unless the table is also the output head), and multiplies each weight it reads twice
    table = 0 if inflight.cfg.tie_word_embeddings else inflight.cfg.vocab_size * inflight.cfg.hidden_size * 4
    nbytes -= table
    params = nbytes / 4
    one = make(slots=1)
    decode_only = [(work["uniform"][0][0][:16], 256 if not args.quick else 32)]
    s, t, _ = timed(engine_run(one, decode_only), args.runs)
    rows.append(row("roofline", "batch 1 decode", decode_only, s, t))
    b1 = tokens_of(decode_only) / s
    full = [(p[:16], 128 if not args.quick else 16) for p, _ in work["uniform"][: args.slots]]
    s, t, _ = timed(engine_run(inflight, full), args.runs)
    rows.append(row("roofline", f"batch {args.slots} decode", full, s, t))
    bn = tokens_of(full) / s
    roof = {"bandwidth_gbs": bw, "matmul_gflops": mm, "weight_bytes_read_per_step": nbytes, "embedding_bytes": table,
            "batch1_roofline_tok_s": bw * 1e9 / nbytes, "batch1_achieved_tok_s": b1,
            "batch1_fraction": b1 / (bw * 1e9 / nbytes),
            "batchN_roofline_tok_s": min(args.slots * bw * 1e9 / nbytes, mm * 1e9 / (2 * params)),
            "batchN_achieved_tok_s": bn}
    roof["batchN_fraction"] = bn / roof["batchN_roofline_tok_s"]
    return {"args": vars(args), "machine": machine_info(), "rows": rows, "checks": checks, "roofline": roof,
            "params": int(params)}


def ratios(result: dict) -> dict[str, float]:
    r = {(x["comparison"], x["variant"]): x["median_s"] for x in result["rows"]}
    return {
        "inflight_over_static_hetero": r[("in-flight vs static (hetero)", "static waves")]
        / r[("in-flight vs static (hetero)", "in-flight, longest 1st")],
        "inflight_arrival_over_static_hetero": r[("in-flight vs static (hetero)", "static waves")]
        / r[("in-flight vs static (hetero)", "in-flight, arrival")],
        "prefix_on_over_off_labeling": r[("prefix cache (labeling)", "off")] / r[("prefix cache (labeling)", "on")],
        "engine_over_hf_hetero": r[("engine vs HF (hetero)", "HF generate")] / r[("engine vs HF (hetero)", "engine in-flight")],
        "engine_over_hf_uniform": r[("engine vs HF (uniform)", "HF generate")] / r[("engine vs HF (uniform)", "engine in-flight")],
        "int8_speed_over_f32": r[("int8 weights (uniform)", "float32")] / r[("int8 weights (uniform)", "int8")],
    }


TARGETS = {"inflight_over_static_hetero": 1.8, "inflight_arrival_over_static_hetero": 1.65,
           "prefix_on_over_off_labeling": 3.0, "engine_over_hf_hetero": 2.5, "engine_over_hf_uniform": 1.0}


def report(result: dict) -> str:
    lines = [f"{'comparison':<32} {'variant':<18} {'median s':>9} {'tokens/s':>9}  runs"]
    for x in result["rows"]:
        lines.append(f"{x['comparison']:<32} {x['variant']:<18} {x['median_s']:>9.2f} {x['tokens_per_s']:>9.1f}  "
                     f"{x['runs_s']}")
    lines.append("")
    for k, v in result["ratios"].items():
        target = TARGETS.get(k)
        lines.append(f"{k:<32} {v:6.2f}x" + (f"   target >= {target}x: {'met' if v >= target else 'MISSED'}"
                                               if target else ""))
    q = result["checks"]["int8"]
    lines.append(f"{'int8 bytes vs bf16':<32} {q['weight_bytes_vs_bf16']:6.3f}    target <= 0.55: "
                 f"{'met' if q['weight_bytes_vs_bf16'] <= 0.55 else 'MISSED'}")
    roof = result["roofline"]
    lines.append(f"{'batch-1 decode vs bandwidth':<32} {roof['batch1_fraction']:6.1%}   "
                 f"({roof['batch1_achieved_tok_s']:.1f} of {roof['batch1_roofline_tok_s']:.1f} tok/s; target >= 50%)")
    lines.append(f"{'batch-N decode vs roofline':<32} {roof['batchN_fraction']:6.1%}   "
                 f"({roof['batchN_achieved_tok_s']:.1f} of {roof['batchN_roofline_tok_s']:.1f} tok/s)")
    lines.append(f"checks: {json.dumps({k: v for k, v in result['checks'].items() if k != 'int8'})}")
    lines.append(f"int8: {json.dumps({k: round(v, 4) for k, v in q.items()})}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [c for c in dict.fromkeys(x["comparison"] for x in result["rows"]) if c != "roofline"]
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2))
    for ax, g in zip(axes, groups):
        xs = [x for x in result["rows"] if x["comparison"] == g]
        ax.bar([x["variant"] for x in xs], [x["tokens_per_s"] for x in xs], color=["#4C72B0", "#DD8452", "#55A868"][: len(xs)])
        ax.set_title(g, fontsize=9)
        ax.set_ylabel("generated tokens/s")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{result['params'] / 1e6:.0f}M-parameter Llama, float32, {result['machine']['cpu_count']} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = bench(args)
    result["ratios"] = ratios(result)
    print(report(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
