"""The accelerator hot paths run on this CPU host: the TPU path (stacked layers in a lax.scan, the
stacked cache, the Pallas attention kernel in interpret mode) and the GPU path (the same with the
kernel's XLA reference) give the CPU path's tokens, compile decode once, and shard; also for
architectures whose layers differ (Gemma 2 and 3: per-layer windows, Gemma 3: per-layer RoPE),
which the scan over layers looks up by the traced layer index."""

import jax
import numpy as np
import pytest

from hf_reference import make_hf_model, save_hf_model
from model import Engine, SamplingParams
from model.kv_cache import StackedKVCache
from model.platform import hot_path

rng = np.random.default_rng(3)
# lengths across several kernel blocks (max_len 256 -> 256-position blocks at most), two sharing a prefix
SHARED = rng.integers(3, 256, size=40).tolist()
PROMPTS = [rng.integers(3, 256, size=n).tolist() for n in (3, 17, 70)] + [SHARED + [5, 6], SHARED + [7]]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


def _engine(path, mesh=(1, 1), **kw):
    return Engine.from_pretrained("tiny-llama", mesh_shape=mesh, dtype="float32", max_slots=4, max_len=256,
                                  seed=2, hot_path=path, **kw)


@pytest.fixture(scope="module")
def reference():
    return _engine("cpu").generate(PROMPTS, GREEDY)


def test_the_platform_picks_its_path_and_a_cpu_can_run_the_others():
    assert hot_path("cpu") == hot_path("cpu", "auto") and not hot_path("cpu").stacked
    assert hot_path("tpu").attention == "pallas" and not hot_path("tpu").interpret
    assert hot_path("cpu", "tpu").interpret and hot_path("gpu").attention == "xla"
    with pytest.raises(ValueError, match="hot_path='npu'"):
        hot_path("cpu", "npu")


def test_accelerator_prefills_run_at_least_256_tokens_a_call():
    """Fewer tokens only stream the weights once on a TPU or GPU: padding rows cost nothing
    there, and each row count left out is a function fewer to compile."""
    cpu, tpu = _engine("cpu"), _engine("tpu")
    assert cpu.prefill_rows(16) == [1, 2, 4] and tpu.prefill_rows(16) == [4]  # 4 slots at most
    assert tpu.prefill_rows(128) == [2, 4] and tpu.prefill_rows(256) == [1, 2, 4]
    assert _engine("tpu", prefill_chunk=32).prefill_rows(16) == [2, 4]  # within a step's 32-token budget


def test_cpu_prefills_pad_to_quarter_octaves_and_prompts_of_one_octave_share_a_call(reference):
    """A CPU prefill's time follows its padded tokens, so it pads to 4 lengths per doubling; the
    accelerators keep one (each shape is a long compile there). Prompts still batch by octave:
    the 33-64-token prompts below fill one call, padded to the longest one's bucket."""
    cpu, tpu = _engine("cpu"), _engine("tpu")
    assert cpu._bucket(65) == 80 and cpu._bucket(33) == 40 and tpu._bucket(65) == 128
    assert cpu.buckets[:9] == [16, 24, 32, 40, 48, 56, 64, 80, 96] and tpu.buckets == cpu.groups
    shapes = []
    call = cpu._call_prefill
    cpu._call_prefill = lambda tokens, *a: shapes.append(np.shape(tokens)) or call(tokens, *a)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (33, 45, 50, 34)]
    out = cpu.generate(prompts, GREEDY)
    assert shapes == [(4, 56)]  # one call; 50 tokens pad to 56, not 64
    cpu._call_prefill = call
    assert [o.token_ids for o in out] == [o.token_ids for o in _engine("cpu").generate(prompts, GREEDY)]
    assert [o.token_ids for o in cpu.generate(PROMPTS, GREEDY)] == [o.token_ids for o in reference]


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("mesh_shape", [None, (2, 2)])
def test_prefill_windows_write_what_the_scatter_writes(int8, mesh_shape):
    """StackedKVCache.write_runs (one in-place window per row) against write (a scatter): a
    dropped row (slot out of range), a run past max_len (its tail dropped, the window moved back),
    slots split over "data" and heads over "model"."""
    import jax.numpy as jnp

    from model.sharding import make_mesh
    layers, slots, kv, n, hd, b, t = 2, 4, 2, 16, 8, 4, 6
    mesh = None if mesh_shape is None else make_mesh(mesh_shape)
    shape = (layers, slots, kv, n, hd)
    if int8:
        cache = StackedKVCache(*(jnp.asarray(rng.integers(-5, 5, size=shape), jnp.int8) for _ in range(2)),
                               *(jnp.asarray(rng.uniform(0.5, 1, size=(*shape[:3], 1, n)), jnp.float32) for _ in range(2)))
    else:
        cache = StackedKVCache(*(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2)))
    if mesh is not None:
        cache = jax.device_put(cache, cache.shardings(mesh))
    k = jnp.asarray(rng.normal(size=(b, t, kv, hd)), jnp.float32)
    slots_b, starts_b, layer = jnp.array([1, 4, 3, 0]), jnp.array([0, 3, 12, 5]), jnp.int32(1)
    want = cache.write(layer, slots_b, starts_b[:, None] + jnp.arange(t)[None], k, 2 * k)
    got = jax.jit(lambda c: c.write_runs(layer, slots_b, starts_b, k, 2 * k, mesh))(cache)
    for a, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(a))


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("t", [1, 3])
def test_decode_writes_what_a_scatter_by_slot_writes(t, int8):
    """A decode or verify step's write (every slot, t consecutive positions): keys and values by
    (slot, kv head, position), an int8 cache's scales by the select over the layer or as one window
    per slot, and each "data" group writing its own slots on a (2, 2) mesh; against the scatter by
    (slot, position) a prefill uses, with a slot whose run passes max_len."""
    import jax.numpy as jnp

    from model.sharding import make_mesh
    layers, slots, kv, n, hd = 2, 4, 2, 16, 8
    shape = (layers, slots, kv, n, hd)
    if int8:
        cache = StackedKVCache(*(jnp.asarray(rng.integers(-5, 5, size=shape), jnp.int8) for _ in range(2)),
                               *(jnp.asarray(rng.uniform(0.5, 1, size=(*shape[:3], 1, n)), jnp.float32) for _ in range(2)))
    else:
        cache = StackedKVCache(*(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2)))
    k = jnp.asarray(rng.normal(size=(slots, t, kv, hd)), jnp.float32)
    positions = jnp.array([0, 5, n - 2, 9])[:, None] + jnp.arange(t)[None]
    layer = jnp.int32(1)
    want = cache.write(layer, jnp.arange(slots), positions, k, 2 * k)
    mesh = make_mesh((2, 2))
    split = jax.device_put(cache, cache.shardings(mesh))
    for got in (cache.write(layer, None, positions, k, 2 * k),
                cache.write(layer, None, positions, k, 2 * k, scale_windows=True),
                jax.jit(lambda c: c.write(layer, None, positions, k, 2 * k, scale_windows=True, mesh=mesh))(split)):
        for a, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(a))


@pytest.mark.parametrize("path,mesh,kw", [
    pytest.param("tpu", (1, 1), {}, marks=pytest.mark.slow),  # the (2, 2) and (2, 1) meshes below cover it
    ("tpu", (2, 2), {"kv_cache_dtype": "int8"}),  # slots over data, kv heads over model; int8 cache
    ("tpu", (2, 1), {"prefix_cache_entries": 2, "prefix_block": 16}),
    pytest.param("gpu", (1, 4), {}, marks=pytest.mark.slow),  # 2 kv heads over 4 devices: replicated
    ("gpu", (1, 2), {"quantize": "int8"}),  # int8 weights, stacked per layer
])
def test_accelerator_paths_give_the_cpu_paths_tokens(reference, path, mesh, kw):
    engine = _engine(path, mesh, **kw)
    assert isinstance(engine.cache, StackedKVCache) and engine.path.name == path
    outs = engine.generate(PROMPTS, GREEDY)
    if kw.get("kv_cache_dtype") or kw.get("quantize"):  # int8 moves logits a little: the first tokens
        assert [o.token_ids[:4] for o in outs] == [o.token_ids[:4] for o in reference]
    else:
        assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
        np.testing.assert_allclose(np.concatenate([o.logprobs for o in outs]),
                                   np.concatenate([o.logprobs for o in reference]), atol=1e-4)
    assert engine.compile_counts["decode"] == 1  # whatever the live lengths
    if kw.get("prefix_cache_entries"):
        assert engine.prefix_cache.stats.hits >= 1


def test_an_accelerator_paths_warmup_compiles_all_a_workload_needs(reference):
    """Its prefills of at least 256 tokens and its first-token samplers, one per row count: the
    scheduler never asks for a shape warmup_functions() leaves out."""
    engine = _engine("gpu")
    assert engine.warmup()["functions"] == len(engine.warmup_functions())
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == [o.token_ids for o in reference]
    assert compiles == []


def test_the_stacked_engine_hands_back_weights_per_layer_as_loaded():
    cpu, tpu = _engine("cpu"), _engine("gpu")
    for name, value in cpu.weights().items():
        other = tpu.weights()[name]
        if isinstance(value, list):
            assert len(other) == len(value)
            for a, b in zip(value, other):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(other))


@pytest.fixture(scope="module")
def newer_checkpoints(tmp_path_factory):
    """variant -> (checkpoint, the CPU path's outputs and logits), made on first use."""
    made = {}

    def get(variant):
        if variant not in made:
            path = save_hf_model(make_hf_model(variant, seed=5), tmp_path_factory.mktemp(variant))
            cpu = _checkpoint_engine(path, "cpu")
            made[variant] = path, cpu.generate(PROMPTS, GREEDY), cpu.logits(PROMPTS[:2])
        return made[variant]
    return get


def _checkpoint_engine(path, hot, mesh=(1, 1)):
    return Engine.from_pretrained(path, mesh_shape=mesh, dtype="float32", max_slots=4, max_len=256, hot_path=hot)


@pytest.mark.parametrize("variant,path,mesh", [
    pytest.param("qwen3", "gpu", (1, 1), marks=pytest.mark.slow),  # q/k norms (also qwen3-moe's, slow too)
    ("gemma2", "tpu", (2, 2)),  # sliding and global layers alternate (a traced window in the kernel),
    pytest.param("gemma2", "gpu", (1, 1), marks=pytest.mark.slow),  # soft-caps, post norms
    pytest.param("gemma3", "gpu", (1, 1), marks=pytest.mark.slow),  # sliding x2, full, sliding; two RoPEs
])
def test_newer_families_give_the_cpu_paths_tokens_on_the_stacked_paths(newer_checkpoints, variant, path, mesh):
    checkpoint, reference, logits = newer_checkpoints(variant)
    engine = _checkpoint_engine(checkpoint, path, mesh)
    assert isinstance(engine.cache, StackedKVCache)
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    np.testing.assert_allclose(np.concatenate([o.logprobs for o in outs]),
                               np.concatenate([o.logprobs for o in reference]), atol=1e-4)
    np.testing.assert_allclose(engine.logits(PROMPTS[:2]), logits, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("variant,path,mesh,kw", [
    ("mixtral", "tpu", (1, 1), {}),            # the scan over stacked [layers, experts, ...] weights
    pytest.param("qwen3-moe", "tpu", (2, 2), {},  # slots and heads split, each expert's width over "model"
                 marks=pytest.mark.slow),
    pytest.param("qwen3-moe", "gpu", (1, 2), {"quantize": "int8"},  # int8 expert weights, stacked per layer
                 marks=pytest.mark.slow),
])
def test_mixtures_of_experts_give_the_cpu_paths_tokens_on_the_stacked_paths(newer_checkpoints, variant, path,
                                                                             mesh, kw):
    checkpoint, reference, logits = newer_checkpoints(variant)
    engine = Engine.from_pretrained(checkpoint, mesh_shape=mesh, dtype="float32", max_slots=4, max_len=256,
                                    hot_path=path, **kw)
    assert isinstance(engine.cache, StackedKVCache) and engine.path.name == path
    outs = engine.generate(PROMPTS, GREEDY)
    if kw.get("quantize"):  # int8 moves logits a little: the first tokens
        assert [o.token_ids[:4] for o in outs] == [o.token_ids[:4] for o in reference]
        return
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    np.testing.assert_allclose(np.concatenate([o.logprobs for o in outs]),
                               np.concatenate([o.logprobs for o in reference]), atol=1e-4)
    np.testing.assert_allclose(engine.logits(PROMPTS[:2]), logits, atol=1e-4, equal_nan=True)
    assert engine.compile_counts["decode"] == 1


@pytest.mark.parametrize("t", [1, 3])
def test_the_decode_write_of_int8_scales_equals_the_scatter(t):
    """Decode writes every slot's int8 scales by a select over the layer (a scatter there makes
    the TPU compiler relayout them each step): it stores what the per-row scatter stores,
    dropping positions past max_len the same way."""
    import jax.numpy as jnp
    from model.config import PRESETS
    from model.sharding import make_mesh
    cfg = PRESETS["tiny-llama"]
    cache = StackedKVCache.create(cfg, 4, 16, jnp.float32, make_mesh((1, 1)), int8=True)
    k = jnp.asarray(rng.normal(size=(4, t, cfg.num_kv_heads, cfg.head_dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(4, t, cfg.num_kv_heads, cfg.head_dim)), jnp.float32)
    positions = jnp.asarray([0, 5, 14, 15])[:, None] + jnp.arange(t)[None, :]  # the last rows run past 16
    layer = jnp.asarray(1)
    by_select = cache.write(layer, None, positions, k, v)
    by_scatter = cache.write(layer, jnp.arange(4), positions, k, v)
    for a, b in zip(by_select.__dict__.values(), by_scatter.__dict__.values()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(by_select.k_scale[1]).sum()) > 0
