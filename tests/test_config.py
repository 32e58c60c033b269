"""ModelConfig from HF config.json: every supported architecture's quirks, and clear errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from hf_reference import make_hf_model
from model.config import FULL, PRESETS, PUBLISHED, SLIDING, ModelConfig, RopeScaling, rope_inv_freq
from model.params import init_params, param_specs


def _cfg(variant, **kw):
    return ModelConfig.from_hf_config(make_hf_model(variant, **kw).config.to_dict())


def test_each_architecture_maps_its_quirks():
    llama, qwen, gemma, mistral = _cfg("llama"), _cfg("qwen2"), _cfg("gemma"), _cfg("mistral")
    assert (llama.qkv_bias, llama.tie_word_embeddings, llama.activation, llama.sliding_window) == (False, False, "silu", None)
    assert (qwen.qkv_bias, qwen.tie_word_embeddings) == (True, True)
    assert (gemma.norm_weight_offset, gemma.scale_embeddings, gemma.activation, gemma.head_dim) == (1.0, True, "gelu_tanh", 32)
    assert gemma.head_dim * gemma.num_heads != gemma.hidden_size  # head_dim independent of width
    assert mistral.sliding_window == 8
    assert _cfg("llama3-rope").rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)


def test_the_newer_families_map_their_quirks():
    qwen3, gemma2, gemma3, phi3, longrope = (_cfg(v) for v in ("qwen3", "gemma2", "gemma3", "phi3", "phi3-longrope"))
    assert (qwen3.qk_norm, qwen3.post_norms, qwen3.head_dim, qwen3.layer_windows) == (True, False, 32, (None, None))
    assert (gemma2.post_norms, gemma2.qk_norm, gemma2.norm_weight_offset) == (True, False, 1.0)
    assert gemma2.activation == "gelu_tanh"
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping, gemma2.attn_scale) == (3.0, 4.0, 24 ** -0.5)
    assert gemma2.layer_types == (SLIDING, FULL) and gemma2.layer_windows == (8, None)
    assert gemma3.qk_norm and gemma3.post_norms and gemma3.attn_logit_softcapping is None  # HF never applies it
    assert gemma3.layer_types == (SLIDING, SLIDING, FULL) and gemma3.layer_windows == (8, 8, None, 8)
    assert (gemma3.rope_theta, gemma3.rope_local_base_freq, gemma3.rope_scaling) == (50000.0, 5000.0,
                                                                                      RopeScaling("linear", 4.0))
    assert phi3.layer_windows == (12, 12) and not phi3.layer_types and phi3.rope_scaling is None
    rs = longrope.rope_scaling
    assert (rs.kind, rs.original_max_position_embeddings, rs.factor, len(rs.long_factor)) == ("longrope", 64, 8.0, 8)
    assert rs.attention_factor == pytest.approx((1 + math.log(8) / math.log(64)) ** 0.5)  # HF's default


def test_longrope_factors_follow_max_len():
    """HF uses the long factors for sequences longer than original_max_position_embeddings: the
    engine does for every sequence once max_len is longer."""
    cfg = _cfg("phi3-longrope")
    base = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    short, at_limit, long = (rope_inv_freq(cfg, n) for n in (None, 64, 65))
    assert short == at_limit == [f / s for f, s in zip(base, cfg.rope_scaling.short_factor)]
    assert long == [f / s for f, s in zip(base, cfg.rope_scaling.long_factor)]


def test_published_style_configs_of_the_newer_families():
    """config.json as published (legacy keys: no layer_types, Gemma 3's rope_local_base_freq and
    sliding_window_pattern) reads like transformers 5's own dicts."""
    gemma2 = ModelConfig.from_hf_config(PUBLISHED["gemma-2-9b"])
    assert gemma2.layer_windows[:4] == (4096, None, 4096, None)  # HF's default: even layers slide
    gemma3 = ModelConfig.from_hf_config(PUBLISHED["gemma-3-12b"])
    assert gemma3.layer_windows[:7] == (1024,) * 5 + (None, 1024)
    assert (gemma3.rope_theta, gemma3.rope_local_base_freq, gemma3.rope_scaling.factor) == (1e6, 1e4, 8.0)
    v5 = {**PUBLISHED["gemma-3-12b"], "rope_parameters": {
        FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        SLIDING: {"rope_type": "default", "rope_theta": 1e4}},
        "layer_types": [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(48)]}
    for key in ("rope_scaling", "rope_theta", "rope_local_base_freq", "sliding_window_pattern"):
        v5.pop(key)
    assert ModelConfig.from_hf_config(v5) == gemma3
    assert _cfg("gemma3").layer_types == (SLIDING, SLIDING, FULL)  # [S, S, F, S] from HF: its repeating prefix


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma", "qwen3", "gemma2", "gemma3_text", "phi3",
                                        "mixtral", "qwen3_moe"])
def test_keys_a_config_json_omits_take_hf_s_defaults(model_type):
    """A config.json with only the shape (and token ids) reads as transformers reads it: its
    config class fills in the soft-caps, windows, layer kinds, RoPE theta, ..."""
    import transformers

    minimal = {"model_type": model_type, "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
               "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    filled = transformers.AutoConfig.for_model(**minimal).to_dict()
    assert ModelConfig.from_hf_config(minimal) == ModelConfig.from_hf_config(filled)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_hf_config_json(name):
    cfg = PRESETS[name]
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_legacy_rope_scaling_key_and_round_trip():
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 500000.0,
          "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 32.0 and cfg.num_kv_heads == 4
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"hidden_act": "relu"}, "activation 'relu'"),
    ({"num_key_value_heads": 3}, "num_heads=4 is not a multiple of num_kv_heads=3"),
])
def test_unsupported_configs_say_what_and_why(change, match):
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 4, **change}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf)


@pytest.mark.parametrize("variant,change,match", [
    ("qwen3", {"architectures": None, "model_type": "qwen2_moe"},
     r"model_type 'qwen2_moe' \(no architectures\) is not supported"),
    ("gemma3", {"architectures": ["Gemma3ForConditionalGeneration"]},
     "'Gemma3ForConditionalGeneration' is not supported"),
    ("phi3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None},
     "rope_scaling type 'yarn'"),
    ("phi3", {"partial_rotary_factor": 0.75, "rope_parameters": None}, "partial_rotary_factor=0.75"),  # Phi-4-mini
    ("phi3", {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
    ("phi3-longrope", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 3,
                                           "long_factor": [1.0] * 8}},
     "rope_scaling short_factor has 3 values; expected head_dim / 2 = 8"),
    ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types has 'chunked_attention'"),
    ("gemma3", {"rope_parameters": {FULL: {"rope_type": "default"}, SLIDING: {"rope_type": "yarn", "factor": 2.0}}},
     "rope_parameters.sliding_attention.rope_type 'yarn'"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not supported"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ("qwen3", {"attention_bias": True}, "Qwen3ForCausalLM with attention_bias=true"),
])
def test_unsupported_configs_of_the_newer_families_name_field_and_value(variant, change, match):
    hf = make_hf_model(variant).config.to_dict()
    hf.update(change)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf)


def test_the_mixture_of_experts_families_map_their_router_and_experts():
    mixtral, qwen, norm = _cfg("mixtral"), _cfg("qwen3-moe"), _cfg("qwen3-moe-norm")
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.intermediate_size) == (4, 2, 64)
    assert mixtral.norm_topk_prob and not mixtral.qk_norm  # Mixtral always renormalizes the chosen weights
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.intermediate_size) == (8, 3, 48)  # moe_intermediate_size
    assert qwen.qk_norm and not qwen.norm_topk_prob and norm.norm_topk_prob
    published = ModelConfig.from_hf_config({k: v for k, v in PUBLISHED["qwen3-30b-a3b"].items()})
    assert (published.num_experts, published.num_experts_per_tok) == (128, 8)  # its config says num_experts


@pytest.mark.parametrize("variant,change,match", [
    ("qwen3-moe", {"decoder_sparse_step": 2}, "Qwen3MoeForCausalLM with decoder_sparse_step=2 is not supported; "
                                              "expected 1"),
    ("qwen3-moe", {"mlp_only_layers": [0, 1]}, r"mlp_only_layers=\[0, 1\] is not supported; expected \[\]"),
    ("qwen3-moe", {"num_experts_per_tok": 9}, "num_experts_per_tok=9; expected an integer from 1 to 8"),
    ("qwen3-moe", {"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ("mixtral", {"num_local_experts": 0}, "num_local_experts=0; a mixtral model needs an integer >= 1"),
    ("mixtral", {"num_experts_per_tok": None}, "num_experts_per_tok=None"),
    ("mixtral", {"hidden_act": "gelu_new"}, "activation 'gelu_new'"),
])
def test_unsupported_mixture_of_experts_configs_name_field_and_value(variant, change, match):
    hf = make_hf_model(variant).config.to_dict()
    hf.update(change)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf)


def test_presets_have_their_advertised_size_without_allocating():
    assert 90e6 < PRESETS["llama-100m"].num_params < 110e6
    cfg = PRESETS["llama-1b"]
    assert 1.1e9 < cfg.num_params < 1.4e9
    shapes = jax.eval_shape(lambda k: init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    assert sum(s.size for s in jax.tree.leaves(shapes)) == cfg.num_params
    assert set(shapes) == set(param_specs(cfg))


# Parameter counts as the model cards publish them.
# gemma-3-12b: its text model (the 12.2B of the card include a 0.4B vision tower).
PUBLISHED_SIZES = {"llama-3.2-1b": 1.24e9, "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9,
                   "mistral-7b": 7.24e9, "qwen2.5-7b": 7.61e9, "gemma-7b": 8.54e9, "qwen3-8b": 8.19e9,
                   "gemma-2-9b": 9.24e9, "gemma-3-12b": 11.77e9, "phi-3-mini": 3.82e9,
                   "mixtral-8x7b": 46.7e9, "qwen3-30b-a3b": 30.5e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_published_model_presets_have_the_published_size_without_allocating(name):
    cfg = PRESETS[name]
    assert cfg.num_params == pytest.approx(PUBLISHED_SIZES[name], rel=0.01)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    assert sum(s.size for s in jax.tree.leaves(shapes)) == cfg.num_params


def test_published_model_presets_keep_each_architecture_s_differences():
    assert PRESETS["mistral-7b"].sliding_window == 4096
    assert PRESETS["qwen2.5-7b"].qkv_bias and PRESETS["qwen2.5-7b"].sliding_window is None
    gemma = PRESETS["gemma-7b"]
    assert (gemma.norm_weight_offset, gemma.scale_embeddings, gemma.activation, gemma.head_dim) == (1.0, True, "gelu_tanh", 256)
    assert PRESETS["llama-3.1-8b"].rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert PRESETS["llama-3.2-1b"].tie_word_embeddings and not PRESETS["llama-3.1-70b"].tie_word_embeddings
    assert PRESETS["qwen3-8b"].qk_norm and not PRESETS["qwen3-8b"].tie_word_embeddings
    gemma2 = PRESETS["gemma-2-9b"]
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping, gemma2.attn_scale) == (50.0, 30.0, 1 / 16)
    assert gemma2.post_norms and gemma2.tie_word_embeddings and gemma2.layer_windows.count(None) == 21
    gemma3 = PRESETS["gemma-3-12b"]
    assert gemma3.qk_norm and gemma3.layer_windows.count(None) == 8 and gemma3.final_logit_softcapping is None
    assert PRESETS["phi-3-mini"].layer_windows == (2047,) * 32
    mixtral, qwen = PRESETS["mixtral-8x7b"], PRESETS["qwen3-30b-a3b"]
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.sliding_window) == (8, 2, None)
    assert mixtral.num_active_params == pytest.approx(12.9e9, rel=0.01)  # "13B active", as Mistral AI publishes
    assert qwen.qk_norm and qwen.norm_topk_prob and qwen.intermediate_size == 768
    assert qwen.num_active_params == pytest.approx(3.3e9, rel=0.02)  # "3.3B activated"


def test_engine_config_is_the_one_source_of_serving_defaults():
    from model import EngineConfig
    from model.config import buckets_for

    cfg = PRESETS["tiny-llama"]
    assert EngineConfig().context_length(cfg) == min(2048, cfg.max_position_embeddings)
    assert EngineConfig(max_len=96).context_length(cfg) == 96
    assert EngineConfig(max_slots=4, max_len=64).batch_tokens(cfg) == 2 * 4 * 64
    assert buckets_for(96) == [16, 32, 64, 96]
    assert buckets_for(96, per_octave=4) == [16, 24, 32, 40, 48, 56, 64, 80, 96]  # steps of 8 tokens at least
    assert buckets_for(300, per_octave=2) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 300]
    with pytest.raises(ValueError, match="per_octave=0"):
        buckets_for(96, per_octave=0)
    with pytest.raises(ValueError, match="max_len=100000 exceeds"):
        EngineConfig(max_len=100_000).context_length(cfg)
    for bad, match in (({"max_slots": 0}, "max_slots=0"), ({"order": "random"}, "order='random'"),
                       ({"kv_cache_dtype": "int4"}, "kv_cache_dtype='int4'"), ({"max_len": 1}, "max_len=1"),
                       ({"prefill_chunk": 8}, "prefill_chunk=8; must be None or an integer >= 16")):
        with pytest.raises(ValueError, match=match):
            EngineConfig(**bad)
