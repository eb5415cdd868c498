"""Models installed as Python packages: found by pip's name, a .gguf inside, or assembled from chunk packages."""

from __future__ import annotations

import pathlib

import pytest

from kvserve.loader.weights import packaged_model_path, resolve_model_path


def make_package(root: pathlib.Path, name: str, source: str = "", gguf: bool = False) -> None:
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text(source)
    if gguf:
        (package / "tiny.gguf").write_bytes(b"GGUF")


@pytest.fixture
def packages(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_package_holding_a_gguf_is_that_file(packages):
    make_package(packages, "tiny_model_gguf", gguf=True)
    assert resolve_model_path("tiny-model-gguf") == packages / "tiny_model_gguf" / "tiny.gguf"


def test_a_chunked_package_is_what_its_assemble_writes(packages):
    target = packages / "joined.gguf"
    target.write_bytes(b"GGUF")
    make_package(packages, "chunked_model", f"def assemble():\n    return {str(target)!r}\n")
    assert packaged_model_path("chunked-model") == target


def test_a_failed_assembly_names_the_package(packages):
    make_package(packages, "broken_model", "def assemble():\n    raise ValueError('sha256 did not match')\n")
    with pytest.raises(ValueError, match="model package 'broken-model': cannot assemble its GGUF file "
                                         r"\(sha256 did not match\)"):
        resolve_model_path("broken-model")


def test_a_package_without_a_model_is_no_model(packages):
    make_package(packages, "plain_package")
    assert packaged_model_path("plain-package") is None
    with pytest.raises(ValueError, match="no such file or directory; expected .*installed model package"):
        resolve_model_path("plain-package")
