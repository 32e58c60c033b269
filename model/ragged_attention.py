"""Attention over the stacked KV cache that reads only the key/value blocks each row needs.

A Pallas TPU kernel for decode (t = 1) and prefill chunks (t > 1) of rows that sit at different
positions: row i's queries are positions starts[i] + [0, t) of cache slot slots[i]. Each
(row, q block) needs the key blocks [first, last] (causal, and the sliding window if any); the
BlockSpec index_map clamps the k-block grid index into that range, so grid steps outside it
repeat a block index, which the TPU pipeline does not copy again, and `pl.when` skips their
compute. The layer is chosen in the index_map from a scalar-prefetched (possibly traced) index,
so the stacked cache is passed whole and never sliced (an XLA slice would copy it).

Grid (kv heads, rows, q blocks, k blocks). Heads outermost: each head's pass over the rows is the
same sequence of block indices, so the HBM traffic is exactly kv_heads x `blocks_fetched`.
Padding rows repeat the previous real row's final block: they fetch nothing.

int8 cache: scales are float32 [L, S, K, 1, T], one per cached vector. The unit dimension makes
the kernel's (1, block_k) scale block legal for Mosaic (the last two block dims must divide by
(8, 128) or equal the array's), and XLA then tiles the array T(1,128), so one head's scales are
contiguous: no bytes beyond the ones needed. (With [L, S, K, T], XLA tiles T(K,128) and a block
must span all K heads, reading K times the scales needed.) Key scales multiply the scores, value
scales the probabilities, so no dequantized block is built.

Per-layer differences: the window may be a traced scalar (a scan over layers whose windows
differ, as Gemma 2's alternate), prefetched like the layer; NO_WINDOW stands for none. The score
scale and Gemma 2's tanh soft-cap of the scores are static.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Default block sizes for v5e with head_dim 128: a 512-position k/v block pair is 256 KiB of
# bfloat16, about the per-grid-step overhead in HBM time; prefill's score tile stays in scoped VMEM.
BLOCK_K, BLOCK_Q = 512, 256
# Most query rows (positions x the query heads of one kv head) in a block: a prefill's q block is
# up to this many / group positions, so that its [rows, BLOCK_K] float32 scores and weights (4 MiB
# each) fit the scoped VMEM. Each q block fetches the k/v blocks up to its diagonal, so fewer,
# larger q blocks fetch fewer: 512 positions at 4 heads per kv head halve an 8B prefill's cache
# reads against 256 (docs/benchmarks.md).
QUERY_ROWS = 2048

# A traced window that masks nothing: every earlier position lies within it.
NO_WINDOW = 1 << 30


def default_blocks(t: int, max_len: int, group: int = 1) -> tuple[int, int]:
    """(block_q, block_k) for t queries per row over a cache of max_len, `group` query heads per kv
    head: block_q the larger of BLOCK_Q and QUERY_ROWS // group, up to 2 * BLOCK_Q, block_k
    BLOCK_K, each shrunk to divide t and max_len. Up to BLOCK_Q queries are one block whatever t is
    (a speculative verify step's k + 1): a block's rows must be a multiple of 8 or all of them."""
    most = min(2 * BLOCK_Q, max(BLOCK_Q, QUERY_ROWS // group))
    return (t if t <= most else math.gcd(t, most)), math.gcd(max_len, BLOCK_K)


def _block_sizes(t: int, max_len: int, block_q: int, block_k: int) -> tuple[int, int]:
    block_q, block_k = min(block_q, t), min(block_k, max_len)
    if max_len % block_k or t % block_q:
        raise ValueError(f"cache length {max_len} must be a multiple of block_k {block_k}, and query "
                         f"length {t} a multiple of block_q {block_q}")
    return block_q, block_k


def _live_blocks(xp, slots, starts, *, t, block_q, block_k, max_len, num_slots, window):
    """(fetch_slot [b], first [b, nq], last [b, nq]): the slot each row reads and the key blocks
    each (row, q block) needs. Works on numpy (host) and jax arrays alike. A padding row (slot
    outside [0, num_slots)) is pinned to the previous real row's slot and final block, so the
    pipeline fetches nothing for it; before any real row that is slot 0, block 0."""
    q_first = starts[:, None] + xp.arange(t // block_q) * block_q  # [b, nq]
    last = xp.minimum(q_first + block_q - 1, max_len - 1) // block_k
    first = xp.zeros_like(last) if window is None else xp.maximum(q_first - window + 1, 0) // block_k
    first = xp.minimum(first, last)  # queries past max_len - 1: keep the range non-empty
    live = (slots >= 0) & (slots < num_slots)
    prev = xp.maximum.accumulate(xp.where(live, xp.arange(slots.shape[0]), -1))  # last real row <= i
    src = xp.maximum(prev, 0)
    pin = xp.where(prev >= 0, last[src, -1], 0)[:, None]
    first, last = xp.where(live[:, None], first, pin), xp.where(live[:, None], last, pin)
    return xp.where(prev >= 0, slots[src], 0), first, last


def blocks_fetched(starts, t: int, *, window: int | None, block_k: int, block_q: int, max_len: int,
                   slots=None, num_slots: int | None = None) -> int:
    """Key blocks (block_k x head_dim each; value blocks are as many) the kernel's pipeline DMAs
    per kv head per layer: the grid's sequence of clamped block indices, counting a fetch
    wherever it changes. XLA's cost analysis cannot see inside the kernel, so this is how cache
    traffic is reported. Default slots: row i in slot i, all real. This is one TensorCore's
    in-order walk (v5e, v6e); a megacore chip (v4, v5p) splits the parallel axes between two
    cores, which adds about one fetch per core."""
    starts = np.asarray(starts)
    slots = np.arange(len(starts)) if slots is None else np.asarray(slots)
    num_slots = int(slots.max()) + 1 if num_slots is None else num_slots
    block_q, block_k = _block_sizes(t, max_len, block_q, block_k)
    fetch_slot, first, last = _live_blocks(np, slots, starts, t=t, block_q=block_q, block_k=block_k,
                                           max_len=max_len, num_slots=num_slots, window=window)
    kb = np.arange(max_len // block_k)
    blocks = np.clip(kb, first[..., None], last[..., None]).reshape(-1)  # grid order: row, q block, k block
    slot = np.broadcast_to(fetch_slot[:, None, None], first.shape + kb.shape).reshape(-1)
    return 1 + int(np.sum((blocks[1:] != blocks[:-1]) | (slot[1:] != slot[:-1])))


def _kernel(layer_ref, slots_ref, starts_ref, fetch_ref, first_ref, last_ref, window_ref, q_ref, k_ref, v_ref,
            *refs, group, block_q, block_k, num_q_blocks, num_slots, windowed, scale, softcap, int8, heads_major):
    """One (kv head, row, q block, k block) step: q [block_q * group, h] (rows are positions x
    heads), or [group, block_q, h] when heads_major (rows are heads x positions); k and v
    [block_k, h]. Flash-style online softmax in float32 scratch."""
    ks_ref, vs_ref = refs[:2] if int8 else (None, None)
    o_ref, m_ref, l_ref, acc_ref = refs[-4:]
    i, qb, kb = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    j = i * num_q_blocks + qb

    @pl.when(kb == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    slot = slots_ref[i]
    live = (slot >= 0) & (slot < num_slots) & (kb >= first_ref[j]) & (kb <= last_ref[j])

    @pl.when(live)
    def _compute():
        q = q_ref[...].reshape(-1, q_ref.shape[-1])  # heads_major: [group, block_q, h] as its rows
        k = k_ref[...].astype(q.dtype)  # int8 -> compute dtype: exact for |x| <= 127
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * scale
        if int8:
            s = s * ks_ref[...]  # [1, block_k]: one scale per key
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        shape = s.shape
        row = lax.broadcasted_iota(jnp.int32, shape, 0)
        q_pos = starts_ref[i] + qb * block_q + (lax.rem(row, block_q) if heads_major else lax.div(row, group))
        k_pos = kb * block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
        mask = k_pos <= q_pos
        if windowed:
            mask &= k_pos > q_pos - window_ref[0]
        s = jnp.where(mask, s, -jnp.inf)  # also drops any NaN a stale cache entry left in s
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no visible key yet: keep exp() finite
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        l_ref[...] = alpha * l_ref[...] + p.sum(axis=-1, keepdims=True)
        if int8:
            p = p * vs_ref[...]  # value scales fold into the weights; l keeps the unscaled sum
        v = v_ref[...].astype(q.dtype)
        acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_ref[...] = m_new

    @pl.when(kb == pl.num_programs(3) - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l == 0, 1.0, l)).astype(o_ref.dtype).reshape(o_ref.shape)  # no key: 0


def ragged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer, slots: jax.Array,
                     starts: jax.Array, *, k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                     window: int | jax.Array | None = None, scale: float | None = None, softcap: float | None = None,
                     block_k: int = BLOCK_K, block_q: int = BLOCK_Q,
                     interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """Causal GQA attention of q [b, t, n, h] (row i at positions starts[i] + [0, t)) over layer
    `layer` of the stacked cache k_cache, v_cache [L, S, K, T, h], slot slots[i]; -> [b, t, n, h]
    in q.dtype. int8 caches come with k_scale, v_scale float32 [L, S, K, 1, T]. `layer` may be
    traced. Rows whose slot is outside [0, S) are padding: zeros, no fetch. Queries that see no
    key (past T with a window) give zeros. `window`: None, an int, or a traced int32 scalar
    (NO_WINDOW: none). `scale` multiplies q.k (default head_dim ** -0.5); `softcap` then maps
    scores to softcap * tanh(scores / softcap) (Gemma 2). `interpret`: True, or
    pltpu.InterpretParams(), runs the kernel on CPU.

    The cost estimate counts flops and exps for the keys a query sees (decode: all of T, an upper
    bound; prefill: a causal prompt from position 0) and only q and output bytes: the cache bytes
    are `blocks_fetched(...)` x block bytes x K."""
    b, t, n, h = q.shape
    _, S, K, T, _ = k_cache.shape
    if n % K:
        raise ValueError(f"{n} query heads are not a multiple of {K} kv heads")
    int8 = k_scale is not None
    if int8 != (v_scale is not None) or (int8 and k_scale.shape != (*k_cache.shape[:3], 1, T)):
        raise ValueError(f"int8 caches need k_scale and v_scale of shape {(*k_cache.shape[:3], 1, T)}; "
                         f"got {None if k_scale is None else k_scale.shape}, "
                         f"{None if v_scale is None else v_scale.shape}")
    group = n // K
    block_q, block_k = _block_sizes(t, T, block_q, block_k)
    nq, rows = t // block_q, block_q * group
    slots, starts = jnp.asarray(slots, jnp.int32), jnp.asarray(starts, jnp.int32)
    win = None if window is None else jnp.asarray(window, jnp.int32)
    fetch_slot, first, last = _live_blocks(jnp, slots, starts, t=t, block_q=block_q, block_k=block_k,
                                           max_len=T, num_slots=S, window=win)
    prefetch = (jnp.asarray(layer, jnp.int32).reshape(1), slots, starts, fetch_slot.astype(jnp.int32),
                first.reshape(-1).astype(jnp.int32), last.reshape(-1).astype(jnp.int32),
                jnp.full((1,), NO_WINDOW, jnp.int32) if win is None else win.reshape(1))

    def kv_block(kh, i, qb, kb, layer_ref, slots_ref, starts_ref, fetch_ref, first_ref, last_ref, window_ref):
        j = i * nq + qb
        return layer_ref[0], fetch_ref[i], kh, jnp.minimum(jnp.maximum(kb, first_ref[j]), last_ref[j])

    # A prefill's q goes in as [b, K, group, t, h] (each kv head's query heads, then positions):
    # the layout the projection and RoPE write without a transpose, where [b, K, t * group, h]
    # took the TPU compiler two copies of q per layer (67 MB per layer and chip on an 8B prefill).
    # Blocks of a few positions (decode, a verify step's k + 1) keep positions x heads as rows.
    heads_major = block_q % 16 == 0
    if heads_major:
        q_spec = pl.BlockSpec((None, None, group, block_q, h), lambda kh, i, qb, kb, *_: (i, kh, 0, qb, 0))
    else:
        q_spec = pl.BlockSpec((None, None, rows, h), lambda kh, i, qb, kb, *_: (i, kh, qb, 0))
    kv_spec = pl.BlockSpec((None, None, None, block_k, h), lambda *a: (*kv_block(*a), 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    operands = [k_cache, v_cache]
    if int8:
        def scale_block(*a):
            layer_i, slot, kh, kb = kv_block(*a)
            return layer_i, slot, kh, 0, kb
        in_specs += [pl.BlockSpec((None, None, None, 1, block_k), scale_block)] * 2
        operands += [k_scale, v_scale]

    if heads_major:
        q_in = q.reshape(b, t, K, group, h).transpose(0, 2, 3, 1, 4)  # [b, K, group, t, h]
    else:
        q_in = q.reshape(b, t, K, group, h).transpose(0, 2, 1, 3, 4).reshape(b, K, t * group, h)
    # keys each query sees, summed: a decode row may see all of T; a prefill is costed as a prompt
    # from position 0 (causal), since the starts are only known at run time; a traced window as none
    static_window = window if isinstance(window, int) else T
    seen = [min(T, j + 1, static_window) for j in range(t)] if t > 1 else [min(T, static_window)]
    kernel = functools.partial(_kernel, group=group, block_q=block_q, block_k=block_k, num_q_blocks=nq,
                               num_slots=S, windowed=window is not None, scale=h ** -0.5 if scale is None else scale,
                               softcap=softcap, int8=int8, heads_major=heads_major)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(K, b, nq, T // block_k),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                            pltpu.VMEM((rows, h), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q_in.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=4 * b * n * h * sum(seen),
                                      transcendentals=(1 if softcap is None else 2) * b * n * sum(seen),
                                      bytes_accessed=2 * q.size * q.dtype.itemsize),
        interpret=interpret,
    )(*prefetch, q_in, *operands)
    if heads_major:
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    return out.reshape(b, K, t, group, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


def reference_ragged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer, slots: jax.Array,
                               starts: jax.Array, *, k_scale: jax.Array | None = None,
                               v_scale: jax.Array | None = None, window: int | jax.Array | None = None,
                               scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """`ragged_attention` in plain jnp (gather each row's slot, dequantize, mask, softmax): the
    numerical reference. Same shapes, scale layout and options."""
    b, t, n, h = q.shape
    _, S, K, T, _ = k_cache.shape
    live = (slots >= 0) & (slots < S)
    slot = jnp.clip(slots, 0, S - 1)
    k, v = k_cache[layer, slot].astype(jnp.float32), v_cache[layer, slot].astype(jnp.float32)  # [b, K, T, h]
    if k_scale is not None:
        k = k * k_scale[layer, slot][:, :, 0, :, None]
        v = v * v_scale[layer, slot][:, :, 0, :, None]
    q_btkgh = q.reshape(b, t, K, n // K, h).astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    s = jnp.einsum("btkgh,bksh->btkgs", q_btkgh, k, precision=hi) * (h ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    q_pos = starts[:, None] + jnp.arange(t)  # [b, t]
    k_pos = jnp.arange(T)
    mask = (k_pos <= q_pos[..., None]) & live[:, None, None]  # [b, t, T]
    if window is not None:
        mask &= k_pos > q_pos[..., None] - window
    s = jnp.where(mask[:, :, None, None, :], s, -jnp.inf)
    m = s.max(axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m))
    l = p.sum(axis=-1, keepdims=True)
    out = jnp.einsum("btkgs,bksh->btkgh", p / jnp.where(l == 0, 1.0, l), v, precision=hi)
    return out.reshape(b, t, n, h).astype(q.dtype)
