"""The inference engine: a sharded Flax NNX decoder with a static KV cache. Knows nothing of Beam."""

from model.platform import quiet_defaults

quiet_defaults()  # before jax is imported below  # noqa: E402

from model.config import PRESETS, EngineConfig, ModelConfig
from model.engine import Engine, GenerationOutput, ScoreOutput, resolve_checkpoint
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer, load_tokenizer
from model.weights import read_hf_config

__all__ = ["Engine", "EngineConfig", "GenerationOutput", "ModelConfig", "PRESETS", "SamplingParams", "ScoreOutput",
           "Tokenizer", "load_tokenizer", "read_hf_config", "resolve_checkpoint"]
