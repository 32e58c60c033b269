"""The sampler draws from exactly the distribution HF and vLLM define (temperature, then top-k,
then top-p on the renormalized top-k mass) on each of its paths: among the top-k candidates, the
whole vocabulary (Gumbel-max), and the exact fallback for a set wider than the candidates, which
finds each row's set by bisection and must pick what a stable sort would, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.sampling import _exact_keep, sample

V, ROWS = 40, 6000


def expected(logits, temperature, top_k, top_p):
    """The target distribution, computed in numpy from a full sort."""
    z = logits / temperature
    order = np.argsort(-z)
    p = np.exp(z[order] - z.max())
    if 0 < top_k < V:
        p[top_k:] = 0
    p /= p.sum()
    keep = (np.cumsum(p) - p) < top_p
    p = np.where(keep, p, 0)
    out = np.zeros(V)
    out[order] = p / p.sum()
    return out


@pytest.mark.parametrize("top_k,top_p,candidates", [
    (0, 1.0, 8),   # the whole vocabulary, no sort
    (5, 1.0, 8),   # top-k within the candidates
    (5, 0.7, 8),   # then top-p on the renormalized top-k mass
    (0, 0.5, 8),   # a nucleus the candidates cover
    (0, 0.97, 4),  # a nucleus wider than the candidates: the exact fallback
    (20, 0.9, 4),  # top-k wider than the candidates: the fallback
])
def test_sampled_tokens_follow_the_target_distribution(top_k, top_p, candidates):
    logits = np.random.default_rng(0).normal(size=V).astype(np.float32) * 2
    rows = lambda x, dt: jnp.full((ROWS,), x, dt)  # noqa: E731
    tokens = jax.jit(sample, static_argnums=(6,))(
        jnp.broadcast_to(logits, (ROWS, V)), rows(0.8, jnp.float32), rows(top_k, jnp.int32), rows(top_p, jnp.float32),
        jnp.arange(ROWS, dtype=jnp.uint32), rows(0, jnp.int32), candidates)
    freq = np.bincount(np.asarray(tokens), minlength=V) / ROWS
    target = expected(logits, 0.8, top_k, top_p)
    assert freq[target == 0].sum() == 0  # nothing outside the row's set
    # total variation distance; with 6000 draws its sampling noise is about 0.03
    assert 0.5 * np.abs(freq - target).sum() < 0.05


def test_greedy_rows_beside_sampled_ones_take_the_argmax_and_seeds_repeat():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, V)), jnp.float32)
    args = (logits, jnp.array([0.0, 1.0, 0.0, 1.0]), jnp.array([0, 0, 3, 3]), jnp.array([1.0, 0.9, 1.0, 1.0]),
            jnp.array([1, 2, 3, 4], jnp.uint32), jnp.array([0, 0, 0, 0]))
    a, b = sample(*args), sample(*args)
    assert a.tolist() == b.tolist()
    assert a[0] == jnp.argmax(logits[0]) and a[2] == jnp.argmax(logits[2])


def _stable_sort_keep(x, k, p):
    """A row's top-k / top-p set from a stable sort by descending logit (ties: the lower id first)."""
    order = np.argsort(-x, kind="stable")
    keep = (k <= 0) | (np.arange(len(x)) < k)
    e = np.where(keep, np.exp(x[order] - x[order][keep].max()), 0.0)
    probs = e / e.sum()
    keep &= ((np.cumsum(probs) - probs) < p) | (p >= 1)
    out = np.zeros(len(x), bool)
    out[order] = keep
    return out


@pytest.mark.parametrize("v", [7, 64, 300])
def test_the_exact_fallback_keeps_the_set_a_stable_sort_keeps(v):
    rng = np.random.default_rng(v)
    rows = 60
    x = (rng.normal(size=(rows, v)) * rng.uniform(0.1, 5, size=(rows, 1))).astype(np.float32)
    x[::3] = np.round(x[::3])  # ties, among them -0.0 and 0.0
    x[::5, : v // 3] = -np.inf  # masked tokens
    k = rng.choice([0, 1, 2, 5, v // 2, v, v + 3], size=rows)
    p = rng.choice([1.0, 0.999, 0.9, 0.5, 0.1], size=rows).astype(np.float32)
    got = np.asarray(_exact_keep(jnp.asarray(x), jnp.asarray(k, jnp.int32), jnp.asarray(p)))
    for i in range(rows):
        want = _stable_sort_keep(x[i].astype(np.float64), k[i], p[i])
        finite = np.isfinite(x[i])  # a kept -inf token has probability 0 either way
        np.testing.assert_array_equal(got[i] & finite, want & finite, err_msg=f"row {i}: k={k[i]}, p={p[i]}")
