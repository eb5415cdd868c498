"""HfSource: tiny random HF checkpoints (single file and sharded) load back exactly."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch

from kvserve.loader import HF_CONFIG_KEYS, HfSource, ModelSource, open_model, resolve_model_path


def _save(model: Any, directory: pathlib.Path, **kwargs: Any) -> pathlib.Path:
    """save_pretrained (safetensors is the only format in transformers 5) and return the dir."""
    model.save_pretrained(directory, **kwargs)
    return directory


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_round_trip(tmp_path: pathlib.Path, tiny_model: Any, tie: bool, shard: str | None) -> None:
    model = tiny_model("llama", tie=tie)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    directory = _save(model, tmp_path / "ckpt", **kwargs)
    num_files = len(list(directory.glob("*.safetensors")))
    assert (num_files > 1) is (shard is not None)
    assert (directory / "model.safetensors.index.json").is_file() is (shard is not None)

    assert resolve_model_path(str(directory)) == directory.resolve()
    source = open_model(directory)
    assert isinstance(source, HfSource) and isinstance(source, ModelSource)
    config = source.hf_config
    raw = json.loads((directory / "config.json").read_text())
    assert config.items() >= raw.items()  # config.json passes through; keys are only added
    assert set(HF_CONFIG_KEYS) <= config.keys()
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tie
    # transformers 5 writes rope_parameters; the canonical keys are filled from it.
    assert config["rope_theta"] == 50000.0 and config["rope_scaling"] is None
    assert config["torch_dtype"] == "float32" and config["head_dim"] == 16
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
        assert config[key] == getattr(model.config, key)

    expected = model.state_dict()
    if tie:
        del expected["lm_head.weight"]  # not stored, so not yielded: the model ties it
    ours = dict(source.iter_weights(torch.float32))
    assert source.num_weight_tensors == len(ours) == len(expected)
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


def _edit_config(directory: pathlib.Path, **changes: Any) -> None:
    """Rewrite config.json with keys set (value None = delete the key)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_legacy_config_keys(tmp_path: pathlib.Path, tiny_model: Any) -> None:
    """Pre-v5 style config.json: top-level rope_theta, rope_scaling with "type", no head_dim."""
    directory = _save(tiny_model("qwen2", tie=False), tmp_path / "ckpt")
    scaling = {"type": "linear", "factor": 2.0}
    _edit_config(
        directory,
        rope_parameters=None,
        rope_theta=1e6,
        rope_scaling=scaling,
        head_dim=None,
        dtype=None,
        torch_dtype="bfloat16",
    )
    config = open_model(directory).hf_config
    assert config["rope_theta"] == 1e6
    assert config["rope_scaling"] == {**scaling, "rope_type": "linear"}
    assert config["head_dim"] == 16 and config["torch_dtype"] == "bfloat16"
    assert config["attention_bias"] is True  # Qwen2 has q/k/v biases but no config key


def test_tie_inferred_from_weights(tmp_path: pathlib.Path, tiny_model: Any) -> None:
    directory = _save(tiny_model("llama", tie=True), tmp_path / "ckpt")
    _edit_config(directory, tie_word_embeddings=None)
    assert open_model(directory).hf_config["tie_word_embeddings"] is True
    _edit_config(directory, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="no lm_head.weight") as info:
        open_model(directory)
    assert str(directory) in str(info.value)


def test_config_missing_required_key(tmp_path: pathlib.Path, tiny_model: Any) -> None:
    directory = _save(tiny_model("llama", tie=True), tmp_path / "ckpt")
    _edit_config(directory, hidden_size=None)
    with pytest.raises(ValueError, match="hidden_size"):
        open_model(directory)


def test_iter_weights_casts_dtype(tmp_path: pathlib.Path, tiny_model: Any) -> None:
    model = tiny_model("qwen3", tie=False)
    source = open_model(_save(model, tmp_path / "ckpt"))
    weights = dict(source.iter_weights(torch.bfloat16))
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    name = "model.layers.0.self_attn.q_norm.weight"
    assert torch.equal(weights[name], model.state_dict()[name].to(torch.bfloat16))


def test_tokenizer_round_trip(tmp_path: pathlib.Path, tiny_model: Any, gguf_tokenizer: Any) -> None:
    """A tokenizer saved next to the weights is loaded with its chat template."""
    directory = _save(tiny_model("llama", tie=True), tmp_path / "ckpt")
    gguf_tokenizer.save_pretrained(directory)
    tokenizer = open_model(directory).load_tokenizer()
    text = "Hello world, ça va?"
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    assert tokenizer.eos_token == gguf_tokenizer.eos_token


def test_missing_tokenizer(tmp_path: pathlib.Path, tiny_model: Any) -> None:
    directory = _save(tiny_model("llama", tie=True), tmp_path / "ckpt")
    source = open_model(directory)
    with pytest.raises(ValueError, match="no tokenizer files") as info:
        source.load_tokenizer()
    assert str(directory) in str(info.value)


def test_index_names_missing_shard(tmp_path: pathlib.Path, tiny_model: Any) -> None:
    directory = _save(tiny_model("llama", tie=True), tmp_path / "ckpt", max_shard_size="20KB")
    shard = sorted(directory.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match="do not exist") as info:
        open_model(directory)
    assert shard.name in str(info.value)


def test_corrupt_shard(tmp_path: pathlib.Path, tiny_model: Any) -> None:
    directory = _save(tiny_model("llama", tie=True), tmp_path / "ckpt")
    weights = directory / "model.safetensors"
    weights.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a readable safetensors file") as info:
        open_model(directory)
    assert str(weights) in str(info.value)


def test_corrupt_config(tmp_path: pathlib.Path, tiny_model: Any) -> None:
    directory = _save(tiny_model("llama", tie=True), tmp_path / "ckpt")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        open_model(directory)
