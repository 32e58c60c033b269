"""ModelConfig: the architecture of a decoder, built once from a HF config.json or a preset."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

# A layer's kind, in HF's words (config.json `layer_types`).
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class Family:
    """What one architecture's config.json leaves implicit: HF's code for it hard-codes these.
    from_hf_config reads them once into ModelConfig fields, which are all the decoder sees."""

    model_type: str
    gemma: bool = False  # RMSNorm scales by (1 + w), embeddings times sqrt(width), head tied by default
    qkv_bias: bool = False  # q, k, v projections have biases (whatever `attention_bias` says)
    qk_norm: bool = False  # RMSNorm over head_dim of each q and k head, before RoPE
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs, before each residual add
    sliding: str = "none"  # "none" | "all": `sliding_window` on every layer | "layer_types": on the sliding ones
    softcaps: tuple[str, ...] = ()  # which of attn_logit_softcapping, final_logit_softcapping HF applies
    query_pre_attn_scalar: bool = False  # attention scale query_pre_attn_scalar ** -0.5
    local_rope: bool = False  # sliding layers use rope_local_base_freq, unscaled
    refused: tuple[str, ...] = ()  # config flags the engine does not implement: an error when true
    defaults: tuple[tuple[str, Any], ...] = ()  # HF's values for config.json keys it may omit
    # Mixture of experts: a sparse MLP on every layer, `num_local_experts` (or `num_experts`) experts of
    # this config key's width, `num_experts_per_tok` per token
    expert_width: str | None = None
    # the chosen experts' weights renormalized to sum to 1: always (True) or as `norm_topk_prob` says (None)
    norm_topk: bool | None = True
    required: tuple[tuple[str, Any], ...] = ()  # config keys the engine supports only at these values


_GEMMA2 = dict(gemma=True, post_norms=True, sliding="layer_types", query_pre_attn_scalar=True)
_GEMMA = (("hidden_activation", "gelu_pytorch_tanh"),)
_GEMMA2_DEFAULTS = _GEMMA + (("query_pre_attn_scalar", 256), ("sliding_window", 4096))
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama"),
    "MistralForCausalLM": Family("mistral", sliding="all", defaults=(("sliding_window", 4096),)),
    "Qwen2ForCausalLM": Family("qwen2", qkv_bias=True, refused=("use_sliding_window",)),
    "GemmaForCausalLM": Family("gemma", gemma=True, defaults=_GEMMA),
    "Qwen3ForCausalLM": Family("qwen3", qk_norm=True, refused=("use_sliding_window",)),
    "Gemma2ForCausalLM": Family("gemma2", softcaps=("attn_logit_softcapping", "final_logit_softcapping"),
                                defaults=_GEMMA2_DEFAULTS + (("sliding_window_pattern", 2),
                                                             ("attn_logit_softcapping", 50.0),
                                                             ("final_logit_softcapping", 30.0)), **_GEMMA2),
    # HF's Gemma 3 attention never soft-caps its logits, whatever attn_logit_softcapping says
    "Gemma3ForCausalLM": Family("gemma3_text", qk_norm=True, softcaps=("final_logit_softcapping",), local_rope=True,
                                refused=("use_bidirectional_attention",),
                                defaults=_GEMMA2_DEFAULTS + (("sliding_window_pattern", 6), ("rope_theta", 1e6)),
                                **_GEMMA2),
    "Phi3ForCausalLM": Family("phi3", sliding="all", defaults=(("rms_norm_eps", 1e-5),)),
    # HF's Mixtral router: softmax over all experts, then the top k renormalized (= softmax over their logits)
    "MixtralForCausalLM": Family("mixtral", sliding="all", expert_width="intermediate_size",
                                 defaults=(("num_local_experts", 8), ("num_experts_per_tok", 2), ("rms_norm_eps", 1e-5),
                                           ("rope_theta", 1e6))),
    # Qwen3-MoE can interleave dense MLP layers (decoder_sparse_step > 1, mlp_only_layers); published
    # checkpoints make every layer sparse, the one case supported
    "Qwen3MoeForCausalLM": Family("qwen3_moe", qk_norm=True, refused=("use_sliding_window",),
                                  expert_width="moe_intermediate_size", norm_topk=None,
                                  defaults=(("norm_topk_prob", False), ("num_experts", 128),
                                            ("num_experts_per_tok", 8), ("moe_intermediate_size", 768)),
                                  required=(("decoder_sparse_step", 1), ("mlp_only_layers", []))),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
_MODEL_TYPES = {f.model_type: arch for arch, f in FAMILIES.items()}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling` of type "linear", "llama3" (factor and the band limits) or "longrope"
    (Phi-3: per-frequency short and long factors, and a factor on cos and sin)."""

    kind: str  # "linear" | "llama3" | "longrope"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


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
    sliding_window: int | None = None  # Mistral, Phi-3: every layer; with layer_types, the sliding ones
    # HF's layer kinds ("sliding_attention" | "full_attention"), repeating: layer i is
    # layer_types[i % len]; () = every layer alike. Gemma 2: (sliding, full); Gemma 3: 5 sliding, 1 full.
    layer_types: tuple[str, ...] = ()
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim of q and k (weights q_norm, k_norm)
    post_norms: bool = False  # Gemma 2, 3: norms on the attention and MLP outputs (post_attn_norm, post_mlp_norm)
    query_pre_attn_scalar: float | None = None  # Gemma 2, 3: attention scale is its ** -0.5 (None: head_dim's)
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: the same on the output logits
    rope_local_base_freq: float | None = None  # Gemma 3: sliding layers' RoPE theta (unscaled)
    # Mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is num_experts gated MLPs of width
    # intermediate_size, num_experts_per_tok of them per token, weighted by the router's softmax over
    # all experts (renormalized over the chosen ones if norm_topk_prob). 0: a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True
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
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"layer_types has {bad[0]!r}; supported: {SLIDING!r}, {FULL!r}")
        if SLIDING in self.layer_types and self.sliding_window is None:
            raise ValueError(f"layer_types has {SLIDING!r} layers but sliding_window is None")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok}; expected 1 to "
                             f"num_experts={self.num_experts}")
        if self.num_experts < 0 or (not self.num_experts and self.num_experts_per_tok):
            raise ValueError(f"num_experts={self.num_experts} with num_experts_per_tok={self.num_experts_per_tok}; "
                             "a mixture of experts needs num_experts >= 1")
        rs = self.rope_scaling
        if rs is not None and rs.kind == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(rs, name)) != self.head_dim // 2:
                    raise ValueError(f"rope_scaling {name} has {len(getattr(rs, name))} values; expected "
                                     f"head_dim / 2 = {self.head_dim // 2}")

    @property
    def attn_scale(self) -> float:
        """What attention multiplies q.k by."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends within sliding_window (the others see every earlier position)."""
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[layer % len(self.layer_types)] == SLIDING

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window (None: none)."""
        return tuple(self.sliding_window if self.is_sliding(i) else None for i in range(self.num_layers))

    @property
    def num_params(self) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        norms = 2 * d + (2 * hd if self.qk_norm else 0) + (2 * d if self.post_norms else 0)
        mlp = (self.num_experts * (3 * d * f + d)) if self.num_experts else 3 * d * f  # + the router's
        layer = attn + mlp + norms
        return self.num_layers * layer + v * d * (1 if self.tie_word_embeddings else 2) + d

    @property
    def num_active_params(self) -> int:
        """Parameters one token runs through: num_params with only num_experts_per_tok experts per layer."""
        idle = self.num_experts - self.num_experts_per_tok
        return self.num_params - self.num_layers * idle * 3 * self.hidden_size * self.intermediate_size

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds a config from the dict of a HF `config.json`; `source` names that file in errors."""
        arch = supported_architecture(hf, source)
        fam = FAMILIES[arch]
        hf = {**dict(fam.defaults), **hf}  # an explicit null stays null
        for flag in ("attention_bias", "mlp_bias") if not fam.qkv_bias else ():
            if hf.get(flag):
                raise ValueError(f"{arch} with {flag}=true is not supported")
        for flag in fam.refused:
            if hf.get(flag):
                raise ValueError(f"{arch} with {flag}=true is not supported")
        for key, supported in fam.required:
            if hf.get(key) not in (None, supported):  # null: HF's default, the supported value
                raise ValueError(f"{source}: {arch} with {key}={json.dumps(hf[key])} is not supported; "
                                 f"expected {json.dumps(supported)}")
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hidden // heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        sliding = hf.get("sliding_window") if fam.sliding != "none" else None
        layer_types = _layer_types(hf, fam)
        if layer_types and sliding is None and SLIDING in layer_types:
            raise ValueError(f"{source}: layer_types has {SLIDING!r} layers but sliding_window is null")
        caps = {name: hf.get(name) for name in fam.softcaps}
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf[fam.expert_width or "intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(hf),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", fam.gemma),
            qkv_bias=fam.qkv_bias,
            norm_weight_offset=1.0 if fam.gemma else 0.0,
            scale_embeddings=fam.gemma,
            activation=_activation(act),
            sliding_window=sliding,
            layer_types=layer_types,
            qk_norm=fam.qk_norm,
            post_norms=fam.post_norms,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if fam.query_pre_attn_scalar else None,
            attn_logit_softcapping=caps.get("attn_logit_softcapping"),
            final_logit_softcapping=caps.get("final_logit_softcapping"),
            rope_local_base_freq=_rope_local_theta(hf) if fam.local_rope else None,
            **(_experts(hf, fam, source) if fam.expert_width else {}),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id") or 0,
            architecture=arch,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict for this config (used to write checkpoints and references)."""
        hf = {
            "architectures": [self.architecture], "model_type": FAMILIES[self.architecture].model_type,
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
            if rs.kind == "longrope":
                hf["rope_scaling"].update(short_factor=list(rs.short_factor), long_factor=list(rs.long_factor),
                                          attention_factor=rs.attention_factor)
                hf["original_max_position_embeddings"] = rs.original_max_position_embeddings
        if self.sliding_window is not None:
            hf["sliding_window"] = self.sliding_window
        if self.layer_types:
            hf["layer_types"] = [self.layer_types[i % len(self.layer_types)] for i in range(self.num_layers)]
        fam = FAMILIES[self.architecture]
        for name in fam.softcaps:  # written even when null: HF's Gemma 2 defaults them to 50 and 30
            hf[name] = getattr(self, name)
        if fam.query_pre_attn_scalar:
            hf["query_pre_attn_scalar"] = self.query_pre_attn_scalar
        if fam.local_rope:
            hf["rope_local_base_freq"] = self.rope_local_base_freq
        if fam.expert_width:
            hf.update({fam.expert_width: self.intermediate_size, "num_local_experts": self.num_experts,
                       "num_experts_per_tok": self.num_experts_per_tok}, **dict(fam.required))
            if fam.norm_topk is None:
                hf["norm_topk_prob"] = self.norm_topk_prob
        return hf


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


def _layer_types(hf: dict[str, Any], fam: Family) -> tuple[str, ...]:
    """The shortest prefix of HF's per-layer `layer_types` (or of the family's default pattern)
    that repeats to the whole list."""
    if fam.sliding != "layer_types":
        return ()
    types = hf.get("layer_types")
    if not types:
        every = hf["sliding_window_pattern"]
        types = [FULL if (i + 1) % every == 0 else SLIDING for i in range(hf["num_hidden_layers"])]
    types = tuple(types)
    for p in range(1, len(types) + 1):
        if all(types[i] == types[i % p] for i in range(len(types))):
            return types[:p]
    return types


def _experts(hf: dict[str, Any], fam: Family, source: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a MoE family's config.json."""
    key = "num_local_experts" if hf.get("num_local_experts") is not None else "num_experts"  # Qwen3-MoE's name
    experts = hf.get(key)
    if not isinstance(experts, int) or experts < 1:
        raise ValueError(f"{source}: {key}={experts!r}; a {fam.model_type} model needs an integer >= 1")
    top_k = hf.get("num_experts_per_tok")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(f"{source}: num_experts_per_tok={top_k!r}; expected an integer from 1 to {experts} "
                         "(the number of experts)")
    norm = hf.get("norm_topk_prob") if fam.norm_topk is None else fam.norm_topk
    return dict(num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=bool(norm))


def _activation(name: str) -> str:
    if name == "silu":
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu", "gelu_tanh"):
        # HF Gemma runs the tanh approximation even when a legacy config says "gelu".
        return "gelu_tanh"
    raise ValueError(f"activation {name!r} is not supported; expected silu or gelu_pytorch_tanh")


def _rope_params(hf: dict[str, Any], layer_type: str = FULL) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters` (Gemma 3: one dict per layer type); older
    # checkpoints write `rope_scaling` + `rope_theta` (+ Gemma 3's `rope_local_base_freq`).
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if FULL in rp or SLIDING in rp:
        rp = rp.get(layer_type) or {}
    return rp


def _rope_theta(hf: dict[str, Any], default: float = 10000.0) -> float:
    return float(_rope_params(hf).get("rope_theta") or hf.get("rope_theta") or default)


def _rope_local_theta(hf: dict[str, Any]) -> float:
    rp = hf.get("rope_parameters") or {}
    local = rp.get(SLIDING) or {}
    kind = local.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"rope_parameters.{SLIDING}.rope_type {kind!r} is not supported; expected default")
    return float(local.get("rope_theta") or hf.get("rope_local_base_freq") or 10000.0)


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling | None:
    rs = _rope_params(hf)
    kind = rs.get("rope_type", rs.get("type", "default"))
    partial = rs.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported; expected 1.0 (rotary on all of head_dim)")
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(rs["factor"]))
    if kind == "llama3":
        return RopeScaling("llama3", float(rs["factor"]), float(rs["low_freq_factor"]),
                           float(rs["high_freq_factor"]), int(rs["original_max_position_embeddings"]))
    if kind in ("longrope", "su"):  # "su": HF's older name for LongRoPE
        # as HF: a top-level original_max_position_embeddings (Phi-3 writes one) wins over rope_scaling's
        original = int(hf.get("original_max_position_embeddings") or rs.get("original_max_position_embeddings")
                       or hf["max_position_embeddings"])
        factor = float(rs.get("factor") or hf["max_position_embeddings"] / original)
        attention = rs.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return RopeScaling("longrope", factor, original_max_position_embeddings=original,
                           short_factor=tuple(float(x) for x in rs["short_factor"]),
                           long_factor=tuple(float(x) for x in rs["long_factor"]), attention_factor=float(attention))
    raise ValueError(f"rope_scaling type {kind!r} is not supported; expected default, linear, llama3 or longrope")


def llama_preset(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, ffw: int,
                 **kw: Any) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffw, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
                       rms_norm_eps=1e-5, rope_theta=500000.0, **kw)


# Random-initialized shapes, for benchmarks and tests. Real checkpoints load from a path.
DEFAULT_MAX_LEN = 2048  # tokens a sequence may hold when neither the caller nor the YAML says
MIN_BUCKET = 16
AUTO_SLOTS_GUESS = 64  # max_slots "auto" is known only once the engine is on its devices


def buckets_for(max_len: int, per_octave: int = 1) -> list[int]:
    """Prompt-length buckets: powers of two from MIN_BUCKET, then max_len itself. per_octave > 1
    adds evenly spaced lengths within each doubling, in steps of at least 8 tokens (16, 24, 32, 40,
    48, 56, 64, 80, ... for 4), so a prompt pads by at most a step instead of up to twice its length."""
    if per_octave < 1:
        raise ValueError(f"per_octave={per_octave!r}; must be an integer >= 1")
    out, b = [], MIN_BUCKET
    while b < max_len:
        step = max(8, b // per_octave) if per_octave > 1 else b
        out += range(b, min(2 * b, max_len), step)
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
    # Structured outputs: the device table of the automata running rows follow (model/constraints.py),
    # its capacity in states, token classes and automata. It grows (a recompile) when rows need more.
    constraint_states: int = 4096
    constraint_classes: int = 512
    constraint_automata: int = 8
    # Speculative decoding (model/speculative.py): per row, num_speculative_tokens proposals are
    # verified by one forward of the model per step. "ngram" proposes the tokens that followed the
    # latest earlier occurrence of the row's last prompt_lookup_max..prompt_lookup_min tokens in
    # its own prompt and output (prompt lookup); "draft" (implied by `draft`) samples them from a
    # small model sharing the tokenizer: `draft` is its checkpoint directory or bundled name
    # ("demo-draft"). Outputs follow the same distribution as without (greedy: the same tokens);
    # a batch falls back to plain decoding while speculation does not pay.
    speculative: str | None = None
    draft: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 2

    def __post_init__(self):
        if self.max_slots != "auto" and (not isinstance(self.max_slots, int) or self.max_slots < 1):
            raise ValueError(f"max_slots={self.max_slots!r}; must be an integer >= 1 or 'auto'")
        if not isinstance(self.hbm_utilization, (int, float)) or not 0 < self.hbm_utilization <= 1:
            raise ValueError(f"hbm_utilization={self.hbm_utilization!r}; must be a number in (0, 1]")
        for name, value, least in (("decode_steps", self.decode_steps, 1),
                                   ("prefill_tokens", self.prefill_tokens, 1), ("prefix_block", self.prefix_block, 1),
                                   ("prefix_cache_entries", self.prefix_cache_entries, 0),
                                   ("constraint_states", self.constraint_states, 1),
                                   ("constraint_classes", self.constraint_classes, 1),
                                   ("constraint_automata", self.constraint_automata, 1),
                                   ("num_speculative_tokens", self.num_speculative_tokens, 1),
                                   ("prompt_lookup_min", self.prompt_lookup_min, 1),
                                   ("prompt_lookup_max", self.prompt_lookup_max, 1)):
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
                                     ("hot_path", self.hot_path, ("auto", "cpu", "tpu", "gpu")),
                                     ("speculative", self.speculative, (None, "ngram", "draft"))):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; expected one of {allowed}")
        if self.draft is not None:
            if not isinstance(self.draft, str) or not self.draft:
                raise ValueError(f"draft={self.draft!r}; must be a checkpoint directory or a bundled name")
            if self.speculative not in (None, "draft"):
                raise ValueError(f"draft={self.draft!r} with speculative={self.speculative!r}; a draft model "
                                 "speculates as speculative='draft' (or leave speculative out)")
            object.__setattr__(self, "speculative", "draft")
        elif self.speculative == "draft":
            raise ValueError("speculative='draft' needs `draft`: the draft model's checkpoint")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} exceeds prompt_lookup_max="
                             f"{self.prompt_lookup_max}")

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
    # a mixture of experts of tiny-llama's shape: 8 experts of width 64, 2 per token (Mixtral's router)
    "tiny-mixtral": llama_preset(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, ffw=64, num_experts=8,
                                 num_experts_per_tok=2, architecture="MixtralForCausalLM"),
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
    "qwen3-8b": {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "hidden_size": 4096,
                 "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "rope_scaling": None, "max_position_embeddings": 40960, "use_sliding_window": False,
                 "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 151643,
                 "eos_token_id": 151645},
    "gemma-2-9b": {"architectures": ["Gemma2ForCausalLM"], "vocab_size": 256000, "hidden_size": 3584,
                   "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                   "max_position_embeddings": 8192, "hidden_activation": "gelu_pytorch_tanh",
                   "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
    # the text model of gemma-3-12b-pt (published as Gemma3ForConditionalGeneration: its text_config)
    "gemma-3-12b": {"architectures": ["Gemma3ForCausalLM"], "vocab_size": 262208, "hidden_size": 3840,
                    "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
                    "num_key_value_heads": 8, "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                    "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                    "max_position_embeddings": 131072, "hidden_activation": "gelu_pytorch_tanh",
                    "query_pre_attn_scalar": 256, "sliding_window": 1024, "sliding_window_pattern": 6,
                    "final_logit_softcapping": None, "attn_logit_softcapping": None, "bos_token_id": 2,
                    "eos_token_id": 1, "pad_token_id": 0},
    # Phi-3-mini-4k-instruct (its 128k sibling differs in LongRoPE factors and context)
    "phi-3-mini": {"architectures": ["Phi3ForCausalLM"], "vocab_size": 32064, "hidden_size": 3072,
                   "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
                   "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
                   "sliding_window": 2047, "tie_word_embeddings": False, "bos_token_id": 1,
                   "eos_token_id": 32000, "pad_token_id": 32000},
    # mixtures of experts
    "mixtral-8x7b": {"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                     "max_position_embeddings": 32768, "sliding_window": None, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    "qwen3-30b-a3b": {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
                      "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6,
                      "rope_theta": 1e6, "max_position_embeddings": 40960, "num_experts": 128,
                      "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
                      "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": None,
                      "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645},
}
PRESETS.update({name: ModelConfig.from_hf_config(hf) for name, hf in PUBLISHED.items()})


def rope_inv_freq(cfg: ModelConfig, max_len: int | None = None, sliding: bool = False) -> list[float]:
    """Per-frequency inverse wavelengths [head_dim // 2], with HF's linear / llama3 / longrope
    scaling applied. sliding: a sliding-window layer's, which with rope_local_base_freq (Gemma 3)
    is plain RoPE at that theta. longrope (Phi-3): HF switches from the short to the long factors
    once a sequence is longer than original_max_position_embeddings; with static shapes the
    choice is made once, from max_len, the longest sequence the engine holds: long factors if
    max_len exceeds it, else short (also for max_len None, HF's choice before any sequence)."""
    hd = cfg.head_dim
    local = sliding and cfg.rope_local_base_freq is not None
    theta = cfg.rope_local_base_freq if local else cfg.rope_theta
    inv = [1.0 / theta ** (2 * i / hd) for i in range(hd // 2)]
    rs = None if local else cfg.rope_scaling
    if rs is None:
        return inv
    if rs.kind == "linear":
        return [f / rs.factor for f in inv]
    if rs.kind == "longrope":
        long = max_len is not None and max_len > rs.original_max_position_embeddings
        return [f / s for f, s in zip(inv, rs.long_factor if long else rs.short_factor)]
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


def rope_attention_factor(cfg: ModelConfig, sliding: bool = False) -> float:
    """What HF multiplies RoPE's cos and sin by (so q.k by its square): longrope's attention
    factor, else 1."""
    rs = cfg.rope_scaling
    local = sliding and cfg.rope_local_base_freq is not None
    return rs.attention_factor if rs is not None and rs.kind == "longrope" and not local else 1.0
