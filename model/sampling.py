"""Sampling parameters and the per-row sampler.

Every parameter becomes a per-row array, so a batch can mix greedy and sampled rows, different
temperatures, top-k and top-p without recompiling. A row's random key is derived from its own
seed and how many tokens it has generated, so its output does not depend on its batch mates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to generate for one prompt. temperature=0 is greedy; top_k=0 and top_p=1 disable them."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()  # strings: the engine ends the sequence once its text holds one
    # A model.constraints.TokenAutomaton (Engine.constraint makes one) the output must follow: each
    # token is drawn from the tokens its state allows, and EOS only where the output is complete.
    constraint: Any = dataclasses.field(default=None, compare=False, repr=False)
    top_logprobs: int = 0  # return the k <= MAX_TOP_LOGPROBS most likely tokens at each step, with log p

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens < 2**31:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}; must be an integer in [1, 2**31)")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature={self.temperature!r}; must be >= 0")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:  # int32 on the device
            raise ValueError(f"top_k={self.top_k!r}; must be an integer in [0, 2**31) (0, or the vocabulary "
                             "size or more, disables it)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}; must be in (0, 1]")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r}; must be an integer in [0, 2**32)")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(x, str) and x for x in stop):
            raise ValueError(f"stop={self.stop!r}; must be non-empty strings")
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs={self.top_logprobs!r}; must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.constraint is not None:
            if not hasattr(self.constraint, "next_state"):
                raise ValueError(f"constraint={type(self.constraint).__name__}; expected a TokenAutomaton "
                                 "(Engine.constraint or model.constraints.compile_constraint)")
            if self.ignore_eos:
                raise ValueError("ignore_eos=True with a constraint: a constrained output ends with EOS where it "
                                 "is complete, so EOS cannot be ignored")


MAX_TOP_LOGPROBS = 20  # as OpenAI's API allows
CANDIDATES = 256  # tokens the sampler ranks with lax.top_k instead of sorting the vocabulary


def sample(logits_bv: jax.Array, temperature_b: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array,
           seed_b: jax.Array, step_b: jax.Array, candidates: int = CANDIDATES,
           exact_fallback: bool = True) -> jax.Array:
    """Next token per row [b] from float32 logits [b, v]. Rows with temperature 0 take the argmax.

    Order as in HF and vLLM: temperature, then top-k, then top-p on the renormalized top-k mass.
    Sorting the vocabulary every step costs more than the rest of a decode step on a TPU (10 GB per
    step at 128 slots x 128k vocabulary, compiler estimate), so each row's set is found among the
    `candidates` best tokens (lax.top_k), which is exact when it lies within them: top_k <=
    candidates, or a nucleus whose mass those tokens reach. Rows with neither top-k nor top-p
    sample the whole vocabulary (Gumbel-max, no sort). Any other row (rare: a nucleus wider than
    the candidates) takes an exact pass over the whole vocabulary (_exact_keep: bisection, no
    sort), run only when such a row exists; exact_fallback=False leaves it out (launch/aot.py, to
    cost the common path).
    """
    greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def sampled(_):
        scaled = _scaled(logits_bv, temperature_b)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed_b, step_b)
        values, ids, keep, whole, covered = _candidates(scaled, top_k_b, top_p_b, candidates)
        choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, values, -jnp.inf))
        token = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
        token = jnp.where(whole, jax.vmap(jax.random.categorical)(keys, scaled), token).astype(jnp.int32)
        if exact_fallback:
            wide = (temperature_b > 0) & ~whole & ~covered
            token = jax.lax.cond(jnp.any(wide), lambda tok: jnp.where(wide, _exact_sample(scaled, top_k_b, top_p_b,
                                                                                         keys), tok),
                                 lambda tok: tok, token)
        return jnp.where(temperature_b > 0, token, greedy)

    return jax.lax.cond(jnp.any(temperature_b > 0), sampled, lambda _: greedy, None)


def filtered_logits(logits_bv: jax.Array, temperature_b: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array,
                    candidates: int = CANDIDATES) -> jax.Array:
    """The distribution `sample` draws from, as logits [b, v]: scaled by the temperature, -inf
    outside each row's top-k and top-p set (softmax gives the probabilities). Rows with
    temperature 0 are one-hot at their argmax (0 there, -inf elsewhere). Speculative decoding
    verifies proposals against it (model/speculative.py)."""
    b, v = logits_bv.shape
    greedy = jnp.argmax(logits_bv, axis=-1)
    one_hot = jnp.where(jnp.arange(v)[None, :] == greedy[:, None], 0.0, -jnp.inf)
    scaled = _scaled(logits_bv, temperature_b)
    values, ids, keep, whole, covered = _candidates(scaled, top_k_b, top_p_b, candidates)
    kept = jnp.full((b, v), -jnp.inf, scaled.dtype).at[jnp.arange(b)[:, None], ids].set(
        jnp.where(keep, values, -jnp.inf))
    out = jnp.where(whole[:, None], scaled, kept)
    wide = (temperature_b > 0) & ~whole & ~covered
    out = jax.lax.cond(jnp.any(wide), lambda o: jnp.where(wide[:, None], _exact_filter(scaled, top_k_b, top_p_b), o),
                       lambda o: o, out)
    return jnp.where((temperature_b > 0)[:, None], out, one_hot)


def _scaled(logits_bv: jax.Array, temperature_b: jax.Array) -> jax.Array:
    t = jnp.where(temperature_b > 0, temperature_b, 1.0)
    return logits_bv / t[:, None]


def _candidates(scaled, top_k_b, top_p_b, candidates: int):
    """Each row's top-k/top-p set among its `candidates` best tokens: (values, ids [b, c] in
    descending order, keep [b, c], whole [b]: nothing is filtered, covered [b]: the set lies
    within the candidates, so `keep` is exact)."""
    v = scaled.shape[-1]
    c = min(candidates, v)
    top_k_on = (top_k_b > 0) & (top_k_b < v)
    whole = ~top_k_on & (top_p_b >= 1.0)  # nothing filtered: sample the whole vocabulary
    values, ids = jax.lax.top_k(scaled, c)  # descending
    probs = jnp.exp(values - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))  # of the whole distribution
    keep = ~top_k_on[:, None] | (jnp.arange(c)[None, :] < top_k_b[:, None])
    kept = jnp.where(keep, probs, 0.0)
    kept = kept / jnp.where(top_k_on, kept.sum(-1), 1.0)[:, None]  # renormalized over the top-k set
    before = jnp.cumsum(kept, axis=-1) - kept
    keep &= before < top_p_b[:, None]  # the top token is always kept
    covered = (top_k_on & (top_k_b <= c)) | (~top_k_on & (kept.sum(-1) >= top_p_b))
    return values, ids, keep, whole, covered


def _exact_keep(scaled_bv, top_k_b, top_p_b) -> jax.Array:
    """Each row's top-k and top-p set over the whole vocabulary, without sorting it: keep [b, v].
    The same set as a stable sort by descending logit would give (ties go to the lower token id):
    the top_k best, then among them the shortest run, best first, whose mass before each token
    is below top_p. Thresholds are found by bisection over the logits' float32 bit patterns (32
    passes over [b, v]), so compiling it costs what a reduction does, where a sort of a 128k
    vocabulary took the TPU compiler about 10 s in every function holding it."""
    b, v = scaled_bv.shape
    x = scaled_bv.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)  # -0.0 ties with 0.0
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 ordered as the floats are

    def smallest(pred):  # per row, the smallest int32 t with pred(t) (pred: monotone, true at the top)
        def step(_, lo_hi):
            lo, hi = lo_hi  # pred(hi) holds; the answer lies in (lo, hi]
            mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
            ok = pred(mid)
            return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)
        lo = jnp.full((b,), jnp.iinfo(jnp.int32).min, jnp.int32)
        hi = jnp.full((b,), jnp.iinfo(jnp.int32).max, jnp.int32)
        return jax.lax.fori_loop(0, 32, step, (lo, hi))[1]

    def first_of_ties(at, room):  # the first `room` tokens (by id) whose key is `at`
        tie = key == at[:, None]
        return tie & (jnp.cumsum(tie, axis=-1) <= room[:, None])

    # top-k: t = the k-th best key (the smallest t with at most k - 1 keys above it, i.e. count(key > t) < k)
    top_k_on = (top_k_b > 0) & (top_k_b < v)
    k = jnp.where(top_k_on, top_k_b, v)
    t = smallest(lambda t: jnp.sum(key > t[:, None], axis=-1) < k)
    above = key > t[:, None]
    keep = above | first_of_ties(t, k - above.sum(-1))
    # top-p over the renormalized top-k set: every token whose key is above t is kept when the
    # mass above t is below top_p; the boundary key's tokens in id order while the mass before stays below
    probs = jax.nn.softmax(jnp.where(keep, scaled_bv, -jnp.inf), axis=-1)
    mass_above = lambda t: jnp.sum(jnp.where(key > t[:, None], probs, 0.0), axis=-1)  # noqa: E731
    t = smallest(lambda t: mass_above(t) < top_p_b)
    tie = keep & (key == t[:, None])
    before = mass_above(t)[:, None] + jnp.cumsum(jnp.where(tie, probs, 0.0), axis=-1) - jnp.where(tie, probs, 0.0)
    nucleus = (key > t[:, None]) | (tie & (before < top_p_b[:, None])) | (top_p_b >= 1.0)[:, None]
    return keep & nucleus


def _exact_filter(scaled_bv, top_k_b, top_p_b) -> jax.Array:
    """filtered_logits over the whole vocabulary (any top-k and top-p)."""
    return jnp.where(_exact_keep(scaled_bv, top_k_b, top_p_b), scaled_bv, -jnp.inf)


def _exact_sample(scaled_bv, top_k_b, top_p_b, keys) -> jax.Array:
    """The sampler over the whole vocabulary (any top-k and top-p)."""
    return jax.vmap(jax.random.categorical)(keys, _exact_filter(scaled_bv, top_k_b, top_p_b)).astype(jnp.int32)


def token_logprobs(logits_bv: jax.Array, token_b: jax.Array) -> jax.Array:
    """log p(token) per row [b] under the model's own distribution (before temperature, top-k, top-p)."""
    logits = logits_bv.astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, token_b[:, None], axis=-1)[:, 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


def top_logprobs(logits_bv: jax.Array, want_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The MAX_TOP_LOGPROBS most likely token ids [b, K] and their log p [b, K] under the model's
    own distribution, best first; computed only when some row wants them (zeros otherwise)."""
    k = min(MAX_TOP_LOGPROBS, logits_bv.shape[-1])

    def top(logits):
        logits = logits.astype(jnp.float32)
        values, ids = jax.lax.top_k(logits, k)
        return ids.astype(jnp.int32), values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)

    b = logits_bv.shape[0]
    none = lambda _: (jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32))  # noqa: E731
    return jax.lax.cond(want_b.any(), top, none, logits_bv)
