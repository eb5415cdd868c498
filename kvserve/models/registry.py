"""Find a model class by its architecture name (config.json `architectures` or GGUF `general.architecture`)."""

from __future__ import annotations

from torch import nn

from kvserve.attention.backend import AttentionBackend
from kvserve.config import ModelConfig
from kvserve.models.deepseek import DeepseekForCausalLM
from kvserve.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from kvserve.models.llama import LlamaForCausalLM, Phi3ForCausalLM
from kvserve.models.qwen_moe import QwenMoeForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "DeepseekV2ForCausalLM": DeepseekForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": QwenMoeForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": QwenMoeForCausalLM,
}


def supported_architectures() -> list[str]:
    """Architecture names this build can run."""
    return sorted(_MODELS)


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The model class registered for `config.architecture`."""
    cls = _MODELS.get(config.architecture)
    if cls is None:
        raise ValueError(f"architecture {config.architecture!r} is not supported; "
                         f"supported: {supported_architectures()}")
    return cls


def build_model(config: ModelConfig, max_position: int, attention_backend: AttentionBackend) -> nn.Module:
    """Instantiate the model class registered for `config.architecture` (weights uninitialised), its attention
    layers on `attention_backend`."""
    return model_class(config)(config, max_position, attention_backend)
