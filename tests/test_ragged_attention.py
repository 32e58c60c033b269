"""The Pallas ragged attention kernel (model/ragged_attention.py) on CPU in interpret mode against
its plain-jnp reference; its fetch count against the TPU interpreter's own block copies; and a
deviceless compile for a TPU (Mosaic) where libtpu is installed."""

import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.ragged_attention import NO_WINDOW, blocks_fetched, ragged_attention, reference_ragged_attention

L, S, T, H = 2, 4, 64, 16  # layers, slots, max_len, head_dim of the small CPU cases
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (requirements-dev.txt): no deviceless TPU compiler")


def _inputs(seed, b, t, n, kv, dtype=jnp.float32, layers=L):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, H), np.float32)
    k, v = rng.standard_normal((2, layers, S, kv, T, H), np.float32)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _both(q, k, v, layer, slots, starts, *, block_k=16, block_q=8, **kw):
    slots, starts = jnp.asarray(slots, jnp.int32), jnp.asarray(starts, jnp.int32)
    out = ragged_attention(q, k, v, layer, slots, starts, block_k=block_k, block_q=block_q, interpret=True, **kw)
    return np.asarray(out, np.float32), np.asarray(reference_ragged_attention(q, k, v, layer, slots, starts, **kw),
                                                   np.float32)


@pytest.mark.parametrize("n,kv", [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_decode_rows_at_different_positions_match_the_reference(n, kv):
    q, k, v = _inputs(0, 5, 1, n, kv)
    # slot 4 (== S) and -1 are padding rows; positions 0 and T - 1 are the edges
    out, ref = _both(q, k, v, 1, [2, 4, 0, -1, 3], [0, 7, T - 1, 9, 33])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert np.all(out[[1, 3]] == 0) and np.all(np.abs(out[[0, 2, 4]]).max(axis=(1, 2, 3)) > 0)


def test_decode_in_bfloat16():
    q, k, v = _inputs(1, 4, 1, 4, 2, jnp.bfloat16)
    out, ref = _both(q, k, v, 0, [3, 1, 0, 2], [5, 60, 0, 31])
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("t,block_q", [(16, 8), (32, 16)], ids=["positions-major", "heads-major"])
@pytest.mark.parametrize("window", [None, 20])
def test_prefill_from_zero_and_after_a_cached_prefix(window, t, block_q):
    """Two q blocks per row; blocks of 16 positions or more take q as [b, kv, group, t, h] (each
    kv head's query heads, then positions), smaller ones as [b, kv, t * group, h]."""
    q, k, v = _inputs(2, 4, t, 4, 2)
    # rows start at 0, continue a prefix at 24 and 37, and one runs past max_len (a right-padded
    # chunk whose tail queries sit at positions >= T)
    out, ref = _both(q, k, v, 0, [1, 0, 3, 2], [0, 24, 37, 56], window=window, block_q=block_q)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _int8(x):
    """Per-vector symmetric int8, as the cache stores it: values and scales [L, S, K, 1, T]."""
    x = np.asarray(x)
    scale = np.abs(x).max(axis=-1) / 127.0
    return (jnp.asarray(np.round(x / scale[..., None]).astype(np.int8)),
            jnp.asarray(scale[:, :, :, None, :].astype(np.float32)))


def test_int8_cache_with_scales_matches_the_reference_on_the_same_values():
    q, k, v = _inputs(3, 3, 8, 4, 2)
    (kq, ks), (vq, vs) = _int8(k), _int8(v)
    out, ref = _both(q, kq, vq, 1, [0, 2, 1], [0, 13, 50], k_scale=ks, v_scale=vs, window=24)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_a_traced_layer_selects_that_layer():
    q, k, v = _inputs(4, 3, 1, 4, 2, layers=3)
    slots, starts = jnp.array([1, 3, 0]), jnp.array([40, 2, 63])
    attend = jax.jit(lambda layer: ragged_attention(q, k, v, layer, slots, starts, block_k=16, interpret=True))
    outs = [np.asarray(attend(jnp.int32(layer))) for layer in (1, 2)]
    for layer, out in zip((1, 2), outs):
        np.testing.assert_allclose(out, reference_ragged_attention(q, k, v, layer, slots, starts), rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs[0], outs[1])
    assert attend._cache_size() == 1


def test_blocks_outside_each_rows_live_range_are_never_computed_on():
    """Every key and value a row must not read is NaN: beyond its last needed block, before the
    first (window), other layers, other slots. One NaN read would make the output NaN."""
    t, block_k, window = 4, 8, 12
    q, k, v = _inputs(5, 4, t, 4, 2)
    slots, starts = np.array([2, 0, 4, 1]), np.array([0, 30, 9, 58])  # slot 3 unused, row 2 padding
    needed = np.zeros((L, S, T), bool)
    for slot, start in zip(slots, starts):
        if slot < S:
            first = max(start - window + 1, 0) // block_k * block_k
            last = (min(start + t - 1, T - 1) // block_k + 1) * block_k
            needed[1, slot, first:last] = True
    mask = jnp.asarray(needed[:, :, None, :, None])
    poisoned = [jnp.where(mask, x, jnp.nan) for x in (k, v)]
    out = ragged_attention(q, *poisoned, 1, jnp.asarray(slots), jnp.asarray(starts), window=window,
                           block_k=block_k, block_q=t, interpret=True)
    ref = reference_ragged_attention(q, k, v, 1, jnp.asarray(slots), jnp.asarray(starts), window=window)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert needed.sum() < needed.size / 8  # the poison covers most of the cache


@pytest.mark.parametrize("t", [1, 16], ids=["decode", "prefill"])
def test_a_traced_window_scale_and_softcap_match_the_reference(t):
    """Gemma 2's options: a per-layer window passed as a traced value (NO_WINDOW: none), a score
    scale other than head_dim's, and tanh soft-capping; one compile serves every window."""
    q, k, v = _inputs(7, 4, t, 4, 2)
    q = q * 4  # scores large enough for the cap to bite
    slots, starts = jnp.array([1, 0, 3, 2]), jnp.array([0, 24, 37, 47])
    opts = dict(scale=0.2, softcap=3.0)
    attend = jax.jit(lambda layer, window: ragged_attention(q, k, v, layer, slots, starts, window=window, block_k=16,
                                                            block_q=8, interpret=True, **opts))
    outs = {}
    for layer, window in ((0, 20), (1, NO_WINDOW), (1, 9)):
        out = np.asarray(attend(jnp.int32(layer), jnp.int32(window)))
        ref = reference_ragged_attention(q, k, v, layer, slots, starts, window=jnp.int32(window), **opts)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        outs[layer, window] = out
    assert attend._cache_size() == 1
    unbounded = reference_ragged_attention(q, k, v, 1, slots, starts, **opts)  # a static "no window"
    np.testing.assert_allclose(outs[1, NO_WINDOW], unbounded, rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs[1, 9], outs[1, NO_WINDOW])
    uncapped = reference_ragged_attention(q, k, v, 1, slots, starts, scale=0.2)
    assert np.abs(np.asarray(uncapped) - outs[1, NO_WINDOW]).max() > 1e-2  # the cap changed something


def test_a_traced_window_still_skips_the_blocks_before_it():
    """As with a static window, keys before a row's window are never read: they are NaN here."""
    t, block_k, window = 1, 8, 12
    q, k, v = _inputs(8, 3, t, 4, 2)
    slots, starts = np.array([2, 0, 1]), np.array([40, 63, 20])
    needed = np.zeros((L, S, T), bool)
    for slot, start in zip(slots, starts):
        needed[0, slot, max(start - window + 1, 0) // block_k * block_k:(start // block_k + 1) * block_k] = True
    mask = jnp.asarray(needed[:, :, None, :, None])
    poisoned = [jnp.where(mask, x, jnp.nan) for x in (k, v)]
    attend = jax.jit(lambda w: ragged_attention(q, *poisoned, 0, jnp.asarray(slots), jnp.asarray(starts), window=w,
                                                block_k=block_k, block_q=t, interpret=True))
    out = attend(jnp.int32(window))
    assert np.isfinite(np.asarray(out)).all()
    ref = reference_ragged_attention(q, k, v, 0, jnp.asarray(slots), jnp.asarray(starts), window=window)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _copies_by_interpreter(monkeypatch, q, k, v, slots, starts, **kw):
    """How many key and value blocks the TPU interpreter copied into the kernel: like the Mosaic
    pipeline, it copies an input block only when the block index changes from the previous grid
    step. It visits 'parallel' grid axes in a shuffled order (legal, but not what a TPU core
    does); here it visits them in order, as a core does and as blocks_fetched assumes."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter
    from jax.experimental.pallas import tpu as pltpu
    copies = []
    real_get = interpreter.get

    def counting_get(*args, input_name=None, **kwargs):
        copies.append(input_name)
        return real_get(*args, input_name=input_name, **kwargs)

    def in_order(grid, *args, **kwargs):
        return (jnp.array((), jnp.int32),) * len(grid)  # an empty array means "in order"

    monkeypatch.setattr(interpreter, "get", counting_get)
    monkeypatch.setattr(interpreter, "_get_randomized_grid_coordinates", in_order)
    out = ragged_attention(q, k, v, 0, jnp.asarray(slots), jnp.asarray(starts), interpret=pltpu.InterpretParams(),
                           **kw)
    jax.block_until_ready(out)
    assert "q_ref" in copies, f"the interpreter no longer names kernel inputs: {set(copies)}"
    return copies.count("k_ref"), copies.count("v_ref")


@pytest.mark.parametrize("t,window,slots,starts", [
    (1, None, [0, 4, 1, 4, 4, 3], [0, 0, 63, 0, 0, 17]),  # decode, padding rows between real ones
    (8, 20, [3, 1, 2], [0, 21, 50]),                      # prefill chunks, a window, 2 q blocks
], ids=["decode", "prefill-window"])
def test_blocks_fetched_equals_the_interpreters_copies(monkeypatch, t, window, slots, starts):
    kv, block_k, block_q = 2, 16, 4
    q, k, v = _inputs(6, len(slots), t, 4, kv)
    k_copies, v_copies = _copies_by_interpreter(monkeypatch, q, k, v, slots, starts, window=window,
                                                block_k=block_k, block_q=block_q)
    expected = blocks_fetched(starts, t, window=window, block_k=block_k, block_q=block_q, max_len=T,
                              slots=slots, num_slots=S)
    assert k_copies == v_copies == kv * expected
    assert expected < len(slots) * (t // min(block_q, t)) * (T // block_k)  # fewer than every block of every row


def test_blocks_fetched_by_hand():
    # decode, 16-position blocks: row 0 needs 1 block, row 1 all 4; padding row 2 repeats row 1's last
    assert blocks_fetched([0, 63, 0], 1, window=None, block_k=16, block_q=1, max_len=64,
                          slots=[0, 1, 4], num_slots=4) == 5
    # a 20-position window at position 40 needs blocks 1..2 only
    assert blocks_fetched([40], 1, window=20, block_k=16, block_q=1, max_len=64) == 2
    with pytest.raises(ValueError, match="cache length 64 must be a multiple of block_k 24"):
        blocks_fetched([0], 1, window=None, block_k=24, block_q=1, max_len=64)


@needs_libtpu
@pytest.mark.parametrize("case", ["decode", "decode-int8", "prefill", "decode-traced-window-softcap"])
def test_compiles_for_a_tpu_without_copying_the_cache(monkeypatch, case):
    # Workaround, shared hosts: libtpu takes a lock file per process; another process compiling
    # for a TPU would make this one fail. Nothing here touches a real TPU.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host discovery (launch/aot.py)
    from jax.experimental import topologies
    device = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))

    layers, slots, kv, max_len, h, n = 2, 8, 1, 1024, 128, 4
    b, t = (2, 256) if case == "prefill" else (8, 1)
    cache_dtype = jnp.int8 if case == "decode-int8" else jnp.bfloat16
    cache = spec((layers, slots, kv, max_len, h), cache_dtype)
    args = [spec((b, t, n, h), jnp.bfloat16), cache, cache, spec((), jnp.int32), spec((b,), jnp.int32),
            spec((b,), jnp.int32)]
    if case == "decode-int8":
        args += [spec((layers, slots, kv, 1, max_len), jnp.float32)] * 2
    gemma2 = case == "decode-traced-window-softcap"
    if gemma2:
        args += [None, None, spec((), jnp.int32)]

    def attend(q, k, v, layer, slots, starts, k_scale=None, v_scale=None, window=None):
        opts = dict(window=window, scale=256 ** -0.5, softcap=50.0) if gemma2 else {}
        return ragged_attention(q, k, v, layer, slots, starts, k_scale=k_scale, v_scale=v_scale, **opts)

    start = time.perf_counter()
    exe = jax.jit(attend).lower(*args).compile()
    seconds = time.perf_counter() - start
    assert "tpu_custom_call" in exe.as_text()
    one_layer = slots * kv * max_len * h * jnp.dtype(cache_dtype).itemsize
    assert exe.memory_analysis().temp_size_in_bytes < one_layer  # the cache is read in place, not sliced
    print(f"{case}: compiled for v5e in {seconds:.2f} s")
