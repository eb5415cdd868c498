"""Model source for Hugging Face checkpoint directories (config.json + *.safetensors)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from kvserve.loader.hf_config import normalize_hf_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INDEX_FILE = "model.safetensors.index.json"

# Any one of these means AutoTokenizer has something to load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    """Parse a JSON object file, turning any failure into a ValueError naming the file."""
    try:
        with path.open(encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class HfSource:
    """A Hugging Face model directory: config.json, safetensors shards, tokenizer files."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        raw_config = _read_json(self.path / "config.json")
        # Reading every header now both counts tensors and rejects corrupt shards up front.
        self._keys = {file: self._tensor_names(file) for file in self._shard_files()}
        names = {name for keys in self._keys.values() for name in keys}
        self.num_weight_tensors = len(names)
        self.hf_config = normalize_hf_config(raw_config, names, self.path)

    def _shard_files(self) -> list[pathlib.Path]:
        """The safetensors files to read: those the index names, else every *.safetensors."""
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path}: missing or empty 'weight_map'")
            files = [self.path / name for name in sorted(set(weight_map.values()))]
            missing = [str(file) for file in files if not file.is_file()]
            if missing:
                raise ValueError(f"{index_path}: names shard files that do not exist: {missing}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{self.path}: no *.safetensors files")
        return files

    @staticmethod
    def _tensor_names(file: pathlib.Path) -> list[str]:
        """Tensor names in one safetensors file (reads only the header)."""
        try:
            with safe_open(file, framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:  # safetensors raises SafetensorError/OSError on bad files
            raise ValueError(f"{file}: not a readable safetensors file ({exc})") from exc

    def iter_weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, tensor) for every stored tensor; floating tensors cast to `dtype`."""
        # A tied lm_head is simply absent from the files, so it is never yielded.
        for file, names in self._keys.items():
            with safe_open(file, framework="pt") as handle:
                for name in names:
                    tensor = handle.get_tensor(name)
                    yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """Load the directory's tokenizer with AutoTokenizer (chat template included)."""
        from transformers import AutoTokenizer

        if not any((self.path / name).is_file() for name in _TOKENIZER_FILES):
            raise ValueError(
                f"{self.path}: no tokenizer files (expected one of {list(_TOKENIZER_FILES)})"
            )
        try:
            return AutoTokenizer.from_pretrained(self.path)
        except Exception as exc:  # transformers raises OSError/ValueError/KeyError variously
            raise ValueError(f"{self.path}: cannot load tokenizer ({exc})") from exc
