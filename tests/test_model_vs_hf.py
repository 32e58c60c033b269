"""The whole model against HF transformers on tiny random models of every supported architecture;
for the newer families (Qwen3, Gemma 2, Gemma 3, Phi-3, and the mixtures of experts Mixtral and
Qwen3-MoE) also on a (2, 4) mesh and with int8 weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_reference import VARIANTS, hf_greedy, hf_logits, make_hf_model, save_hf_model
from model import Engine, SamplingParams
from model.kv_cache import KVCache
from model.quantize import QArray

PROMPTS = [[5, 17, 42], [7] + list(range(30, 40)), list(range(100, 117)), list(range(200, 230))]
# Seed 0 of every architecture in the default run; seed 1 under `make test-slow` (CI time).
CASES = [pytest.param((v, seed), id=f"{v}-seed{seed}", marks=[pytest.mark.slow] if seed else [])
         for v in VARIANTS for seed in (0, 1)]


@pytest.fixture(scope="module", params=CASES)
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


SPECULATIVE_DEFAULT = {"gemma2", "qwen3-moe"}  # the rest under `make test-slow`


def test_speculative_greedy_tokens_match_reference(pair, request):
    """Prompt-lookup speculation keeps the reference's greedy tokens (seed 0 of each architecture;
    two of them in the default run, every one with -m slow)."""
    variant, seed = request.node.callspec.params["pair"]
    if seed != 0:
        pytest.skip("one seed per architecture")
    if variant not in SPECULATIVE_DEFAULT and "not slow" in (request.config.getoption("markexpr") or ""):
        pytest.skip("run with -m slow (make test-slow)")
    hf, engine = pair
    spec = Engine(engine.cfg, engine.weights(), engine.mesh, dataclasses.replace(engine.config, speculative="ngram",
                                                                                prompt_lookup_min=1))
    spec._gate.cost = 0.0  # speculate at every step (no cost measurement)
    prompts = [p * 2 for p in PROMPTS]  # repeated, so that lookup finds matches
    outs = spec.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
    for p, out in zip(prompts, outs):  # up to the cache's end (max_len 64)
        n = min(24, engine.max_len - len(p))
        assert out.token_ids == hf_greedy(hf, p, n)
    assert sum(o.proposed_tokens for o in outs) > 0


@pytest.mark.parametrize("slots,cache_len", [pytest.param(2, 64, marks=pytest.mark.slow), (1, 64), (2, 384),
                                             pytest.param(1, 384, marks=pytest.mark.slow)])
def test_cached_decode_equals_full_forward(pair, slots, cache_len):
    """Slots at different positions decode together (or one alone, which takes another
    attention path), over a cache of one chunk (64) or three (384); every step equals a full
    forward. The default run has each path once (one slot over one chunk, two over three)."""
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


# ---------------------------------------------------------------- the newer families: mesh, int8, LongRoPE

NEWER = ["qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3-moe"]
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", params=NEWER)
def newer(request, tmp_path_factory):
    hf = make_hf_model(request.param, seed=2)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    one = Engine.from_pretrained(path, mesh_shape=(1, 1), dtype="float32", max_slots=4, max_len=64)
    return path, one


def test_a_2x4_mesh_gives_the_single_device_logits_and_tokens(newer):
    path, one = newer
    mesh = Engine.from_pretrained(path, mesh_shape=(2, 4), dtype="float32", max_slots=4, max_len=64)
    # heads split: the CPU path stores wq outputs first, [heads, head_dim, d]; weights() gives [d, heads, head_dim]
    assert mesh.params["wq"][0][...].addressable_shards[0].data.shape[0] == mesh.cfg.num_heads // 4
    assert mesh.weights()["wq"][0].addressable_shards[0].data.shape[1] == mesh.cfg.num_heads // 4
    if mesh.cfg.num_experts:  # 4 or 8 experts over "model" 4: whole experts split (expert parallel)
        local = mesh.params["w_down"][0][...].addressable_shards[0].data.shape
        assert local == (mesh.cfg.num_experts // 4, mesh.cfg.intermediate_size, mesh.cfg.hidden_size)
    np.testing.assert_allclose(mesh.logits(PROMPTS), one.logits(PROMPTS), atol=1e-5, equal_nan=True)
    prompts = PROMPTS[:2]  # one prefill bucket: fewer compiles
    assert [o.token_ids for o in mesh.generate(prompts, GREEDY)] == [o.token_ids for o in one.generate(prompts, GREEDY)]


@pytest.mark.parametrize("mesh_shape,quantize,whole", [
    ((1, 8), None, False),   # 4 experts do not divide over 8 devices: each expert's width split
    ((2, 4), "int8", True),  # whole experts split, int8 values and their per-expert scales with them
])
def test_mixture_of_experts_split_by_width_or_by_expert_gives_the_single_device_result(
        mesh_shape, quantize, whole, tmp_path):
    path = save_hf_model(make_hf_model("mixtral", seed=3), tmp_path)
    kw = dict(dtype="float32", max_slots=4, max_len=64, quantize=quantize)
    one = Engine.from_pretrained(path, mesh_shape=(1, 1), **kw)
    mesh = Engine.from_pretrained(path, mesh_shape=mesh_shape, **kw)
    w_down = mesh.weights()["w_down"][0]
    local = (w_down.q if quantize else w_down).addressable_shards[0].data.shape
    e, f, d, model = mesh.cfg.num_experts, mesh.cfg.intermediate_size, mesh.cfg.hidden_size, mesh_shape[1]
    assert local == ((e // model, f, d) if whole else (e, f // model, d))
    np.testing.assert_allclose(mesh.logits(PROMPTS), one.logits(PROMPTS), atol=1e-5, equal_nan=True)
    prompts = PROMPTS[:2]
    assert [o.token_ids for o in mesh.generate(prompts, GREEDY)] == [o.token_ids for o in one.generate(prompts, GREEDY)]


def test_int8_weights_load_and_stay_close(newer):
    path, one = newer
    q8 = Engine.from_pretrained(path, mesh_shape=(1, 1), dtype="float32", max_slots=4, max_len=64, quantize="int8")
    weights = q8.weights()
    assert all(isinstance(weights[n][0], QArray) for n in ("wq", "wk", "wv", "w_gate", "w_up", "w_down"))
    if q8.cfg.num_experts:  # one scale per expert and output channel; the router stays as loaded
        assert weights["w_gate"][0].scale.shape == (q8.cfg.num_experts, q8.cfg.intermediate_size)
        assert not isinstance(weights["router"][0], QArray)
    assert not any(isinstance(v[0] if isinstance(v, list) else v, QArray) for n, v in weights.items() if "norm" in n)
    ref, got = one.logits(PROMPTS), q8.logits(PROMPTS)
    live = ~np.isnan(ref)
    assert np.abs(got[live] - ref[live]).max() / np.abs(ref[live]).max() < 0.05


def test_longrope_switches_to_the_long_factors_when_max_len_exceeds_the_original_context(tmp_path):
    """HF picks the long factors for a forward over more than original_max_position_embeddings
    (64 here) positions. An engine whose max_len exceeds 64 uses them for every sequence: its
    logits equal HF's on such a sequence (and differ from the short-factor engine's)."""
    hf = make_hf_model("phi3-longrope", seed=0)
    path = save_hf_model(hf, tmp_path)
    long = Engine.from_pretrained(path, mesh_shape=(1, 1), dtype="float32", max_slots=2, max_len=128)
    short = Engine.from_pretrained(path, mesh_shape=(1, 1), dtype="float32", max_slots=2, max_len=64)
    seq = [(7 * i) % 250 + 3 for i in range(100)]
    ref = hf_logits(hf, seq)
    np.testing.assert_allclose(long.logits([seq])[0], ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    prefix = seq[:40]  # HF: short factors; the max_len-64 engine agrees, the max_len-128 one does not
    np.testing.assert_allclose(short.logits([prefix])[0], hf_logits(hf, prefix), rtol=0, atol=1e-4 * np.abs(ref).max())
    assert np.abs(long.logits([prefix])[0] - hf_logits(hf, prefix)).max() > 1e-2
