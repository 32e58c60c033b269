"""The decoder: embed -> N x (attention, gated MLP) -> norm -> head, in Flax NNX.

Each weight is declared once in model/params.py (`param_specs`: shape, logical axes, init). How the
layers run is the platform's hot path (model/platform.py):
- TPU and GPU ("stacked"): a per-layer weight is one [layers, ...] array and the layers run as a
  `lax.scan` that carries the stacked KV cache and writes it in place: compile time does not grow
  with depth, and decode compiles once. Attention over the cache is model/ragged_attention.py's
  kernel on TPU (it reads only each row's live blocks), its XLA reference elsewhere.
- CPU: a per-layer weight is one array per layer, run as an unrolled Python loop, over a cache in
  per-layer chunks: slicing a layer out of stacked weights copies it on XLA:CPU at every step,
  doubling the memory traffic that bounds decoding.
What differs between architectures is declared once, as ModelConfig fields (model/config.py's
FAMILIES says which architecture sets which), and read here: q/k norms, norms after attention and
MLP, the attention scale and soft-caps, and per-layer windows and RoPE. A per-layer value is a
Python value on the CPU path and, where layers differ, a lookup by the scan's layer index on the
stacked path.
Dimension letters in einsums: b batch, t query positions, s key positions, d model width, n query
heads, k kv heads, g query heads per kv head, h head dim, f MLP width, v vocabulary, l layers.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import ragged_attention as ragged
from model.config import ModelConfig, rope_attention_factor, rope_inv_freq
from model.kv_cache import STACKED_AXES, KVCache, StackedKVCache
# abstract_params, init_params and param_shardings are imported for those who import them from here
from model.params import ParamSpec, abstract_params, init_params, param_shardings, param_specs  # noqa: F401
from model.platform import HotPath, hot_path
from model.quantize import CONTRACTED, QArray
from model.sharding import DATA, MODEL, constrain, logical_to_spec, named_sharding

Array = jax.Array


def stack_layers(params: dict[str, Any], cfg: ModelConfig, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The params format with each per-layer list stacked into one [layers, ...] array (a QArray's
    values and scales each stacked), placed with a replicated "layers" axis; already-stacked
    weights pass through. One weight at a time, each list dropped once stacked, so peak memory is
    the model plus one weight. Abstract weights give abstract stacked weights."""
    specs, out = param_specs(cfg, mesh), dict(params)
    for name, value in params.items():
        if not (specs[name].per_layer and isinstance(value, (list, tuple))):
            continue

        def sharding(x):
            return named_sharding(("layers",) + _axes_of(name, specs[name], x), (cfg.num_layers, *x.shape), mesh)
        shardings = jax.tree.map(sharding, value[0])
        stack = jax.jit(lambda *ws: jax.tree.map(lambda *xs: jnp.stack(xs), *ws), out_shardings=shardings)
        abstract = isinstance(jax.tree.leaves(value[0])[0], jax.ShapeDtypeStruct)
        out[name] = jax.eval_shape(stack, *value) if abstract else stack(*value)
    return out


def _axes_of(name: str, spec: ParamSpec, x) -> tuple[str | None, ...]:
    """Logical axes of one layer's array of a weight: its spec's, or for an int8 weight's scale
    (a QArray leaf of lower rank) its non-contracted ones."""
    if x.ndim == len(spec.axes):
        return spec.axes
    return tuple(a for a in spec.axes if a not in CONTRACTED[name])


# ---------------------------------------------------------------- layers (pure functions)

def linear(eq: str, x: Array, w: Array | QArray, **kw) -> Array:
    """einsum(eq, x, w). An int8 weight is converted to x's dtype and its per-output-channel
    scale applied to the result (the output ends with the weight's non-contracted dims)."""
    # Accumulate in float32 and cast back: better numerics, and on CPU a bfloat16 matmul with a
    # float32 result runs about twice as fast as one with a bfloat16 result.
    # accumulate: the matmul's result type. x's own (bfloat16) for a row-parallel matmul on the
    # accelerator path, so that its partial sums are added over "model" in bfloat16: half the
    # bytes of that all-reduce and of the result (the MXU still accumulates in float32).
    out_dtype = kw.pop("preferred_element_type", x.dtype)
    acc = kw.pop("accumulate", jnp.float32)
    if isinstance(w, QArray):
        out = jnp.einsum(eq, x, w.q.astype(x.dtype), preferred_element_type=acc, **kw)
        return (out * w.scale).astype(out_dtype)
    return jnp.einsum(eq, x, w, preferred_element_type=acc, **kw).astype(out_dtype)


def rms_norm(x: Array, w: Array, eps: float, offset: float = 0.0) -> Array:
    """RMSNorm over the last axis, computed in float32; Gemma passes offset=1 to scale by (1 + w)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (offset + w.astype(jnp.float32))).astype(x.dtype)


def rope(x_btnh: Array, positions_bt: Array, inv_freq_h: Array, factor: float | Array = 1.0,
         compute_dtype=jnp.float32, swap_by_matmul: bool = False) -> Array:
    """Rotary embedding in HF's rotate-half layout (first and second halves of head_dim pair up);
    cos and sin times `factor` (LongRoPE's attention factor). compute_dtype: of the rotation
    (cos and sin are computed in float32 and cast to it, as HF's models do to their dtype).

    swap_by_matmul: form the swapped halves [-x2, x1] as a matmul with a fixed +-1 matrix rather
    than by slices and a concatenation. Exact (each output is one input, negated or not). The TPU
    compiler writes the rotation in one fusion then, where the concatenation took a fusion and a
    copy of its own: 34 MB less per layer and chip on an 8B prefill (docs/benchmarks.md), for 0.3%
    more flops."""
    angles = positions_bt[:, :, None].astype(jnp.float32) * inv_freq_h[None, None, :]  # [b, t, h/2]
    cos, sin = jnp.cos(angles)[:, :, None, :] * factor, jnp.sin(angles)[:, :, None, :] * factor
    cos, sin = cos.astype(compute_dtype), sin.astype(compute_dtype)
    x = x_btnh.astype(compute_dtype)
    if not swap_by_matmul:
        x1, x2 = jnp.split(x, 2, axis=-1)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnh.dtype)
    half = x.shape[-1] // 2
    swap = np.zeros((2 * half, 2 * half), np.float32)
    swap[np.arange(half) + half, np.arange(half)] = -1.0  # output i < half: -x2[i]
    swap[np.arange(half), np.arange(half) + half] = 1.0   # output half + i: x1[i]
    swapped = jnp.einsum("btnh,hg->btng", x, jnp.asarray(swap, compute_dtype), precision=jax.lax.Precision.HIGHEST)
    cos, sin = (jnp.concatenate([a, a], axis=-1) for a in (cos, sin))
    return (x * cos + swapped * sin).astype(x_btnh.dtype)


def attention(q_btnh: Array, k_bkhs: Array | Sequence[Array], v_bksh: Array | Sequence[Array], mask_bts: Array,
              k_scale_bks: Sequence[Array] | None = None, v_scale_bks: Sequence[Array] | None = None,
              scale: float | None = None, softcap: float | None = None) -> Array:
    """Grouped-query attention: each kv head serves num_heads // num_kv_heads query heads.

    Keys and values come in the cache's layouts (see kv_cache.py), which the two matmuls read
    without a transpose: one array each, or lists of chunks along the positions (the cache's
    split); mask_bts covers the chunks' concatenation. The softmax runs over all chunks at once.
    With an int8 cache, the key scales multiply the scores and the value scales the weights.
    Scores are q.k times `scale` (default head_dim ** -0.5), then soft-capped to
    softcap * tanh(scores / softcap) if `softcap` is set (Gemma 2).
    """
    ks, vs = _as_chunks(k_bkhs), _as_chunks(v_bksh)
    k_scales, v_scales = _as_chunks(k_scale_bks), _as_chunks(v_scale_bks)
    b, t, n, h = q_btnh.shape
    k = ks[0].shape[1]
    q = q_btnh.reshape(b, t, k, n // k, h)
    if b * t == 1 and len(ks) == 1:  # one sequence, one token, one chunk: see _attention_one
        pick = lambda xs: xs[0] if xs else None  # noqa: E731
        return _attention_one(q, ks[0], vs[0], mask_bts, pick(k_scales), pick(v_scales), scale,
                              softcap).astype(q_btnh.dtype)
    per_key = lambda s: s[:, :, None, None, :]  # noqa: E731  [b, k, s] -> [b, k, 1, 1, s]
    scores = []
    for c, kc in enumerate(ks):
        sc = jnp.einsum("btkgh,bkhs->bktgs", q, kc.astype(q.dtype), preferred_element_type=jnp.float32)
        scores.append(sc * per_key(k_scales[c]) if k_scales else sc)
    scores = jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0]
    scores = jnp.where(mask_bts[:, None, :, None, :], _scale(scores, h, scale, softcap), jnp.finfo(jnp.float32).min)
    probs = _split(jax.nn.softmax(scores, axis=-1), vs)
    out = 0.0
    for c, (pc, vc) in enumerate(zip(probs, vs)):
        if v_scales:
            pc = pc * per_key(v_scales[c])
        # [b, k, t, g, h] is the matmul's natural output; asking for [b, t, k, g, h] directly lets
        # XLA:CPU swap the operands into a form its bfloat16 dot does not implement
        out = out + jnp.einsum("bktgs,bksh->bktgh", pc.astype(q.dtype), vc.astype(q.dtype),
                               preferred_element_type=jnp.float32)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, n, h).astype(q_btnh.dtype)


def _attention_one(q_btkgh, k_bkhs, v_bksh, mask_bts, k_scale_bks, v_scale_bks, scale, softcap) -> Array:
    """`attention` for a single row and token over a single chunk, as multiply-and-reduce
    instead of matmuls: with a batch of one, XLA:CPU copies a cache buffer that a matmul reads
    after the step's in-place write (measured: 5 of a 12 ms step for a 26M model at max_len
    1024). Over several chunks the per-chunk reductions cost more than those copies, so
    `attention` takes the matmul path there."""
    h = q_btkgh.shape[-1]
    q = q_btkgh[:, 0].astype(jnp.float32)  # [b, k, g, h]
    scores = jnp.sum(q[..., None] * k_bkhs[:, :, None].astype(jnp.float32), axis=-2)  # [b, k, g, s]
    if k_scale_bks is not None:
        scores = scores * k_scale_bks[:, :, None, :]
    scores = jnp.where(mask_bts[:, 0][:, None, None, :], _scale(scores, h, scale, softcap), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale_bks is not None:
        probs = probs * v_scale_bks[:, :, None, :]
    out = jnp.sum(probs[..., None] * v_bksh[:, :, None].astype(jnp.float32), axis=-2)  # [b, k, g, h]
    return out.reshape(1, 1, -1, h)


def _scale(scores: Array, head_dim: int, scale: float | None, softcap: float | None) -> Array:
    scores = scores * (head_dim ** -0.5 if scale is None else scale)
    return scores if softcap is None else jnp.tanh(scores / softcap) * softcap


def _as_chunks(x: Array | Sequence[Array] | None) -> list[Array]:
    return [] if x is None else [x] if isinstance(x, jax.Array) else list(x)


def _split(probs: Array, vs: list[Array]) -> list[Array]:
    """Probabilities over all positions -> one piece per value chunk (along the last axis)."""
    if len(vs) == 1:
        return [probs]
    ends = list(itertools.accumulate(v.shape[2] for v in vs))[:-1]
    return jnp.split(probs, ends, axis=-1)


def to_cache_layout(k_btkh: Array, v_btkh: Array) -> tuple[Array, Array]:
    """Keys and values [b, t, kv_heads, head_dim] -> the layouts `attention` takes."""
    return k_btkh.transpose(0, 2, 3, 1), v_btkh.transpose(0, 2, 1, 3)


def attention_mask(q_pos_bt: Array, k_pos_s: Array, window: int | Array | None) -> Array:
    """[b, t, s]: a query sees keys at or before its position (and within the sliding window:
    an int, or a traced scalar, ragged.NO_WINDOW for none)."""
    q, k = q_pos_bt[:, :, None], k_pos_s[None, None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def packed_mask(positions_bt: Array, segments_bt: Array, window: int | Array | None) -> Array:
    """[b, t, t]: a query sees earlier keys of the prompt (segment 0) and of its own segment (and
    within the sliding window, by position)."""
    index = jnp.arange(positions_bt.shape[1])
    seg_q, seg_k = segments_bt[:, :, None], segments_bt[:, None, :]
    mask = (index[None, None, :] <= index[None, :, None]) & ((seg_k == 0) | (seg_k == seg_q))
    if window is not None:
        mask &= positions_bt[:, None, :] > positions_bt[:, :, None] - window
    return mask


def _activation(name: str) -> Callable[[Array], Array]:
    """The MLP's activation: SiLU, or GELU in its tanh approximation (Gemma, Phi-3's configs)."""
    return jax.nn.silu if name == "silu" else lambda a: jax.nn.gelu(a, approximate=True)


def gated_mlp(x_btd: Array, w_gate, w_up, w_down, activation: str, accumulate=jnp.float32,
              groups: int | None = None) -> Array:
    """groups: as in fused_linear (gate and up as one matmul); None: two matmuls."""
    act = _activation(activation)
    if groups is None:
        gate, up = (linear("btd,df->btf", x_btd, w) for w in (w_gate, w_up))
    else:
        gate, up = fused_linear(x_btd, [w_gate, w_up], groups)
    return linear("btf,fd->btd", act(gate) * up, w_down, accumulate=accumulate)


def fused_linear(x_btd: Array, ws: Sequence[Array | QArray], groups: int, head_dim: int | None = None) -> list[Array]:
    """[x @ w for w in ws] (each w [d, n_i]) as one matmul, so that x is read once instead of
    once per weight. The weights are concatenated per group of columns: with each w's columns
    split over `groups` devices (tensor parallel), group g of the result is device g's columns of
    every w, so the concatenation and the split stay on the device.

    head_dim: every w's columns are whole heads of this size (q, k, v). The product then keeps
    heads as a dim of its own, [b, t, groups, heads, head_dim], and each projection is a slice of
    whole heads that the next op reads in place. As one flat dim, the TPU compiler copied q out
    of the product and laid it out again as [heads, head_dim] (75 MB per layer and chip on an 8B
    prefill, docs/benchmarks.md)."""
    cols = (groups, -1) if head_dim is None else (groups, -1, head_dim)

    def grouped(w):  # [d, n] -> [d, groups, n / groups] or [d, groups, heads / groups, head_dim]
        if isinstance(w, QArray):
            return QArray(w.q.reshape(w.q.shape[0], *cols), w.scale.reshape(cols))
        return w.reshape(w.shape[0], *cols)
    parts = [grouped(w) for w in ws]
    along = -1 if head_dim is None else -2  # the columns, or the heads (weights and int8 scales alike)
    w = jax.tree.map(lambda *a: jnp.concatenate(a, axis=along), *parts)
    out = linear("btd,dgn->btgn" if head_dim is None else "btd,dgnh->btgnh", x_btd, w)
    cuts = list(itertools.accumulate(p.shape[2] for p in parts))[:-1]
    b, t = x_btd.shape[:2]
    return [o.reshape(b, t, -1) for o in jnp.split(out, cuts, axis=3)]


def route(x_td: Array, router_de: Array, top_k: int, renormalize: bool) -> tuple[Array, Array]:
    """Each token's top_k experts [t, k] (int32) and their float32 weights [t, k]: the softmax of
    the router's logits over all experts at the chosen ones, renormalized to sum to 1 if asked
    (which equals a softmax over the chosen logits alone: Mixtral)."""
    logits = linear("td,de->te", x_td, router_de, preferred_element_type=jnp.float32)
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return experts.astype(jnp.int32), weights


def grouped_linear(x_md: Array, w: Array | QArray, group_sizes_e: Array, expert_m: Array) -> Array:
    """Rows of x sorted by expert, each times its expert's matrix: jax.lax.ragged_dot of x [m, d]
    and w [e, d, f] with group_sizes_e rows per expert -> [m, f] in x's dtype. The matmul
    accumulates in float32 and writes x's dtype itself: on TPU a float32 result costs twice the
    bytes of these [m, f] arrays (m = tokens x experts per token), then a pass to convert. An int8
    w is converted to x's dtype as `linear` does, and its per-expert, per-output-channel scale
    [e, f] applied to each row's float32 output (expert_m: each row's expert)."""
    if not isinstance(w, QArray):
        return jax.lax.ragged_dot(x_md, w, group_sizes_e, preferred_element_type=x_md.dtype)
    out = jax.lax.ragged_dot(x_md, w.q.astype(x_md.dtype), group_sizes_e, preferred_element_type=jnp.float32)
    return (out * w.scale[expert_m]).astype(x_md.dtype)


def _routed_pairs(x_btd: Array, router_de: Array, top_k: int, renormalize: bool, first_expert: Array | int,
                  held: int) -> tuple[Array, Array, Array, Array]:
    """Routing shared by moe_mlp and moe_mlp_batched: (x as [tokens, d], the router's weights
    [tokens, k], each (token, expert) pair's expert among the `held` from first_expert on [t * k]
    (token-major), and whether that expert is held here [t * k])."""
    x_td = x_btd.reshape(-1, x_btd.shape[-1])
    experts_tk, weights_tk = route(x_td, router_de, top_k, renormalize)
    local_m = experts_tk.reshape(-1) - first_expert
    return x_td, weights_tk, local_m, (local_m >= 0) & (local_m < held)


def moe_mlp(x_btd: Array, router_de: Array, w_gate, w_up, w_down, top_k: int, renormalize: bool,
            activation: str, first_expert: Array | int = 0) -> Array:
    """Mixture of experts [b, t, d] -> float32 [b, t, d]: each token runs through its top_k
    experts' gated MLPs (w_gate, w_up [e, d, f], w_down [e, f, d]), each in x's dtype as
    transformers runs them, and their outputs summed with the router's weights in float32 (so
    that sums over devices add up before rounding). The t*k (token, expert) pairs are sorted by
    expert so that each expert's matmul is one group of a ragged_dot: every pair is computed, none
    dropped, no capacity limit.

    The weights may hold only experts first_expert .. first_expert + e - 1 of the router's (one
    device's share when experts are split over devices): the pairs routed to other experts sort
    after every group, where ragged_dot leaves its rows zero, and add nothing here."""
    b, t, d = x_btd.shape
    held = w_down.shape[0]
    x_td, weights_tk, local_m, mine_m = _routed_pairs(x_btd, router_de, top_k, renormalize, first_expert, held)
    key_m = jnp.where(mine_m, local_m, held)  # pairs of experts held elsewhere: one group past the last
    order_m = jnp.argsort(key_m, stable=True)
    sorted_m = jnp.minimum(key_m[order_m], held - 1)  # each row's expert, for an int8 weight's scales
    group_sizes_e = jnp.zeros((held + 1,), jnp.int32).at[key_m].add(1)[:held]
    xs_md = x_td[order_m // top_k]
    act = _activation(activation)
    h_mf = act(grouped_linear(xs_md, w_gate, group_sizes_e, sorted_m)) * grouped_linear(
        xs_md, w_up, group_sizes_e, sorted_m)
    out_md = grouped_linear(h_mf, w_down, group_sizes_e, sorted_m)
    out_md = jnp.zeros_like(out_md).at[order_m].set(out_md)  # back to token-major order
    out_tkd = out_md.reshape(b * t, top_k, d).astype(jnp.float32) * weights_tk[..., None]
    out_tkd = jnp.where(mine_m.reshape(b * t, top_k, 1), out_tkd, 0.0)
    return jnp.sum(out_tkd, axis=1).reshape(b, t, d)


def expert_capacity(tokens: int, top_k: int, num_experts: int) -> int:
    """Rows each expert gets in moe_mlp_batched: twice the mean load under uniform routing, in
    multiples of 4, at most `tokens` (an expert never gets more: a token picks it once)."""
    return min(tokens, 4 * math.ceil(2 * tokens * top_k / num_experts / 4))


def _batched_linear(x_ecd: Array, w: Array | QArray) -> Array:
    """Each expert's block of rows times its matrix: [e, c, d] x [e, d, f] -> [e, c, f], as
    `linear` (float32 accumulation; an int8 w's per-expert, per-output-channel scale [e, f])."""
    if isinstance(w, QArray):
        out = jnp.einsum("ecd,edf->ecf", x_ecd, w.q.astype(x_ecd.dtype), preferred_element_type=jnp.float32)
        return (out * w.scale[:, None, :]).astype(x_ecd.dtype)
    return jnp.einsum("ecd,edf->ecf", x_ecd, w, preferred_element_type=jnp.float32).astype(x_ecd.dtype)


def moe_mlp_batched(x_btd: Array, router_de: Array, w_gate, w_up, w_down, top_k: int, renormalize: bool,
                    activation: str, first_expert: Array | int = 0) -> Array:
    """moe_mlp for the CPU path, whose compiler has no grouped matmul (ragged_dot there is a
    masked dense matmul of every row against every expert: `experts` times the pairs' flops).
    Each expert's rows are gathered into a block of `capacity` rows (expert_capacity), the three
    matmuls run batched over the experts, and each pair's output is gathered back: about twice the
    pairs' flops, each expert's weights read once and in place. A step where some expert gets more
    rows than that runs with every expert holding all t rows instead (lax.cond), so no pair is
    dropped. Same arguments and result as moe_mlp, first_expert included."""
    b, t, d = x_btd.shape
    held = w_down.shape[0]
    x_td, weights_tk, local_m, mine_m = _routed_pairs(x_btd, router_de, top_k, renormalize, first_expert, held)
    onehot_me = (local_m[:, None] == jnp.arange(held)).astype(jnp.int32)  # none for others' experts
    rank_m = jnp.sum((jnp.cumsum(onehot_me, axis=0) - 1) * onehot_me, axis=-1)  # the pair's row in its block
    load_e = jnp.sum(onehot_me, axis=0)
    token_m = jnp.arange(local_m.shape[0]) // top_k
    act = _activation(activation)

    def run(capacity):  # blocks [experts, capacity, d]: the experts a leading batch dim of each matmul
        rows = held * capacity
        slot_m = jnp.where(mine_m & (rank_m < capacity), local_m * capacity + rank_m, rows)
        xs = jnp.zeros((rows + 1, d), x_td.dtype).at[slot_m].set(x_td[token_m])[:rows].reshape(held, capacity, d)
        h = act(_batched_linear(xs, w_gate)) * _batched_linear(xs, w_up)
        y = _batched_linear(h, w_down).reshape(rows, d)
        y_m = y[jnp.minimum(slot_m, rows - 1)].astype(jnp.float32) * weights_tk.reshape(-1, 1)
        return jnp.sum(jnp.where((slot_m < rows)[:, None], y_m, 0.0).reshape(b * t, top_k, d), axis=1)

    capacity = expert_capacity(b * t, top_k, router_de.shape[-1])
    if capacity == b * t:
        return run(capacity).reshape(b, t, d)
    out = jax.lax.cond(jnp.max(load_e) <= capacity, lambda: run(capacity), lambda: run(b * t))
    return out.reshape(b, t, d)


def _merge_leading(w: Array | QArray, n: int) -> Array | QArray:
    """w with its first n dims merged into one (a free reshape of the stored array)."""
    if isinstance(w, QArray):
        return QArray(w.q.reshape(-1, *w.q.shape[n:]), w.scale)
    return w.reshape(-1, *w.shape[n:])


def _merge_trailing(w: Array | QArray) -> Array | QArray:
    """A [d, heads, head_dim] projection as [d, heads * head_dim] (a free reshape): the matmul
    then reads it as stored, where as a 3-d operand the TPU compiler copies it into a heads-major
    layout before every dispatch (all layers' weights, each time)."""
    if isinstance(w, QArray):
        return QArray(w.q.reshape(w.q.shape[0], -1), w.scale.reshape(-1))
    return w.reshape(w.shape[0], -1)


def _heads_linear(x_btd: Array, ws: Sequence[Array | QArray], groups: int | None = None) -> list[Array]:
    """[x @ w for w in ws] for [d, heads, head_dim] projections, as [b, t, heads, head_dim]:
    one matmul each, or with groups (see fused_linear) one for all."""
    b, t = x_btd.shape[:2]
    merged = [_merge_trailing(w) for w in ws]
    outs = ([linear("btd,dx->btx", x_btd, w) for w in merged] if groups is None
            else fused_linear(x_btd, merged, groups, ws[0].shape[-1]))
    return [o.reshape(b, t, *w.shape[1:]) for o, w in zip(outs, ws)]


# ---------------------------------------------------------------- the CPU path's matmuls

# The CPU path stores these weights with their output dims first, [out..., in...]: each one's
# permutation of the params format's dims. A dense MLP's only (a mixture of experts' keep the
# params format); a tied head reads the embedding table, which is [vocab, d] already.
OUTPUTS_FIRST = {"wq": (1, 2, 0), "wk": (1, 2, 0), "wv": (1, 2, 0), "wo": (2, 0, 1),
                 "w_gate": (1, 0), "w_up": (1, 0), "w_down": (1, 0), "lm_head": (1, 0)}
# Up to this many rows (tokens), a matmul runs as w @ x^T over x^T materialized (to_features):
# XLA:CPU's matmul of a few rows by [in, out] weights runs at half the speed of the same product
# with the weights' rows as its long side (launch/bench_matmul.py). Above it, x @ w^T is as fast.
FEATURES_MAX_ROWS = 128


def _permuted(x, perm: tuple[int, ...]):
    """x with its dims permuted: a copy of an array, or a ShapeDtypeStruct with shape and
    NamedSharding permuted alike (abstract weights). An int8 weight's values are permuted; its
    scale, over the output dims, stays as it is."""
    if isinstance(x, QArray):
        return QArray(_permuted(x.q, perm), x.scale)
    if not isinstance(x, jax.ShapeDtypeStruct):
        return jnp.transpose(x, perm)
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
        spec = tuple(spec[i] for i in perm)
        while spec and spec[-1] is None:  # as the array's own transpose writes it
            spec = spec[:-1]
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return jax.ShapeDtypeStruct(tuple(x.shape[i] for i in perm), x.dtype, sharding=sharding)


def to_features(x: Array, n_in: int = 1) -> Array:
    """[lead..., in...] (n_in trailing dims) -> [in..., m] with m = the lead dims' size, as an
    array of its own: the optimization barrier stops XLA from folding the transpose into the
    matmul that reads it, which would bring back the slow form."""
    lead = x.ndim - n_in
    return jax.lax.optimization_barrier(jnp.moveaxis(x.reshape(-1, *x.shape[lead:]), 0, -1))


def from_features(y: Array, lead: tuple[int, ...]) -> Array:
    """[out..., m] -> [lead..., out...]: to_features' inverse, for a matmul's result."""
    y = jax.lax.optimization_barrier(y)
    return jnp.moveaxis(y, -1, 0).reshape(*lead, *y.shape[:-1])


def _contract_stored(w: Array | QArray, x: Array, n_in: int, w_first: bool, dtype) -> Array:
    """w [out..., in...]'s n_in trailing dims contracted with x's n_in leading dims (w_first:
    -> [out..., m]) or trailing dims (-> [lead..., out...]), in `dtype`, accumulated in float32;
    an int8 w as in `linear`: converted to x's dtype, its scale applied to the result."""
    w_dims = tuple(range(len(w.shape) - n_in, len(w.shape)))
    x_dims = tuple(range(n_in)) if w_first else tuple(range(x.ndim - n_in, x.ndim))
    q = w.q.astype(x.dtype) if isinstance(w, QArray) else w
    operands, dims = ((q, x), (w_dims, x_dims)) if w_first else ((x, q), (x_dims, w_dims))
    out = jax.lax.dot_general(*operands, (dims, ((), ())), preferred_element_type=jnp.float32)
    if isinstance(w, QArray):
        out = out * (w.scale[..., None] if w_first else w.scale)
    return out.astype(dtype)


def matmul_features(w: Array | QArray, x_in_m: Array, n_in: int, dtype) -> Array:
    """w [out..., in...] times x [in..., m] -> [out..., m] in `dtype` (see _contract_stored)."""
    return _contract_stored(w, x_in_m, n_in, True, dtype)


def linear_stored(x: Array, w: Array | QArray, n_in: int, dtype=None) -> Array:
    """x [lead..., in...] times a weight stored outputs first, w [out..., in...] -> [lead..., out...]
    in `dtype` (default x's; float32 accumulation): as matmul_features over to_features(x) for a
    few rows, else one matmul contracting both trailing dims."""
    lead, dtype = x.shape[:x.ndim - n_in], dtype or x.dtype
    if math.prod(lead) <= FEATURES_MAX_ROWS:
        return from_features(matmul_features(w, to_features(x, n_in), n_in, dtype), lead)
    return _contract_stored(w, x, n_in, False, dtype)


def gated_mlp_stored(x: Array, w_gate: Array | QArray, w_up: Array | QArray, w_down: Array | QArray,
                     activation: str) -> Array:
    """gated_mlp with its weights stored outputs first (w_gate, w_up [f, d], w_down [d, f]); for a
    few rows the hidden activations stay [f, m] between the matmuls."""
    lead, act = x.shape[:-1], _activation(activation)
    if math.prod(lead) > FEATURES_MAX_ROWS:
        return linear_stored(act(linear_stored(x, w_gate, 1)) * linear_stored(x, w_up, 1), w_down, 1)
    x_dm = to_features(x)
    h_fm = act(matmul_features(w_gate, x_dm, 1, x.dtype)) * matmul_features(w_up, x_dm, 1, x.dtype)
    return from_features(matmul_features(w_down, h_fm, 1, x.dtype), lead)


# ---------------------------------------------------------------- the model

# attend(layer, q, k, v, cache) -> (out_btnh, cache): self-attention (writing the cache, if any)
# for prefill, or write-into-cache-then-attend for decode.
AttendFn = Callable[[Array, Array, Array, Array, KVCache | None], tuple[Array, KVCache | None]]


class Decoder(nnx.Module):
    """The decoder's weights (nnx.Param, named as in `param_specs`) and its forward passes."""

    def __init__(self, cfg: ModelConfig, params: dict[str, Array], mesh: jax.sharding.Mesh | None = None,
                 path: HotPath | None = None, max_len: int | None = None):
        """params: the params format, with per-layer weights as lists (the CPU path) or stacked
        [layers, ...] arrays (the stacked path, see stack_layers). max_len: the longest sequence
        it will run (LongRoPE picks its factors by it; see config.rope_inv_freq)."""
        specs = param_specs(cfg)
        if set(params) != set(specs):
            raise ValueError(f"weights {sorted(set(params) ^ set(specs))} missing or unexpected")
        self.cfg = cfg
        self.mesh = mesh
        self.path = path or hot_path("cpu")
        sliding = [cfg.is_sliding(i) for i in range(cfg.num_layers)]
        self.inv_freq = tuple(tuple(rope_inv_freq(cfg, max_len, s)) for s in sliding)  # [layers][head_dim / 2]
        self.rope_factor = tuple(rope_attention_factor(cfg, s) for s in sliding)
        for name, value in params.items():
            spec = specs[name]
            stacked = spec.per_layer and self.path.stacked_weights
            arrays = value if spec.per_layer and not stacked else [value]
            layers = value.shape[0] if stacked else len(arrays)
            if spec.per_layer and layers != cfg.num_layers:
                raise ValueError(f"weight {name!r} has {layers} layers; expected {cfg.num_layers}")
            for a in arrays:
                shape = tuple(a.shape)[1:] if stacked else tuple(a.shape)
                if shape != spec.shape:
                    raise ValueError(f"weight {name!r} has shape {shape}; expected {spec.shape}")
        # the CPU path's dense matmul weights, stored outputs first (OUTPUTS_FIRST)
        moe = ("w_gate", "w_up", "w_down") if cfg.num_experts else ()
        self.outputs_first = tuple(sorted(n for n in params if self.path.outputs_first and n in OUTPUTS_FIRST
                                          and n not in moe))
        for name, value in params.items():
            if name in self.outputs_first:
                perm = OUTPUTS_FIRST[name]
                value = [_permuted(a, perm) for a in value] if specs[name].per_layer else _permuted(value, perm)
            if specs[name].per_layer and not self.path.stacked_weights:
                setattr(self, name, nnx.List([nnx.Param(a) for a in value]))
            else:
                setattr(self, name, nnx.Param(value))

    def _layer_weights(self, i: int | None) -> dict[str, Array | QArray]:
        """One layer's weights by name; i None: the stacked arrays (the stacked path)."""
        specs = param_specs(self.cfg)
        return {name: self.weight(name, i) for name, spec in specs.items() if spec.per_layer}

    def weights(self) -> dict[str, Any]:
        """All weights in the params format: name -> array, or a list of arrays per layer."""
        def unstored(name, x):  # outputs first -> the params format
            if name not in self.outputs_first:
                return x
            return _permuted(x, tuple(int(i) for i in np.argsort(OUTPUTS_FIRST[name])))
        return {name: [unstored(name, self.weight(name, i)) for i in range(self.cfg.num_layers)] if spec.per_layer
                else unstored(name, self.weight(name)) for name, spec in param_specs(self.cfg).items()}

    def weight(self, name: str, layer: int | None = None) -> Array | QArray:
        """A weight's value as stored (outputs first for those in self.outputs_first); `layer`
        picks one layer's array of a per-layer weight."""
        if self.path.stacked_weights:
            value = getattr(self, name).get_value()
            return value if layer is None else jax.tree.map(lambda x: x[layer], value)
        param = getattr(self, name) if layer is None else getattr(self, name)[layer]
        return param.get_value()

    def embed_tokens(self, tokens_bt: Array) -> Array:
        table = self.weight("embed")
        if isinstance(table, QArray):
            x = (table.q[tokens_bt].astype(jnp.float32) * table.scale[tokens_bt][..., None])
            x = x.astype(self.weight("final_norm").dtype)
        else:
            x = jnp.take(table, tokens_bt, axis=0)
        if self.cfg.scale_embeddings:
            x = x * jnp.asarray(self.cfg.hidden_size ** 0.5, x.dtype)
        return self._residual(x)

    def head(self, x_btd: Array) -> Array:
        """Final norm and vocabulary projection; float32 logits [b, t, v]."""
        x = self._norm(x_btd, self.weight("final_norm"))
        name = "embed" if self.cfg.tie_word_embeddings else "lm_head"
        if self.path.outputs_first:  # [vocab, d] either way
            logits = linear_stored(x, self.weight(name), 1, jnp.float32)
        elif self.cfg.tie_word_embeddings:
            logits = linear("btd,vd->btv", x, self.weight("embed"), preferred_element_type=jnp.float32)
        else:
            logits = linear("btd,dv->btv", x, self.weight("lm_head"), preferred_element_type=jnp.float32)
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    def _window(self, layer: int | Array) -> int | Array | None:
        """The layer's attention window: a Python value, or where layers differ and `layer` is
        the scan's traced index, a traced one (ragged.NO_WINDOW for none)."""
        windows = self.cfg.layer_windows
        if isinstance(layer, int) or len(set(windows)) == 1:
            return windows[layer if isinstance(layer, int) else 0]
        return jnp.asarray([ragged.NO_WINDOW if w is None else w for w in windows], jnp.int32)[layer]

    def _rope(self, layer: int | Array) -> tuple[Array, float | Array]:
        """The layer's RoPE inverse frequencies [head_dim / 2] and cos/sin factor."""
        if isinstance(layer, int) or len(set(zip(self.inv_freq, self.rope_factor))) == 1:
            i = layer if isinstance(layer, int) else 0
            return jnp.asarray(self.inv_freq[i], jnp.float32), self.rope_factor[i]
        return jnp.asarray(self.inv_freq, jnp.float32)[layer], jnp.asarray(self.rope_factor, jnp.float32)[layer]

    def _norm(self, x: Array, w: Array) -> Array:
        return rms_norm(x, w, self.cfg.rms_norm_eps, self.cfg.norm_weight_offset)

    def _acc(self, x: Array):
        """The result type of a row-parallel matmul (see linear): x's on the accelerator path,
        float32 on the CPU path (where a bfloat16 result runs slower)."""
        return x.dtype if self.path.stacked else jnp.float32

    def _residual(self, x_btd: Array) -> Array:
        """x in the residual stream's placement: on the accelerator path its tokens split over
        "model" (sequence parallel: a prefill's norms and adds then read 1/model of it per chip,
        and its row-parallel matmuls reduce-scatter instead of all-reduce); elsewhere as "seq"."""
        seq = "residual_seq" if self.path.stacked else "seq"
        return constrain(x_btd, ("batch", seq, "embed"), self.mesh)

    def _gathered(self, x_btd: Array) -> Array:
        """x with all its tokens on every "model" device: the input of column-parallel matmuls."""
        return constrain(x_btd, ("batch", "seq", "embed"), self.mesh)

    def _fusion(self, x_btd: Array, names: Sequence[str]) -> int | None:
        """The groups with which the projections `names` of x run as one matmul (fused_linear),
        or None for one matmul each. Fused on the accelerator path when x is bigger than the
        weights (a prefill: reading x once instead of len(names) times saves more than
        concatenating the weights costs; decode keeps reading the weights once) and every
        weight's columns are split alike (over "model", or not at all)."""
        if not self.path.stacked:
            return None
        specs = param_specs(self.cfg)
        weight_bytes = sum(math.prod(specs[n].shape) * x_btd.dtype.itemsize for n in names)
        if x_btd.size * x_btd.dtype.itemsize * (len(names) - 1) <= 2 * weight_bytes // self._model_size():
            return None
        splits = {logical_to_spec(specs[n].axes, specs[n].shape, self.mesh)[1:] != ()
                  if self.mesh is not None else False for n in names}
        if len(splits) > 1:
            return None
        return self._model_size() if splits.pop() else 1

    def _model_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape[MODEL]

    def _scores(self) -> dict[str, float | None]:
        """How attention scales and caps its scores (attention's and the kernel's scale, softcap)."""
        return dict(scale=self.cfg.attn_scale, softcap=self.cfg.attn_logit_softcapping)

    def _block(self, x: Array, w: dict[str, Array], positions_bt: Array, attend: AttendFn,
               layer: int | Array, carry: KVCache | None) -> tuple[Array, KVCache | None]:
        cfg = self.cfg
        h = self._gathered(self._norm(x, w["attn_norm"]))
        names = ("wq", "wk", "wv")
        if "wq" in self.outputs_first:
            q, k, v = (linear_stored(h, w[n], 1) for n in names)
        else:
            q, k, v = _heads_linear(h, [w[n] for n in names], self._fusion(h, names))
        if cfg.qkv_bias:
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
        if cfg.qk_norm:  # per head, over head_dim
            q, k = self._norm(q, w["q_norm"]), self._norm(k, w["k_norm"])
        inv_freq, factor = self._rope(layer)
        # the accelerator path rotates in the activations' dtype, as HF's models do: a bfloat16
        # rotation spares a prefill a float32 copy of q (0.1 GB per layer and chip on an 8B)
        dtype = q.dtype if self.path.stacked else jnp.float32
        q, k = (rope(a, positions_bt, inv_freq, factor, dtype, swap_by_matmul=self.path.stacked) for a in (q, k))
        out, carry = attend(layer, q, k, v, carry)
        b, t = out.shape[:2]  # heads and head_dim merged: the matmul then reads wo as stored
        if "wo" in self.outputs_first:
            out = self._residual(linear_stored(out, w["wo"], 2))
        else:
            out = self._residual(linear("btx,xd->btd", out.reshape(b, t, -1), _merge_leading(w["wo"], 2),
                                        accumulate=self._acc(x)))
        x = x + (self._norm(out, w["post_attn_norm"]) if cfg.post_norms else out)
        out = self._residual(self._mlp(self._gathered(self._norm(x, w["mlp_norm"])), w))
        x = x + (self._norm(out, w["post_mlp_norm"]) if cfg.post_norms else out)
        return self._residual(x), carry

    def _mlp(self, x_btd: Array, w: dict[str, Array | QArray]) -> Array:
        """The layer's MLP: gated, or a mixture of experts (cfg.num_experts > 0)."""
        cfg = self.cfg
        if "w_down" in self.outputs_first:
            return gated_mlp_stored(x_btd, w["w_gate"], w["w_up"], w["w_down"], cfg.activation)
        if not cfg.num_experts:
            return gated_mlp(x_btd, w["w_gate"], w["w_up"], w["w_down"], cfg.activation, self._acc(x_btd),
                             self._fusion(x_btd, ("w_gate", "w_up")))
        # grouped matmuls where the compiler has them (TPU, GPU); batched blocks on the CPU path
        moe = functools.partial(moe_mlp if self.path.stacked else moe_mlp_batched, top_k=cfg.num_experts_per_tok,
                                renormalize=cfg.norm_topk_prob, activation=cfg.activation)
        names = ("router", "w_gate", "w_up", "w_down")
        if self.mesh is None or self.mesh.size == 1:
            return moe(x_btd, *(w[n] for n in names)).astype(x_btd.dtype)
        return self._moe_sharded(moe, x_btd, {n: w[n] for n in names}).astype(x_btd.dtype)

    def _moe_sharded(self, moe: Callable, x_btd: Array, w: dict[str, Array | QArray]) -> Array:
        """moe_mlp per device under shard_map, each with its rows (split over "data" as the
        activations are) and its share of the experts' weights as RULES places them: whole
        experts when they divide over "model" (expert parallel), else a slice of every expert's
        MLP width (see docs/moe.md). Routing is computed on every device alike; the outputs, each
        device's experts' or width slices' partial sums, are added over "model"."""
        specs = param_specs(self.cfg, self.mesh)

        def spec(name, x):
            return logical_to_spec(_axes_of(name, specs[name], x), x.shape, self.mesh)
        w_specs = {n: jax.tree.map(lambda x, n=n: spec(n, x), v) for n, v in w.items()}
        x_spec = logical_to_spec(("batch", "seq", "embed"), x_btd.shape, self.mesh)
        down = tuple(w_specs["w_down"].q if isinstance(w["w_down"], QArray) else w_specs["w_down"])
        split = MODEL in down
        by_expert = bool(down) and down[0] == MODEL

        def local(x, ws):
            held = ws["w_down"].shape[0]
            first = jax.lax.axis_index(MODEL) * held if by_expert else 0
            out = moe(x, ws["router"], ws["w_gate"], ws["w_up"], ws["w_down"], first_expert=first)
            return jax.lax.psum(out, MODEL) if split else out
        return jax.shard_map(local, mesh=self.mesh, in_specs=(x_spec, w_specs), out_specs=x_spec,
                             check_vma=False)(x_btd, w)

    def _run_layers(self, x: Array, positions_bt: Array, attend: AttendFn, carry: Any):
        if not self.path.stacked_weights:
            for i in range(self.cfg.num_layers):
                x, carry = self._block(x, self._layer_weights(i), positions_bt, attend, i, carry)
            return x, carry

        def body(c, xs):  # the cache is carried, so each layer's write is in place
            (x, carry), (w, i) = c, xs
            return self._block(x, w, positions_bt, attend, i, carry), None

        (x, carry), _ = jax.lax.scan(body, (x, carry), (self._layer_weights(None), jnp.arange(self.cfg.num_layers)))
        return x, carry

    def forward(self, tokens_bt: Array, positions_bt: Array, segments_bt: Array | None = None) -> Array:
        """Causal forward over whole sequences, no cache: hidden states [b, t, d].

        segments_bt packs several continuations of one prompt into a row: segment 0 is the
        prompt (positions 0..n-1), segment j > 0 a continuation at positions n.. of its own.
        A token sees the prompt and the earlier tokens of its own segment only (label scoring)."""
        def attend(layer, q, k, v, cache):
            if segments_bt is None:
                mask = attention_mask(positions_bt, jnp.arange(tokens_bt.shape[1]), self._window(layer))
            else:
                mask = packed_mask(positions_bt, segments_bt, self._window(layer))
            return attention(q, *to_cache_layout(k, v), mask, **self._scores()), cache

        return self._run_layers(self.embed_tokens(tokens_bt), positions_bt, attend, None)[0]

    def prefill(self, tokens_bt: Array, starts_b: Array, slots_b: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """Runs t tokens per row at positions starts_b[i] + [0, t) of cache slot slots_b[i]: their
        keys and values are written there, and each attends to everything its slot holds before
        it. starts_b = 0 is a plain prefill; starts_b > 0 continues a slot whose first tokens are
        already cached (a shared prefix). Out-of-range slot ids are padding rows: dropped.
        Returns (hidden [b, t, d], cache).
        """
        positions_bt = starts_b[:, None] + jnp.arange(tokens_bt.shape[1])[None, :]
        if self.path.stacked:
            def attend(layer, q, k, v, cache):
                cache = cache.write_runs(layer, slots_b, starts_b, k, v, self.mesh)
                return self._cache_attention(q, cache, layer, slots_b, starts_b, rows_on_data=False), cache
            return self._run_layers(self.embed_tokens(tokens_bt), positions_bt, attend, cache)
        fresh = jnp.all(starts_b == 0)  # every row starts a prompt: nothing cached before it

        def attend(layer, q, k, v, cache):
            cache = cache.write(layer, slots_b, positions_bt, k, v)
            window = self._window(layer)

            def over_cache(q, k, v, chunks):  # each row's slot, all of max_len
                rows = [None if x is None else [jnp.take(c, slots_b, axis=0, mode="clip") for c in x] for x in chunks]
                mask = attention_mask(positions_bt, jnp.arange(cache.max_len), window)
                return attention(q, rows[0], rows[1], mask, rows[2], rows[3], **self._scores())

            def over_piece(q, k, v, chunks):  # the piece's own keys: t positions, not max_len
                mask = attention_mask(positions_bt, jnp.arange(q.shape[1]), window)
                return attention(q, *to_cache_layout(k, v), mask, **self._scores())

            if cache.k_scale is not None:  # int8: attend to the stored (quantized) keys, as decode does
                return over_cache(q, k, v, cache.layer(layer)), cache
            return jax.lax.cond(fresh, over_piece, over_cache, q, k, v, cache.layer(layer)), cache

        return self._run_layers(self.embed_tokens(tokens_bt), positions_bt, attend, cache)

    def decode_step(self, tokens_b: Array, positions_b: Array, cache: KVCache,
                    chunks: int | None = None) -> tuple[Array, KVCache]:
        """One token for each of the cache's slots, at its own position.

        The new key/value is written at `positions_b`, then each row attends to its cache up to
        and including that position. Only the cache's first `chunks` chunks (None: all) are
        written and read: every position must lie within them. Returns (float32 logits
        [slots, vocab], cache).
        """
        logits, cache = self.decode_tokens(tokens_b[:, None], positions_b, cache, chunks)
        return logits[:, 0], cache

    def decode_tokens(self, tokens_bt: Array, positions_b: Array, cache: KVCache,
                      chunks: int | None = None) -> tuple[Array, KVCache]:
        """decode_step over t tokens per slot, at positions positions_b[i] + [0, t) (speculative
        decoding's verify step: a row's last token and its proposals). Returns (float32 logits
        [slots, t, vocab], cache)."""
        b, span = cache.max_slots, cache.span(chunks or len(cache.sizes))
        positions_bt = positions_b[:, None] + jnp.arange(tokens_bt.shape[1], dtype=positions_b.dtype)[None, :]
        if self.path.stacked:
            rows = jnp.arange(b, dtype=jnp.int32)

            def attend(layer, q, k, v, cache):
                cache = cache.write(layer, None, positions_bt, k, v, scale_windows=True, mesh=self.mesh)
                return self._cache_attention(q, cache, layer, rows, positions_b, rows_on_data=True), cache
            x, cache = self._run_layers(self.embed_tokens(tokens_bt), positions_bt, attend, cache)
            return self.head(x), cache
        rows = jnp.arange(b)

        def attend(layer, q, k, v, cache):
            cache = cache.write(layer, rows, positions_bt, k, v, chunks)
            mask = attention_mask(positions_bt, jnp.arange(span), self._window(layer))
            return attention(q, *cache.layer(layer, chunks)[:2], mask, *cache.layer(layer, chunks)[2:],
                             **self._scores()), cache

        x, cache = self._run_layers(self.embed_tokens(tokens_bt), positions_bt, attend, cache)
        return self.head(x), cache

    def _cache_attention(self, q_btnh: Array, cache: StackedKVCache, layer: Array, slots_b: Array,
                         starts_b: Array, rows_on_data: bool) -> Array:
        """Row i's queries (at positions starts_b[i] + [0, t)) attend to what slot slots_b[i] of
        the stacked cache holds up to each query: ragged_attention's kernel ("pallas") or its
        reference ("xla"), per device under shard_map. Heads split over "model" when the cache's
        kv heads are; rows over "data" when rows_on_data (decode: row i is slot i), else every
        device of a "data" row sees all rows, attends those whose slot it holds, and the "data"
        devices' outputs are summed."""
        window = self._window(layer)
        traced = isinstance(window, jax.Array)  # layers differ: the scan's value, passed as an operand
        kw = dict(k_scale=cache.k_scale, v_scale=cache.v_scale, window=window, **self._scores())
        if self.path.attention == "pallas":
            block_q, block_k = ragged.default_blocks(q_btnh.shape[1], cache.max_len,
                                                     self.cfg.num_heads // self.cfg.num_kv_heads)
            fn = functools.partial(ragged.ragged_attention, interpret=self.path.interpret, block_q=block_q,
                                   block_k=block_k)
        else:
            fn = ragged.reference_ragged_attention
        if self.mesh is None or self.mesh.size == 1:
            return fn(q_btnh, cache.k, cache.v, layer, slots_b, starts_b, **kw)
        from jax.sharding import PartitionSpec as P
        cache_spec = logical_to_spec(STACKED_AXES, cache.k.shape, self.mesh)
        cache_spec = tuple(cache_spec) + (None,) * (5 - len(cache_spec))
        slots_split, heads = cache_spec[1] == DATA, MODEL if cache_spec[2] == MODEL else None
        rows = DATA if rows_on_data and slots_split else None
        local_slots = cache.k.shape[1] // (self.mesh.shape[DATA] if slots_split else 1)
        scale_spec = P(None, cache_spec[1], cache_spec[2], None, None)

        def local(q, k, v, layer, slots, starts, k_scale, v_scale, layer_window):
            offset = jax.lax.axis_index(DATA) * local_slots if slots_split else 0
            out = fn(q, k, v, layer, slots - offset, starts, k_scale=k_scale, v_scale=v_scale,
                     window=layer_window if traced else window, **self._scores())
            return jax.lax.psum(out, DATA) if slots_split and rows is None else out

        scales = None if cache.k_scale is None else scale_spec
        return jax.shard_map(
            local, mesh=self.mesh,
            in_specs=(P(rows, None, heads, None), P(*cache_spec), P(*cache_spec), P(), P(rows), P(rows), scales, scales,
                      P() if traced else None),
            out_specs=P(rows, None, heads, None), check_vma=False,
        )(q_btnh, cache.k, cache.v, layer, slots_b, starts_b, cache.k_scale, cache.v_scale, window if traced else None)
