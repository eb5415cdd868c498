"""KV-cache memory calculator: exact figures for Llama-2-7B, DeepSeek-V2, the bundled model and the allocated cache."""

from __future__ import annotations

import argparse
import json
import pathlib
from fractions import Fraction

import pytest

from kvserve.kv.kv_memory import ModelShape, kv_memory_report, load_shape
from kvserve.kv.kv_memory_cli import add_kv_memory_command

MiB, GiB = 2**20, 2**30


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `kv-memory` through a parser built with add_kv_memory_command; return stdout."""
    parser = argparse.ArgumentParser(prog="kvserve")
    add_kv_memory_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["kv-memory", *argv])
    args.func(args)
    return capsys.readouterr().out


def test_llama_2_7b_mha_float16_is_half_a_mib_per_token():
    report = kv_memory_report(load_shape("llama-2-7b"), context=4096, batch=32)
    real = report.row("real")
    assert real.layout.attention == "MHA"
    assert real.layout.elements_per_token_per_layer == 2 * 32 * 128
    assert real.bytes_per_token["auto"] == 32 * 2 * 32 * 128 * 2 == 524_288 == MiB // 2
    assert real.bytes_per_token["auto"] * 4096 == 2 * GiB
    assert real.total_bytes["auto"] == 64 * GiB
    assert real.bytes_per_token["float32"] == MiB
    assert report.row("MQA").layout.elements_per_token_per_layer == 2 * 128
    assert report.row("GQA").layout.elements_per_token_per_layer == 2 * 8 * 128  # assumed 8 KV heads
    # Not MLA: the MLA equivalent uses DeepSeek-V2's ratio d_c = 4·d_h, d_rope = d_h/2, and says so.
    assert report.row("MLA").layout.elements_per_token_per_layer == 512 + 64
    assert any("not MLA" in note and "4·d_h" in note for note in report.notes)


def test_deepseek_v2_mla_caches_latent_plus_rope_key():
    report = kv_memory_report(load_shape("deepseek-v2"), context=4096)
    real = report.row("real")
    assert real.layout.attention == "MLA"
    assert real.layout.elements_per_token_per_layer == 512 + 64
    assert real.bytes_per_token["auto"] == 60 * (512 + 64) * 2
    # Equivalents use n_h = 128 and d_h = 128 (nope / v head dims), as in the DeepSeek-V2 paper.
    assert report.row("MHA").layout.elements_per_token_per_layer == 2 * 128 * 128
    assert report.row("MQA").layout.elements_per_token_per_layer == 2 * 128


def test_quantized_schemes_include_their_scales():
    shape = load_shape("llama-2-7b")
    mha = kv_memory_report(shape).row("MHA")
    heads, d_h, layers = 32, 128, 32
    # int8 / fp8: 1 byte per element + a float32 scale per token per KV head, for K and for V.
    assert mha.bytes_per_token["int8"] == mha.bytes_per_token["fp8"] == layers * heads * (2 * d_h + 2 * 4)
    # int4 KIVI: 0.5 byte per element; V: float16 scale + zero point per token; K: per channel per 64 tokens.
    assert mha.bytes_per_token["int4"] == layers * heads * (d_h + 2 * 2 + Fraction(2 * 2 * d_h, 64))
    # 3.66x smaller than float16 at d_h = 128, scales included.
    assert mha.bytes_per_token["auto"] / mha.bytes_per_token["int4"] > Fraction(7, 2)
    assert set(mha.bytes_per_token) == {"auto", "float32", "int8", "int4", "fp8"}
    # MLA caches a single latent with no separate value: one scale per token.
    mla = kv_memory_report(load_shape("deepseek-v2")).row("MLA")
    assert mla.bytes_per_token["int8"] == 60 * (576 + 4)
    # auto follows the model dtype.
    assert kv_memory_report(shape, model_dtype_bytes=4).row("MHA").bytes_per_token["auto"] == MiB


def test_hf_config_json_and_its_directory(tmp_path: pathlib.Path):
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 16, "num_attention_heads": 32,
              "num_key_value_heads": 8, "hidden_size": 2048}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for model in (tmp_path / "config.json", tmp_path):
        shape = load_shape(str(model))
        assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (16, 32, 8, 64)
        assert shape.attention == "GQA"
    report = kv_memory_report(shape)
    assert report.row("real").layout.attention == "GQA"
    assert report.row("GQA").bytes_per_token["auto"] == 16 * 2 * 8 * 64 * 2


def test_deepseek_v3_style_hf_config(tmp_path: pathlib.Path):
    config = {"architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 61, "num_attention_heads": 128,
              "num_key_value_heads": 128, "hidden_size": 7168, "kv_lora_rank": 512, "q_lora_rank": 1536,
              "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    shape = load_shape(str(path))
    assert shape.is_mla and shape.attention == "MLA"
    assert kv_memory_report(shape).row("real").bytes_per_token["auto"] == 61 * 576 * 2


def test_mla_gguf_read_from_metadata(tmp_path: pathlib.Path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "deepseek2.gguf"
    writer = gguf.GGUFWriter(path, "deepseek2")  # an architecture the loader cannot run: metadata fallback
    writer.add_block_count(27)
    writer.add_head_count(16)
    writer.add_head_count_kv(16)
    writer.add_embedding_length(2048)
    writer.add_key_length(192)
    writer.add_value_length(128)
    writer.add_kv_lora_rank(512)
    writer.add_rope_dimension_count(64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shape = load_shape(str(path))
    assert (shape.num_layers, shape.kv_lora_rank, shape.qk_rope_head_dim, shape.qk_nope_head_dim,
            shape.v_head_dim) == (27, 512, 64, 128, 128)


def test_bundled_model_matches_the_allocated_cache():
    shape = load_shape(None)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (30, 3, 64)
    real = kv_memory_report(shape, model_dtype_bytes=4).row("real")
    assert real.layout.elements_per_token_per_layer == 2 * 3 * 64 == 384
    assert real.bytes_per_token["float32"] == 30 * 384 * 4 == 46_080

    from kvserve import LLM

    llm = LLM(kv_cache_memory=16 * 2**20, show_progress=False)  # the engine runs float32 on CPU
    assert llm.engine.kv_bytes_per_token == real.bytes_per_token["float32"]
    assert llm.stats().kv_cache_bytes == llm.engine.kv_manager.num_blocks * 16 * real.bytes_per_token["float32"]


def test_cli_table_and_json(capsys: pytest.CaptureFixture[str]):
    out = run_cli(["--model", "llama-2-7b", "--context", "4096", "--batch", "32"], capsys)
    assert "MHA (real)" in out and "524,288" in out and "512 KiB" in out and "64 GiB" in out
    assert "auto (float16)" in out  # the dtype the auto rows assume, said
    assert "auto (float32)" in run_cli(["--model", "llama-2-7b", "--model-dtype", "float32"], capsys)
    data = json.loads(run_cli(["--model", "llama-2-7b", "--context", "4096", "--batch", "32", "--json"], capsys))
    assert data["num_tokens"] == 4096 * 32
    mha = next(row for row in data["attention"] if row["is_real"])
    assert mha["attention"] == "MHA"
    assert mha["bytes_per_token"]["auto"] == 524_288
    assert mha["total_bytes"]["auto"] == 64 * GiB
    data = json.loads(run_cli(["--model", "deepseek-v2", "--json"], capsys))
    mla = next(row for row in data["attention"] if row["attention"] == "MLA")
    assert mla["is_real"] and mla["elements_per_token_per_layer"] == 576


def test_bad_model_is_a_clear_value_error(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model.*no such file"):
        run_cli(["--model", str(missing)], capsys)
    not_a_config = tmp_path / "config.json"
    not_a_config.write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="num_hidden_layers"):
        load_shape(str(not_a_config))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="garbage.gguf"):
        load_shape(str(garbage))
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelShape("bad", num_layers=1, num_heads=1, num_kv_heads=0, head_dim=1)
    with pytest.raises(ValueError, match="context"):
        kv_memory_report(load_shape("llama-2-7b"), context=0)
