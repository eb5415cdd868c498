"""The int8, int4 and AWQ linear methods: fused layers loaded shard by shard compute the reference matmul of
their quantized weights (kernel and torch paths), AWQ tensors land in the int4 layout, and whole models load
through the one weight path with the embedding and LM head left dense."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvserve.attention.backend import AttentionRequirements
from kvserve.attention.torch_backend import TorchAttentionBackend
from kvserve.config import EngineConfig, ModelConfig
from kvserve.layers import int_ops
from kvserve.layers.linear import Linear
from kvserve.layers.quantization import UnquantizedLinearMethod, weight_only_method
from kvserve.layers.quantization.awq import AwqLinearMethod
from kvserve.layers.quantization.awq_format import to_awq
from kvserve.layers.quantization.cpu import CpuLinearMethod
from kvserve.layers.quantization.rtn import quantize_int4_groups, quantize_int8_rows
from kvserve.models.registry import build_model
from kvserve.platforms import CpuPlatform

KERNEL_PATHS = [None, int_ops] if int_ops.available() else [None]  # the dequantized weight, the compiled kernels
SHARDS = [64, 32, 32]  # a GQA-shaped fused QKV's output sizes
NUM_IN = 128


def _fused_layer(method: Any, bias: bool) -> Linear:
    layer = Linear(NUM_IN, sum(SHARDS), bias=bias, output_sizes=SHARDS)
    layer.set_method(method)
    return layer


def _reference(layer: Linear, dense: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    expected = x.double() @ dense.double().t()
    return (expected if layer.bias is None else expected + layer.bias.double()).float()


def _load_float_shards(layer: Linear, bias: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    shards = [torch.randn(rows, NUM_IN) for rows in SHARDS]
    for shard_id, tensor in enumerate(shards):
        layer.weight.weight_loader(layer.weight, tensor, shard_id)
        if bias:
            layer.bias.weight_loader(layer.bias, torch.randn(tensor.shape[0]), shard_id)
    layer.process_weights_after_loading()
    return shards


@pytest.mark.parametrize("kernels", KERNEL_PATHS, ids=lambda k: "kernel" if k is not None else "torch")
@pytest.mark.parametrize("bias", [False, True])
def test_int8_layer_quantizes_each_shard_on_its_rows(kernels: Any, bias: bool) -> None:
    layer = _fused_layer(weight_only_method("int8", UnquantizedLinearMethod(), kernels), bias)
    shards = _load_float_shards(layer, bias)
    parts = [quantize_int8_rows(shard) for shard in shards]
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, torch.cat([q for q, _ in parts]))
    assert torch.equal(layer.weight_scale, torch.cat([scale for _, scale in parts]))
    dense = torch.cat([q.float() * scale[:, None] for q, scale in parts])
    for rows in (1, 7):
        x = torch.randn(rows, NUM_IN)
        torch.testing.assert_close(layer(x), _reference(layer, dense, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernels", KERNEL_PATHS, ids=lambda k: "kernel" if k is not None else "torch")
@pytest.mark.parametrize(("group_size", "bias"), [(32, True), (64, False), (None, False)])
def test_int4_layer_quantizes_each_shard_in_groups(kernels: Any, group_size: int | None, bias: bool) -> None:
    layer = _fused_layer(weight_only_method("int4", UnquantizedLinearMethod(), kernels, group_size), bias)
    shards = _load_float_shards(layer, bias)
    groups = [quantize_int4_groups(shard, group_size or 128) for shard in shards]  # None: 128 divides 128
    assert layer.weight.shape == (sum(SHARDS), NUM_IN // 2) and layer.weight_scale.shape[1] == NUM_IN // (
        group_size or 128)
    dense = torch.cat([g.dequantize() for g in groups])
    for rows in (1, 7):
        x = torch.randn(rows, NUM_IN)
        torch.testing.assert_close(layer(x), _reference(layer, dense, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernels", KERNEL_PATHS, ids=lambda k: "kernel" if k is not None else "torch")
def test_awq_shards_become_the_int4_layout(kernels: Any) -> None:
    layer = _fused_layer(AwqLinearMethod(UnquantizedLinearMethod(), kernels), bias=True)
    assert layer.weight is None and {name for name, _ in layer.named_parameters()} == {
        "bias", "qweight", "qzeros", "scales"}
    torch.manual_seed(3)
    groups = [quantize_int4_groups(torch.randn(rows, NUM_IN), 32, scale_dtype=torch.float16) for rows in SHARDS]
    for shard_id, shard in enumerate(groups):
        for name, tensor in to_awq(shard).items():
            param = getattr(layer, name)
            param.weight_loader(param, tensor.float() if name == "scales" else tensor, shard_id)
        layer.bias.weight_loader(layer.bias, torch.randn(SHARDS[shard_id]), shard_id)
    layer.process_weights_after_loading()
    assert {name for name, _ in layer.named_parameters()} == {"bias", "weight", "weight_scale", "weight_min"}
    assert layer.weight.shape == (128, 64) and layer.weight_scale.shape == (128, 4)
    dense = torch.cat([g.dequantize() for g in groups])
    for rows in (1, 5):
        x = torch.randn(rows, NUM_IN)
        torch.testing.assert_close(layer(x), _reference(layer, dense, x), rtol=1e-5, atol=1e-4)


def test_awq_shard_shapes_are_checked() -> None:
    layer = _fused_layer(AwqLinearMethod(UnquantizedLinearMethod(), None), bias=False)
    with pytest.raises(ValueError, match=r"has shape \(128, 4\), expected \[\*, 8\] for 64 output rows"):
        layer.qweight.weight_loader(layer.qweight, torch.zeros(128, 4, dtype=torch.int32), 0)
    odd = Linear(NUM_IN, 12)
    odd.set_method(AwqLinearMethod(UnquantizedLinearMethod(), None))
    with pytest.raises(ValueError, match="AWQ packs eight per int32"):
        odd.scales.weight_loader(odd.scales, torch.zeros(4, 12), None)


def test_int4_group_size_must_fit_the_layer() -> None:
    with pytest.raises(ValueError, match="group size 96 does not fit input size 128"):
        Linear(NUM_IN, 8).set_method(weight_only_method("int4", UnquantizedLinearMethod(), None, 96))


# A tiny Qwen2 (QKV biases, GQA, untied LM head), as in test_weight_loading.py.
QWEN2: dict[str, Any] = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 96, "hidden_size": 64,
                         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "tie_word_embeddings": False}


def _model(quantization: str) -> torch.nn.Module:
    config = ModelConfig.from_hf_config(QWEN2)
    backend = TorchAttentionBackend(AttentionRequirements(torch.device("cpu"), "float32", use_window=False,
                                                          use_mla=False))
    model = build_model(config, 64, backend)
    CpuPlatform(EngineConfig.from_kwargs(quantization=quantization)).prepare_model(model, torch.float32, quantization)
    return model


def _checkpoint() -> dict[str, torch.Tensor]:
    hidden, inter, q, kv = 64, 128, 64, 32
    torch.manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(96, hidden), "model.norm.weight": torch.randn(hidden),
               "lm_head.weight": torch.randn(96, hidden)}
    for i in range(2):
        shapes = {"self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
                  "self_attn.v_proj.weight": (kv, hidden), "self_attn.q_proj.bias": (q,),
                  "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
                  "self_attn.o_proj.weight": (hidden, q), "mlp.gate_proj.weight": (inter, hidden),
                  "mlp.up_proj.weight": (inter, hidden), "mlp.down_proj.weight": (hidden, inter),
                  "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}
        tensors |= {f"model.layers.{i}.{name}": torch.randn(shape) for name, shape in shapes.items()}
    return tensors


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_a_dense_checkpoint_quantizes_at_load_leaving_embedding_and_lm_head_dense(quantization: str) -> None:
    model = _model(quantization)
    checkpoint = _checkpoint()
    model.load_weights(checkpoint.items())
    attn = model.model.layers[1].self_attn
    assert attn.qkv_proj.weight.dtype == (torch.int8 if quantization == "int8" else torch.uint8)
    assert isinstance(model.lm_head.method, CpuLinearMethod)
    assert torch.equal(model.lm_head.weight, checkpoint["lm_head.weight"])
    assert torch.equal(model.model.embed_tokens.weight, checkpoint["model.embed_tokens.weight"])
    x = torch.randn(3, 64)
    dense = torch.cat([checkpoint[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    bias = torch.cat([checkpoint[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"])
    # Quantization error only: int8 within ~1%, int4 within ~15% of the float layer's output.
    error = (attn.qkv_proj(x) - (x @ dense.t() + bias)).norm() / (x @ dense.t()).norm()
    assert error < (0.01 if quantization == "int8" else 0.15)


def test_an_int8_checkpoint_loads_as_stored_and_its_scales_only_once() -> None:
    checkpoint = _checkpoint()
    stored = dict(checkpoint)
    for name in [n for n in checkpoint if n.endswith("proj.weight") and n.startswith("model.layers")]:
        stored[name], stored[name + "_scale"] = quantize_int8_rows(checkpoint[name])
    model = _model("int8")
    model.load_weights(stored.items())
    down = model.model.layers[0].mlp.down_proj
    assert torch.equal(down.weight, stored["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(down.weight_scale, stored["model.layers.0.mlp.down_proj.weight_scale"])

    twice = dict(checkpoint) | {"model.layers.0.mlp.down_proj.weight_scale": torch.ones(64)}
    with pytest.raises(ValueError, match="down_proj.weight_scale"):
        _model("int8").load_weights(twice.items())
    without_scale = {name: t for name, t in stored.items() if name != "model.layers.0.mlp.down_proj.weight_scale"}
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\).*down_proj.weight_scale"):
        _model("int8").load_weights(without_scale.items())


class _Source:
    """A checkpoint's config and path, as the platform sees a model source."""

    def __init__(self, quantization_config: dict[str, Any] | None) -> None:
        self.path = "ckpt"
        self.hf_config = dict(QWEN2) | ({"quantization_config": quantization_config} if quantization_config else {})


def test_a_checkpoints_declared_quantization_is_the_default_and_the_only_choice() -> None:
    platform = CpuPlatform(EngineConfig())
    awq = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "GEMM"}
    assert platform.resolve_quantization(None, _Source(awq), torch.float32) == "awq"
    assert platform.resolve_quantization("awq", _Source(awq), torch.float32) == "awq"
    assert platform.resolve_quantization(None, _Source({"quant_method": "kvserve-int8"}), torch.float32) == "int8"
    assert platform.resolve_quantization("int4", _Source(None), torch.float32) == "int4"
    assert platform.resolve_quantization(None, _Source(None), torch.float32) is None
    with pytest.raises(ValueError, match="the checkpoint is awq-quantized .* load it with quantization='awq'"):
        platform.resolve_quantization("int8", _Source(awq), torch.float32)
    with pytest.raises(ValueError, match="quantization='awq' loads AutoAWQ checkpoints"):
        platform.resolve_quantization("awq", _Source(None), torch.float32)
    with pytest.raises(ValueError, match="ckpt: AWQ with bits=8"):
        platform.resolve_quantization(None, _Source(awq | {"bits": 8}), torch.float32)
    with pytest.raises(ValueError, match="quant_method 'gptq' is not supported"):
        platform.resolve_quantization(None, _Source({"quant_method": "gptq"}), torch.float32)
