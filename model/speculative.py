"""Speculative decoding's device-side pieces: prompt-lookup proposals and exact verification.

Each verify step feeds a row its last token and k proposed tokens at once; the target's logits at
those k + 1 positions decide how many proposals to keep (Leviathan et al., 2023):
  proposal j is accepted with probability min(1, p_j(d_j) / q_j(d_j)), given all before it were;
  at the first rejection a token is drawn from max(p_j - q_j, 0), renormalized;
  when all are accepted, a bonus token is drawn from p_k.
p is the row's own sampling distribution (temperature, top-k, top-p: sampling.filtered_logits),
so the output follows exactly the distribution plain decoding samples from. A greedy row's p is
one-hot at the argmax, which makes this "keep proposals while they equal the argmax": the tokens
are those plain greedy decoding gives. Prompt lookup proposes deterministically (q one-hot at each
proposal), so a proposal is kept with probability p_j(d_j) and a rejection draws from p_j with d_j
removed.
A draft model proposes by sampling its own distribution q (sampling.filtered_logits of its logits,
with the row's parameters; greedy rows take its argmax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.sampling import filtered_logits

SPEC_SALT = 0x5BEC  # keys of verification draws, apart from the plain sampler's


def ngram_propose(history_bl: jax.Array, position_b: jax.Array, k: int, n_max: int,
                  n_min: int) -> tuple[jax.Array, jax.Array]:
    """Prompt-lookup proposals: for row i, whose tokens are history_bl[i, :position_b[i] + 1],
    the k tokens that followed the latest earlier occurrence of its longest suffix of n_max down
    to n_min tokens (a longer match wins, then a later one). Returns (proposals [b, k], how many
    of them are real [b]: 0 without a match, fewer than k when the match ends near the row's end).
    """
    b, length = history_bl.shape
    index = jnp.arange(length)[None, :]
    last = jnp.take_along_axis(history_bl, position_b[:, None], axis=1)  # [b, 1]
    # matched[i, j]: the suffix of length n ends at j as it ends at position_b (j < position_b)
    matched = (history_bl == last) & (index < position_b[:, None])
    size = jnp.zeros((b, length), jnp.int32)
    for n in range(1, n_max + 1):
        if n > 1:
            back = jnp.take_along_axis(history_bl, jnp.maximum(position_b - (n - 1), 0)[:, None], axis=1)
            shifted = jnp.pad(history_bl, ((0, 0), (n - 1, 0)), constant_values=-1)[:, :length]
            matched &= (shifted == back) & (index >= n - 1) & (position_b[:, None] >= n - 1)
        size = jnp.where(matched, n, size)
    score = jnp.where(size >= n_min, size * length + index, -1)
    end = jnp.argmax(score, axis=1)  # where the match ends
    found = jnp.max(score, axis=1) >= 0
    take = end[:, None] + 1 + jnp.arange(k)[None, :]
    proposals = jnp.take_along_axis(history_bl, jnp.minimum(take, length - 1), axis=1)
    count = jnp.where(found, jnp.clip(position_b - end, 0, k), 0)
    return proposals.astype(jnp.int32), count.astype(jnp.int32)


def verify(logits_btv: jax.Array, proposals_bk: jax.Array, proposed_b: jax.Array, temperature_b: jax.Array,
           top_k_b: jax.Array, top_p_b: jax.Array, seed_b: jax.Array, step_b: jax.Array,
           draft_logq_bkv: jax.Array | None = None, greedy_only: bool = False) -> tuple[jax.Array, jax.Array]:
    """Accepts a prefix of each row's proposals and draws the token after it. logits_btv: the
    target's float32 logits at the row's last token and its k proposals [b, k + 1, v];
    proposed_b: how many proposals are real (the rest are never accepted); draft_logq_bkv: the
    log-probabilities the proposals were drawn from (a draft model's), None for deterministic
    proposals (prompt lookup's). Returns (tokens [b, k + 1]: the accepted proposals, then the
    drawn token at index `accepted`; accepted [b]). seed_b and step_b key the draws, per row
    (step: tokens it generated so far). greedy_only: every row is greedy (launch/aot.py's cost
    model, which costs the common step)."""
    b, t, v = logits_btv.shape
    k = t - 1
    real = jnp.arange(k)[None, :] < proposed_b[:, None]
    greedy = jnp.argmax(logits_btv, axis=-1).astype(jnp.int32)  # [b, k + 1]
    greedy_accepted = jnp.cumprod((proposals_bk == greedy[:, :k]) & real, axis=1).sum(axis=1)

    def sampled(_):
        repeat = lambda x: jnp.repeat(x, t)  # noqa: E731  per row -> per (row, position)
        logp = jax.nn.log_softmax(filtered_logits(logits_btv.reshape(b * t, v), repeat(temperature_b),
                                                  repeat(top_k_b), repeat(top_p_b)), axis=-1).reshape(b, t, v)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), i), SPEC_SALT))(
            seed_b, step_b)
        u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 0), (k,)))(keys)
        at_proposals = lambda lp: jnp.take_along_axis(lp, proposals_bk[..., None], axis=-1)[..., 0]  # noqa: E731
        ratio = jnp.exp(at_proposals(logp[:, :k]) - (0.0 if draft_logq_bkv is None else at_proposals(draft_logq_bkv)))
        accepted = jnp.cumprod((u < ratio) & real, axis=1).sum(axis=1)
        at = jnp.take_along_axis(logp, accepted[:, None, None], axis=1)[:, 0]  # [b, v]: p at the first rejection
        rejected = (accepted < proposed_b)[:, None]
        if draft_logq_bkv is None:  # q one-hot at the proposal: p without it
            proposal = jnp.take_along_axis(proposals_bk, jnp.minimum(accepted, k - 1)[:, None], axis=1)
            residual = jnp.where(rejected & (jnp.arange(v)[None, :] == proposal), -jnp.inf, at)
        else:  # max(p - q, 0), or p itself where that is empty (p == q: rejection has probability 0)
            q = jnp.exp(jnp.take_along_axis(draft_logq_bkv, jnp.minimum(accepted, k - 1)[:, None, None], axis=1)[:, 0])
            rest = jnp.maximum(jnp.exp(at) - q, 0.0)
            rest_log = jnp.where(rest > 0, jnp.log(jnp.where(rest > 0, rest, 1.0)), -jnp.inf)
            residual = jnp.where(rejected & (rest.sum(-1, keepdims=True) > 0), rest_log, at)
        drawn = jax.vmap(lambda key, lp: jax.random.categorical(jax.random.fold_in(key, 1), lp))(keys, residual)
        tokens = jnp.where(jnp.arange(t)[None, :] < accepted[:, None], jnp.pad(proposals_bk, ((0, 0), (0, 1))),
                           drawn[:, None]).astype(jnp.int32)
        hot = temperature_b > 0
        return jnp.where(hot[:, None], tokens, greedy), jnp.where(hot, accepted, greedy_accepted)

    if greedy_only:
        return greedy, greedy_accepted
    return jax.lax.cond(jnp.any(temperature_b > 0), sampled, lambda _: (greedy, greedy_accepted), None)


def check_draft(draft: ModelConfig, target: ModelConfig, max_len: int | None = None) -> None:
    """A ValueError unless the draft's token ids mean what the target's do (and, given the
    engine's max_len, the draft's positions reach it)."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"draft vocabulary has {draft.vocab_size} tokens; the target's has "
                         f"{target.vocab_size}: a draft must share the target's tokenizer")
    for field in ("bos_token_id", "eos_token_ids", "pad_token_id"):
        if getattr(draft, field) != getattr(target, field):
            raise ValueError(f"draft {field}={getattr(draft, field)!r}; the target's is "
                             f"{getattr(target, field)!r}")
    if max_len is not None and draft.max_position_embeddings < max_len:
        raise ValueError(f"the draft's max_position_embeddings={draft.max_position_embeddings} is below the "
                         f"engine's max_len={max_len}")


def draft_propose(logits_bv: jax.Array, temperature_b: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array,
                  seed_b: jax.Array, step_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A draft model's proposal per row and the log-probabilities it was drawn from [b, v]:
    sampled from the row's own filtered distribution, or the argmax for greedy rows (whose q
    verify never reads: it is computed only when some row samples, zeros otherwise)."""
    greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def sampled(_):
        logq = jax.nn.log_softmax(filtered_logits(logits_bv, temperature_b, top_k_b, top_p_b), axis=-1)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), i), SPEC_SALT + 1))(
            seed_b, step_b)
        drawn = jax.vmap(jax.random.categorical)(keys, logq).astype(jnp.int32)
        return jnp.where(temperature_b > 0, drawn, greedy), logq

    return jax.lax.cond(jnp.any(temperature_b > 0), sampled, lambda _: (greedy, jnp.zeros_like(logits_bv)), None)
