"""Tiny random-initialized HF transformers models (PyTorch, CPU): the reference implementation."""

from __future__ import annotations

import torch
import transformers

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class, model class, overrides). Each exercises one architecture's quirks.
VARIANTS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=10000.0)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(head_dim=32, eos_token_id=2,
                                                                              bos_token_id=1)),
    # q/k norms; head_dim independent of the width
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32)),
    # sliding (layer 0) and global (layer 1) layers, caps small enough to bite on a tiny model,
    # a query_pre_attn_scalar other than head_dim, four norms per layer
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        head_dim=32, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0, eos_token_id=2, bos_token_id=1)),
    # layers sliding, sliding, full, sliding: local RoPE on sliding layers, linear-scaled global
    # RoPE on the full one; attn_logit_softcapping set but, as in HF, not applied
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        head_dim=32, num_hidden_layers=4, sliding_window=8, sliding_window_pattern=3, query_pre_attn_scalar=24,
        rope_theta=50000.0, rope_local_base_freq=5000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
        final_logit_softcapping=4.0, attn_logit_softcapping=3.0, eos_token_id=2, bos_token_id=1)),
    # fused qkv and gate_up weights; a sliding window on every layer
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(sliding_window=12)),
    # mixture of experts: 4 experts, 2 per token (Mixtral's router renormalizes the chosen two)
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)),
    # 8 experts, 3 per token, not renormalized (Qwen3-MoE's default), q/k norms, another expert width
    "qwen3-moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, head_dim=32, norm_topk_prob=False)),
    # renormalized
    "qwen3-moe-norm": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=32, norm_topk_prob=True)),
    # LongRoPE; original_max_position_embeddings = the tests' max_len, so HF and the engine both
    # use the short factors (and the attention factor, from 512 / 64)
    "phi3-longrope": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        original_max_position_embeddings=64, rope_scaling={
            "rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [1.0 + 2.0 * i for i in range(8)]})),
}


def make_hf_model(variant: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random model in float32 eval mode. Norm weights and biases are randomized too (HF inits
    them to constants), so that a wrong offset or a missing bias would show."""
    config_cls, model_cls, extra = VARIANTS[variant]
    config = config_cls(**{**TINY, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model: transformers.PreTrainedModel, path, max_shard_size: str | None = None) -> str:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), safe_serialization=True, **kw)
    return str(path)


def hf_logits(model, tokens: list[int]):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def hf_greedy(model, tokens: list[int], n: int) -> list[int]:
    """HF generate(do_sample=False) for n tokens, EOS not stopping (the engine uses ignore_eos)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(tokens):].tolist()
