"""Model loading: find a checkpoint, read its config, iterate its weights, build its tokenizer."""

from kvserve.loader.gguf import GgufSource
from kvserve.loader.hf_config import HF_CONFIG_KEYS
from kvserve.loader.safetensors import HfSource
from kvserve.loader.weights import (
    BUNDLED_GGUF,
    ModelSource,
    bundled_model_path,
    open_model,
    resolve_model_path,
)

__all__ = [
    "BUNDLED_GGUF",
    "HF_CONFIG_KEYS",
    "GgufSource",
    "HfSource",
    "ModelSource",
    "bundled_model_path",
    "open_model",
    "resolve_model_path",
]
