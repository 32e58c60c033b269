"""How fast this host multiplies a few rows by weights that do not fit its caches: the bound behind
the CPU figures of speculative decoding (a verify step runs k + 1 rows per slot), mixture-of-experts
decode and small refill prefills.

A chain of `layers` gated-MLP-shaped products, x + silu(x @ W1) @ W2 with W1 [hidden, ffw] and
W2 [ffw, hidden] (float32, distinct weights per layer: 70 MB at the defaults, bench_features'
model's MLP width), for M rows, in XLA:CPU (jitted), numpy and torch, side by side. Prints ms per
chain, the weights' bytes over that time, and the flops rate; medians of --runs.

jax-outputs-first is the engine's CPU form (model/decoder.py, HotPath.outputs_first): the same
weights stored [out, in], and for up to FEATURES_MAX_ROWS rows the products run as W @ x^T with x^T
materialized, which XLA:CPU runs about twice as fast at 4-16 rows.

    python -m launch.bench_matmul                         # rows 1 4 16 64, writes bench_matmul.json
    XLA_FLAGS=--xla_cpu_use_onednn=true python -m launch.bench_matmul --libs jax   # an XLA:CPU flag
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from launch.bench_engine import machine_info  # noqa: E402

LIBS = ("jax", "jax-outputs-first", "numpy", "torch")


def chains(hidden: int, ffw: int, layers: int, seed: int = 0) -> dict:
    """A function per library: f(rows) -> seconds of one chain over `rows` rows (result ready)."""
    rng = np.random.default_rng(seed)
    w1 = [rng.standard_normal((hidden, ffw), dtype=np.float32) * 0.02 for _ in range(layers)]
    w2 = [rng.standard_normal((ffw, hidden), dtype=np.float32) * 0.02 for _ in range(layers)]

    def jax_chain():
        import jax
        import jax.numpy as jnp
        a, b = [jnp.asarray(w) for w in w1], [jnp.asarray(w) for w in w2]

        @jax.jit
        def f(x, a, b):
            for u, v in zip(a, b):
                x = x + jax.nn.silu(x @ u) @ v
            return x
        return lambda x: f(jnp.asarray(x), a, b).block_until_ready()

    def jax_outputs_first_chain():
        import model  # noqa: F401  (its start-up defaults precede jax's import)
        import jax
        import jax.numpy as jnp
        from model.decoder import FEATURES_MAX_ROWS, from_features, linear_stored, matmul_features, to_features
        a, b = [jnp.asarray(w.T.copy()) for w in w1], [jnp.asarray(w.T.copy()) for w in w2]

        @jax.jit
        def f(x, a, b):  # as decoder.gated_mlp_stored: the hidden [ffw, rows] between the two products
            for u, v in zip(a, b):
                if x.shape[0] > FEATURES_MAX_ROWS:
                    x = x + linear_stored(jax.nn.silu(linear_stored(x, u, 1)), v, 1)
                else:
                    x = x + from_features(matmul_features(v, jax.nn.silu(matmul_features(u, to_features(x), 1, x.dtype)),
                                                          1, x.dtype), x.shape[:1])
            return x
        return lambda x: f(jnp.asarray(x), a, b).block_until_ready()

    def numpy_chain(x):
        for u, v in zip(w1, w2):
            h = x @ u
            x = x + (h / (1 + np.exp(-h))) @ v
        return x

    def torch_chain():
        import torch
        torch.set_num_threads(os.cpu_count())
        a, b = [torch.from_numpy(w) for w in w1], [torch.from_numpy(w) for w in w2]

        def f(x):
            with torch.no_grad():
                x = torch.from_numpy(x)
                for u, v in zip(a, b):
                    x = x + torch.nn.functional.silu(x @ u) @ v
            return x
        return f

    return {"jax": jax_chain, "jax-outputs-first": jax_outputs_first_chain, "numpy": lambda: numpy_chain,
            "torch": torch_chain}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffw", type=int, default=1408)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", default="bench_matmul.json")
    args = p.parse_args(argv)
    makers = chains(args.hidden, args.ffw, args.layers)
    weight_bytes = args.layers * 2 * args.hidden * args.ffw * 4
    rows = []
    for lib in args.libs:
        fn = makers[lib]()
        for m in args.rows:
            x = np.ones((m, args.hidden), np.float32)
            fn(x)  # compile (jax) and warm the allocator
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - start)
            s = float(np.median(times))
            rows.append({"lib": lib, "rows": m, "ms": round(s * 1e3, 2), "gb_per_s": round(weight_bytes / s / 1e9, 1),
                         "gflop_per_s": round(2 * m * weight_bytes / 4 / s / 1e9, 1)})
            r = rows[-1]
            print(f"{lib:<17} rows {m:>4}: {r['ms']:>8.2f} ms  {r['gb_per_s']:>6.1f} GB/s  {r['gflop_per_s']:>6.1f} GFLOP/s",
                  flush=True)
    result = {"args": vars(args), "xla_flags": os.environ.get("XLA_FLAGS", ""), "weight_bytes": weight_bytes,
              "machine": machine_info(), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
