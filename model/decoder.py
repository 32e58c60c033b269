"""The decoder: embed -> N x (attention, gated MLP) -> norm -> head, in Flax NNX.

Each weight is declared once in `param_specs` (shape, logical axes, init). Per-layer weights are
stacked on a leading "layers" axis and the blocks run under `jax.lax.scan`, so compile time does
not grow with depth. Dimension letters in einsums: b batch, t query positions, s key positions,
d model width, n query heads, k kv heads, g query heads per kv head, h head dim, f MLP width,
v vocabulary, l layers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig, rope_inv_freq
from model.kv_cache import KVCache
from model.quantize import QArray
from model.sharding import constrain

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # "normal" | "zeros" | "ones"

    @property
    def per_layer(self) -> bool:
        return self.axes[0] == "layers"


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Every weight of the decoder, by name. Per-layer weights lead with the "layers" axis."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    norm_init = "zeros" if cfg.norm_weight_offset else "ones"  # Gemma scales by (1 + w)
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed")),
        "attn_norm": ParamSpec((L, D), ("layers", "embed"), norm_init),
        "wq": ParamSpec((L, D, N, H), ("layers", "embed", "q_heads", "head_dim")),
        "wk": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "wv": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "wo": ParamSpec((L, N, H, D), ("layers", "q_heads", "head_dim", "embed")),
        "mlp_norm": ParamSpec((L, D), ("layers", "embed"), norm_init),
        "w_gate": ParamSpec((L, D, F), ("layers", "embed", "ffw")),
        "w_up": ParamSpec((L, D, F), ("layers", "embed", "ffw")),
        "w_down": ParamSpec((L, F, D), ("layers", "ffw", "embed")),
        "final_norm": ParamSpec((D,), ("embed",), norm_init),
    }
    if cfg.qkv_bias:
        specs["bq"] = ParamSpec((L, N, H), ("layers", "q_heads", "head_dim"), "zeros")
        specs["bk"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        specs["bv"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return specs


def init_params(cfg: ModelConfig, key: Array, dtype: jnp.dtype, std: float = 0.02) -> dict[str, Array]:
    """Random weights (normal(0, std) matrices, unit norms). Jit it with out_shardings to place them."""
    out = {}
    for i, (name, spec) in enumerate(sorted(param_specs(cfg).items())):
        if spec.init == "normal":
            out[name] = (std * jax.random.normal(jax.random.fold_in(key, i), spec.shape)).astype(dtype)
        else:
            out[name] = (jnp.ones if spec.init == "ones" else jnp.zeros)(spec.shape, dtype)
    return out


# ---------------------------------------------------------------- layers (pure functions)

def linear(eq: str, x: Array, w: Array | QArray, **kw) -> Array:
    """einsum(eq, x, w). An int8 weight is converted to x's dtype and its per-output-channel
    scale applied to the result (the output ends with the weight's non-contracted dims)."""
    # Accumulate in float32 and cast back: better numerics, and on CPU a bfloat16 matmul with a
    # float32 result runs about twice as fast as one with a bfloat16 result.
    out_dtype = kw.pop("preferred_element_type", x.dtype)
    if isinstance(w, QArray):
        out = jnp.einsum(eq, x, w.q.astype(x.dtype), preferred_element_type=jnp.float32, **kw)
        return (out * w.scale).astype(out_dtype)
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32, **kw).astype(out_dtype)


def rms_norm(x: Array, w: Array, eps: float, offset: float = 0.0) -> Array:
    """RMSNorm over the last axis, computed in float32; Gemma passes offset=1 to scale by (1 + w)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (offset + w.astype(jnp.float32))).astype(x.dtype)


def rope(x_btnh: Array, positions_bt: Array, inv_freq_h: Array) -> Array:
    """Rotary embedding in HF's rotate-half layout (first and second halves of head_dim pair up)."""
    angles = positions_bt[:, :, None].astype(jnp.float32) * inv_freq_h[None, None, :]  # [b, t, h/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnh.dtype)


def attention(q_btnh: Array, k_bskh: Array, v_bskh: Array, mask_bts: Array,
              k_scale_bsk: Array | None = None, v_scale_bsk: Array | None = None) -> Array:
    """Grouped-query attention: each kv head serves num_heads // num_kv_heads query heads.
    With an int8 cache, the key scales multiply the scores and the value scales the weights."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q = q_btnh.reshape(b, t, k, n // k, h)
    per_key = lambda s: s.transpose(0, 2, 1)[:, :, None, None, :]  # noqa: E731  [b, s, k] -> [b, k, 1, 1, s]
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh.astype(q.dtype), preferred_element_type=jnp.float32)
    if k_scale_bsk is not None:
        scores = scores * per_key(k_scale_bsk)
    scores = jnp.where(mask_bts[:, None, None], scores * h ** -0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale_bsk is not None:
        probs = probs * per_key(v_scale_bsk)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(q.dtype), v_bskh.astype(q.dtype),
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q_btnh.dtype)


def attention_mask(q_pos_bt: Array, k_pos_s: Array, window: int | None) -> Array:
    """[b, t, s]: a query sees keys at or before its position (and within the sliding window)."""
    q, k = q_pos_bt[:, :, None], k_pos_s[None, None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def gated_mlp(x_btd: Array, w_gate, w_up, w_down, activation: str) -> Array:
    act = jax.nn.silu if activation == "silu" else lambda a: jax.nn.gelu(a, approximate=True)
    gate = linear("btd,df->btf", x_btd, w_gate)
    up = linear("btd,df->btf", x_btd, w_up)
    return linear("btf,fd->btd", act(gate) * up, w_down)


# ---------------------------------------------------------------- the model

# attend(layer, q, k, v, cache) -> (out_btnh, cache): self-attention (writing the cache, if any)
# for prefill, or write-into-cache-then-attend for decode.
AttendFn = Callable[[Array, Array, Array, Array, KVCache | None], tuple[Array, KVCache | None]]


class Decoder(nnx.Module):
    """The decoder's weights (nnx.Param, named as in `param_specs`) and its forward passes."""

    def __init__(self, cfg: ModelConfig, params: dict[str, Array], mesh: jax.sharding.Mesh | None = None):
        specs = param_specs(cfg)
        if set(params) != set(specs):
            raise ValueError(f"weights {sorted(set(params) ^ set(specs))} missing or unexpected")
        self.cfg = cfg
        self.mesh = mesh
        self.inv_freq = tuple(rope_inv_freq(cfg))
        for name, value in params.items():
            if tuple(value.shape) != specs[name].shape:
                raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}; expected {specs[name].shape}")
            setattr(self, name, nnx.Param(value))

    def _layer_weights(self) -> dict[str, Array]:
        specs = param_specs(self.cfg)
        return {name: self.weight(name) for name, spec in specs.items() if spec.per_layer}

    def weight(self, name: str) -> Array | QArray:
        return getattr(self, name).get_value()

    def embed_tokens(self, tokens_bt: Array) -> Array:
        table = self.weight("embed")
        if isinstance(table, QArray):
            x = (table.q[tokens_bt].astype(jnp.float32) * table.scale[tokens_bt][..., None])
            x = x.astype(self.weight("final_norm").dtype)
        else:
            x = jnp.take(table, tokens_bt, axis=0)
        if self.cfg.scale_embeddings:
            x = x * jnp.asarray(self.cfg.hidden_size ** 0.5, x.dtype)
        return constrain(x, ("batch", "seq", "embed"), self.mesh)

    def head(self, x_btd: Array) -> Array:
        """Final norm and vocabulary projection; float32 logits [b, t, v]."""
        x = rms_norm(x_btd, self.weight("final_norm"), self.cfg.rms_norm_eps, self.cfg.norm_weight_offset)
        if self.cfg.tie_word_embeddings:
            return linear("btd,vd->btv", x, self.weight("embed"), preferred_element_type=jnp.float32)
        return linear("btd,dv->btv", x, self.weight("lm_head"), preferred_element_type=jnp.float32)

    def _block(self, x: Array, w: dict[str, Array], positions_bt: Array, attend: AttendFn,
               layer: Array, carry: KVCache | None) -> tuple[Array, KVCache | None]:
        cfg = self.cfg
        h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps, cfg.norm_weight_offset)
        q = linear("btd,dnh->btnh", h, w["wq"])
        k = linear("btd,dkh->btkh", h, w["wk"])
        v = linear("btd,dkh->btkh", h, w["wv"])
        if cfg.qkv_bias:
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        q, k = rope(q, positions_bt, inv_freq), rope(k, positions_bt, inv_freq)
        out, carry = attend(layer, q, k, v, carry)
        x = x + linear("btnh,nhd->btd", out, w["wo"])
        h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps, cfg.norm_weight_offset)
        x = x + gated_mlp(h, w["w_gate"], w["w_up"], w["w_down"], cfg.activation)
        return constrain(x, ("batch", "seq", "embed"), self.mesh), carry

    def _run_layers(self, x: Array, positions_bt: Array, attend: AttendFn, carry: KVCache | None):
        def body(state, xs):
            x, carry = state
            w, layer = xs
            x, carry = self._block(x, w, positions_bt, attend, layer, carry)
            return (x, carry), None

        xs = (self._layer_weights(), jnp.arange(self.cfg.num_layers))
        (x, carry), _ = jax.lax.scan(body, (x, carry), xs)
        return x, carry

    def forward(self, tokens_bt: Array, positions_bt: Array) -> Array:
        """Causal forward over whole sequences, no cache: hidden states [b, t, d]."""
        mask = attention_mask(positions_bt, jnp.arange(tokens_bt.shape[1]), self.cfg.sliding_window)

        def attend(layer, q, k, v, cache):
            return attention(q, k, v, mask), cache

        return self._run_layers(self.embed_tokens(tokens_bt), positions_bt, attend, None)[0]

    def prefill(self, tokens_bt: Array, starts_b: Array, slots_b: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """Runs t tokens per row at positions starts_b[i] + [0, t) of cache slot slots_b[i]: their
        keys and values are written there, and each attends to everything its slot holds before
        it. starts_b = 0 is a plain prefill; starts_b > 0 continues a slot whose first tokens are
        already cached (a shared prefix). Out-of-range slot ids are padding rows: dropped.
        Returns (hidden [b, t, d], cache).
        """
        positions_bt = starts_b[:, None] + jnp.arange(tokens_bt.shape[1])[None, :]
        mask = attention_mask(positions_bt, jnp.arange(cache.max_len), self.cfg.sliding_window)

        def attend(layer, q, k, v, cache):
            cache = cache.write((layer, slots_b[:, None], positions_bt), k, v)
            rows = [None if x is None else jnp.take(x, slots_b, axis=0, mode="clip") for x in cache.layer(layer)]
            return attention(q, rows[0], rows[1], mask, rows[2], rows[3]), cache

        return self._run_layers(self.embed_tokens(tokens_bt), positions_bt, attend, cache)

    def decode_step(self, tokens_b: Array, positions_b: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """One token for each of the cache's slots, at its own position.

        The new key/value is written at `positions_b`, then each row attends to its cache up to
        and including that position. Returns (float32 logits [slots, vocab], cache).
        """
        b, max_len = cache.max_slots, cache.max_len
        positions_bt = positions_b[:, None]
        mask = attention_mask(positions_bt, jnp.arange(max_len), self.cfg.sliding_window)
        rows = jnp.arange(b)

        def attend(layer, q, k, v, cache):
            cache = cache.write((layer, rows, positions_b), k[:, 0], v[:, 0])
            return attention(q, *cache.layer(layer)[:2], mask, *cache.layer(layer)[2:]), cache

        x, cache = self._run_layers(self.embed_tokens(tokens_b[:, None]), positions_bt, attend, cache)
        return self.head(x)[:, 0], cache
