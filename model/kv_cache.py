"""The static KV cache: one fixed-shape buffer per key and value, shared by `max_slots` sequences."""

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
    """k, v: [layers, slots, max_len, kv_heads, head_dim]. Which positions of a slot are valid is
    tracked by the engine's per-slot lengths; stale entries past a slot's length are masked."""

    k: jax.Array
    v: jax.Array

    @property
    def max_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @classmethod
    def create(cls, cfg: ModelConfig, max_slots: int, max_len: int, dtype: jnp.dtype,
               mesh: jax.sharding.Mesh) -> "KVCache":
        shape = (cfg.num_layers, max_slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        sharding = named_sharding(CACHE_AXES, shape, mesh)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return cls(zeros(), zeros())

    def shardings(self, mesh: jax.sharding.Mesh) -> "KVCache":
        s = named_sharding(CACHE_AXES, self.k.shape, mesh)
        return KVCache(s, s)
