"""The (data, model) device mesh and the one table that maps logical axes to mesh axes.

Weights, the KV cache and activations name their dimensions with logical axes ("q_heads", "ffw",
"slots", ...). `RULES` says which mesh axis each one is split over; nothing else in the project
decides placement. A dimension that does not divide evenly over its mesh axis is replicated.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"

# Logical axis -> mesh axis (None = replicated). Inference preset: tensor parallel over "model"
# (heads, MLP width, vocabulary), independent sequences (batch rows, cache slots) over "data".
RULES: dict[str, str | None] = {
    "layers": None,
    "vocab": MODEL,
    "embed": None,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "head_dim": None,
    "ffw": MODEL,
    # Mixture of experts: whole experts over "model" (expert parallel), or each expert's MLP width
    # like a dense MLP's. Which one is split_experts' choice: an expert weight names its experts
    # dim only when they split, and its "ffw" dim then stays whole (logical_to_spec)
    "experts": MODEL,
    "batch": DATA,
    "slots": DATA,
    "cache_len": None,
    "seq": None,
    # The residual stream between blocks on the accelerator path: its tokens split over "model"
    # (sequence parallel), so norms and residual adds touch 1/model of it; each block gathers it
    # before its projections and reduce-scatters their partial sums back (see Decoder._block).
    # A step of fewer tokens than "model" devices (decode) replicates it, as "seq" does.
    "residual_seq": MODEL,
}


# The TPU's vector lane width: the minor dim of a weight is laid out in tiles of this many
LANES = 128


def split_experts(num_experts: int, width: int, mesh: Mesh) -> bool:
    """Whether a mixture of experts' weights go on "model" as whole experts (expert parallel)
    rather than as a slice of every expert's MLP width (tensor parallel, like a dense MLP's).

    Measured with the TPU compiler (docs/moe.md): width slices of whole 128-lane tiles keep every
    device on every row with balanced bytes and flops, and expert parallel is worse there
    (Mixtral's 1792-wide slices on 8: decode 1.08x its ideal bytes against 1.15x, prefill 1.00x
    its flops against 7.1x). Slices that are not (Qwen3-30B-A3B's 192 on 4) are copied into a
    padded layout before every grouped matmul: 2.55x the ideal decode bytes and 12 GiB of
    temporaries, against 1.20x and 0.2 GiB with whole experts. So whole experts when the width
    slice is not whole tiles and the experts divide evenly."""
    n = mesh.shape[MODEL]
    return n > 1 and num_experts % n == 0 and width % (n * LANES) != 0


def make_mesh(mesh_shape: Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over the first data*model devices. None puts every device on 'data'."""
    devices = list(devices if devices is not None else jax.devices())
    if mesh_shape is None:
        mesh_shape = (len(devices), 1)
    mesh_shape = tuple(int(n) for n in mesh_shape)
    if len(mesh_shape) != 2 or min(mesh_shape) < 1:
        raise ValueError(f"mesh_shape={mesh_shape}; expected (data, model) with positive sizes")
    if math.prod(mesh_shape) > len(devices):
        raise ValueError(f"mesh_shape={mesh_shape} needs {math.prod(mesh_shape)} devices; "
                         f"{len(devices)} are available")
    grid = np.asarray(devices[: math.prod(mesh_shape)]).reshape(mesh_shape)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for a tensor whose dims carry logical `axes`, under RULES on `mesh`."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    spec, used = [], {}
    for axis, size in zip(axes, shape):
        if axis is not None and axis not in RULES:
            raise ValueError(f"logical axis {axis!r} has no rule; known: {sorted(RULES)}")
        mesh_axis = RULES.get(axis) if axis is not None else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            mesh_axis = None  # e.g. 2 kv heads over 4 devices: replicate rather than fail
        if mesh_axis is not None and mesh.shape[mesh_axis] > 1:
            if used.get(mesh_axis) == "experts":
                mesh_axis = None  # whole experts on each device: each one's width stays whole
            elif mesh_axis in used:
                raise ValueError(f"logical axes {used[mesh_axis]!r} and {axis!r} of one tensor both map "
                                 f"to mesh axis {mesh_axis!r}")
            else:
                used[mesh_axis] = axis
        spec.append(mesh_axis if mesh_axis is not None and mesh.shape[mesh_axis] > 1 else None)
    while spec and spec[-1] is None:  # the form jit gives its outputs: an array placed here and one
        spec.pop()                    # returned by a jitted function then hit one dispatch-cache entry
    return PartitionSpec(*spec)


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """with_sharding_constraint by logical axes; a no-op without a mesh (single device)."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, mesh))


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (the largest shard
    of each)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))
