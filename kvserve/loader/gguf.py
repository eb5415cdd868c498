"""Model source for llama.cpp GGUF files: HF-style config, dequantized weights, tokenizer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField, ReaderTensor
from gguf.quants import dequantize

from kvserve.loader import gguf_deepseek2

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# general.architecture -> (HF architectures entry, HF model_type).
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "deepseek2": ("DeepseekV2ForCausalLM", "deepseek_v2"),  # V3 when its experts are sigmoid-gated
}

# Architectures computed on dequantized weights: DeepSeek's MLA derives per-head matrices from kv_b_proj's floats.
_DEQUANTIZED_ARCHITECTURES = frozenset({"deepseek2"})

# llama.cpp's Gemma converters store each RMSNorm's (1 + weight); Hugging Face's Gemma norms add the 1 themselves.
_NORM_PLUS_ONE_ARCHITECTURES = frozenset({"gemma2", "gemma3"})

# llama.cpp's converter reorders Q/K rows into the interleaved rope layout only for llama.
_PERMUTED_ARCHITECTURES = frozenset({"llama"})

_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Gemma's four norms per layer.
_GEMMA_LAYER_NAMES = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# Where an architecture's layer tensors are named otherwise than Llama's.
_ARCH_LAYER_NAMES: dict[str, dict[str, str]] = {
    "gemma2": _GEMMA_LAYER_NAMES,
    "gemma3": _GEMMA_LAYER_NAMES,
    "deepseek2": gguf_deepseek2.LAYER_NAMES,
}

_LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Optional float `{arch}.rope.scaling.*` keys -> HF rope_scaling keys.
_ROPE_SCALING_FLOATS: dict[str, str] = {
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}

# Types kept as they are (float ones are always dequantized): the ones layers/gguf_ops.py computes on.
_FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})

_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_to_hf_name(name: str, architecture: str = "llama") -> str | None:
    """Map a GGUF tensor name to its Hugging Face parameter name, or None if unknown."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_TENSOR.fullmatch(name)
    names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(architecture, {})}
    if match is None or match.group(2) not in names:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{names[part]}.{kind}"


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rope -> HF rotate-half layout)."""
    # weight: [num_heads * head_dim, *rest] (rest is [in] for weights, [] for biases).
    # llama.cpp stored, per head, rows [x0, x_half, x1, x_half+1, ...], i.e. it viewed the
    # head as [2, head_dim/2] and transposed it; transposing the [head_dim/2, 2] view back
    # restores HF's [first half | second half] order.
    rest = weight.shape[1:]
    head_dim = weight.shape[0] // num_heads
    pairs = weight.reshape(num_heads, head_dim // 2, 2, *rest)  # [H, D/2, 2, *rest]
    return pairs.swapaxes(1, 2).reshape(weight.shape)  # [H, 2, D/2, *rest] -> [H*D, *rest]


def _round_f32(value: float) -> float:
    """Shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(value)))


@dataclasses.dataclass(frozen=True)
class GgufTensor:
    """A weight kept in its file's block format: `data` [out, row_bytes] uint8 (Q/K rows already in Hugging
    Face's order), `qtype` its ggml type, `shape` the logical (out, in)."""

    data: torch.Tensor
    qtype: GGMLQuantizationType
    shape: tuple[int, int]

    def to(self, device: torch.device | str) -> GgufTensor:
        """The same tensor on `device`."""
        return dataclasses.replace(self, data=self.data.to(device))

    def narrow(self, dim: int, start: int, length: int) -> GgufTensor:
        """Rows (dim 0) or columns (dim 1) [start, start + length): a tensor-parallel rank's part. Columns are cut
        at whole blocks only."""
        if dim == 0:
            return GgufTensor(self.data.narrow(0, start, length), self.qtype, (length, self.shape[1]))
        values_per_block, block_bytes = GGML_QUANT_SIZES[self.qtype]
        if start % values_per_block or length % values_per_block:
            raise ValueError(f"is {self.qtype.name}, whose blocks of {values_per_block} columns cannot be split at "
                             f"columns {start}..{start + length}; load with quantization='none'")
        cut = self.data.narrow(1, start // values_per_block * block_bytes, length // values_per_block * block_bytes)
        return GgufTensor(cut, self.qtype, (self.shape[0], length))

    def pad_rows(self, rows: int) -> GgufTensor:
        """Zero rows appended up to `rows` (a zero block is zeros: its scales are 0)."""
        padding = self.data.new_zeros(rows - self.shape[0], self.data.shape[1])
        return GgufTensor(torch.cat([self.data, padding]), self.qtype, (rows, self.shape[1]))


# Metadata arrays this long (a vocabulary's tokens, scores, types and merges) are stepped over, not parsed.
LONG_ARRAY = 4096


class GgufFileReader(GGUFReader):
    """gguf's GGUFReader over a plain ndarray view of its memory map, that steps over long metadata arrays.

    - The view: the same read-only pages, but each slice is numpy's C slicing, not numpy.memmap's Python-level
      __array_finalize__ (the bundled file's metadata 2.8 -> 0.8-1.1 s, most of a start-up).
    - Long arrays: gguf parses each element into its own array (Gemma 3's 262k-token vocabulary: 786k of them,
      ~3 s). The engine never reads them: the tokenizer is converted by transformers, from the file. Such a field
      keeps only its element type and length (`array_length`); `contents()` of it is empty.
    """

    @property
    def data(self) -> np.ndarray:
        return self._mapped

    @data.setter
    def data(self, mapped: np.memmap) -> None:  # set once, by GGUFReader.__init__
        self._mapped = mapped.view(np.ndarray)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, length = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        kind = GGUFValueType(int(item_type[0]))
        if int(length[0]) < LONG_ARRAY or (kind != GGUFValueType.STRING and kind not in self.gguf_scalar_to_np):
            return super()._get_field_parts(orig_offs, raw_type)  # short, or of arrays: gguf's own parse
        end = self._skip_array(orig_offs + 12, kind, int(length[0]))
        return end - orig_offs, [item_type, length], [], [GGUFValueType.ARRAY, kind]

    def _skip_array(self, offset: int, item_type: GGUFValueType, length: int) -> int:
        """The offset past `length` scalars or strings of `item_type` starting at `offset`."""
        scalar = self.gguf_scalar_to_np.get(item_type)
        if scalar is not None:
            return offset + np.dtype(scalar).itemsize * length
        raw, order = self.data, "little" if self.byte_order == "I" else "big"
        for _ in range(length):  # each string: a uint64 length, then its bytes
            offset += 8 + int.from_bytes(raw[offset:offset + 8].tobytes(), order)
        return offset


def array_length(field: ReaderField) -> int:
    """Elements of an array field (also of one GgufFileReader stepped over)."""
    return int(field.parts[4][0])  # parts: key length, key, value type, item type, length, ...


class GgufSource:
    """A GGUF checkpoint: metadata read eagerly, tensors dequantized lazily."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        try:
            self._reader = GgufFileReader(self.path)
        except Exception as exc:  # gguf raises ValueError, struct/numpy errors on garbage
            raise ValueError(self._unreadable(exc)) from exc
        if int(self._field("split.count", default=1)) > 1:
            raise ValueError(
                f"{self.path}: split GGUF files are not supported; merge them first "
                "(llama-gguf-split --merge)"
            )
        self.architecture = str(self._field("general.architecture", required=True))
        if self.architecture not in _ARCHITECTURES:
            raise ValueError(
                f"{self.path}: general.architecture={self.architecture!r} is not supported "
                f"(supported: {sorted(_ARCHITECTURES)})"
            )
        self._tensors = self._map_tensors()
        self.hf_config = self._build_hf_config()
        self.num_weight_tensors = len(self._tensors)

    @property
    def computes_on_blocks(self) -> bool:
        """Whether its matrices can be computed on in their block formats (quantization="gguf")."""
        return self.architecture not in _DEQUANTIZED_ARCHITECTURES

    def _unreadable(self, error: Exception) -> str:
        """Why the reader failed, in a user's words: not a GGUF file at all, or one cut short (numpy's reshape and
        index errors are what a truncated file's tensors give)."""
        with open(self.path, "rb") as file:
            magic = file.read(4)
        if magic != b"GGUF":
            return f"{self.path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')"
        size = self.path.stat().st_size
        return (f"{self.path}: truncated or corrupt GGUF file ({size:,} bytes; was a download or copy cut short?): "
                f"{error}")

    def _field(self, key: str, *, required: bool = False, default: Any = None) -> Any:
        """Return a scalar/string metadata value, or default when absent."""
        field = self._reader.get_field(key)
        if field is None:
            if required:
                raise ValueError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return field.contents()

    def _arch(self, suffix: str, *, required: bool = False, default: Any = None) -> Any:
        """Return the architecture-prefixed metadata value `{arch}.{suffix}`."""
        return self._field(f"{self.architecture}.{suffix}", required=required, default=default)

    def _map_tensors(self) -> list[tuple[str, ReaderTensor]]:
        """Pair every GGUF tensor with its HF name; reject tensors we cannot place."""
        mapped = []
        for tensor in self._reader.tensors:
            if tensor.name == "rope_freqs.weight":
                # Llama 3 rope scaling baked into per-frequency factors; HF needs the original
                # rope_scaling parameters, which the GGUF does not keep.
                raise ValueError(
                    f"{self.path}: rope_freqs (Llama 3 rope scaling) is not supported; "
                    "use the Hugging Face safetensors checkpoint instead"
                )
            hf_name = gguf_to_hf_name(tensor.name, self.architecture)
            if hf_name is None:
                raise ValueError(f"{self.path}: unexpected GGUF tensor {tensor.name!r}")
            mapped.append((hf_name, tensor))
        return mapped

    def _build_hf_config(self) -> dict[str, Any]:
        """Translate GGUF metadata into a Hugging Face config.json-style dict."""
        architecture, model_type = _ARCHITECTURES[self.architecture]
        hidden_size = int(self._arch("embedding_length", required=True))
        num_heads = int(self._arch("attention.head_count", required=True))
        names = {hf_name: tensor for hf_name, tensor in self._tensors}
        config = {
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": hidden_size,
            "intermediate_size": int(self._arch("feed_forward_length", required=True)),
            "num_hidden_layers": int(self._arch("block_count", required=True)),
            "num_attention_heads": num_heads,
            "num_key_value_heads": int(self._arch("attention.head_count_kv", default=num_heads)),
            "head_dim": self._head_dim(hidden_size, num_heads),
            "rms_norm_eps": _round_f32(
                self._arch("attention.layer_norm_rms_epsilon", default=1e-6)
            ),
            "rope_theta": _round_f32(self._arch("rope.freq_base", default=10000.0)),
            "rope_scaling": self._rope_scaling(),
            "max_position_embeddings": int(self._arch("context_length", required=True)),
            "vocab_size": self._vocab_size(names),
            "tie_word_embeddings": "lm_head.weight" not in names,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in names,
            "torch_dtype": "float32",
            **(self._gemma_config() if self.architecture in ("gemma2", "gemma3") else {}),
        }
        if self.architecture == "deepseek2":
            config.update(gguf_deepseek2.hf_config(self._arch, num_heads))
            gguf_deepseek2.yarn_mscale(config)
        return config

    def _gemma_config(self) -> dict[str, Any]:
        """Gemma's keys. What the GGUF may leave out takes llama.cpp's values for the released models: a global
        layer every sixth (Gemma 3) or second (Gemma 2), local RoPE theta 10k (Gemma 3), queries scaled by
        head_dim ** -0.5; Gemma 2's soft caps are in its metadata."""
        num_layers = int(self._arch("block_count", required=True))
        gemma3 = self.architecture == "gemma3"
        pattern = int(self._arch("attention.sliding_window_pattern", default=6 if gemma3 else 2))
        head_dim = self._head_dim(int(self._arch("embedding_length")), int(self._arch("attention.head_count")))
        config = {
            "layer_types": ["full_attention" if (index + 1) % pattern == 0 else "sliding_attention"
                            for index in range(num_layers)],
            "sliding_window": int(self._arch("attention.sliding_window", required=True)),
            "query_pre_attn_scalar": head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
        }
        if not gemma3:
            return {**config, "attn_logit_softcapping": self._arch("attn_logit_softcapping"),
                    "final_logit_softcapping": self._arch("final_logit_softcapping")}
        return {
            **config,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", **(self._rope_scaling() or {}),
                                   "rope_theta": _round_f32(self._arch("rope.freq_base", default=1_000_000.0))},
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": _round_f32(self._arch("rope.freq_base_swa", default=10000.0))},
            },
        }

    def _head_dim(self, hidden_size: int, num_heads: int) -> int:
        """Per-head size: explicit key length (Qwen3), else rope dims, else hidden/heads."""
        key_length = self._arch("attention.key_length")
        if key_length is not None:
            return int(key_length)
        return int(self._arch("rope.dimension_count", default=hidden_size // num_heads))

    def _vocab_size(self, names: dict[str, ReaderTensor]) -> int:
        """Rows of the embedding (what the model allocates); token list length as fallback."""
        embedding = names.get("model.embed_tokens.weight")
        if embedding is not None:
            return int(embedding.shape[-1])  # GGUF shape is reversed: [hidden, vocab]
        tokens = self._reader.get_field("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"{self.path}: no token_embd.weight and no tokenizer.ggml.tokens")
        return array_length(tokens)

    def _rope_scaling(self) -> dict[str, Any] | None:
        """HF-style rope_scaling from `{arch}.rope.scaling.*` (or legacy scale_linear)."""
        kind = self._arch("rope.scaling.type")
        factor = self._arch("rope.scaling.factor")
        if kind is None and self._arch("rope.scale_linear") is not None:
            kind, factor = "linear", self._arch("rope.scale_linear")
        if kind is None or kind == "none":
            return None
        scaling: dict[str, Any] = {"rope_type": str(kind)}
        if factor is not None:
            scaling["factor"] = _round_f32(factor)
        original = self._arch("rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        for suffix, hf_key in _ROPE_SCALING_FLOATS.items():
            value = self._arch(f"rope.scaling.{suffix}")
            if value is not None:
                scaling[hf_key] = _round_f32(value)
        return scaling

    def iter_weights(self, dtype: torch.dtype, keep_quantized: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor | GgufTensor]]:
        """Yield (HF name, tensor in `dtype`) for every tensor, dequantizing one at a time; with
        `keep_quantized`, block-quantized matrices come as GgufTensor instead (the file's bytes)."""
        if self.architecture == "deepseek2":
            for hf_name, array in gguf_deepseek2.weights(iter(self._tensors), self._dequantize):
                yield hf_name, torch.from_numpy(array).to(dtype)
            return
        for hf_name, tensor in self._tensors:
            if keep_quantized and tensor.tensor_type not in _FLOAT_TYPES and len(tensor.shape) == 2:
                yield hf_name, self._quantized(hf_name, tensor)
            else:
                yield hf_name, torch.from_numpy(self._dequantize(hf_name, tensor)).to(dtype)

    def _quantized(self, hf_name: str, tensor: ReaderTensor) -> GgufTensor:
        """One matrix as its rows of blocks, [out, row_bytes], Q/K rows unpermuted like the values would be."""
        rows = np.array(tensor.data).reshape(int(tensor.shape[1]), -1)  # a copy: the memmap stays read-only
        if self.architecture in _PERMUTED_ARCHITECTURES:
            rows = np.ascontiguousarray(self._unpermute(hf_name, rows))
        return GgufTensor(torch.from_numpy(rows), tensor.tensor_type, (int(tensor.shape[1]), int(tensor.shape[0])))

    def _dequantize(self, hf_name: str, tensor: ReaderTensor) -> np.ndarray:
        """Dequantize one tensor to float32 in HF shape, undoing the Q/K permutation."""
        # GGUF lists dims innermost-first ([in, out]); numpy/HF order is [out, in].
        hf_shape = tuple(int(dim) for dim in reversed(tensor.shape))
        try:
            array = dequantize(tensor.data, tensor.tensor_type).reshape(hf_shape)
        except NotImplementedError as exc:
            raise ValueError(
                f"{self.path}: tensor {tensor.name} has unsupported type {tensor.tensor_type.name}"
            ) from exc
        if self.architecture in _PERMUTED_ARCHITECTURES:
            array = self._unpermute(hf_name, array)
        if self.architecture in _NORM_PLUS_ONE_ARCHITECTURES and hf_name.endswith("norm.weight"):
            array = array - 1
        if not array.flags.writeable:
            # F32 tensors come back as views of the read-only memmap, which torch must not alias.
            array = array.copy()
        return np.ascontiguousarray(array, dtype=np.float32)

    def _unpermute(self, hf_name: str, array: np.ndarray) -> np.ndarray:
        """Apply unpermute_rope_rows to q_proj/k_proj weights and biases."""
        if ".self_attn.q_proj." in hf_name:
            return unpermute_rope_rows(array, self.hf_config["num_attention_heads"])
        if ".self_attn.k_proj." in hf_name:
            return unpermute_rope_rows(array, self.hf_config["num_key_value_heads"])
        return array

    def _tokenizer_without_config(self, error: Exception) -> PreTrainedTokenizerBase:
        """The tokenizer of a file whose architecture transformers' GGUF config reader does not know (deepseek2):
        its tokenizer metadata alone, built without AutoTokenizer's config lookup."""
        from transformers import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except Exception:
            raise ValueError(f"{self.path}: cannot build a tokenizer from GGUF ({error})") from error

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """Build the tokenizer from tokenizer.ggml.* metadata via transformers' GGUF support, or load the copy an
        earlier build saved (transformers parses the whole file again to convert it: ~10 s for the bundled model)."""
        from transformers import AutoTokenizer

        saved = tokenizer_cache_path(self.path)
        if saved.is_dir():
            try:
                return load_saved_tokenizer(saved)
            except Exception:  # a damaged copy: removed, rebuilt and saved again below
                shutil.rmtree(saved, ignore_errors=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except Exception as exc:  # transformers raises a zoo of types for bad tokenizers
            tokenizer = self._tokenizer_without_config(exc)
        template = self._field("tokenizer.chat_template")
        if template is not None and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = str(template)
        save_atomically(tokenizer, saved)
        return tokenizer


# tokenizer_config.json keys a saved tokenizer is built with (the rest, e.g. its class, are not options).
_TOKENIZER_OPTIONS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "sep_token", "cls_token",
                      "extra_special_tokens", "additional_special_tokens", "model_max_length", "chat_template",
                      "add_bos_token", "add_eos_token", "clean_up_tokenization_spaces", "padding_side")


def load_saved_tokenizer(saved: pathlib.Path) -> PreTrainedTokenizerBase:
    """A tokenizer `save_atomically` saved, read straight into a PreTrainedTokenizerFast from its tokenizer.json
    (the whole pipeline the converted class built). AutoTokenizer would parse that JSON five times in Python:
    Gemma 3's 33 MB took 3.0 s, this 1.2 s."""
    from transformers import PreTrainedTokenizerFast

    config = json.loads((saved / "tokenizer_config.json").read_text())
    template = saved / "chat_template.jinja"
    if template.is_file():
        config.setdefault("chat_template", template.read_text())
    options = {key: config[key] for key in _TOKENIZER_OPTIONS if key in config}
    return PreTrainedTokenizerFast(tokenizer_file=str(saved / "tokenizer.json"), **options)


def tokenizer_cache_path(path: pathlib.Path) -> pathlib.Path:
    """Where the tokenizer converted from the GGUF file at `path` is kept: named by the file (path, size,
    modification time) and the transformers version that converted it."""
    import transformers

    from kvserve.native import cache_dir

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return cache_dir() / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:16]


def save_atomically(tokenizer: PreTrainedTokenizerBase, target: pathlib.Path) -> None:
    """save_pretrained into a scratch directory renamed to `target`, so that a reader never sees half a copy; a
    cache that cannot be written (read-only home, another process first) is skipped."""
    scratch = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(dir=target.parent)
        tokenizer.save_pretrained(scratch)
        os.rename(scratch, target)
    except OSError:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
