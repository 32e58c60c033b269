"""The scheduler's settings side by side, in one run: batching and order, prefill_chunk, and HF.

On bench_features' model (a random 26M-parameter Llama, float32, 16 slots) and its heterogeneous
workload (b): 32-128-token prompts, completions log-uniform in 16-512 tokens. Adds a short-output
workload (s): 24-96-token prompts, completions uniform in 8-128. EOS is ignored everywhere.

Every variant is warmed up once (it compiles there), then the timed runs go round-robin over the
variants (run 1 of every variant, then run 2, ...), so a burst of load from another process on
a shared host falls on all of them alike. Each row reports the median and, from Engine.stats(),
where the median run's time went: prefill calls, decode (dispatch and waiting for results),
compiles (should be 0 in timed runs) and the rest (host work: scheduling, bookkeeping).

    python -m launch.bench_scheduler                              # the default set of variants
    python -m launch.bench_scheduler --chunks off 128 512 --runs 3
    python -m launch.bench_scheduler --quick                      # smoke run
    python -m launch.bench_scheduler --chunks 512 --longest-chunks 512 --refill-on-read --octave-buckets --hf short
    python -m launch.bench_scheduler --chunks 512 --longest-chunks 512 --refill-on-read --before inputs-first --hf short
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from launch.bench_engine import machine_info  # noqa: E402
from launch.bench_features import hf_run, ideal_step_ratios, random_checkpoint, tokens_of, workloads  # noqa: E402
import model.engine  # noqa: E402
from model import Engine, SamplingParams  # noqa: E402
from model.platform import hot_path  # noqa: E402

FULL = dict(vocab=8000, hidden=512, layers=6, heads=8, kv_heads=4, ffw=1408, slots=16, n=48, max_new=512,
            prompt_len=64, uniform_new=64, prefix_len=512)
QUICK = dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, ffw=128, slots=4, n=12, max_new=64,
             prompt_len=16, uniform_new=8, prefix_len=64)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--chunks", nargs="+", default=["off", "128", "256", "512"],
                   help="prefill_chunk values for in-flight arrival order ('off' = None)")
    p.add_argument("--longest-chunks", nargs="+", default=["off", "512"],
                   help="prefill_chunk values for in-flight longest-first")
    p.add_argument("--decode-steps", type=int, nargs="+", default=[8], help="decode_steps values (each chunk set)")
    p.add_argument("--hf", nargs="*", default=["hetero", "short"], choices=["hetero", "short"],
                   help="workloads to run HF generate on (none: skip HF)")
    p.add_argument("--refill-on-read", nargs="*", default=["512"],
                   help="prefill_chunk values for in-flight arrival order refilling as before (RefillOnRead)")
    p.add_argument("--before", choices=sorted(BEFORE),
                   help="also run static, in-flight arrival (the last --chunks value) and the short workload "
                        "on the engine as it was before a change: prompts padded to one length per doubling "
                        "(OctaveBuckets), or matmul weights stored inputs first (InputsFirst)")
    p.add_argument("--octave-buckets", dest="before", action="store_const", const="octave-buckets",
                   help="the same as --before octave-buckets")
    p.add_argument("--out", default="bench_scheduler.json")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        setattr(args, k, v)
    return args


def short_workload(args, rng: np.random.Generator) -> list[tuple[list[int], int]]:
    hi = args.max_new // 4 if args.quick else 128
    return [(rng.integers(3, args.vocab, size=int(rng.integers(24, 97))).tolist(), int(rng.integers(8, hi + 1)))
            for _ in range(args.n)]


class RefillOnRead(Engine):
    """The engine as it was before it refilled slots whose sequence ends within the dispatch in
    flight: a slot is refilled only once its end has been read back (one dispatch later)."""

    def _free_slots(self) -> list[int]:
        return [s for s, q in enumerate(self._slot_of) if q is None]


class OctaveBuckets(Engine):
    """The engine as it was before the CPU path padded prompts to 4 lengths per doubling: a
    prefill pads to the next power of two (or max_len)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.buckets = self.groups


class InputsFirst(Engine):
    """The engine as it was before the CPU path stored its matmul weights outputs first
    (HotPath.outputs_first): weights as loaded, [in, out], and every matmul x @ w."""

    def __init__(self, *a, **kw):
        choose = model.engine.hot_path
        model.engine.hot_path = lambda *x: dataclasses.replace(hot_path(*x), outputs_first=False)
        try:
            super().__init__(*a, **kw)
        finally:
            model.engine.hot_path = choose


BEFORE = {"octave-buckets": OctaveBuckets, "inputs-first": InputsFirst}


def chunk_value(s: str) -> int | None:
    return None if s == "off" else int(s)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    work = {"hetero": workloads(args, rng)["hetero"]}
    work["short"] = short_workload(args, np.random.default_rng(1))
    hf, path, max_len = random_checkpoint(args, work, "bench_scheduler_")

    def make(cls=Engine, **kw):
        return cls.from_pretrained(path, mesh_shape=(1, 1), dtype="float32", max_len=max_len,
                                      max_slots=args.slots, **kw)

    # variant name -> (workload name, engine or None for HF)
    variants: dict[str, tuple[str, Engine | None]] = {}
    for steps in args.decode_steps:
        tag = "" if args.decode_steps == [8] else f", steps {steps}"
        variants[f"static{tag}"] = ("hetero", make(batching="static", order="arrival", prefill_chunk=None,
                                                   decode_steps=steps))
        for c in args.chunks:
            variants[f"arrival, chunk {c}{tag}"] = ("hetero", make(order="arrival", prefill_chunk=chunk_value(c),
                                                                  decode_steps=steps))
        for c in args.longest_chunks:
            variants[f"longest, chunk {c}{tag}"] = ("hetero", make(prefill_chunk=chunk_value(c),
                                                                  decode_steps=steps))
        for c in args.refill_on_read:
            variants[f"arrival, chunk {c}, on read{tag}"] = ("hetero", make(RefillOnRead, order="arrival",
                                                                            prefill_chunk=chunk_value(c),
                                                                            decode_steps=steps))
        variants[f"short: engine{tag}"] = ("short", make(decode_steps=steps))
        if args.before:
            cls = BEFORE[args.before]
            variants[f"before: static{tag}"] = ("hetero", make(cls, batching="static", order="arrival",
                                                              prefill_chunk=None, decode_steps=steps))
            variants[f"before: arrival, chunk {args.chunks[-1]}{tag}"] = (
                "hetero", make(cls, order="arrival", prefill_chunk=chunk_value(args.chunks[-1]), decode_steps=steps))
            variants[f"before: short: engine{tag}"] = ("short", make(cls, decode_steps=steps))
    for wname in args.hf:
        variants[f"{wname}: HF"] = (wname, None)

    def runner(wname, engine):
        w = work[wname]
        if engine is None:
            return hf_run(hf, w, args.slots)
        sp = [SamplingParams(max_new_tokens=n, ignore_eos=True) for _, n in w]
        return lambda: [o.token_ids for o in engine.generate([p for p, _ in w], sp)]

    fns = {name: runner(w, e) for name, (w, e) in variants.items()}
    outputs, runs = {}, {name: [] for name in variants}
    for name, fn in fns.items():  # warm-up: compiles
        start = time.perf_counter()
        outputs[name] = fn()
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    for r in range(args.runs):
        for name, fn in fns.items():
            engine = variants[name][1]
            before = engine.stats() if engine is not None else {}
            start = time.perf_counter()
            out = fn()
            secs = time.perf_counter() - start
            assert out == outputs[name], f"{name}: run {r} differs from its warm-up"
            after = engine.stats() if engine is not None else {}
            runs[name].append({"s": secs, **{k: after[k] - before[k] for k in after}})
            print(f"run {r} {name}: {secs:.2f} s", flush=True)

    rows = []
    for name, rs in runs.items():
        med = sorted(rs, key=lambda x: x["s"])[len(rs) // 2]
        wname = variants[name][0]
        row = {"variant": name, "workload": wname, "median_s": round(med["s"], 3),
               "runs_s": [round(x["s"], 3) for x in rs], "tokens_per_s": round(tokens_of(work[wname]) / med["s"], 1)}
        if variants[name][1] is not None:
            host = med["s"] - med["prefill_s"] - med["decode_s"] - med["compile_s"]
            row.update({k: round(med[k], 3) for k in ("prefill_s", "decode_s", "compile_s")},
                       host_s=round(host, 3), prefill_calls=med["prefill_calls"], decode_calls=med["decode_calls"])
        rows.append(row)
    med = {r["variant"]: r["median_s"] for r in rows}
    ratios = {}
    for steps in args.decode_steps:
        tag = "" if args.decode_steps == [8] else f", steps {steps}"
        for name in med:
            if name.endswith(tag) and (name.startswith("arrival") or name.startswith("longest")):
                ratios[f"static / {name}"] = round(med[f"static{tag}"] / med[name], 3)
        if "hetero" in args.hf:
            ratios[f"HF / longest, chunk {args.longest_chunks[-1]}{tag} (hetero)"] = round(
                med["hetero: HF"] / med[f"longest, chunk {args.longest_chunks[-1]}{tag}"], 3)
        if "short" in args.hf:
            ratios[f"HF / short: engine{tag}"] = round(med["short: HF"] / med[f"short: engine{tag}"], 3)
        if args.before:
            arrival = f"arrival, chunk {args.chunks[-1]}{tag}"
            ratios[f"before: static / before: {arrival}"] = round(
                med[f"before: static{tag}"] / med[f"before: {arrival}"], 3)
            for name in (f"static{tag}", arrival, f"short: engine{tag}"):
                ratios[f"before / now: {name}"] = round(med[f"before: {name}"] / med[name], 3)
            if "short" in args.hf:
                ratios[f"HF / before: short: engine{tag}"] = round(med["short: HF"] / med[f"before: short: engine{tag}"], 3)
    engine_outs = {n: o for n, o in outputs.items() if variants[n][1] is not None}
    hetero_same = len({json.dumps(o) for n, o in engine_outs.items() if variants[n][0] == "hetero"}) == 1
    checks = {"engine_variants_identical_hetero": hetero_same,
              "ideal_static_over_inflight_steps": ideal_step_ratios(work["hetero"], args.slots)}
    if args.hf:
        checks["identical_to_hf"] = {
            w: float(np.mean([a == b for a, b in zip(outputs[f"{w}: HF"], engine_outs[next(
                n for n in engine_outs if variants[n][0] == w)])]))
            for w in args.hf}
    print(f"\n{'variant':<28} {'median s':>9} {'tok/s':>8} {'prefill':>8} {'decode':>8} {'compile':>8} "
          f"{'host':>7} {'calls p/d':>10}  runs")
    for x in rows:
        extra = (f"{x['prefill_s']:>8.2f} {x['decode_s']:>8.2f} {x['compile_s']:>8.2f} {x['host_s']:>7.2f} "
                 f"{x['prefill_calls']:>4}/{x['decode_calls']:<5}" if "host_s" in x else " " * 44)
        print(f"{x['variant']:<28} {x['median_s']:>9.2f} {x['tokens_per_s']:>8.1f} {extra}  {x['runs_s']}")
    print()
    for k, v in ratios.items():
        print(f"{k:<48} {v:6.3f}x")
    print(f"checks: {json.dumps(checks)}")
    print(f"load average at the end: {os.getloadavg()}")
    result = {"args": vars(args), "machine": machine_info(), "rows": rows, "ratios": ratios, "checks": checks,
              "short_workload": {"tokens": tokens_of(work["short"]), "mean_new": tokens_of(work["short"]) / args.n,
                                 "max_len": max_len}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
