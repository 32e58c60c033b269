"""HF safetensors checkpoints (one file or sharded with an index), from a local path or gs://.

The safetensors format is an 8-byte header length, a JSON header (name -> dtype, shape, byte
range) and raw little-endian bytes. We read it through fsspec so that gs:// (gcsfs) works with
range reads; the `safetensors` package only opens local files. Tensors are read one at a time,
converted to our layout and dtype, and placed straight into their sharding: the checkpoint never
sits in host memory whole, and pickle-based formats are never opened.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Callable

import fsspec
import jax
import ml_dtypes
import numpy as np

from model.config import ModelConfig, supported_architecture
from model.decoder import param_specs
from model.sharding import named_sharding

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

# Our weight name -> (HF tensor name, whether HF stores it as [out, in] and we as [in, out]).
# {i} is the layer index. Shapes are checked against `hf_shape` below.
HF_NAMES: dict[str, tuple[str, bool]] = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", False),
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", False),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", False),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
}

# Buffers some exporters write that are not weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The shape HF stores one layer's (or a global) tensor in."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "embed": (V, D), "final_norm": (D,), "lm_head": (V, D), "attn_norm": (D,), "mlp_norm": (D,),
        "wq": (q, D), "wk": (kv, D), "wv": (kv, D), "wo": (D, q), "bq": (q,), "bk": (kv,), "bv": (kv,),
        "w_gate": (F, D), "w_up": (F, D), "w_down": (D, F),
    }[name]


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

    def read(self, name: str) -> np.ndarray:
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
        self._f.seek(self._data_start + begin)
        buf = self._f.read(nbytes)
        return np.frombuffer(buf, dtype=dtype.newbyteorder("<")).reshape(meta["shape"])

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

    def read(self, name: str) -> np.ndarray:
        return self._file_of(name).read(name)

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


def expected_keys(cfg: ModelConfig) -> dict[str, list[str]]:
    """Our weight name -> the HF tensor names it is assembled from (one per layer for stacked ones)."""
    out = {}
    for name, spec in param_specs(cfg).items():
        template = HF_NAMES[name][0]
        out[name] = [template.format(i=i) for i in range(cfg.num_layers)] if spec.per_layer else [template]
    return out


def _read_layout(ckpt: Checkpoint, key: str, name: str, cfg: ModelConfig,
                 shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor `key` (our weight `name`, or one layer of it) in our layout and `shape`."""
    # The header's shape is checked before any bytes are read.
    if ckpt.shape(key) != hf_shape(name, cfg):
        raise ValueError(f"{ckpt.path}: tensor {key!r} has shape {ckpt.shape(key)}; "
                         f"expected {hf_shape(name, cfg)} for this config.json")
    tensor = ckpt.read(key)
    if HF_NAMES[name][1]:
        tensor = tensor.T
    return tensor.reshape(shape)


def load_params(path: str, cfg: ModelConfig, dtype: Any, mesh: jax.sharding.Mesh,
                progress: Callable[[str], None] | None = None) -> dict[str, jax.Array]:
    """Reads every weight of `cfg` from the safetensors checkpoint at `path`, placed on `mesh`."""
    ckpt = Checkpoint(path)
    try:
        wanted = expected_keys(cfg)
        available = set(ckpt.weight_map)
        needed = {k for keys in wanted.values() for k in keys}
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
        for name, spec in param_specs(cfg).items():
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
    tensors = {}
    for name, spec in param_specs(cfg).items():
        arrays = params[name] if spec.per_layer else [params[name]]
        for value, key in zip(arrays, expected_keys(cfg)[name]):
            tensor = np.asarray(jax.device_get(value)).astype(dtype)
            if HF_NAMES[name][1]:  # back to HF's [out, in]
                tensor = tensor.reshape(hf_shape(name, cfg)[::-1]).T
            tensors[key] = np.ascontiguousarray(tensor.reshape(hf_shape(name, cfg)))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg.to_hf_config(), "dtype": np.dtype(dtype).name}, f, indent=2)
