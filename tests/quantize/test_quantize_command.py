"""`kvserve quantize` on tiny random Llama / Qwen2 checkpoints: AutoAWQ's layout and config, AWQ's folding keeps
the float model, kvserve reads back exactly what was written, and the int8 checkpoint is int8-at-load's."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from kvserve import LLM, SamplingParams
from kvserve.cli import main
from kvserve.config import ModelConfig
from kvserve.layers.quantization.awq_format import awq_quantization_config, from_awq
from kvserve.loader.weights import open_model
from kvserve.quantize.awq_search import ScalingGroup, folded_scales, llama_scaling_groups, search_scale
from kvserve.quantize.checkpoint_writer import fold_scales
from kvserve.quantize.command import QuantizeOptions, quantize

PROMPTS = [[1, 520, 3000, 45, 8800, 17, 99, 250], list(range(300, 341))]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _save_tiny(path: pathlib.Path, tokenizer: Any, config_name: str = "LlamaConfig") -> pathlib.Path:
    """A 2-layer GQA model (hidden 64, 4 heads, 2 KV heads) with peaked logits, and the bundled tokenizer."""
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        initializer_range=0.15, rope_theta=10000.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # uneven norm weights and (Qwen2) biases, so that a folding bug cannot hide at 1 or 0
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.uniform_(0.5, 2.0)
            elif name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> pathlib.Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    words = "the river rises in the hills and runs past seven towns to a wide grey sea".split()
    path.write_text("".join(" ".join(words[i % 7:] + words[:i % 7]) + f" {i}\n" for i in range(200)))
    return path


def _greedy(model: pathlib.Path, **options: Any) -> list[list[int]]:
    llm = LLM(model=str(model), kv_cache_memory=8 * 2**20, show_progress=False, **options)
    try:
        return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY,
                                                              use_tqdm=False)]
    finally:
        llm.engine.shutdown()


def _tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory: pytest.TempPathFactory, tiny: pathlib.Path,
            calibration_text: pathlib.Path) -> pathlib.Path:
    out = tmp_path_factory.mktemp("awq") / "out"
    summary = quantize(QuantizeOptions(method="awq", model=str(tiny), out=str(out),
                                       calibration_text=str(calibration_text), calibration_tokens=256,
                                       calibration_seq_len=64, search_rows=128, alpha_grid=5))
    assert summary["group_size"] == 64 and summary["awq"]["layer_groups"] == 8
    return out


def test_awq_checkpoint_has_autoawqs_tensors_and_config(awq_dir: pathlib.Path) -> None:
    config = json.loads((awq_dir / "config.json").read_text())
    assert config["quantization_config"] == awq_quantization_config(64) == {
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None}
    tensors = _tensors(awq_dir)
    layer = "model.layers.1."
    for name, (num_in, num_out) in {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32),
                                    "mlp.down_proj": (128, 64), "mlp.up_proj": (64, 128)}.items():
        assert tensors[f"{layer}{name}.qweight"].shape == (num_in, num_out // 8)
        assert tensors[f"{layer}{name}.qweight"].dtype == torch.int32
        assert tensors[f"{layer}{name}.qzeros"].shape == (num_in // 64, num_out // 8)
        assert tensors[f"{layer}{name}.scales"].shape == (num_in // 64, num_out)
        assert tensors[f"{layer}{name}.scales"].dtype == torch.float16
        assert f"{layer}{name}.weight" not in tensors
    assert tensors["lm_head.weight"].dtype == torch.float32 and f"{layer}input_layernorm.weight" in tensors
    assert (awq_dir / "tokenizer.json").is_file()


def test_kvserve_reads_the_awq_checkpoint_as_written(awq_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # The same weights dequantized by the format's definition into a float checkpoint: the same greedy tokens.
    tensors = _tensors(awq_dir)
    dense = {name: t for name, t in tensors.items() if not name.endswith(("qweight", "qzeros", "scales"))}
    for name in [n for n in tensors if n.endswith(".qweight")]:
        prefix = name.removesuffix(".qweight")
        groups = from_awq(tensors[name], tensors[prefix + ".qzeros"], tensors[prefix + ".scales"])
        dense[prefix + ".weight"] = groups.dequantize()
    save_file(dense, str(tmp_path / "model.safetensors"))
    config = json.loads((awq_dir / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    open_model(awq_dir).load_tokenizer().save_pretrained(tmp_path)
    assert _greedy(awq_dir) == _greedy(tmp_path)


@pytest.mark.parametrize("config_name", ["LlamaConfig", "Qwen2Config"])
def test_folding_scales_keeps_the_float_model(config_name: str, tmp_path: pathlib.Path, tokenizer: Any) -> None:
    source_dir = _save_tiny(tmp_path / "source", tokenizer, config_name)
    source = open_model(source_dir)
    groups = llama_scaling_groups(ModelConfig.from_hf_config(source.hf_config))
    torch.manual_seed(1)
    in_sizes = {"qkv_proj": 64, "o_proj": 64, "gate_up_proj": 64, "down_proj": 128}
    scales = {g.module: g.shared(torch.rand(in_sizes[g.module.rsplit(".", 1)[1]]) * 4 + 0.25) for g in groups}
    column_scales, divisors = folded_scales(groups, scales)
    folded = {name: fold_scales(name, t, column_scales, divisors) for name, t in source.iter_weights(torch.float32)}
    assert not torch.equal(folded["model.layers.0.self_attn.v_proj.weight"],
                           dict(source.iter_weights(torch.float32))["model.layers.0.self_attn.v_proj.weight"])
    save_file(folded, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((source_dir / "config.json").read_text())
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(source_dir).eval()(ids).logits
        logits = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_search_scales_up_salient_channels_and_beats_rtn() -> None:
    torch.manual_seed(2)
    x = torch.randn(256, 128)
    x[:, :4] *= 30  # four salient input channels, as LLM activations have
    weight = torch.randn(96, 128)
    group = ScalingGroup("m", (), ())
    result = search_scale(x, weight, x.abs().mean(dim=0), group, 64, 10)
    assert result.alpha > 0 and result.error < 0.8 * result.rtn_error
    assert result.scale[:4].min() > result.scale[4:].max()  # the salient channels get the largest scales


def test_int8_checkpoint_is_int8_at_load(tiny: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "int8"
    assert main(["quantize", "--method", "int8", "--model", str(tiny), "--out", str(out)]) is None
    tensors = _tensors(out)
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (64,)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "kvserve-int8"
    assert _greedy(out) == _greedy(tiny, quantization="int8")


def test_int4_checkpoint_is_round_to_nearest_in_autoawqs_layout(tiny: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "int4"
    quantize(QuantizeOptions(method="int4", model=str(tiny), out=str(out), group_size=32))
    tensors = _tensors(out)
    source = dict(open_model(tiny).iter_weights(torch.float32))
    name = "model.layers.1.mlp.gate_proj"
    groups = from_awq(tensors[name + ".qweight"], tensors[name + ".qzeros"], tensors[name + ".scales"].float())
    assert groups.group_size == 32
    error = (groups.dequantize() - source[name + ".weight"]).abs()  # [out, in] within half a step of its group
    assert (error <= groups.scale.repeat_interleave(32, dim=1) / 2 + 1e-6).all()
    assert LLM(model=str(out), kv_cache_memory=8 * 2**20, show_progress=False).engine.runner.quantization == "awq"


def test_bad_requests_are_named(tiny: pathlib.Path, awq_dir: pathlib.Path, tmp_path: pathlib.Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    cases = [(["--method", "awq", "--model", str(tiny), "--out", str(tmp_path / "a")], "needs --calibration-text"),
             (["--method", "int8", "--model", str(tiny), "--out", str(awq_dir)], "already holds a checkpoint"),
             (["--method", "int8", "--model", str(awq_dir), "--out", str(tmp_path / "b")], "is quantized already"),
             (["--method", "int4", "--model", str(tiny), "--out", str(tmp_path / "c"), "--group-size", "48"],
              "group size 48 does not fit")]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["quantize", *args])
        assert message in str(exit_info.value)
