"""Which quantization a checkpoint's config.json declares (`quantization_config`), and the kvserve int8 one.

kvserve reads two quantized Hugging Face formats: AutoAWQ's GEMM layout (4-bit, zero point; awq_format.py) and
its own int8 one, written by `kvserve quantize --method int8`: each linear layer's `weight` int8 [out, in] and
`weight_scale` float32 [out] (W = weight * weight_scale[:, None]), which is the int8 method's own layout, so it
loads by copy; embeddings and the LM head stay in float.
"""

from __future__ import annotations

from typing import Any

INT8_QUANT_METHOD = "kvserve-int8"


def int8_quantization_config() -> dict[str, Any]:
    """config.json's `quantization_config` for a kvserve int8 checkpoint."""
    return {"quant_method": INT8_QUANT_METHOD, "bits": 8, "symmetric": True, "granularity": "output_channel",
            "modules_to_not_convert": ["lm_head"]}


def checkpoint_quantization(hf_config: dict[str, Any], where: object) -> str | None:
    """The `quantization` that reads a checkpoint with this config ("awq", "int8"), or None for a dense one;
    ValueError naming the field for a format kvserve cannot read."""
    config = hf_config.get("quantization_config")
    if not config:
        return None
    method = config.get("quant_method")
    if method == INT8_QUANT_METHOD:
        return "int8"
    if method != "awq":
        raise ValueError(f"{where}: quantization_config.quant_method {method!r} is not supported; kvserve reads "
                         f"'awq' (AutoAWQ GEMM) and {INT8_QUANT_METHOD!r}")
    bits = config.get("bits", config.get("w_bit"))
    version = str(config.get("version", "gemm")).lower()
    if bits != 4 or not config.get("zero_point", True) or version != "gemm":
        raise ValueError(f"{where}: AWQ with bits={bits}, zero_point={config.get('zero_point')}, version={version!r}"
                         f" is not supported; kvserve reads 4-bit GEMM checkpoints with zero points")
    if config.get("modules_to_not_convert"):
        raise ValueError(f"{where}: AWQ quantization_config.modules_to_not_convert "
                         f"{config['modules_to_not_convert']} is not supported (every linear layer must be AWQ)")
    return "awq"
