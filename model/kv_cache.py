"""The static KV cache: one fixed-shape buffer per key and value, shared by `max_slots` sequences.

Optionally int8: each cached key/value vector (one position, one kv head) is stored as int8 with
its own float32 scale. Attention then applies the key scales to the scores and folds the value
scales into the attention weights, so no dequantized copy of the cache is built.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.sharding import named_sharding

CACHE_AXES = ("layers", "slots", "cache_len", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k, v: [layers, slots, max_len, kv_heads, head_dim]; k_scale, v_scale: [layers, slots,
    max_len, kv_heads] when int8, else None. Which positions of a slot are valid is tracked by
    the engine's per-slot lengths; stale entries past a slot's length are masked."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def max_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    @classmethod
    def create(cls, cfg: ModelConfig, max_slots: int, max_len: int, dtype: jnp.dtype,
               mesh: jax.sharding.Mesh, int8: bool = False) -> "KVCache":
        shape = (cfg.num_layers, max_slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        zeros = lambda s, dt, axes: jax.jit(  # noqa: E731
            lambda: jnp.zeros(s, dt), out_shardings=named_sharding(axes, s, mesh))()
        if not int8:
            return cls(zeros(shape, dtype, CACHE_AXES), zeros(shape, dtype, CACHE_AXES))
        return cls(zeros(shape, jnp.int8, CACHE_AXES), zeros(shape, jnp.int8, CACHE_AXES),
                   zeros(shape[:-1], jnp.float32, CACHE_AXES[:-1]), zeros(shape[:-1], jnp.float32, CACHE_AXES[:-1]))

    def shardings(self, mesh: jax.sharding.Mesh) -> "KVCache":
        return jax.tree.map(lambda x: named_sharding(CACHE_AXES[: x.ndim], x.shape, mesh), self)

    def write(self, index: tuple, k: jax.Array, v: jax.Array) -> "KVCache":
        """Stores k, v (trailing dims [kv_heads, head_dim]) at cache[index]; out-of-range
        indices are dropped (padding rows)."""
        if self.k_scale is None:
            return dataclasses.replace(self, k=self.k.at[index].set(k.astype(self.k.dtype), mode="drop"),
                                       v=self.v.at[index].set(v.astype(self.v.dtype), mode="drop"))
        (kq, ks), (vq, vs) = _quantize_vectors(k), _quantize_vectors(v)
        return KVCache(self.k.at[index].set(kq, mode="drop"), self.v.at[index].set(vq, mode="drop"),
                       self.k_scale.at[index].set(ks, mode="drop"), self.v_scale.at[index].set(vs, mode="drop"))

    def layer(self, i: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
        """(k, v, k_scale, v_scale) of one layer: [slots, max_len, kv_heads, (head_dim)]."""
        pick = lambda x: None if x is None else x[i]  # noqa: E731
        return pick(self.k), pick(self.v), pick(self.k_scale), pick(self.v_scale)


def _quantize_vectors(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per vector over the last axis (head_dim)."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8), scale
