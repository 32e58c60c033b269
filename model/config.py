"""ModelConfig: the architecture of a decoder, built once from a HF config.json or a preset."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GemmaForCausalLM",
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling` of type "linear" or "llama3" (factor and the llama3 band limits)."""

    kind: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about an architecture. Fields use HF's meaning."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    norm_weight_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + w)
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    activation: str = "silu"  # "silu" | "gelu_tanh" (Gemma's GeGLU)
    sliding_window: int | None = None  # Mistral
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 0
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"activation={self.activation!r}; expected 'silu' or 'gelu_tanh'")

    @property
    def num_params(self) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        return self.num_layers * layer + v * d * (1 if self.tie_word_embeddings else 2) + d

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds a config from the dict of a HF `config.json`; `source` names that file in errors."""
        arch = supported_architecture(hf, source)
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag) and arch != "Qwen2ForCausalLM":
                raise ValueError(f"{arch} with {flag}=true is not supported")
        if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
            raise ValueError("Qwen2 with use_sliding_window=true is not supported")
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hidden // heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        gemma = arch == "GemmaForCausalLM"
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        sliding = hf.get("sliding_window") if arch == "MistralForCausalLM" else None
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(hf),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", gemma),
            qkv_bias=arch == "Qwen2ForCausalLM",
            norm_weight_offset=1.0 if gemma else 0.0,
            scale_embeddings=gemma,
            activation=_activation(act),
            sliding_window=sliding,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id") or 0,
            architecture=arch,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict for this config (used to write checkpoints and references)."""
        model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                      "Qwen2ForCausalLM": "qwen2", "GemmaForCausalLM": "gemma"}[self.architecture]
        hf = {
            "architectures": [self.architecture], "model_type": model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "gelu_pytorch_tanh" if self.activation == "gelu_tanh" else "silu",
            "bos_token_id": self.bos_token_id, "pad_token_id": self.pad_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.activation == "gelu_tanh":
            hf["hidden_activation"] = "gelu_pytorch_tanh"
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            hf["rope_scaling"] = {"rope_type": rs.kind, "factor": rs.factor}
            if rs.kind == "llama3":
                hf["rope_scaling"].update(
                    low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings)
        if self.architecture == "MistralForCausalLM":
            hf["sliding_window"] = self.sliding_window
        return hf


_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "gemma": "GemmaForCausalLM"}


def supported_architecture(hf: dict[str, Any], source: str = "config.json") -> str:
    """The architecture a HF config.json names (`architectures`, else `model_type`), if the engine
    supports it; a ValueError naming the file, both fields and what is supported otherwise."""
    archs, model_type = hf.get("architectures"), hf.get("model_type")
    arch = archs[0] if archs else _MODEL_TYPES.get(model_type or "")
    if arch not in SUPPORTED_ARCHITECTURES:
        named = f"model_type {model_type!r}" + (f", architecture {arch!r}" if archs else " (no architectures)")
        raise ValueError(f"{source}: {named} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
                         f"(model_type {', '.join(_MODEL_TYPES)})")
    return arch


def _activation(name: str) -> str:
    if name == "silu":
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu", "gelu_tanh"):
        # HF Gemma runs the tanh approximation even when a legacy config says "gelu".
        return "gelu_tanh"
    raise ValueError(f"activation {name!r} is not supported; expected silu or gelu_pytorch_tanh")


def _rope_params(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters`; older checkpoints write `rope_scaling` + `rope_theta`.
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def _rope_theta(hf: dict[str, Any]) -> float:
    return float(_rope_params(hf).get("rope_theta") or hf.get("rope_theta") or 10000.0)


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling | None:
    rs = _rope_params(hf)
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(rs["factor"]))
    if kind == "llama3":
        return RopeScaling("llama3", float(rs["factor"]), float(rs["low_freq_factor"]),
                           float(rs["high_freq_factor"]), int(rs["original_max_position_embeddings"]))
    raise ValueError(f"rope_scaling type {kind!r} is not supported; expected default, linear or llama3")


def llama_preset(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, ffw: int,
                 **kw: Any) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffw, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
                       rms_norm_eps=1e-5, rope_theta=500000.0, **kw)


# Random-initialized shapes, for benchmarks and tests. Real checkpoints load from a path.
DEFAULT_MAX_LEN = 2048  # tokens a sequence may hold when neither the caller nor the YAML says
MIN_BUCKET = 16
AUTO_SLOTS_GUESS = 64  # max_slots "auto" is known only once the engine is on its devices


def buckets_for(max_len: int) -> list[int]:
    """Prompt-length buckets: powers of two from MIN_BUCKET, then max_len itself."""
    out, b = [], MIN_BUCKET
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How an engine serves a model: its cache slots and their length, and its scheduler. The one
    place for these defaults: `Engine` takes it, the job's ModelSpec embeds it, and the job's
    batching reads its buckets and token budget from it."""

    max_slots: int | str = 32  # "auto": as many as fit hbm_utilization of device memory after the weights
    max_len: int | None = None  # None: min(DEFAULT_MAX_LEN, the model's max_position_embeddings)
    decode_steps: int = 8  # decode steps per dispatch
    prefill_tokens: int = 4096  # most prompt tokens in one prefill call
    # Chunked prefill: while any sequence decodes, each scheduler step spends at most this many
    # prefill tokens (rows x bucket, padding included) before the next decode dispatch, and a
    # prompt is prefilled in pieces of the largest length bucket within it, one step after
    # another. None: every free slot is filled with whole prompts before decoding goes on.
    prefill_chunk: int | None = 512
    kv_cache_dtype: str | None = None  # "int8": int8 KV cache
    prefix_cache_entries: int = 0  # > 0 for labeling runs: a shared instruction is prefilled once
    prefix_block: int = 64
    batching: str = "inflight"  # "static": refill only when every slot is free (a baseline)
    order: str = "longest_first"  # or "arrival": which waiting prompt takes a free slot
    hbm_utilization: float = 0.9  # with max_slots "auto": the share of device memory weights and cache may take
    hot_path: str = "auto"  # the devices' own (model/platform.py); "tpu" on a CPU runs the TPU code, kernels interpreted

    def __post_init__(self):
        if self.max_slots != "auto" and (not isinstance(self.max_slots, int) or self.max_slots < 1):
            raise ValueError(f"max_slots={self.max_slots!r}; must be an integer >= 1 or 'auto'")
        if not isinstance(self.hbm_utilization, (int, float)) or not 0 < self.hbm_utilization <= 1:
            raise ValueError(f"hbm_utilization={self.hbm_utilization!r}; must be a number in (0, 1]")
        for name, value, least in (("decode_steps", self.decode_steps, 1),
                                   ("prefill_tokens", self.prefill_tokens, 1), ("prefix_block", self.prefix_block, 1),
                                   ("prefix_cache_entries", self.prefix_cache_entries, 0)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r}; must be an integer >= {least}")
        if self.prefill_chunk is not None and (not isinstance(self.prefill_chunk, int)
                                               or self.prefill_chunk < MIN_BUCKET):
            raise ValueError(f"prefill_chunk={self.prefill_chunk!r}; must be None or an integer >= {MIN_BUCKET} "
                             "(the shortest length bucket)")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 2):
            raise ValueError(f"max_len={self.max_len!r}; must be an integer >= 2")
        for name, value, allowed in (("kv_cache_dtype", self.kv_cache_dtype, (None, "int8")),
                                     ("batching", self.batching, ("inflight", "static")),
                                     ("order", self.order, ("longest_first", "arrival")),
                                     ("hot_path", self.hot_path, ("auto", "cpu", "tpu", "gpu"))):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; expected one of {allowed}")

    def context_length(self, model: ModelConfig) -> int:
        """Tokens a sequence may hold (prompt + completion): max_len, resolved for `model`."""
        if self.max_len is None:
            return min(DEFAULT_MAX_LEN, model.max_position_embeddings)
        if self.max_len > model.max_position_embeddings:
            raise ValueError(f"max_len={self.max_len} exceeds the model's max_position_embeddings="
                             f"{model.max_position_embeddings}")
        return self.max_len

    def batch_tokens(self, model: ModelConfig) -> int:
        """A Beam batch's default token budget (prompt + max_tokens, summed): two full loads of
        the slots, so a batch keeps every slot busy while the next one is formed."""
        slots = self.max_slots if isinstance(self.max_slots, int) else AUTO_SLOTS_GUESS
        return 2 * slots * self.context_length(model)


PRESETS: dict[str, ModelConfig] = {
    "tiny-llama": llama_preset(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, ffw=128),
    "llama-100m": llama_preset(vocab=32000, hidden=768, layers=8, heads=12, kv_heads=4, ffw=2048,
                               max_position_embeddings=4096),
    "llama-1b": llama_preset(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, ffw=8192,
                             tie_word_embeddings=True, max_position_embeddings=8192,
                             rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),
}

# The shapes of published models: the architecture fields of each one's config.json on the
# Hugging Face Hub (base models), read through from_hf_config. With random weights they are only
# for tests; they exist so that launch/aot.py can size and compile a real model with no weights.
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "max_position_embeddings": 131072, "bos_token_id": 128000,
           "eos_token_id": 128001}
PUBLISHED: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "tie_word_embeddings": True, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}},
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                     "tie_word_embeddings": False, "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}},
    "llama-3.1-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
                      "tie_word_embeddings": False, "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}},
    # Mistral-7B-v0.1: the version whose config has a sliding window
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "max_position_embeddings": 32768, "sliding_window": 4096, "tie_word_embeddings": False,
                   "bos_token_id": 1, "eos_token_id": 2},
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "max_position_embeddings": 131072, "use_sliding_window": False,
                   "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643},
    "gemma-7b": {"architectures": ["GemmaForCausalLM"], "vocab_size": 256000, "hidden_size": 3072,
                 "intermediate_size": 24576, "num_hidden_layers": 28, "num_attention_heads": 16,
                 "num_key_value_heads": 16, "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                 "max_position_embeddings": 8192, "hidden_act": "gelu_pytorch_tanh",
                 "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
}
PRESETS.update({name: ModelConfig.from_hf_config(hf) for name, hf in PUBLISHED.items()})


def rope_inv_freq(cfg: ModelConfig) -> list[float]:
    """Per-frequency inverse wavelengths [head_dim // 2], with HF's linear / llama3 scaling applied."""
    hd = cfg.head_dim
    inv = [1.0 / cfg.rope_theta ** (2 * i / hd) for i in range(hd // 2)]
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs.kind == "linear":
        return [f / rs.factor for f in inv]
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / rs.factor)
        else:  # smooth interpolation between the two bands
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor)
            out.append((1 - smooth) * f / rs.factor + smooth * f)
    return out
