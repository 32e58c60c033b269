"""The static KV cache: fixed-shape key and value buffers shared by `max_slots` sequences.

Layouts are chosen for the attention matmuls, so that decode reads each buffer in place: keys
[slots, kv_heads, head_dim, len] (the score matmul contracts head_dim, then runs along
positions), values [slots, kv_heads, len, head_dim]. Each layer's buffers are separate arrays:
slicing a layer out of a stacked buffer inside the step copies it on XLA:CPU.

Each layer's positions are split into up to MAX_CHUNKS chunks, one array each, so that a decode
step can attend over only the chunks that hold live tokens (the engine compiles one decode per
count of live chunks) without slicing a buffer, which would copy it.

Optionally int8: each cached key/value vector (one position, one kv head) is stored as int8 with
its own float32 scale. Attention then applies the key scales to the scores and folds the value
scales into the attention weights, so no dequantized copy of the cache is built.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig
from model.sharding import DATA, named_sharding

K_AXES = ("slots", "kv_heads", "head_dim", "cache_len")
V_AXES = ("slots", "kv_heads", "cache_len", "head_dim")
SCALE_AXES = ("slots", "kv_heads", "cache_len")
MAX_CHUNKS, MIN_CHUNK = 8, 128

Chunks = list[jax.Array]  # one layer's buffer, split along positions


def chunk_sizes(max_len: int) -> list[int]:
    """How a layer's max_len positions split into chunks: at most MAX_CHUNKS of at least
    MIN_CHUNK positions (the last one may be shorter)."""
    n = min(MAX_CHUNKS, max(1, -(-max_len // MIN_CHUNK)))
    size = -(-max_len // n)
    return [min(size, max_len - start) for start in range(0, max_len, size)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k[layer][chunk]: [slots, kv_heads, head_dim, chunk_len]; v[layer][chunk]: [slots,
    kv_heads, chunk_len, head_dim]; k_scale, v_scale likewise [slots, kv_heads, chunk_len] when
    int8, else None. Which positions of a slot are valid is tracked by the engine's per-slot
    lengths; stale entries past them are masked."""

    k: list[Chunks]
    v: list[Chunks]
    k_scale: list[Chunks] | None = None
    v_scale: list[Chunks] | None = None

    @property
    def max_slots(self) -> int:
        return self.v[0][0].shape[0]

    @property
    def sizes(self) -> list[int]:
        return [c.shape[2] for c in self.v[0]]

    @property
    def max_len(self) -> int:
        return sum(self.sizes)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def chunks_for(self, length: int) -> int:
        """How many leading chunks hold positions [0, length)."""
        end, n = 0, 0
        for size in self.sizes:
            if end >= length:
                break
            end, n = end + size, n + 1
        return max(n, 1)

    def span(self, chunks: int) -> int:
        """Positions held by the first `chunks` chunks."""
        return sum(self.sizes[:chunks])

    @classmethod
    def abstract(cls, cfg: ModelConfig, max_slots: int, max_len: int, dtype: jnp.dtype,
                 mesh: jax.sharding.Mesh, int8: bool = False) -> "KVCache":
        """The cache's one declaration: a KVCache of jax.ShapeDtypeStructs, each with its
        NamedSharding on `mesh`. Nothing is allocated, so `mesh` may hold devices this host does
        not have (a TPU topology, for compiling ahead of time)."""
        def structs(shape_of, dt, axes):
            def struct(size):
                shape = shape_of(size)
                return jax.ShapeDtypeStruct(shape, dt, sharding=named_sharding(axes, shape, mesh))
            return [[struct(size) for size in chunk_sizes(max_len)] for _ in range(cfg.num_layers)]

        s, kv, hd = max_slots, cfg.num_kv_heads, cfg.head_dim
        k_shape, v_shape, scale_shape = (lambda n: (s, kv, hd, n)), (lambda n: (s, kv, n, hd)), (lambda n: (s, kv, n))
        if not int8:
            return cls(structs(k_shape, dtype, K_AXES), structs(v_shape, dtype, V_AXES))
        return cls(structs(k_shape, jnp.int8, K_AXES), structs(v_shape, jnp.int8, V_AXES),
                   structs(scale_shape, jnp.float32, SCALE_AXES), structs(scale_shape, jnp.float32, SCALE_AXES))

    @classmethod
    def create(cls, cfg: ModelConfig, max_slots: int, max_len: int, dtype: jnp.dtype,
               mesh: jax.sharding.Mesh, int8: bool = False) -> "KVCache":
        """A zeroed cache as `abstract` declares it, each buffer created in its sharding."""
        return jax.tree.map(_zeros, cls.abstract(cfg, max_slots, max_len, dtype, mesh, int8))

    def shardings(self, mesh: jax.sharding.Mesh) -> "KVCache":
        def place(layers, axes):
            return None if layers is None else [[named_sharding(axes, c.shape, mesh) for c in chunks]
                                                for chunks in layers]
        return KVCache(place(self.k, K_AXES), place(self.v, V_AXES), place(self.k_scale, SCALE_AXES),
                       place(self.v_scale, SCALE_AXES))

    def write(self, layer: int, slots_b: jax.Array, positions_bt: jax.Array, k_btkh: jax.Array,
              v_btkh: jax.Array, chunks: int | None = None) -> "KVCache":
        """Stores row i's keys/values [b, t, kv_heads, head_dim] at slot slots_b[i], positions
        positions_bt[i] of `layer` (within its first `chunks` chunks; None: all). Out-of-range
        slots and positions are dropped (padding rows)."""
        starts = [sum(self.sizes[:c]) for c in range(len(self.sizes))]
        s = slots_b[:, None]

        def put(layers, value, kind):
            out = list(layers)
            new = list(layers[layer])
            for c, (buf, start) in enumerate(zip(layers[layer][:chunks], starts)):
                size = buf.shape[-1] if kind == "k" else buf.shape[2]
                local = positions_bt - start
                local = jnp.where((local >= 0) & (local < size), local, size)  # outside this chunk: dropped
                # indexing [s, :, (:,) p] puts the (b, t) dims first, as in `value`
                index = (s, slice(None), slice(None), local) if kind == "k" else (s, slice(None), local)
                new[c] = buf.at[index].set(value.astype(buf.dtype), mode="drop")
            out[layer] = new
            return out

        if self.k_scale is None:
            return KVCache(put(self.k, k_btkh, "k"), put(self.v, v_btkh, "v"))
        (kq, ks), (vq, vs) = _quantize_vectors(k_btkh), _quantize_vectors(v_btkh)
        return KVCache(put(self.k, kq, "k"), put(self.v, vq, "v"), put(self.k_scale, ks, "scale"),
                       put(self.v_scale, vs, "scale"))

    def layer(self, i: int, chunks: int | None = None) -> tuple[Chunks, Chunks, Chunks | None, Chunks | None]:
        """(k, v, k_scale, v_scale) of one layer: its first `chunks` chunks (None: all)."""
        pick = lambda layers: None if layers is None else layers[i][:chunks]  # noqa: E731
        return pick(self.k), pick(self.v), pick(self.k_scale), pick(self.v_scale)


def _zeros(struct: jax.ShapeDtypeStruct) -> jax.Array:
    return jax.jit(lambda: jnp.zeros(struct.shape, struct.dtype), out_shardings=struct.sharding)()


def _quantize_vectors(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per vector over the last axis (head_dim)."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8), scale


STACKED_AXES = ("layers", "slots", "kv_heads", "cache_len", "head_dim")
STACKED_SCALE_AXES = ("layers", "slots", "kv_heads", None, "cache_len")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StackedKVCache:
    """The accelerator cache: k and v each one array [layers, slots, kv_heads, len, head_dim]
    (a (slot, kv head) row's positions are contiguous rows of head_dim lanes, the blocks the
    attention kernel fetches), k_scale and v_scale [layers, slots, kv_heads, 1, len] float32 when
    int8, else None (the unit axis lets the kernel fetch one head's scales as a legal block; see
    ragged_attention.py). The layer loop carries it and writes each layer's new keys in place."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def max_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def sizes(self) -> list[int]:
        return [self.max_len]  # one chunk: decode attends by live length, not by chunk count

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def chunks_for(self, length: int) -> int:
        return 1

    def span(self, chunks: int) -> int:
        return self.max_len

    @classmethod
    def abstract(cls, cfg: ModelConfig, max_slots: int, max_len: int, dtype: jnp.dtype,
                 mesh: jax.sharding.Mesh, int8: bool = False) -> "StackedKVCache":
        """As KVCache.abstract: ShapeDtypeStructs with their NamedShardings, nothing allocated."""
        def struct(shape, dt, axes):
            return jax.ShapeDtypeStruct(shape, dt, sharding=named_sharding(axes, shape, mesh))

        shape = (cfg.num_layers, max_slots, cfg.num_kv_heads, max_len, cfg.head_dim)
        if not int8:
            return cls(struct(shape, dtype, STACKED_AXES), struct(shape, dtype, STACKED_AXES))
        scale_shape = (*shape[:3], 1, max_len)
        kv, scale = struct(shape, jnp.int8, STACKED_AXES), struct(scale_shape, jnp.float32, STACKED_SCALE_AXES)
        return cls(kv, kv, scale, scale)

    @classmethod
    def create(cls, cfg: ModelConfig, max_slots: int, max_len: int, dtype: jnp.dtype,
               mesh: jax.sharding.Mesh, int8: bool = False) -> "StackedKVCache":
        return jax.tree.map(_zeros, cls.abstract(cfg, max_slots, max_len, dtype, mesh, int8))

    def shardings(self, mesh: jax.sharding.Mesh) -> "StackedKVCache":
        place = lambda x, axes: None if x is None else named_sharding(axes, x.shape, mesh)  # noqa: E731
        return StackedKVCache(place(self.k, STACKED_AXES), place(self.v, STACKED_AXES),
                              place(self.k_scale, STACKED_SCALE_AXES), place(self.v_scale, STACKED_SCALE_AXES))

    def write(self, layer: jax.Array, slots_b: jax.Array | None, positions_bt: jax.Array, k_btkh: jax.Array,
              v_btkh: jax.Array, chunks: int | None = None, scale_windows: bool = False,
              mesh: jax.sharding.Mesh | None = None) -> "StackedKVCache":
        """Stores row i's keys/values [b, t, kv_heads, head_dim] at slot slots_b[i], positions
        positions_bt[i] of `layer` (a traced index). Out-of-range slots and positions are dropped.
        slots_b None: row i is slot i, for every slot (decode; see _put_positions).
        scale_windows: an int8 cache's decode scales go in as one in-place window per slot
        (positions_bt's rows then runs of consecutive positions).
        mesh (decode only): where it splits the slots over "data", each "data" group writes its
        own slots' rows under shard_map, so that an int8 cache's scales go in as windows there too
        (_write_windows indexes slots by their global number)."""
        if slots_b is None and mesh is not None and self._slots_split(mesh):
            specs = jax.tree.map(lambda sh: sh.spec, self.shardings(mesh))
            heads = (tuple(specs.k) + (None,) * 3)[2]
            rows = P(DATA, None, heads, None)  # [slots, t, kv heads, head_dim], as the cache splits them
            local = lambda cache, layer, positions, k, v: cache.write(  # noqa: E731
                layer, None, positions, k, v, scale_windows=scale_windows)
            return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(), P(DATA), rows, rows), out_specs=specs,
                                 check_vma=False)(self, layer, positions_bt, k_btkh, v_btkh)
        s = (jnp.arange(self.max_slots) if slots_b is None else slots_b)[:, None]
        scale_by_window = scale_windows and slots_b is None and self.max_slots <= DECODE_WINDOW_SLOTS

        def put(buf, value):
            if slots_b is None:
                return _put_positions(buf, layer, positions_bt, value.astype(buf.dtype))
            # indexing [l, s, :, p] puts the (b, t) dims first, as in `value`
            return buf.at[layer, s, :, positions_bt].set(value.astype(buf.dtype), mode="drop")

        if self.k_scale is None:
            return StackedKVCache(put(self.k, k_btkh), put(self.v, v_btkh))
        (kq, ks), (vq, vs) = _quantize_vectors(k_btkh), _quantize_vectors(v_btkh)
        if scale_by_window:
            every = jnp.arange(self.max_slots)
            put_scale = lambda buf, value: _write_windows(buf, layer, every, positions_bt[:, 0],  # noqa: E731
                                                          value[..., None], 4)
        elif slots_b is None:
            put_scale = functools.partial(_put_scales, layer, positions_bt)
        else:
            put_scale = lambda buf, value: buf.at[layer, s, :, 0, positions_bt].set(value, mode="drop")  # noqa: E731
        return StackedKVCache(put(self.k, kq), put(self.v, vq), put_scale(self.k_scale, ks),
                              put_scale(self.v_scale, vs))

    def _slots_split(self, mesh: jax.sharding.Mesh) -> bool:
        return mesh.size > 1 and tuple(self.shardings(mesh).k.spec)[1:2] == (DATA,)

    def write_runs(self, layer: jax.Array, slots_b: jax.Array, starts_b: jax.Array, k_btkh: jax.Array,
                   v_btkh: jax.Array, mesh: jax.sharding.Mesh | None = None) -> "StackedKVCache":
        """write() of a prefill: row i's t keys/values at positions starts_b[i] + [0, t) of slot
        slots_b[i] (positions past max_len and out-of-range slots dropped), as one in-place
        dynamic_update_slice of a t-position window per row and buffer instead of a scatter. The
        TPU compiler's cost analysis counts a scatter of 8 x 2048 positions into one buffer at
        72 MB, and these windows at 30 MB (an update of 4.2 MB; launch.aot, docs/benchmarks.md).
        A window that would run past max_len is moved back to end there, and the positions it then
        covers before the row's start keep what they held; so does the window of a dropped row.
        Rows are unrolled (their count is static), so up to RUN_ROWS rows; more use write().
        Under a mesh, each "data" group writes the rows whose slots it holds."""
        b, t = k_btkh.shape[:2]
        if b > RUN_ROWS or t > self.max_len:
            return self.write(layer, slots_b, starts_b[:, None] + jnp.arange(t)[None, :], k_btkh, v_btkh)
        int8 = self.k_scale is not None
        if int8:
            (kq, ks), (vq, vs) = _quantize_vectors(k_btkh), _quantize_vectors(v_btkh)
            new = StackedKVCache(kq, vq, ks[..., None], vs[..., None])  # scales [b, t, kv, 1]
        else:
            new = StackedKVCache(k_btkh.astype(self.k.dtype), v_btkh.astype(self.v.dtype))

        sharded = mesh is not None and mesh.size > 1

        def local(cache, new, slots_b, starts_b):
            if sharded:  # a slot of another "data" group: out of range here, dropped
                slots_b = slots_b - jax.lax.axis_index("data") * cache.max_slots
            positions_axis = StackedKVCache(3, 3, 4, 4) if int8 else StackedKVCache(3, 3)  # of each buffer
            return jax.tree.map(lambda buf, rows, pos: _write_windows(buf, layer, slots_b, starts_b, rows, pos),
                                cache, new, positions_axis)

        if not sharded:
            return local(self, new, slots_b, starts_b)
        cache_specs = jax.tree.map(lambda s: s.spec, self.shardings(mesh))
        rows = jax.tree.map(lambda x: P(None, None, *x[2:3]), cache_specs)  # every row, heads as the cache
        return jax.shard_map(local, mesh=mesh, in_specs=(cache_specs, rows, P(), P()), out_specs=cache_specs,
                             check_vma=False)(self, new, slots_b, starts_b)


# Most prefill rows written by in-place windows (StackedKVCache.write_runs); the rows are unrolled
RUN_ROWS = 32
# Most slots whose decode scales are written by in-place windows (unrolled too); more use a select
DECODE_WINDOW_SLOTS = 128


def _write_windows(buf: jax.Array, layer: jax.Array, slots_b: jax.Array, starts_b: jax.Array, rows: jax.Array,
                   pos_axis: int) -> jax.Array:
    """Row i of `rows` ([b, t] + buf's trailing dims without the position axis: [b, t, kv,
    head_dim] values or [b, t, kv, 1] scales) into buf [layers, slots, kv, ...] at `layer`, slot
    slots_b[i], positions starts_b[i] + [0, t) along buf's pos_axis: a read of the t-position
    window, a select, and a dynamic_update_slice in place."""
    slots, n = buf.shape[1], buf.shape[pos_axis]
    t = rows.shape[1]
    for i in range(rows.shape[0]):
        row = jnp.moveaxis(rows[i], 0, -1)  # [kv, head_dim or 1, t]
        row = jnp.moveaxis(jnp.expand_dims(row, tuple(range(buf.ndim - row.ndim))), -1, pos_axis)  # buf's layout
        start = jnp.clip(starts_b[i], 0, n - t)
        shift = starts_b[i] - start  # > 0 only if the run passes max_len: its window ends at max_len
        slot = jnp.clip(slots_b[i], 0, slots - 1)
        index = [layer, slot] + [0] * (buf.ndim - 2)
        index[pos_axis] = start
        old = jax.lax.dynamic_slice(buf, index, row.shape)
        padded = jnp.concatenate([jnp.zeros_like(row), row], axis=pos_axis)
        moved = jax.lax.dynamic_slice_in_dim(padded, t - shift, t, pos_axis)
        keep = (jnp.arange(t) >= shift) & (slots_b[i] >= 0) & (slots_b[i] < slots)
        keep = keep.reshape([t if a == pos_axis else 1 for a in range(buf.ndim)])
        buf = jax.lax.dynamic_update_slice(buf, jnp.where(keep, moved, old), index)
    return buf


def _put_positions(buf: jax.Array, layer: jax.Array, positions_bt: jax.Array, value_btkh: jax.Array) -> jax.Array:
    """Decode's write of every slot's t new keys or values (row i is slot i) into buf [layers,
    slots, kv, len, head_dim], indexed by (slot, kv head, position) so that each scattered window
    is one head_dim row. (Indexed by (slot, position) only, the window is [kv, head_dim]; with
    more than one kv head per chip, the TPU compiler then lays the whole cache out for that window
    and copies each layer into the kernel's layout and back: 0.27 GB per layer and chip on the 8B
    shape's (2, 4) mesh.) Positions past len are dropped."""
    b, t, kv, _ = value_btkh.shape
    slots, heads = jnp.arange(b)[:, None, None], jnp.arange(kv)[None, :, None]
    rows = jnp.swapaxes(value_btkh, 1, 2)  # [b, kv, t, head_dim]
    return buf.at[layer, slots, heads, positions_bt[:, None, :]].set(rows, mode="drop")


def _put_scales(layer, positions_bt, buf, value):
    """Every slot's new scales (row i is slot i; positions past len dropped), as a select over
    the layer's [slots, kv, 1, len] scales. A scatter there makes the TPU compiler copy them out
    of their [1, len] tiling and back in every layer and step: 19 MB per layer and chip instead
    of 4.5 on the 70B shape (launch.aot's cost copies, docs/benchmarks.md)."""
    old = jax.lax.dynamic_index_in_dim(buf, layer, 0, keepdims=False)
    lengths = jnp.arange(buf.shape[-1])
    new = old
    for j in range(positions_bt.shape[1]):  # t positions per row (1, or k + 1 when verifying)
        hit = (lengths[None, :] == positions_bt[:, j:j + 1])[:, None, None, :]
        new = jnp.where(hit, value[:, j, :, None, None], new)
    return jax.lax.dynamic_update_index_in_dim(buf, new, layer, 0)


def copy_row(dst, src, src_row, dst_row):
    """dst's slot dst_row = src's slot src_row, for every buffer (either cache class, or a tuple
    of caches: a model's and its draft's)."""
    if isinstance(dst, tuple):
        return tuple(copy_row(d, s, src_row, dst_row) for d, s in zip(dst, src))
    axis = 1 if isinstance(dst, StackedKVCache) else 0
    def one(d, s):
        row = jax.lax.dynamic_index_in_dim(s, src_row, axis, keepdims=True)
        return jax.lax.dynamic_update_slice_in_dim(d, row, dst_row, axis)
    return jax.tree.map(one, dst, src)
