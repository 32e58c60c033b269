"""The static KV cache: fixed-shape key and value buffers, one pair per layer, shared by
`max_slots` sequences.

Layouts are chosen for the attention matmuls, so that decode reads each buffer in place: keys
[slots, kv_heads, head_dim, max_len] (the score matmul contracts head_dim, then runs along
positions), values [slots, kv_heads, max_len, head_dim]. One array per layer rather than one
stacked array: slicing a layer out of a stacked buffer inside the step copies it on XLA:CPU,
which cost a copy of the whole cache per decoded token.

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

K_AXES = ("slots", "kv_heads", "head_dim", "cache_len")
V_AXES = ("slots", "kv_heads", "cache_len", "head_dim")
SCALE_AXES = ("slots", "kv_heads", "cache_len")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per layer: k [slots, kv_heads, head_dim, max_len], v [slots, kv_heads, max_len, head_dim];
    k_scale, v_scale [slots, kv_heads, max_len] when int8, else None. Which positions of a slot
    are valid is tracked by the engine's per-slot lengths; stale entries past them are masked."""

    k: list[jax.Array]
    v: list[jax.Array]
    k_scale: list[jax.Array] | None = None
    v_scale: list[jax.Array] | None = None

    @property
    def max_slots(self) -> int:
        return self.v[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.v[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    @classmethod
    def create(cls, cfg: ModelConfig, max_slots: int, max_len: int, dtype: jnp.dtype,
               mesh: jax.sharding.Mesh, int8: bool = False) -> "KVCache":
        k_shape = (max_slots, cfg.num_kv_heads, cfg.head_dim, max_len)
        v_shape = (max_slots, cfg.num_kv_heads, max_len, cfg.head_dim)

        def zeros(shape, dt, axes):
            make = jax.jit(lambda: jnp.zeros(shape, dt), out_shardings=named_sharding(axes, shape, mesh))
            return [make() for _ in range(cfg.num_layers)]

        if not int8:
            return cls(zeros(k_shape, dtype, K_AXES), zeros(v_shape, dtype, V_AXES))
        return cls(zeros(k_shape, jnp.int8, K_AXES), zeros(v_shape, jnp.int8, V_AXES),
                   zeros(v_shape[:-1], jnp.float32, SCALE_AXES), zeros(v_shape[:-1], jnp.float32, SCALE_AXES))

    def shardings(self, mesh: jax.sharding.Mesh) -> "KVCache":
        def place(axes):
            return lambda x: named_sharding(axes, x.shape, mesh)
        scales = lambda xs: None if xs is None else [place(SCALE_AXES)(x) for x in xs]  # noqa: E731
        return KVCache([place(K_AXES)(x) for x in self.k], [place(V_AXES)(x) for x in self.v],
                       scales(self.k_scale), scales(self.v_scale))

    def write(self, layer: int, slots_b: jax.Array, positions_bt: jax.Array, k_btkh: jax.Array,
              v_btkh: jax.Array) -> "KVCache":
        """Stores row i's keys/values [b, t, kv_heads, head_dim] at slot slots_b[i], positions
        positions_bt[i] of `layer`; out-of-range slots are dropped (padding rows)."""
        s, p = slots_b[:, None], positions_bt

        def put(buffers, value, vector_dims):  # indexing [s, :, (:,) p] puts (b, t) first
            index = (s, slice(None), slice(None), p) if vector_dims == "k" else (s, slice(None), p)
            out = list(buffers)
            out[layer] = buffers[layer].at[index].set(value.astype(buffers[layer].dtype), mode="drop")
            return out

        if self.k_scale is None:
            return KVCache(put(self.k, k_btkh, "k"), put(self.v, v_btkh, "v"))
        (kq, ks), (vq, vs) = _quantize_vectors(k_btkh), _quantize_vectors(v_btkh)
        return KVCache(put(self.k, kq, "k"), put(self.v, vq, "v"), put(self.k_scale, ks, "scale"),
                       put(self.v_scale, vs, "scale"))

    def layer(self, i: int) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
        """(k, v, k_scale, v_scale) of one layer, in the layouts above."""
        pick = lambda xs: None if xs is None else xs[i]  # noqa: E731
        return self.k[i], self.v[i], pick(self.k_scale), pick(self.v_scale)


def _quantize_vectors(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per vector over the last axis (head_dim)."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8), scale
