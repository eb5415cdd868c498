"""A GGUF file dequantized by transformers into a float32 Hugging Face directory (what vLLM loads).

    python -m kvserve.bench.peers.hf_export MODEL.gguf OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path


def export_float32(gguf: Path, out: Path) -> None:
    """Write config.json, model.safetensors and the tokenizer of `gguf`, weights dequantized to float32."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    # transformers marks a model loaded from GGUF as quantized and refuses save_pretrained; the tensors are
    # plain float32 by now, so write them ourselves under a config without the marker.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # how vLLM picks its model class; save_pretrained would set it
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same storage as embed_tokens: safetensors refuses shared tensors
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


if __name__ == "__main__":
    export_float32(Path(sys.argv[1]), Path(sys.argv[2]))
