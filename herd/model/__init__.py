from herd.model.config import CONFIGS, ModelConfig, RopeScaling
from herd.model.llama import KVCache, Transformer

__all__ = ["CONFIGS", "KVCache", "ModelConfig", "RopeScaling", "Transformer"]
