"""Speculative decoding on and off, in one run, on the demo model: the numbers behind docs/benchmarks.md.

Workloads (the demo's own prompts, EOS ignored so every row generates `--new` tokens):
  batch1    one slot, greedy: the demo model alone, with its distilled draft (demo-draft), and
            with prompt lookup;
  copy      `--copy-slots` slots, greedy, a copy-heavy labeling workload: each prompt holds a
            passage and asks for a quote of it, so the answer repeats spans of the prompt;
            plain vs prompt lookup;
  busy      `--busy-slots` slots, sampled at temperature 1 (few proposals survive): plain vs
            prompt lookup, where speculation should turn itself off (SpecGate) and cost nothing.
Every engine is warmed up first (which also measures a verify step's cost for the gate); each
figure is the median of `--runs` timed runs, tokens generated / wall seconds.

`--widen N` measures against the target widened N times (launch/widen_model.py: the same function
at N^2 times the parameters, built in a temporary directory), so that a decode step waits on its
weights as a large model's does; the draft, distilled against the target, fits it unchanged.

Run:  python -m launch.bench_speculative            # ~2 min on a 2-core CPU
      python -m launch.bench_speculative --quick
      python -m launch.bench_speculative --widen 4 --workloads batch1   # a 79M-parameter target
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from launch.bench_engine import machine_info  # noqa: E402
from launch.widen_model import widen  # noqa: E402
from model import Engine, SamplingParams  # noqa: E402
from model.engine import CHECKPOINTS  # noqa: E402

WORKLOADS = ("batch1", "copy", "busy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="demo")
    p.add_argument("--draft", default="demo-draft")
    p.add_argument("--ks", default="2,4", help="num_speculative_tokens values to compare (comma-separated)")
    p.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--prompts", type=int, default=8, help="prompts per workload (busy: 8x as many)")
    p.add_argument("--copy-slots", type=int, default=4)
    p.add_argument("--busy-slots", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--widen", type=int, default=1, help="measure against the target widened this many times")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {WORKLOADS}")
    p.add_argument("--out", default="bench_speculative.json")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 prompts, 16 tokens, 1 run")
    args = p.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",")]
    args.workloads = args.workloads.split(",")
    if unknown := set(args.workloads) - set(WORKLOADS):
        p.error(f"--workloads {sorted(unknown)}: not among {WORKLOADS}")
    if args.quick:
        args.prompts, args.new, args.runs, args.busy_slots = 2, 16, 1, 4
    return args


def demo_prompts() -> list[str]:
    recs = [json.loads(line) for path in sorted(glob.glob("configs/demo/prompts-*.jsonl")) for line in open(path)]
    return list(dict.fromkeys(r["prompt"] for r in recs))  # distinct, in file order


def copy_prompts(engine: Engine, seeds: list[str], new: int) -> list[str]:
    """Labeling-style extraction prompts: a passage (the model's own sampled continuation of a
    demo prompt), then the instruction and the quote's first words."""
    tok = engine.tokenizer
    outs = engine.generate(tok.encode_batch(seeds), SamplingParams(max_new_tokens=new, temperature=0.9, seed=1))
    passages = [s + tok.decode(o.token_ids) for s, o in zip(seeds, outs)]
    return [f"Text: {p}\nQuote the text: {p[:24]}" for p in passages]


def timed(engine: Engine, prompts: list[list[int]], sampling: list[SamplingParams], runs: int) -> dict:
    before = engine.stats()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        outs = engine.generate(prompts, sampling)
        times.append(time.perf_counter() - start)
    after = engine.stats()
    tokens = sum(len(o.token_ids) for o in outs)
    proposed, accepted = (after[k] - before[k] for k in ("spec_proposed", "spec_accepted"))
    steps = after["spec_steps"] - before["spec_steps"]
    return {"seconds": statistics.median(times), "times": [round(t, 4) for t in times], "tokens": tokens,
            "tokens_per_s": round(tokens / statistics.median(times), 1),
            "acceptance": round(accepted / proposed, 4) if proposed else None,
            "accepted_per_step": round(accepted / steps, 3) if steps else None,
            "verify_cost": round(engine._gate.cost, 3) if engine.spec_k else None,
            "decode_calls": after["decode_calls"] - before["decode_calls"]}


def bench(args, target: str | None = None) -> dict:
    """target: the checkpoint to load (default args.target)."""
    seeds = demo_prompts()
    results, rows = {}, []

    def engines(slots: int, kinds: tuple[str, ...], ks: list[int]) -> dict[str, Engine]:
        base = Engine.from_pretrained(target or args.target, mesh_shape=(1, 1), dtype="float32", max_slots=slots, max_len=256)
        out = {"plain": base}
        for kind in kinds:
            extra = {"draft": args.draft} if kind == "draft" else {"speculative": "ngram"}
            for k in ks:
                out[f"{kind} k={k}"] = Engine(base.cfg, base.weights(), base.mesh, dataclasses.replace(
                    base.config, num_speculative_tokens=k, **extra), tokenizer=base.tokenizer)
        for e in out.values():
            e.warmup()
        return out

    def run(name: str, es: dict[str, Engine], prompts: list[str], sampling: SamplingParams):
        ids = es["plain"].tokenizer.encode_batch(prompts)
        results[name] = {}
        for kind, e in es.items():
            r = timed(e, ids, [dataclasses.replace(sampling, seed=i) for i in range(len(ids))], args.runs)
            results[name][kind] = r
        base = results[name]["plain"]["seconds"]
        for kind, r in results[name].items():
            r["speedup"] = round(base / r["seconds"], 3)
            rows.append({"workload": name, "engine": kind, "slots": es[kind].max_slots, "tokens/s": r["tokens_per_s"],
                         "speedup": r["speedup"], "acceptance": r["acceptance"] if r["acceptance"] is not None else "",
                         "kept/step": r["accepted_per_step"] if r["accepted_per_step"] is not None else "",
                         "verify cost": r["verify_cost"] if r["verify_cost"] is not None else ""})

    greedy = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    if "batch1" in args.workloads:
        es = engines(1, ("draft", "ngram"), args.ks)
        run("batch1", es, seeds[:args.prompts], greedy)
    if "copy" in args.workloads:
        es = engines(args.copy_slots, ("ngram",), args.ks)
        run("copy", es, copy_prompts(es["plain"], seeds[:args.prompts], 48), greedy)
    if "busy" in args.workloads:
        es = engines(args.busy_slots, ("ngram",), args.ks[-1:])
        run("busy", es, (seeds * 8)[:8 * args.prompts], dataclasses.replace(greedy, temperature=1.0))
    return {"machine": machine_info(), "args": vars(args), "results": results, "rows": rows}


def table(rows: list[dict]) -> str:
    """A markdown table of the rows' keys, in their order."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        target = None
        if args.widen > 1:
            src = CHECKPOINTS.get(args.target, args.target)
            target = widen(src, os.path.join(tmp, f"{os.path.basename(src)}-x{args.widen}"), args.widen)
        result = bench(args, target)
    print(table(result["rows"]))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
