"""Find a model class by its architecture name (config.json `architectures` or GGUF `general.architecture`)."""

from __future__ import annotations

from torch import nn

from kvserve.config import ModelConfig
from kvserve.models.deepseek import DeepseekForCausalLM
from kvserve.models.llama import LlamaForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "DeepseekV2ForCausalLM": DeepseekForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    """Architecture names this build can run."""
    return sorted(_MODELS)


def build_model(config: ModelConfig, max_position: int) -> nn.Module:
    """Instantiate the model class registered for `config.architecture` (weights uninitialised)."""
    model_class = _MODELS.get(config.architecture)
    if model_class is None:
        raise ValueError(f"architecture {config.architecture!r} is not supported; "
                         f"supported: {supported_architectures()}")
    return model_class(config, max_position)
