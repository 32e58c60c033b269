"""The inference engine: a sharded Flax NNX decoder with a static KV cache. Knows nothing of Beam."""

from model.config import PRESETS, ModelConfig
from model.engine import Engine, GenerationOutput
from model.sampling import SamplingParams

__all__ = ["Engine", "GenerationOutput", "ModelConfig", "PRESETS", "SamplingParams"]
