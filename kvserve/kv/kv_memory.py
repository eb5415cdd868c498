"""KV-cache memory calculator: elements and bytes per token of a model's attention and its MHA/GQA/MQA/MLA equivalents.

Pure Python (no torch at import): the GGUF path imports the loader lazily. The storage cost of each
`kv_cache_dtype`, scales and zero points included, comes from the KV dtype table (`kv/dtypes.py`) that the
engine's cache is allocated by.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from kvserve.kv.dtypes import DEFAULT_INT4_GROUP_SIZE, KV_DTYPES, QUANTIZED_KV_DTYPES, kv_dtype

DEFAULT_GQA_KV_HEADS = 8  # GQA equivalent shown for MHA/MLA models (Llama-2-70B / Llama-3 use 8 KV heads)
MLA_LATENT_PER_HEAD_DIM = 4  # MLA equivalent of a non-MLA model: d_c = 4·d_h (DeepSeek-V2: 512 = 4·128)
MLA_ROPE_PER_HEAD_DIM = Fraction(1, 2)  # ... and d_rope = d_h/2 (DeepSeek-V2: 64 = 128/2)
# The columns of the report: auto (the model dtype), float32 (the engine's CPU default) and every quantized
# dtype; float16 / bfloat16 are `auto` at 2 bytes.
REPORTED_DTYPES = ("auto", "float32", *QUANTIZED_KV_DTYPES)


@dataclass(frozen=True)
class ModelShape:
    """The attention shape that decides KV-cache size; MLA models also set `kv_lora_rank` and its head dims."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_lora_rank: int | None = None  # d_c
    qk_rope_head_dim: int | None = None  # d_rope (the decoupled RoPE key, shared by all heads)
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    sliding_window: int | None = None  # a hybrid cache: `num_sliding_layers` layers keep only this many tokens
    num_sliding_layers: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{self.name}: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.is_mla and not (self.qk_rope_head_dim and self.qk_nope_head_dim and self.v_head_dim):
            raise ValueError(f"{self.name}: an MLA shape (kv_lora_rank={self.kv_lora_rank}) needs "
                             "qk_rope_head_dim, qk_nope_head_dim and v_head_dim")

    @property
    def is_mla(self) -> bool:
        """Whether the model caches a compressed latent (Multi-head Latent Attention)."""
        return bool(self.kv_lora_rank)

    @property
    def attention(self) -> str:
        """The model's own attention kind: MHA, GQA, MQA or MLA."""
        if self.is_mla:
            return "MLA"
        if self.num_kv_heads == 1:
            return "MQA"
        return "MHA" if self.num_kv_heads == self.num_heads else "GQA"


@dataclass(frozen=True)
class KVLayout:
    """What one layer caches per token: `num_kv_heads` heads of `key_dim` key and `value_dim` value elements."""

    attention: str
    num_kv_heads: int
    key_dim: int
    value_dim: int
    formula: str
    is_real: bool

    @property
    def elements_per_token_per_layer(self) -> int:
        """Cached elements per token in one layer (keys and values)."""
        return self.num_kv_heads * (self.key_dim + self.value_dim)

    def bytes_per_token(self, num_layers: int, kv_cache_dtype: str, model_dtype_bytes: int = 2) -> Fraction:
        """Bytes one token takes across `num_layers` layers, scales included (amortised for int4 keys)."""
        return num_layers * self.num_kv_heads * kv_dtype(kv_cache_dtype).head_bytes_per_token(
            self.key_dim, self.value_dim, model_dtype_bytes)


def kv_layouts(shape: ModelShape, gqa_kv_heads: int | None = None) -> tuple[list[KVLayout], list[str]]:
    """The MHA, GQA, MQA and MLA layouts of `shape` (its real one marked), and notes on what was assumed.

    Non-MLA model: d_h = head_dim; the MLA equivalent takes d_c = 4·d_h and d_rope = d_h/2 (DeepSeek-V2's ratio).
    MLA model: MHA/GQA/MQA use its n_h with keys of qk_nope_head_dim and values of v_head_dim (d_h = 128 for
    DeepSeek-V2/V3), i.e. the 2·n_h·d_h of the DeepSeek-V2 paper's comparison; the decoupled RoPE key is left out.
    """
    notes = []
    n_h, real = shape.num_heads, shape.attention
    if shape.is_mla:
        assert shape.qk_nope_head_dim and shape.v_head_dim and shape.qk_rope_head_dim and shape.kv_lora_rank
        key_dim, value_dim = shape.qk_nope_head_dim, shape.v_head_dim
        d_c, d_rope = shape.kv_lora_rank, shape.qk_rope_head_dim
        notes.append(f"MHA/GQA/MQA equivalents of this MLA model use its n_h={n_h}, keys of qk_nope_head_dim="
                     f"{key_dim} and values of v_head_dim={value_dim} (the decoupled RoPE key of {d_rope} is left "
                     "out, as in the DeepSeek-V2 paper's 2·n_h·d_h)")
        n_kv = gqa_kv_heads or DEFAULT_GQA_KV_HEADS
    else:
        key_dim = value_dim = shape.head_dim
        d_c = MLA_LATENT_PER_HEAD_DIM * shape.head_dim
        d_rope = int(MLA_ROPE_PER_HEAD_DIM * shape.head_dim)
        notes.append(f"MLA equivalent assumes d_c = 4·d_h = {d_c} and d_rope = d_h/2 = {d_rope} "
                     "(DeepSeek-V2's ratio: 512 = 4·128, 64 = 128/2); this model is not MLA")
        n_kv = gqa_kv_heads or (shape.num_kv_heads if real == "GQA" else DEFAULT_GQA_KV_HEADS)
    n_kv = min(n_kv, n_h)
    if real != "GQA":
        notes.append(f"GQA equivalent assumes n_kv={n_kv} KV heads (the model is {real})")

    def kv_formula(heads: str, n: int) -> str:
        if key_dim == value_dim:
            return f"2·{heads}d_h = 2·{n}·{key_dim}"
        return f"{heads}(d_k + d_v) = {n}·({key_dim} + {value_dim})"

    layouts = [
        KVLayout("MHA", n_h, key_dim, value_dim, kv_formula("n_h·", n_h), real == "MHA"),
        KVLayout("GQA", n_kv, key_dim, value_dim, kv_formula("n_kv·", n_kv), real == "GQA"),
        KVLayout("MQA", 1, key_dim, value_dim, kv_formula("", 1), real == "MQA"),
        # MLA caches one latent per token, read as both key and value: a single head with no separate value.
        KVLayout("MLA", 1, d_c + d_rope, 0, f"d_c + d_rope = {d_c} + {d_rope}", real == "MLA"),
    ]
    return layouts, notes


def _number(value: Fraction) -> int | float:
    """An exact byte count as an int, or a float when amortised scales make it fractional."""
    return int(value) if value.denominator == 1 else float(value)


@dataclass(frozen=True)
class KVMemoryRow:
    """One attention layout's cache cost: elements per token per layer, bytes per token and totals per dtype."""

    layout: KVLayout
    bytes_per_token: dict[str, Fraction]
    total_bytes: dict[str, Fraction]


@dataclass(frozen=True)
class KVMemoryReport:
    """The calculator's answer for one model, context length and batch size."""

    shape: ModelShape
    context: int
    batch: int
    model_dtype_bytes: int
    rows: list[KVMemoryRow]
    notes: list[str] = field(default_factory=list)
    # A hybrid cache (sliding-window layers hold min(context, window) tokens): the model's own layout's bytes per
    # token of context, averaged over the context, per kv_cache_dtype; None for a model without such layers.
    hybrid_bytes_per_token: dict[str, Fraction] | None = None

    def row(self, attention: str) -> KVMemoryRow:
        """The row of `attention` (MHA, GQA, MQA, MLA) or `real` for the model's own."""
        for row in self.rows:
            if row.layout.attention == attention or (attention == "real" and row.layout.is_real):
                return row
        raise KeyError(attention)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (byte counts are ints, or floats where int4 key scales are amortised)."""
        return {
            "model": {"name": self.shape.name, "attention": self.shape.attention,
                      "num_layers": self.shape.num_layers, "num_heads": self.shape.num_heads,
                      "num_kv_heads": self.shape.num_kv_heads, "head_dim": self.shape.head_dim,
                      "kv_lora_rank": self.shape.kv_lora_rank, "qk_rope_head_dim": self.shape.qk_rope_head_dim,
                      "qk_nope_head_dim": self.shape.qk_nope_head_dim, "v_head_dim": self.shape.v_head_dim},
            "context": self.context,
            "batch": self.batch,
            "num_tokens": self.context * self.batch,
            "model_dtype_bytes": self.model_dtype_bytes,
            "kv_cache_dtypes": {name: KV_DTYPES[name].description for name in REPORTED_DTYPES},
            "attention": [
                {"attention": row.layout.attention, "is_real": row.layout.is_real, "formula": row.layout.formula,
                 "num_kv_heads": row.layout.num_kv_heads, "key_dim": row.layout.key_dim,
                 "value_dim": row.layout.value_dim,
                 "elements_per_token_per_layer": row.layout.elements_per_token_per_layer,
                 "bytes_per_token": {k: _number(v) for k, v in row.bytes_per_token.items()},
                 "total_bytes": {k: _number(v) for k, v in row.total_bytes.items()}}
                for row in self.rows
            ],
            "hybrid": None if self.hybrid_bytes_per_token is None else {
                "num_sliding_layers": self.shape.num_sliding_layers, "sliding_window": self.shape.sliding_window,
                "bytes_per_token": {k: _number(v) for k, v in self.hybrid_bytes_per_token.items()},
                "total_bytes": {k: _number(v * self.context * self.batch)
                                for k, v in self.hybrid_bytes_per_token.items()}},
            "notes": self.notes,
        }


def kv_memory_report(shape: ModelShape, context: int = 4096, batch: int = 1, model_dtype_bytes: int = 2,
                     gqa_kv_heads: int | None = None) -> KVMemoryReport:
    """Elements per token per layer, bytes per token and totals for `context` tokens × `batch` sequences."""
    for name, value in (("context", context), ("batch", batch), ("model_dtype_bytes", model_dtype_bytes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    layouts, notes = kv_layouts(shape, gqa_kv_heads)
    rows = []
    for layout in layouts:
        per_token = {name: layout.bytes_per_token(shape.num_layers, name, model_dtype_bytes)
                     for name in REPORTED_DTYPES}
        rows.append(KVMemoryRow(layout, per_token, {k: v * context * batch for k, v in per_token.items()}))
    hybrid = None
    if shape.num_sliding_layers and shape.sliding_window:
        # Per token of context: full layers hold every token, sliding ones min(context, window) of them.
        held = Fraction(shape.num_layers - shape.num_sliding_layers) + Fraction(
            shape.num_sliding_layers * min(context, shape.sliding_window), context)
        real = next(row for row in rows if row.layout.is_real)
        hybrid = {k: v * held / shape.num_layers for k, v in real.bytes_per_token.items()}
    notes.append(f"auto = the model dtype, taken as {model_dtype_bytes} bytes per element")
    notes.append(f"int4 key scales are amortised over groups of {DEFAULT_INT4_GROUP_SIZE} tokens; the newest, "
                 "incomplete group of each running request stays in the model dtype (a per-request cost, not counted "
                 "here)")
    return KVMemoryReport(shape, context, batch, model_dtype_bytes, rows, notes, hybrid)


# ---------------------------------------------------------------------------------------------- model shapes

BUILTIN_SHAPES: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape("llama-2-7b", num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128),
    "deepseek-v2": ModelShape("deepseek-v2", num_layers=60, num_heads=128, num_kv_heads=128, head_dim=192,
                              kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
}


def shape_from_hf_config(cfg: dict[str, Any], name: str) -> ModelShape:
    """Read the attention shape from an HF config.json dict (Llama-style or DeepSeek-V2/V3 MLA)."""
    if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]  # multimodal configs nest the language model's
    try:
        num_layers = int(cfg["num_hidden_layers"])
        num_heads = int(cfg["num_attention_heads"])
    except KeyError as error:
        raise ValueError(f"{name}: config has no {error.args[0]!r}; not a decoder config.json") from error
    num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
    if cfg.get("kv_lora_rank"):
        try:
            rope, nope, v = (int(cfg[k]) for k in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"))
        except KeyError as error:
            raise ValueError(f"{name}: MLA config (kv_lora_rank) has no {error.args[0]!r}") from error
        return ModelShape(name, num_layers, num_heads, num_kv_heads, nope + rope, kv_lora_rank=int(cfg["kv_lora_rank"]),
                          qk_rope_head_dim=rope, qk_nope_head_dim=nope, v_head_dim=v)
    head_dim = cfg.get("head_dim")
    if not head_dim:
        if "hidden_size" not in cfg:
            raise ValueError(f"{name}: config has neither 'head_dim' nor 'hidden_size'")
        head_dim = int(cfg["hidden_size"]) // num_heads
    num_sliding = sum(kind == "sliding_attention" for kind in cfg.get("layer_types") or [])
    window = cfg.get("sliding_window") if num_sliding else None
    return ModelShape(name, num_layers, num_heads, num_kv_heads, int(head_dim), sliding_window=window,
                      num_sliding_layers=num_sliding if window else 0)


def _shape_from_gguf_metadata(path: pathlib.Path) -> ModelShape:
    """Read the attention shape straight from GGUF metadata, for architectures the loader cannot run (deepseek2)."""
    from kvserve.loader.gguf import GgufFileReader

    reader = GgufFileReader(path)

    def get(key: str) -> Any:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    arch = get("general.architecture")
    num_layers, num_heads = get(f"{arch}.block_count"), get(f"{arch}.attention.head_count")
    if arch is None or num_layers is None or num_heads is None:
        raise ValueError(f"{path}: GGUF metadata lacks general.architecture, block_count or attention.head_count")
    cfg: dict[str, Any] = {"num_hidden_layers": num_layers, "num_attention_heads": num_heads,
                           "num_key_value_heads": get(f"{arch}.attention.head_count_kv"),
                           "hidden_size": get(f"{arch}.embedding_length"),
                           "head_dim": get(f"{arch}.attention.key_length")}
    kv_lora_rank = get(f"{arch}.attention.kv_lora_rank")
    if kv_lora_rank:
        # llama.cpp's deepseek2: key_length = nope + rope per head (the *_mla keys when the file absorbs MLA).
        rope = get(f"{arch}.rope.dimension_count")
        key_length = get(f"{arch}.attention.key_length_mla") or get(f"{arch}.attention.key_length")
        value_length = get(f"{arch}.attention.value_length_mla") or get(f"{arch}.attention.value_length")
        if rope is None or key_length is None or value_length is None:
            raise ValueError(f"{path}: MLA GGUF lacks rope.dimension_count, attention.key_length or value_length")
        cfg.update(kv_lora_rank=kv_lora_rank, qk_rope_head_dim=rope, qk_nope_head_dim=int(key_length) - int(rope),
                   v_head_dim=value_length)
    return shape_from_hf_config(cfg, str(path))


def load_shape(model: str | os.PathLike[str] | None) -> ModelShape:
    """Shape of a built-in name (llama-2-7b, deepseek-v2), an HF config.json or its directory, a GGUF file, or None.

    None is the bundled model. GGUF files and HF directories go through `open_model` (the engine's own path), so
    the figures match what the engine allocates; a GGUF architecture the loader cannot run falls back to metadata.
    """
    if model is not None and str(model).lower() in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[str(model).lower()]
    path = None if model is None else pathlib.Path(model).expanduser()
    if path is not None and path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path is not None and path.is_file() and path.suffix.lower() == ".json":
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable JSON config ({error})") from error
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: config.json is not a JSON object")
        return shape_from_hf_config(cfg, str(path))
    from kvserve.loader.weights import find_model_package, open_model  # imports torch: not at this module's import

    if path is not None and not path.exists() and find_model_package(str(model)) is None:
        raise ValueError(f"--model {model}: no such file or directory, and not a built-in shape "
                         f"(built-in: {', '.join(BUILTIN_SHAPES)}); expected a .gguf file, a config.json or its "
                         "directory")
    try:
        source = open_model(model)
    except ValueError as error:
        if path is None or path.suffix.lower() != ".gguf":
            raise
        try:
            return _shape_from_gguf_metadata(path)
        except Exception:  # the loader's error names the real problem better than the fallback's
            raise error from None
    name = "bundled SmolLM2-135M-Instruct" if model is None else str(source.path)
    return shape_from_hf_config(source.hf_config, name)


# ---------------------------------------------------------------------------------------------- formatting

def format_bytes(num_bytes: Fraction | int | float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (B, KiB, MiB, GiB, TiB)."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:,.0f} {unit}" if unit == "B" or value == int(value) else f"{value:,.2f} {unit}"
        value /= 1024
    return f"{value:,.0f} TiB" if value == int(value) else f"{value:,.2f} TiB"


def format_report(report: KVMemoryReport, model_dtype: str | None = None) -> str:
    """A readable table: per layout, elements per token per layer, bytes per token and total per kv_cache_dtype
    (the `auto` rows named with `model_dtype`, the dtype they stand for, when given)."""
    shape = report.shape
    lines = [f"model: {shape.name} ({shape.attention}): {shape.num_layers} layers, {shape.num_heads} heads, "
             + (f"kv_lora_rank {shape.kv_lora_rank}, qk_rope_head_dim {shape.qk_rope_head_dim}, qk_nope_head_dim "
                f"{shape.qk_nope_head_dim}, v_head_dim {shape.v_head_dim}" if shape.is_mla
                else f"{shape.num_kv_heads} KV heads, head_dim {shape.head_dim}"),
             f"context {report.context:,} tokens × batch {report.batch} = {report.context * report.batch:,} tokens",
             ""]
    header = ["attention", "elements/token/layer", "kv_cache_dtype", "bytes/token", "per token", "context × batch"]
    table = []
    for row in report.rows:
        label = row.layout.attention + (" (real)" if row.layout.is_real else "")
        for index, dtype in enumerate(REPORTED_DTYPES):
            per_token = row.bytes_per_token[dtype]
            exact = f"{_number(per_token):,}" if per_token.denominator == 1 else f"{float(per_token):,.2f}"
            table.append([label if index == 0 else "",
                          f"{row.layout.elements_per_token_per_layer:,} = {row.layout.formula}" if index == 0 else "",
                          f"auto ({model_dtype})" if dtype == "auto" and model_dtype else dtype, exact,
                          format_bytes(per_token), format_bytes(row.total_bytes[dtype])])
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    right = {3, 4, 5}

    def render(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs)

    lines += [render(header), render(["-" * w for w in widths])]
    for index, cells in enumerate(table):
        if index and cells[0]:
            lines.append("")
        lines.append(render(cells).rstrip())
    lines.append("")
    if report.hybrid_bytes_per_token is not None:
        lines += _hybrid_lines(report, model_dtype)
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def _hybrid_lines(report: KVMemoryReport, model_dtype: str | None) -> list[str]:
    """What the hybrid cache holds at this context, per dtype, against a cache of every layer."""
    shape, real = report.shape, report.row("real")
    lines = [f"hybrid KV cache (what kvserve allocates): {shape.num_layers - shape.num_sliding_layers} full layers, "
             f"{shape.num_sliding_layers} sliding-window layers holding at most {shape.sliding_window:,} tokens"]
    for dtype, per_token in report.hybrid_bytes_per_token.items():
        label = f"auto ({model_dtype})" if dtype == "auto" and model_dtype else dtype
        ratio = float(real.bytes_per_token[dtype] / per_token)
        lines.append(f"  {label:>16}: {format_bytes(per_token)} per token of context, "
                     f"{format_bytes(per_token * report.context * report.batch)} in all: {ratio:.2f}x smaller")
    return [*lines, ""]
