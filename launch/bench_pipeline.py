"""The Beam job against the engine alone, on the same records, in one run.

Records: prompts of 40-90 words built from the demo prompts, each with its own max_tokens drawn
from [--min_tokens, --max_tokens], greedy, EOS ignored so that lengths are what the record says
(`--ignore_eos`, on by default). The engine alone runs `Engine.generate` over the same token ids;
the job runs `pipeline.job.run` over the same records written as JSONL shards, with the engine
already loaded and compiled in this process (both sides warm: a warm-up run of each first). The
job's rate is completion tokens over its whole wall time, Beam and writing included.

    python -m launch.bench_pipeline                       # demo model, 256 records, 3 runs each
    python -m launch.bench_pipeline --batch_tokens 4096   # Beam batches smaller than the slots

It also times the engine alone on the same records with and without a stop string (`--stop`,
default "."), which the engine's loop checks once per dispatch and ends the sequence on.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import tempfile
import time

import numpy as np

from model import SamplingParams
from pipeline.handler import EngineHandler, ModelSpec
from pipeline.job import run

MODEL = "configs/models/demo.yaml"


def records(n: int, min_tokens: int, max_tokens: int, seed: int = 0) -> list[dict]:
    words = " ".join(json.loads(line)["prompt"] for path in sorted(glob.glob("configs/demo/*.jsonl"))
                     for line in open(path)).split()  # the demo's prompt shards, not its labeling/ folder
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        start, length = int(rng.integers(0, len(words) - 90)), int(rng.integers(40, 91))
        out.append({"id": f"r{i}", "prompt": " ".join(words[start:start + length]),
                    "max_tokens": int(rng.integers(min_tokens, max_tokens + 1))})
    return out


def engine_alone(engine, recs: list[dict], ignore_eos: bool, stop: tuple[str, ...] = ()) -> tuple[float, int]:
    ids = engine.tokenizer.encode_batch([r["prompt"] for r in recs])
    params = [SamplingParams(max_new_tokens=r["max_tokens"], ignore_eos=ignore_eos, stop=stop) for r in recs]
    start = time.perf_counter()
    outs = engine.generate(ids, params)
    return time.perf_counter() - start, sum(len(o.token_ids) for o in outs)


def job(recs: list[dict], workdir: str, shards: int, extra: list[str]) -> tuple[float, int]:
    inp = os.path.join(workdir, "in")
    os.makedirs(inp, exist_ok=True)
    per = -(-len(recs) // shards)
    for s in range(shards):
        with open(os.path.join(inp, f"part-{s}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs[s * per:(s + 1) * per])
    start = time.perf_counter()
    manifest = run(["--input", os.path.join(inp, "*.jsonl"), "--output", os.path.join(workdir, "out"),
                    "--model", MODEL, "--overwrite", "--progress_interval_s", "0", *extra])
    return time.perf_counter() - start, manifest["completion_tokens"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--min_tokens", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--batch_tokens", type=int, default=16384)
    p.add_argument("--workers", type=int, default=0,
                   help="Beam worker threads feeding the one engine (0: the job's default)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--stop", default=".", help="stop string for the engine-alone comparison ('' = skip it)")
    p.add_argument("--out", default="bench_pipeline.json")
    args = p.parse_args(argv)
    recs = records(args.records, args.min_tokens, args.max_tokens)
    spec = ModelSpec.parse(MODEL)
    engine = EngineHandler(spec).load_model()  # the job's own engine: the job then reuses it
    engine.warmup()
    extra = ["--batch_tokens", str(args.batch_tokens)]
    if args.workers:
        extra += ["--direct_num_workers", str(args.workers), "--direct_running_mode", "multi_threading"]
    # The job applies each record's max_tokens with EOS on; the engine side must do the same
    rows = {"engine": [], "job": []}
    with tempfile.TemporaryDirectory() as tmp:
        engine_alone(engine, recs[:16], ignore_eos=False)
        job(recs[:16], tmp, 1, extra)  # warm-up: Beam's own first-run costs
        for _ in range(args.runs):
            rows["engine"].append(engine_alone(engine, recs, ignore_eos=False))
            rows["job"].append(job(recs, tmp, args.shards, extra))
    stops = {}
    if args.stop:
        for name, stop in (("no stop string", ()), (f"stop {args.stop!r}", (args.stop,))):
            runs = [engine_alone(engine, recs, ignore_eos=False, stop=stop) for _ in range(args.runs)]
            stops[name] = {"s": round(statistics.median(s for s, _ in runs), 3), "tokens": runs[-1][1]}
    rate = {k: statistics.median(tokens / secs for secs, tokens in v) for k, v in rows.items()}
    result = {"records": args.records, "batch_tokens": args.batch_tokens, "workers": args.workers,
              "max_slots": spec.engine.max_slots, "runs": {k: [{"s": round(s, 3), "tokens": t} for s, t in v]
                                                    for k, v in rows.items()},
              "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
              "job_over_engine": round(rate["job"] / rate["engine"], 3), "engine_stop_strings": stops}
    print(f"{'':8}{'tokens/s (median of ' + str(args.runs) + ')':>28}")
    for k in ("engine", "job"):
        print(f"{k:8}{rate[k]:>28.1f}")
    print(f"job / engine: {result['job_over_engine']:.3f}   (batch_tokens {args.batch_tokens}, "
          f"{args.records} records, {spec.engine.max_slots} slots)")
    for name, r in stops.items():
        print(f"engine alone, {name}: {r['s']:.2f} s (median of {args.runs}), {r['tokens']} tokens generated")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
