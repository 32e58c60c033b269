"""HF safetensors checkpoints (one file or sharded with an index), from a local path or gs://.

The safetensors format is an 8-byte header length, a JSON header (name -> dtype, shape, byte
range) and raw little-endian bytes. We read it through fsspec so that gs:// (gcsfs) works with
range reads; the `safetensors` package only opens local files. Tensors are read one at a time,
converted to our layout and dtype, and placed straight into their sharding: the checkpoint never
sits in host memory whole, and pickle-based formats are never opened.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any, Callable

import fsspec
import jax
import ml_dtypes
import numpy as np

from model.config import ModelConfig, supported_architecture
from model.params import param_specs
from model.sharding import named_sharding

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where one of our weights lives in a HF checkpoint."""

    name: str  # {i} is the layer index
    transposed: bool = False  # HF stores it [out, in], we [in, out]
    packed: tuple[str, ...] = ()  # fused in HF: these weights of ours, stacked along HF's first dim in order
    experts: bool = False  # one tensor per expert ({j} in the name), stacked along our first dim


# Our weight name -> its HF tensor, in the Llama layout most architectures share. Shapes are
# checked against `hf_shape` below.
HF_NAMES: dict[str, HFTensor] = {
    "embed": HFTensor("model.embed_tokens.weight"),
    "final_norm": HFTensor("model.norm.weight"),
    "lm_head": HFTensor("lm_head.weight", True),
    "attn_norm": HFTensor("model.layers.{i}.input_layernorm.weight"),
    "mlp_norm": HFTensor("model.layers.{i}.post_attention_layernorm.weight"),
    "wq": HFTensor("model.layers.{i}.self_attn.q_proj.weight", True),
    "wk": HFTensor("model.layers.{i}.self_attn.k_proj.weight", True),
    "wv": HFTensor("model.layers.{i}.self_attn.v_proj.weight", True),
    "wo": HFTensor("model.layers.{i}.self_attn.o_proj.weight", True),
    "bq": HFTensor("model.layers.{i}.self_attn.q_proj.bias"),
    "bk": HFTensor("model.layers.{i}.self_attn.k_proj.bias"),
    "bv": HFTensor("model.layers.{i}.self_attn.v_proj.bias"),
    "q_norm": HFTensor("model.layers.{i}.self_attn.q_norm.weight"),
    "k_norm": HFTensor("model.layers.{i}.self_attn.k_norm.weight"),
    "w_gate": HFTensor("model.layers.{i}.mlp.gate_proj.weight", True),
    "w_up": HFTensor("model.layers.{i}.mlp.up_proj.weight", True),
    "w_down": HFTensor("model.layers.{i}.mlp.down_proj.weight", True),
}

# Gemma 2 and 3 name their four norms per layer differently: their post_attention_layernorm
# follows attention (Llama's precedes the MLP).
_GEMMA2_NAMES = {
    "mlp_norm": HFTensor("model.layers.{i}.pre_feedforward_layernorm.weight"),
    "post_attn_norm": HFTensor("model.layers.{i}.post_attention_layernorm.weight"),
    "post_mlp_norm": HFTensor("model.layers.{i}.post_feedforward_layernorm.weight"),
}
_QKV, _GATE_UP = ("wq", "wk", "wv"), ("w_gate", "w_up")
# Architectures whose checkpoints name or pack tensors otherwise: these entries replace HF_NAMES'.
LAYOUTS: dict[str, dict[str, HFTensor]] = {
    "Gemma2ForCausalLM": _GEMMA2_NAMES,
    "Gemma3ForCausalLM": _GEMMA2_NAMES,
    "Phi3ForCausalLM": {  # fused q/k/v and gate/up projections, split on load
        **{n: HFTensor("model.layers.{i}.self_attn.qkv_proj.weight", True, _QKV) for n in _QKV},
        **{n: HFTensor("model.layers.{i}.mlp.gate_up_proj.weight", True, _GATE_UP) for n in _GATE_UP},
    },
    # Mixture of experts: one [out, in] tensor per expert, as the published checkpoints store them
    "MixtralForCausalLM": {
        "w_gate": HFTensor("model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight", True, experts=True),
        "w_up": HFTensor("model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight", True, experts=True),
        "w_down": HFTensor("model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight", True, experts=True),
        "router": HFTensor("model.layers.{i}.block_sparse_moe.gate.weight", True),
    },
    "Qwen3MoeForCausalLM": {
        "w_gate": HFTensor("model.layers.{i}.mlp.experts.{j}.gate_proj.weight", True, experts=True),
        "w_up": HFTensor("model.layers.{i}.mlp.experts.{j}.up_proj.weight", True, experts=True),
        "w_down": HFTensor("model.layers.{i}.mlp.experts.{j}.down_proj.weight", True, experts=True),
        "router": HFTensor("model.layers.{i}.mlp.gate.weight", True),
    },
}

# Buffers some exporters write that are not weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def hf_names(cfg: ModelConfig) -> dict[str, HFTensor]:
    """Our weight name -> its HF tensor, for cfg's architecture."""
    return {**HF_NAMES, **LAYOUTS.get(cfg.architecture, {})}


def hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The shape HF stores one layer's (or a global) tensor in; of a packed weight, its part; of
    a mixture of experts' weight, one expert's."""
    D, F, V, H = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "embed": (V, D), "final_norm": (D,), "lm_head": (V, D), "attn_norm": (D,), "mlp_norm": (D,),
        "post_attn_norm": (D,), "post_mlp_norm": (D,), "q_norm": (H,), "k_norm": (H,),
        "wq": (q, D), "wk": (kv, D), "wv": (kv, D), "wo": (D, q), "bq": (q,), "bk": (kv,), "bv": (kv,),
        "w_gate": (F, D), "w_up": (F, D), "w_down": (D, F), "router": (cfg.num_experts, D),
    }[name]


def _stored_shape(tensor: HFTensor, name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The checkpoint tensor's whole shape (all parts of a packed one)."""
    if not tensor.packed:
        return hf_shape(name, cfg)
    return (sum(hf_shape(p, cfg)[0] for p in tensor.packed), *hf_shape(name, cfg)[1:])


def _rows_of(tensor: HFTensor, name: str, cfg: ModelConfig) -> tuple[int, int] | None:
    """The rows [start, stop) of the stored tensor that hold weight `name` (None: all)."""
    if not tensor.packed:
        return None
    start = sum(hf_shape(p, cfg)[0] for p in tensor.packed[:tensor.packed.index(name)])
    return start, start + hf_shape(name, cfg)[0]


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


class SafetensorsFile:
    """Random access to the tensors of one .safetensors file through fsspec."""

    def __init__(self, url: str):
        self.url = url
        self._f = fsspec.open(url, "rb").open()
        try:
            self.header = self._read_header()
        except Exception:
            self._f.close()
            raise

    def _read_header(self) -> dict[str, dict[str, Any]]:
        # Checked up front: a git-lfs pointer or a truncated download would otherwise surface as
        # a JSON or reshape error that does not say which file is bad.
        size = self._f.seek(0, 2)
        self._f.seek(0)
        head = self._f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{self.url}: not a safetensors file ({size} bytes; header length "
                             f"{n}); a git-lfs pointer or a truncated download?")
        try:
            header = json.loads(self._f.read(n))
        except ValueError as e:
            raise ValueError(f"{self.url}: safetensors header is not valid JSON ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._data_size = size - self._data_start
        return header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or only its rows [start, stop) along the first dim (read as one byte range)."""
        meta = self.header[name]
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"{self.url}: tensor {name!r} has dtype {meta['dtype']}; "
                             f"supported: {sorted(_DTYPES)}")
        dtype = np.dtype(_DTYPES[meta["dtype"]])
        begin, end = meta["data_offsets"]
        nbytes = math.prod(meta["shape"]) * dtype.itemsize
        if end - begin != nbytes or not 0 <= begin <= end <= self._data_size:
            raise ValueError(f"{self.url}: tensor {name!r} has byte range [{begin}, {end}) for "
                             f"{meta['dtype']}{list(meta['shape'])} ({nbytes} bytes) in "
                             f"{self._data_size} data bytes; the file is corrupt or truncated")
        shape = list(meta["shape"])
        if rows is not None:
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            begin, nbytes, shape[0] = begin + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes, rows[1] - rows[0]
        self._f.seek(self._data_start + begin)
        buf = self._f.read(nbytes)
        return np.frombuffer(buf, dtype=dtype.newbyteorder("<")).reshape(shape)

    def close(self):
        self._f.close()


class Checkpoint:
    """All tensors of a checkpoint directory: `model.safetensors` or an index over shards."""

    def __init__(self, path: str):
        self.path = path
        fs, root = fsspec.core.url_to_fs(path)
        index = _join(path, "model.safetensors.index.json")
        if fs.exists(_join(root, "model.safetensors.index.json")):
            with fsspec.open(index, "r") as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif fs.exists(_join(root, "model.safetensors")):
            weight_map = None
        else:
            found = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) if fs.exists(root) else []
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                    f"(found: {found}); only safetensors checkpoints are loaded")
        self._files: dict[str, SafetensorsFile] = {}
        if weight_map is None:
            single = self._file("model.safetensors")
            weight_map = {name: "model.safetensors" for name in single.header}
        self.weight_map = weight_map

    def _file(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            self._files[filename] = SafetensorsFile(_join(self.path, filename))
        return self._files[filename]

    def _file_of(self, name: str) -> SafetensorsFile:
        f = self._file(self.weight_map[name])
        if name not in f.header:
            raise ValueError(f"{self.path}: the index puts tensor {name!r} in {self.weight_map[name]}, "
                             f"which does not contain it")
        return f

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file_of(name).shape(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self._file_of(name).read(name, rows)

    def close(self):
        for f in self._files.values():
            f.close()


def read_hf_config(path: str) -> dict[str, Any]:
    """The dict of a checkpoint's config.json; a ValueError naming the file if the engine does not
    support its architecture (ModelConfig.from_hf_config sees only the dict)."""
    url = _join(path, "config.json")
    try:
        with fsspec.open(url, "r") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} not found: a checkpoint directory needs config.json") from None
    supported_architecture(hf, url)
    return hf


def expected_keys(cfg: ModelConfig) -> dict[str, list[str | tuple[str, ...]]]:
    """Our weight name -> the HF tensor names it is assembled from (one per layer for per-layer
    ones; of a mixture of experts' weight, a tuple of one per expert for each layer)."""
    out, names = {}, hf_names(cfg)
    for name, spec in param_specs(cfg).items():
        hf = names[name]

        def key(i, hf=hf):
            if hf.experts:
                return tuple(hf.name.format(i=i, j=j) for j in range(cfg.num_experts))
            return hf.name.format(i=i)
        out[name] = [key(i) for i in range(cfg.num_layers)] if spec.per_layer else [hf.name]
    return out


def _flat(keys: list[str | tuple[str, ...]]) -> list[str]:
    return [k for key in keys for k in (key if isinstance(key, tuple) else (key,))]


def _read_layout(ckpt: Checkpoint, key: str | tuple[str, ...], name: str, cfg: ModelConfig,
                 shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor `key` (our weight `name`, or one layer of it; of a packed tensor, its rows; of
    a tuple of one tensor per expert, their stack) in our layout and `shape`."""
    if isinstance(key, tuple):
        return np.stack([_read_layout(ckpt, k, name, cfg, shape[1:]) for k in key])
    hf = hf_names(cfg)[name]
    # The header's shape is checked before any bytes are read.
    if ckpt.shape(key) != _stored_shape(hf, name, cfg):
        raise ValueError(f"{ckpt.path}: tensor {key!r} has shape {ckpt.shape(key)}; "
                         f"expected {_stored_shape(hf, name, cfg)} for this config.json")
    tensor = ckpt.read(key, _rows_of(hf, name, cfg))
    if hf.transposed:
        tensor = tensor.T
    return tensor.reshape(shape)


def load_params(path: str, cfg: ModelConfig, dtype: Any, mesh: jax.sharding.Mesh,
                progress: Callable[[str], None] | None = None) -> dict[str, jax.Array]:
    """Reads every weight of `cfg` from the safetensors checkpoint at `path`, placed on `mesh`."""
    ckpt = Checkpoint(path)
    try:
        wanted = expected_keys(cfg)
        available = set(ckpt.weight_map)
        needed = {k for keys in wanted.values() for k in _flat(keys)}
        missing = sorted(needed - available)
        if missing:
            raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
        unexpected = sorted(k for k in available - needed if not k.endswith(_IGNORED_SUFFIXES)
                            and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
        if unexpected:
            raise ValueError(f"{path}: checkpoint has {len(unexpected)} unexpected tensor(s), "
                             f"e.g. {unexpected[:5]}")
        np_dtype = np.dtype(dtype)
        params = {}
        for name, spec in param_specs(cfg, mesh).items():
            sharding = named_sharding(spec.axes, spec.shape, mesh)
            arrays = []
            for key in wanted[name]:  # one tensor per layer for per-layer weights
                host = _read_layout(ckpt, key, name, cfg, spec.shape).astype(np_dtype)
                arrays.append(jax.make_array_from_callback(spec.shape, sharding, lambda idx, h=host: h[idx]))
                del host
            params[name] = arrays if spec.per_layer else arrays[0]
            if progress:
                progress(name)
        return params
    finally:
        ckpt.close()


def save_params(path: str, cfg: ModelConfig, params: dict[str, Any], dtype: Any = np.float32) -> None:
    """Writes params in HF's layout and names (model.safetensors + config.json) to a local dir,
    so the checkpoint loads here and in HF transformers alike."""
    import os

    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    names, parts = hf_names(cfg), {}
    for name, spec in param_specs(cfg).items():
        arrays = params[name] if spec.per_layer else [params[name]]
        for value, keys in zip(arrays, expected_keys(cfg)[name]):
            layer = np.asarray(jax.device_get(value)).astype(dtype)
            # a mixture of experts' weight: one tensor per expert
            for key, tensor in zip(keys, layer) if isinstance(keys, tuple) else [(keys, layer)]:
                if names[name].transposed:  # back to HF's [out, in]
                    tensor = tensor.reshape(hf_shape(name, cfg)[::-1]).T
                parts.setdefault(key, {})[name] = tensor.reshape(hf_shape(name, cfg))
    tensors = {}
    for key, by_name in parts.items():  # a packed tensor's parts, stacked in HF's order
        order = names[next(iter(by_name))].packed or tuple(by_name)
        tensors[key] = np.ascontiguousarray(np.concatenate([by_name[n] for n in order]))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg.to_hf_config(), "dtype": np.dtype(dtype).name}, f, indent=2)
