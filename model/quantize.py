"""int8 weight-only quantization with one scale per output channel.

A weight w is stored as q = round(w / s) in int8 with s = max|w| / 127 over the dimensions a
matmul contracts, so each output channel keeps its own range. The matmul runs on q converted to
the activation dtype and scales its output: x @ (q * s) == (x @ q) * s when s is per output
channel, so no dequantized copy of the weight is ever built.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model.params import param_specs
from model.sharding import named_sharding

# The logical axes each weight's matmul contracts (a mixture of experts' w_gate, w_up, w_down too:
# one scale per expert and output channel). The embedding table is quantized per row (per
# token), which serves both the lookup and the tied output head (which contracts "embed").
CONTRACTED = {
    "embed": ("embed",), "lm_head": ("embed",),
    "wq": ("embed",), "wk": ("embed",), "wv": ("embed",), "wo": ("q_heads", "head_dim"),
    "w_gate": ("embed",), "w_up": ("embed",), "w_down": ("ffw",),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QArray:
    """int8 values and their scales; `scale` has the weight's non-contracted dimensions."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def quantize(w: jax.Array, contracted: tuple[int, ...]) -> QArray:
    """Per-channel symmetric int8 over the axes `contracted` (indices into w.shape)."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=contracted, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return QArray(q, jnp.squeeze(scale, axis=contracted).astype(jnp.float32))


def quantize_params(params: dict, cfg, mesh: jax.sharding.Mesh) -> dict:
    """int8 copies of the matmul weights, placed like the originals; norms and biases stay as they are.
    One weight at a time, so peak memory is the model plus one weight. Abstract weights
    (jax.ShapeDtypeStructs, see params.abstract_params) give abstract int8 weights."""
    specs = param_specs(cfg, mesh)
    out = {}
    for name, value in params.items():
        if name not in CONTRACTED:
            out[name] = value
            continue
        spec = specs[name]
        axes = tuple(spec.axes.index(a) for a in CONTRACTED[name])
        shardings = QArray(named_sharding(spec.axes, spec.shape, mesh), _scale_sharding(spec, axes, mesh))
        convert = jax.jit(lambda w, axes=axes: quantize(w, axes), out_shardings=shardings)
        out[name] = [_apply(convert, v) for v in value] if spec.per_layer else _apply(convert, value)
    return out


def _apply(convert, w):
    # eval_shape of a jitted function keeps its out_shardings on the result
    return jax.eval_shape(convert, w) if isinstance(w, jax.ShapeDtypeStruct) else convert(w)


def _scale_sharding(spec, contracted: tuple[int, ...], mesh):
    keep = [i for i in range(len(spec.shape)) if i not in contracted]
    return named_sharding([spec.axes[i] for i in keep], [spec.shape[i] for i in keep], mesh)


def weight_bytes(params: dict) -> int:
    """Bytes of all weights as stored (int8 values plus their scales, where quantized)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(params))
