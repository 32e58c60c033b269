"""Decode step time by slots and live cache chunks: the measurement behind the chunked KV cache.

A random Llama of the feature benchmark's shape (26M parameters, float32, max_len 1024 = 8 chunks
of 128 positions) runs `decode_steps` tokens per dispatch for every slot, attending over the
first 1, 2, 4 or 8 chunks; the table gives the median time per step and tokens/s.

Run:  python -m launch.bench_decode_step            # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import model  # noqa: E402,F401  (first: its start-up defaults must precede jax's import)
import jax
import jax.numpy as jnp

from model import Engine, SamplingParams
from model.config import ModelConfig
from model.engine import random_params
from model.sharding import make_mesh


def step_times(slots: int, max_len: int, steps: int, runs: int) -> dict[int, tuple[int, float]]:
    """Chunk count -> (positions those chunks hold, median seconds per decode step)."""
    cfg = ModelConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_layers=6, num_heads=8,
                      num_kv_heads=4, head_dim=64, max_position_embeddings=4096, rope_theta=500000.0,
                      eos_token_ids=(2,))
    mesh = make_mesh((1, 1))
    eng = Engine(cfg, random_params(cfg, jnp.float32, mesh, 0), mesh, max_slots=slots, max_len=max_len,
                 decode_steps=steps)
    eng.generate([[5] * 16] * slots, SamplingParams(max_new_tokens=2, ignore_eos=True))
    out = {}
    for chunks in sorted({1, 2, 4, len(eng.cache.sizes)} & set(range(1, len(eng.cache.sizes) + 1))):
        times = []
        for _ in range(runs + 1):  # the first call compiles
            start = time.perf_counter()
            eng.cache, eng.state, eng.spec, *res = eng._decode(eng._weights, eng.cache, eng.state, eng.spec,
                                                               eng._table, steps, chunks)
            jax.block_until_ready(res)
            times.append((time.perf_counter() - start) / steps)
        out[chunks] = eng.cache.span(chunks), statistics.median(times[1:])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default="bench_decode_step.json")
    args = p.parse_args(argv)
    rows = []
    print(f"{'slots':>5} {'chunks':>6} {'positions':>9} {'ms/step':>8} {'tokens/s':>9}")
    for slots in args.slots:
        for chunks, (span, s) in step_times(slots, args.max_len, args.steps, args.runs).items():
            row = {"slots": slots, "chunks": chunks, "positions": span, "ms_per_step": round(1000 * s, 2),
                   "tokens_per_s": round(slots / s, 1)}
            rows.append(row)
            print(f"{slots:>5} {chunks:>6} {span:>9} {row['ms_per_step']:>8} {row['tokens_per_s']:>9}")
    result = {"args": vars(args), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
