"""Every weight of the decoder declared once (shape, logical axes, init), and what derives from
those declarations alone: shardings, abstract weights for compiling ahead of time, random weights.

Its own module so that what reads the declarations (the decoder, int8 quantization, checkpoint
loading) imports them from here, and none of those imports another for them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.sharding import named_sharding, split_experts

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]  # of one array (one layer's, for a per-layer weight)
    axes: tuple[str | None, ...]
    init: str = "normal"  # "normal" | "zeros" | "ones"
    per_layer: bool = False  # params[name] is then a list of num_layers such arrays


def param_specs(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> dict[str, ParamSpec]:
    """Every weight of the decoder, by name; given the mesh they go on, a mixture of experts'
    weights name their experts dim only if whole experts are split over it (split_experts)."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    norm_init = "zeros" if cfg.norm_weight_offset else "ones"  # Gemma scales by (1 + w)
    layer = lambda shape, axes, init="normal": ParamSpec(shape, axes, init, per_layer=True)  # noqa: E731
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed")),
        "attn_norm": layer((D,), ("embed",), norm_init),
        "wq": layer((D, N, H), ("embed", "q_heads", "head_dim")),
        "wk": layer((D, K, H), ("embed", "kv_heads", "head_dim")),
        "wv": layer((D, K, H), ("embed", "kv_heads", "head_dim")),
        "wo": layer((N, H, D), ("q_heads", "head_dim", "embed")),
        "mlp_norm": layer((D,), ("embed",), norm_init),
        "w_gate": layer((D, F), ("embed", "ffw")),
        "w_up": layer((D, F), ("embed", "ffw")),
        "w_down": layer((F, D), ("ffw", "embed")),
        "final_norm": ParamSpec((D,), ("embed",), norm_init),
    }
    if cfg.num_experts:  # the MLP weights, one per expert, and the router (small: never split)
        E = cfg.num_experts
        e = "experts" if mesh is not None and split_experts(E, F, mesh) else None  # else "ffw" splits
        specs["w_gate"] = layer((E, D, F), (e, "embed", "ffw"))
        specs["w_up"] = layer((E, D, F), (e, "embed", "ffw"))
        specs["w_down"] = layer((E, F, D), (e, "ffw", "embed"))
        specs["router"] = layer((D, E), ("embed", None))
    if cfg.qk_norm:
        specs["q_norm"] = layer((H,), ("head_dim",), norm_init)
        specs["k_norm"] = layer((H,), ("head_dim",), norm_init)
    if cfg.post_norms:
        specs["post_attn_norm"] = layer((D,), ("embed",), norm_init)
        specs["post_mlp_norm"] = layer((D,), ("embed",), norm_init)
    if cfg.qkv_bias:
        specs["bq"] = layer((N, H), ("q_heads", "head_dim"), "zeros")
        specs["bk"] = layer((K, H), ("kv_heads", "head_dim"), "zeros")
        specs["bv"] = layer((K, H), ("kv_heads", "head_dim"), "zeros")
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return specs


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The NamedSharding of every weight, in the params' structure (a list for per-layer ones)."""
    out = {}
    for name, spec in param_specs(cfg, mesh).items():
        sharding = named_sharding(spec.axes, spec.shape, mesh)
        out[name] = [sharding] * cfg.num_layers if spec.per_layer else sharding
    return out


def abstract_params(cfg: ModelConfig, dtype: jnp.dtype, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The weights as jax.ShapeDtypeStructs with their NamedShardings, in the params' structure:
    what init_params or load_params return, with nothing allocated (for compiling ahead of time)."""
    shardings = param_shardings(cfg, mesh)
    return {name: jax.tree.map(lambda s, spec=spec: jax.ShapeDtypeStruct(spec.shape, dtype, sharding=s), shardings[name])
            for name, spec in param_specs(cfg, mesh).items()}


def init_params(cfg: ModelConfig, key: Array, dtype: jnp.dtype, std: float = 0.02) -> dict[str, Any]:
    """Random weights (normal(0, std) matrices, unit norms). Jit it with out_shardings to place them."""
    out = {}
    for i, (name, spec) in enumerate(sorted(param_specs(cfg).items())):
        shape = (cfg.num_layers, *spec.shape) if spec.per_layer else spec.shape
        if spec.init == "normal":
            value = (std * jax.random.normal(jax.random.fold_in(key, i), shape)).astype(dtype)
        else:
            value = (jnp.ones if spec.init == "ones" else jnp.zeros)(shape, dtype)
        out[name] = list(value) if spec.per_layer else value
    return out
