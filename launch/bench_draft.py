"""How many of a draft model's proposals its target accepts, measured offline with full forwards.

For each held-out context (the start of a held-out demo chunk, BOS first, of random length), the
draft proposes k tokens and the target verifies them, as speculative decoding would:
  greedy   the draft proposes its argmax tokens; the target accepts the longest prefix equal to
           its own argmax tokens. While they agree both follow the same tokens, so this walks the
           target's greedy continuation and counts the leading positions where the draft's argmax
           matches: exact, no sampling.
  sampled  temperature 1: the draft samples x ~ q, the target accepts it with probability
           min(1, p(x) / q(x)), so position j is accepted with probability
           alpha = sum_x min(p(x), q(x)) given that the ones before it were, and the context it
           extends is the accepted token, distributed as min(p, q) / alpha. The expected number
           accepted, sum_j prod_{i<=j} alpha_i, is estimated by walking one such path per
           context (a Rao-Blackwellised estimate: unbiased, seeded).
The acceptance rate is accepted / proposed = E[accepted] / k. A target forward then yields
E[accepted] + 1 tokens (the correction or bonus token included).

Run (needs `apt-get install jargon-text bible-kjv-text`, like train_demo):
  PYTHONPATH=. python launch/bench_draft.py --drafts model/assets/demo-draft /tmp/draft-ce
Cost: the draft's and the target's time per token of batch-1 greedy decode in the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Sequence

import model  # noqa: E402,F401  (first: its start-up defaults must precede jax's import)
import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm

from launch import train_demo as demo
from launch.distill_draft import load_target, logits_of
from model.speculative import check_draft
from model.config import ModelConfig

# (tokens [n, w] int32, index [n]) -> float32 logits [n, v] of the token after tokens[i, :index[i] + 1]
LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def model_logits_fn(params, cfg: ModelConfig) -> LogitsFn:
    """A LogitsFn running the decoder's full causal forward (jitted once per buffer shape)."""
    fn = jax.jit(lambda p, tokens, index: logits_of(p, cfg, tokens)[jnp.arange(tokens.shape[0]), index])
    return lambda tokens, index: np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(index)))


def greedy_accepted(target: LogitsFn, drafts: dict[str, LogitsFn], tokens: np.ndarray, lengths: np.ndarray,
                    k: int) -> dict[str, np.ndarray]:
    """Per draft, the tokens [n] accepted (0..k) of k greedy proposals after each context
    tokens[i, :lengths[i]]; tokens [n, w] needs w >= max(lengths) + k - 1."""
    buf, rows = tokens.copy(), np.arange(len(tokens))
    match = {name: np.zeros((len(tokens), k), bool) for name in drafts}
    for j in range(k):
        index = lengths + j - 1
        best = np.argmax(target(buf, index), axis=-1)
        for name, draft in drafts.items():
            match[name][:, j] = np.argmax(draft(buf, index), axis=-1) == best
        if j + 1 < k:
            buf[rows, lengths + j] = best
    return {name: np.cumprod(m, axis=1).sum(axis=1) for name, m in match.items()}


def sampled_accepted(target: LogitsFn, draft: LogitsFn, tokens: np.ndarray, lengths: np.ndarray, k: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Expected tokens accepted [n, k] of j + 1 proposals sampled at temperature 1 (column j), after
    each context tokens[i, :lengths[i]]; column 0 is the first proposal's acceptance probability."""
    buf, rows = tokens.copy(), np.arange(len(tokens))
    reach, expected = np.ones(len(tokens)), np.zeros((len(tokens), k))
    for j in range(k):
        index = lengths + j - 1
        overlap = np.minimum(_softmax(target(buf, index)), _softmax(draft(buf, index)))
        alpha = overlap.sum(axis=-1)
        reach = reach * alpha  # P(proposals 0..j all accepted), along this path
        expected[:, j] = reach if j == 0 else expected[:, j - 1] + reach
        if j + 1 < k:
            cdf = np.cumsum(overlap / alpha[:, None], axis=-1)
            buf[rows, lengths + j] = np.minimum((cdf < rng.random(len(rows))[:, None]).sum(axis=-1),
                                                overlap.shape[-1] - 1)
    return expected


def _softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def heldout_contexts(chunks: Sequence[Sequence[int]], rows: int, k: int, min_context: int, max_context: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [rows, max_context + k - 1] right-padded with 0, lengths [rows]): row i is the start of
    chunk i mod len(chunks), of a seeded random length in [min_context, max_context]."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((rows, max_context + k - 1), np.int32)
    lengths = np.zeros(rows, np.int32)
    for i in range(rows):
        chunk = chunks[i % len(chunks)]
        n = int(rng.integers(min_context, min(max_context, len(chunk)) + 1))
        tokens[i, :n], lengths[i] = chunk[:n], n
    return tokens, lengths


def decode_ms_per_token(path: str, new_tokens: int = 128, repeats: int = 3) -> float:
    """Median over `repeats` runs of ms per decode step of batch-1 greedy decode in the engine
    (float32): the engine's own decode seconds (dispatch and wait, compiles excluded) over the
    steps its decode calls ran, so the prefill and the host's bookkeeping are left out."""
    from model import Engine, SamplingParams

    engine = Engine.from_pretrained(path, dtype="float32", max_slots=1, max_len=new_tokens + 32)
    prompt = [[engine.cfg.bos_token_id or 1] + list(range(10, 25))]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompt, params)  # compile

    def run() -> float:
        before = engine.stats()
        engine.generate(prompt, params)
        after = engine.stats()
        steps = (after["decode_calls"] - before["decode_calls"]) * engine.decode_steps
        return (after["decode_s"] - before["decode_s"]) / steps

    return 1e3 * statistics.median(run() for _ in range(repeats))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="model/assets/demo")
    p.add_argument("--drafts", nargs="+", default=["model/assets/demo-draft"], help="draft checkpoint directories")
    p.add_argument("--k", type=int, default=4, help="proposals per verification")
    p.add_argument("--rows", type=int, default=262, help="held-out contexts (2 per held-out chunk)")
    p.add_argument("--min_context", type=int, default=8)
    p.add_argument("--max_context", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_timing", action="store_true", help="skip the decode-speed measurement")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    if args.k < 1:
        raise ValueError(f"--k {args.k}; must be >= 1")
    t_start = time.time()

    target_cfg, target_params = load_target(args.target)
    target = model_logits_fn(target_params, target_cfg)
    drafts, sizes = {}, {"target": target_cfg.num_params}
    for path in args.drafts:
        cfg, params = load_target(path)
        check_draft(cfg, target_cfg)
        drafts[path], sizes[path] = model_logits_fn(params, cfg), cfg.num_params
    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.target, "tokenizer.model"))
    _, heldout_text, _ = demo.split_data()
    chunks = [[sp.bos_id()] + ids for ids in sp.encode(heldout_text)]
    tokens, lengths = heldout_contexts(chunks, args.rows, args.k, args.min_context, args.max_context, args.seed)

    greedy = greedy_accepted(target, drafts, tokens, lengths, args.k)
    results = dict(k=args.k, rows=args.rows, contexts=f"{args.min_context}-{args.max_context} tokens",
                   target=dict(path=args.target, params=target_cfg.num_params), drafts={})
    timing = {} if args.no_timing else {path: decode_ms_per_token(path) for path in [args.target, *args.drafts]}
    for path, draft in drafts.items():  # the same random numbers for each: results do not depend on the order
        sampled = sampled_accepted(target, draft, tokens, lengths, args.k, np.random.default_rng(args.seed))
        g, s = greedy[path], sampled[:, -1]
        r = dict(params=sizes[path], params_ratio=round(target_cfg.num_params / sizes[path], 2),
                 greedy_accepted=float(g.mean()), greedy_rate=float(g.mean() / args.k),
                 greedy_rate_stderr=float(g.std() / np.sqrt(len(g)) / args.k), greedy_first=float((g > 0).mean()),
                 sampled_accepted=float(s.mean()), sampled_rate=float(s.mean() / args.k),
                 sampled_rate_stderr=float(s.std() / np.sqrt(len(s)) / args.k),
                 sampled_first=float(sampled[:, 0].mean()),
                 # fewer proposals: the first j of these k (acceptance of a prefix does not depend on k)
                 greedy_accepted_by_k=[float(np.minimum(g, j).mean()) for j in range(1, args.k + 1)],
                 sampled_accepted_by_k=[float(x) for x in sampled.mean(axis=0)])
        if timing:
            c = timing[path] / timing[args.target]
            # tokens per verification over its cost in target decode steps, if verifying k + 1
            # positions costs one decode step (memory-bound): an upper bound on the speedup
            r.update(decode_ms=round(timing[path], 3), cost_ratio=round(c, 3),
                     greedy_speedup_bound_by_k=[round((a + 1) / (j * c + 1), 2)
                                                for j, a in enumerate(r["greedy_accepted_by_k"], 1)])
        results["drafts"][path] = r
    if timing:
        results["target"]["decode_ms"] = round(timing[args.target], 3)
    results["wall_s"] = round(time.time() - t_start, 1)

    fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"k={args.k}, {args.rows} held-out contexts; target {args.target}: {target_cfg.num_params:,} params"
          + (f", {timing[args.target]:.2f} ms/token" if timing else ""))
    for path, r in results["drafts"].items():
        cost = (f"\n  cost {r['decode_ms']:.2f} ms/token = {r['cost_ratio']:.2f}x target; greedy speedup "
                f"bound by k: {fmt(r['greedy_speedup_bound_by_k'])}") if timing else ""
        print(f"{path}: {r['params']:,} params ({r['params_ratio']}x fewer)\n"
              f"  greedy:  rate {r['greedy_rate']:.3f} +- {r['greedy_rate_stderr']:.3f} "
              f"({r['greedy_accepted']:.2f}/{args.k}, first {r['greedy_first']:.3f})\n"
              f"  sampled: rate {r['sampled_rate']:.3f} +- {r['sampled_rate_stderr']:.3f} "
              f"({r['sampled_accepted']:.2f}/{args.k}, first {r['sampled_first']:.3f})\n"
              f"  accepted with k = 1..{args.k}: greedy {fmt(r['greedy_accepted_by_k'])}, "
              f"sampled {fmt(r['sampled_accepted_by_k'])}{cost}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
