"""The whole model against HF transformers on tiny random models of every supported architecture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_reference import VARIANTS, hf_greedy, hf_logits, make_hf_model, save_hf_model
from model import Engine, SamplingParams
from model.kv_cache import KVCache

PROMPTS = [[5, 17, 42], [7] + list(range(30, 40)), list(range(100, 117)), list(range(200, 230))]
CASES = [(v, seed) for v in VARIANTS for seed in (0, 1)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{v}-seed{s}" for v, s in CASES])
def pair(request, tmp_path_factory):
    variant, seed = request.param
    hf = make_hf_model(variant, seed)
    path = save_hf_model(hf, tmp_path_factory.mktemp(f"{variant}{seed}"))
    engine = Engine.from_pretrained(path, mesh_shape=(1, 1), dtype="float32", max_slots=4, max_len=64)
    return hf, engine


def test_logits_match_reference(pair):
    hf, engine = pair
    ours = engine.logits(PROMPTS)
    for i, p in enumerate(PROMPTS):
        ref = hf_logits(hf, p)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(ours[i, : len(p)], ref, rtol=0, atol=1e-4 * scale)
        assert np.isnan(ours[i, len(p):]).all()


def test_greedy_generation_matches_reference(pair):
    hf, engine = pair
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=32, ignore_eos=True))
    for p, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, p, 32)
        assert out.finish_reason == "length"


@pytest.mark.parametrize("slots,cache_len", [(2, 64), (1, 64), (2, 384), (1, 384)])
def test_cached_decode_equals_full_forward(pair, slots, cache_len):
    """Slots at different positions decode together (or one alone, which takes another
    attention path), over a cache of one chunk (64) or three (384); every step equals a full
    forward."""
    _, engine = pair
    merge = lambda params: nnx.merge(engine.graphdef, params)  # noqa: E731
    prefill = jax.jit(lambda params, tokens, cache: merge(params).prefill(
        tokens, jnp.zeros((slots,), jnp.int32), jnp.arange(slots), cache)[1])
    decode = jax.jit(lambda params, last, pos, cache: merge(params).decode_step(last, pos, cache))

    seqs = [list(PROMPTS[2]), list(PROMPTS[0])][:slots]
    cache = KVCache.create(engine.cfg, slots, cache_len, jnp.float32, engine.mesh)
    tokens = np.zeros((slots, 32), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    cache = prefill(engine.params, jnp.asarray(tokens), cache)
    full = engine.logits(seqs)
    seqs = [s + [int(np.argmax(full[i, len(s) - 1]))] for i, s in enumerate(seqs)]
    for _ in range(12):
        last = jnp.asarray([s[-1] for s in seqs])
        logits, cache = decode(engine.params, last, jnp.asarray([len(s) - 1 for s in seqs]), cache)
        logits, full = np.asarray(logits), engine.logits(seqs)
        for i, s in enumerate(seqs):
            ref = full[i, len(s) - 1]
            np.testing.assert_allclose(logits[i], ref, rtol=0, atol=1e-4 * np.abs(ref).max())
        seqs = [s + [int(np.argmax(logits[i]))] for i, s in enumerate(seqs)]
