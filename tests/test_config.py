"""ModelConfig from HF config.json: every supported architecture's quirks, and clear errors."""

import jax
import jax.numpy as jnp
import pytest

from hf_reference import make_hf_model
from model.config import PRESETS, ModelConfig, RopeScaling
from model.decoder import init_params, param_specs


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


def test_presets_have_their_advertised_size_without_allocating():
    assert 90e6 < PRESETS["llama-100m"].num_params < 110e6
    cfg = PRESETS["llama-1b"]
    assert 1.1e9 < cfg.num_params < 1.4e9
    shapes = jax.eval_shape(lambda k: init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    assert sum(s.size for s in jax.tree.leaves(shapes)) == cfg.num_params
    assert set(shapes) == set(param_specs(cfg))


# Parameter counts as the model cards publish them.
PUBLISHED_SIZES = {"llama-3.2-1b": 1.24e9, "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9,
                   "mistral-7b": 7.24e9, "qwen2.5-7b": 7.61e9, "gemma-7b": 8.54e9}


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


def test_engine_config_is_the_one_source_of_serving_defaults():
    from model import EngineConfig
    from model.config import buckets_for

    cfg = PRESETS["tiny-llama"]
    assert EngineConfig().context_length(cfg) == min(2048, cfg.max_position_embeddings)
    assert EngineConfig(max_len=96).context_length(cfg) == 96
    assert EngineConfig(max_slots=4, max_len=64).batch_tokens(cfg) == 2 * 4 * 64
    assert buckets_for(96) == [16, 32, 64, 96]
    with pytest.raises(ValueError, match="max_len=100000 exceeds"):
        EngineConfig(max_len=100_000).context_length(cfg)
    for bad, match in (({"max_slots": 0}, "max_slots=0"), ({"order": "random"}, "order='random'"),
                       ({"kv_cache_dtype": "int4"}, "kv_cache_dtype='int4'"), ({"max_len": 1}, "max_len=1"),
                       ({"prefill_chunk": 8}, "prefill_chunk=8; must be None or an integer >= 16")):
        with pytest.raises(ValueError, match=match):
            EngineConfig(**bad)
