"""Configuration: frozen dataclasses, the one source of truth for engine options and CLI flags.

EngineConfig groups the options in sub-configs (load, cache, scheduler, parallel, speculative, platform); each
option keeps one flat name, unique across them, for `LLM(**kwargs)` and the CLI. ModelConfig is the checkpoint's
architecture shape. No torch at import: the scheduler and KV manager import this module.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvserve.kv.dtypes import DEFAULT_INT4_GROUP_SIZE, KV_CACHE_DTYPES, MODEL_DTYPES, torch_dtype

if TYPE_CHECKING:
    import torch

DEFAULT_BLOCK_SIZE = 16
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
QUANTIZATION_METHODS = ("none", "gguf", "int8", "int4", "awq")


_QWEN2_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, read from an HF-style config dict."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on the Q/K/V projections
    o_proj_bias: bool = False
    use_qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # The whole HF config dict, for architecture-specific fields (DeepSeek's MLA ranks and MoE routing).
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict (or the same keys translated from GGUF)."""
        architectures = cfg.get("architectures") or []
        if not architectures:
            raise ValueError("model config has no 'architectures' entry")
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        arch = architectures[0]
        rope_theta, rope_scaling = _rope_settings(cfg)
        return cls(
            architecture=arch,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            # Qwen2 always has QKV bias (Qwen2-MoE says so in qkv_bias); Llama-family configs say so with
            # attention_bias.
            attention_bias=cfg.get("attention_bias", cfg.get("qkv_bias", arch in _QWEN2_ARCHITECTURES)),
            # Llama's attention_bias covers o_proj too; Qwen2's QKV bias does not.
            o_proj_bias=cfg.get("attention_bias", False) and arch not in _QWEN2_ARCHITECTURES,
            use_qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            extra=dict(cfg),
        )


@dataclass(frozen=True)
class LoadConfig:
    """What to load and where: the checkpoint, its dtype, the device, the sampling seed."""

    model: str | None = field(default=None, metadata={"help": "a .gguf file, an HF directory, "
                                                      "or nothing for the bundled SmolLM2-135M"})
    dtype: str = field(default="float32", metadata={"help": "weights and activations dtype"})
    quantization: str | None = field(default=None, metadata={
        "help": "how weights are held and computed: gguf (a .gguf file's own block formats, on kvserve's CPU "
                "kernels; the default for .gguf files on a float32 CPU), none (dequantized to dtype), int8 (per "
                "output channel) or int4 (per group, round-to-nearest), both quantized at load, or awq (AutoAWQ "
                "checkpoints; the default for them)"})
    quantization_group_size: int | None = field(default=None, metadata={
        "help": "int4: inputs per scale and zero point, a multiple of 32 dividing each layer's input size "
                "(default: 128, or the largest of 64 and 32 that divides it)"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    seed: int = field(default=0, metadata={"help": "seed of unseeded random sampling"})
    chat_template: str | None = field(default=None, metadata={
        "help": "a Jinja chat template, or the path of a file holding one, replacing the model's (or giving one "
                "to a model without, e.g. Gemma 3's GGUF)"})

    def __post_init__(self) -> None:
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(MODEL_DTYPES)}, got {self.dtype!r}")
        if self.quantization not in (None, *QUANTIZATION_METHODS):
            raise ValueError(f"quantization must be one of {list(QUANTIZATION_METHODS)}, got {self.quantization!r}")
        size = self.quantization_group_size
        if size is not None and (size <= 0 or size % 32):
            raise ValueError(f"quantization_group_size must be a positive multiple of 32, got {size}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by `dtype` (imports torch)."""
        return torch_dtype(self.dtype)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size, storage dtype, memory budget, int4 groups, sinks + window, prefix reuse."""

    block_size: int | None = field(default=None, metadata={
        "help": f"tokens per KV-cache block; default {DEFAULT_BLOCK_SIZE}, or kv_residual_tokens with int4"})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "KV-cache storage: auto (the model dtype), float32 / float16 / bfloat16, int8 or fp8 (e4m3) with "
                "per-token scales, or int4 (KIVI: keys per channel per block, values per token)"})
    kv_cache_memory: str | int | None = field(default=None, metadata={
        "help": "KV-cache size: bytes, or with a unit (1GiB, 512MiB, 2GB); default: kv_cache_memory_fraction of "
                "total memory (CPU) or what gpu_memory_utilization leaves (CUDA)"})
    kv_cache_memory_fraction: float = field(default=0.1, metadata={
        "help": "CPU, when kv_cache_memory is unset: the KV cache's share of the host's total memory (at most "
                "half of the free memory)"})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "CUDA, when kv_cache_memory is unset: the share of the GPU's memory kvserve may use in all; the "
                "KV cache gets what the weights and a profiled worst-case step leave"})
    kv_residual_tokens: int | None = field(default=None, metadata={
        "help": f"int4 only: tokens per key-quantization group, which is one KV block (default "
                f"{DEFAULT_INT4_GROUP_SIZE}); a request's newest, incomplete group stays in full precision"})
    kv_window: int | None = field(default=None, metadata={
        "help": "attention sinks + sliding window (StreamingLLM): each token sees the kv_sinks first tokens and "
                "the last kv_window ones; blocks in between are freed, so memory stays bounded"})
    kv_sinks: int = field(default=4, metadata={"help": "with kv_window: leading tokens always kept (attention sinks)"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "reuse the KV blocks of a prompt prefix computed before"})

    def __post_init__(self) -> None:
        if self.kv_cache_memory is not None:  # frozen: set once here, to bytes
            object.__setattr__(self, "kv_cache_memory", byte_size("kv_cache_memory", self.kv_cache_memory))
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        for name in ("block_size", "kv_residual_tokens", "kv_window", "kv_cache_memory"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.kv_sinks < 0:
            raise ValueError(f"kv_sinks must be >= 0, got {self.kv_sinks}")
        if self.kv_cache_dtype != "int4" and self.kv_residual_tokens is not None:
            raise ValueError("kv_residual_tokens applies only to kv_cache_dtype='int4'")
        if (self.kv_cache_dtype == "int4" and None not in (self.block_size, self.kv_residual_tokens)
                and self.block_size != self.kv_residual_tokens):
            raise ValueError(f"with kv_cache_dtype='int4' a block is one key-quantization group: block_size "
                             f"({self.block_size}) must equal kv_residual_tokens ({self.kv_residual_tokens})")

    @property
    def resolved_block_size(self) -> int:
        """Tokens per KV block: block_size, or for int4 the key-quantization group (kv_residual_tokens)."""
        if self.kv_cache_dtype == "int4":
            return self.kv_residual_tokens or self.block_size or DEFAULT_INT4_GROUP_SIZE
        return self.block_size or DEFAULT_BLOCK_SIZE

    def storage_dtype(self, model_dtype: str) -> str:
        """What the KV cache stores: the model dtype for `auto`, else the quantized format."""
        return model_dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits the scheduler enforces each step; the engine fills in max_model_len once the model is loaded."""

    max_num_seqs: int = field(default=64, metadata={"help": "most requests running at once"})
    # vLLM's CPU server default: 16 prompts of 128 tokens prefill in one step, so their decodes then run in step
    # instead of the first ones stalling behind the others' chunks (ITL p99 at 16 streams 1,066 -> 143 ms).
    max_num_batched_tokens: int = field(default=2048, metadata={
        "help": "token budget of one step (prefill chunks + decodes)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "context window (prompt + output); default: the model's, capped at 8192"})
    enable_chunked_prefill: bool = field(default=True, metadata={
        "help": "split long prompts across steps, sharing them with decodes"})

    def __post_init__(self) -> None:
        _require_positive("max_num_seqs", self.max_num_seqs)
        _require_positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_model_len is not None:
            _require_positive("max_model_len", self.max_model_len)


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split across processes (tensor parallelism on torch.distributed)."""

    tensor_parallel_size: int = field(default=1, metadata={
        "help": "processes each layer is split across (Megatron-style tensor parallelism: attention heads, MLP "
                "and vocabulary split, one all-reduce after attention and one after the MLP; gloo on the CPU, "
                "NCCL on CUDA). Workers are spawned on this machine, or joined under torchrun"})

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


SPECULATIVE_METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16  # a verify step is 1 + k rows per request


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a proposer drafts tokens, the target verifies them in the next step (vLLM's names)."""

    speculative_method: str | None = field(default=None, metadata={
        "help": f"draft-token proposer: one of {SPECULATIVE_METHODS} (ngram: prompt lookup; draft_model: a "
                "smaller model with the same vocabulary, speculative_model), or none (draft_model with a "
                "speculative_model)"})
    num_speculative_tokens: int = field(default=0, metadata={
        "help": "draft tokens proposed per request per step (with a speculative_method)"})
    prompt_lookup_min: int | None = field(default=None, metadata={
        "help": "ngram: shortest suffix matched against earlier tokens (default: prompt_lookup_max, or 5)"})
    prompt_lookup_max: int | None = field(default=None, metadata={
        "help": "ngram: longest suffix matched against earlier tokens (default: prompt_lookup_min, or 5)"})
    speculative_model: str | None = field(default=None, metadata={
        "help": "draft_model: the draft's checkpoint (a .gguf file or an HF directory; the target's file itself at "
                "another speculative_quantization drafts for it)"})
    speculative_quantization: str | None = field(default=None, metadata={
        "help": f"draft_model: the draft's weight format, one of {list(QUANTIZATION_METHODS)} (default: as for the "
                "target, gguf for a .gguf file on the CPU)"})
    speculative_num_layers: int | None = field(default=None, metadata={
        "help": "draft_model: keep only the draft's first N layers (a truncated copy of a model drafts for it; "
                "default: all)"})
    # 4: on the 2-core CPU, 16 streams verifying drafts lost 15-20% of their throughput (BENCHMARKS.md).
    speculative_disable_by_batch_size: int | None = field(default=4, metadata={
        "help": "no drafts in steps that start with more running requests than this (verifying competes with "
                "decoding for compute)"})

    def __post_init__(self) -> None:
        method = self.speculative_method
        if method is None and self.speculative_model is not None:
            method = "draft_model"  # as vLLM infers it
            object.__setattr__(self, "speculative_method", method)
        if method is not None and method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {SPECULATIVE_METHODS} or None, got {method!r}")
        if method is None and self.num_speculative_tokens != 0:
            raise ValueError(f"num_speculative_tokens must be 0 without a speculative_method, "
                             f"got {self.num_speculative_tokens}")
        if method is not None and not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}] with "
                             f"speculative_method={method!r}, got {self.num_speculative_tokens}")
        if (method == "draft_model") != (self.speculative_model is not None):
            raise ValueError("speculative_model must be set with speculative_method='draft_model' and only then, got "
                             f"speculative_model={self.speculative_model!r} with speculative_method={method!r}")
        if self.speculative_quantization not in (None, *QUANTIZATION_METHODS):
            raise ValueError(f"speculative_quantization must be one of {list(QUANTIZATION_METHODS)}, "
                             f"got {self.speculative_quantization!r}")
        if self.speculative_num_layers is not None and self.speculative_num_layers < 1:
            raise ValueError(f"speculative_num_layers must be >= 1, got {self.speculative_num_layers}")
        lookup_min = self.prompt_lookup_min or self.prompt_lookup_max or 5
        lookup_max = self.prompt_lookup_max or self.prompt_lookup_min or 5
        if not 1 <= lookup_min <= lookup_max:
            raise ValueError(f"prompt_lookup_min ({lookup_min}) must be >= 1 and <= prompt_lookup_max ({lookup_max})")
        if self.speculative_disable_by_batch_size is not None and self.speculative_disable_by_batch_size < 1:
            raise ValueError(f"speculative_disable_by_batch_size must be >= 1, "
                             f"got {self.speculative_disable_by_batch_size}")
        object.__setattr__(self, "prompt_lookup_min", lookup_min)
        object.__setattr__(self, "prompt_lookup_max", lookup_max)

    @property
    def enabled(self) -> bool:
        """Whether requests get draft tokens."""
        return self.speculative_method is not None

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots each request holds beyond its step's tokens: a draft model writes its drafts' K/V there."""
        return self.num_speculative_tokens if self.speculative_method == "draft_model" else 0


@dataclass(frozen=True)
class PlatformConfig:
    """Host and device specifics: CPU threads, the CPU fast paths, the attention backend."""

    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (unset or 0: torch's default)"})
    cpu_native_kernels: bool = field(default=True, metadata={
        "help": "CPU float32: batch-1 decode matmuls and RMSNorm on kvserve's compiled kernels (built on first use "
                "with the system C compiler); without one, or when off, cpu_blas_max_tokens applies"})
    cpu_blas_max_tokens: int = field(default=1, metadata={
        "help": "CPU float32 without the compiled GEMV: steps of up to this many tokens run their matmuls on "
                "numpy's OpenBLAS with torch single-threaded (faster than MKL's GEMV for batch-1 decode); 0: off"})
    cpu_fused_decode: bool = field(default=True, metadata={
        "help": "CPU float32 Llama models with the compiled kernels: run the layers of decode-only steps in one "
                "compiled call (the same kernels, without Python between them); float32 weights up to 3 decodes, "
                "larger batches split around the matmuls"})
    cpu_gguf_int8_activations: bool = field(default=False, metadata={
        "help": "GGUF weights on the CPU: round activations to 8 bits per 32 values and multiply in integers, as "
                "llama.cpp does, on Q4_0 / Q4_1 / Q8_0 weights kept in tiles of 8 rows (3-4x faster; a relative "
                "error of about 5e-3 per product, and outputs that may move with chunking at near-ties); with an int8 "
                "KV cache, decode queries are rounded to 8 bits per head for Q.K as well; off: float32 "
                "activations, the dequantized model up to rounding"})
    cpu_packed_weights: bool = field(default=True, metadata={
        "help": "CPU float32: also keep every linear weight in oneDNN's packed layout, for steps of several "
                "tokens (batched decode, prefill); costs a second copy of the weights"})
    enforce_eager: bool = field(default=False, metadata={
        "help": "CUDA: run every step eagerly (no CUDA graphs); by default decode-only steps replay graphs captured "
                "at start-up per batch-size bucket (1, 2, 4, ... max_num_seqs) where the attention backend allows"})
    attention_backend: str = field(default="auto", metadata={
        "help": "paged attention: torch (pure torch, any device and cache), cpu (torch with float32, 16-bit and "
                "int8 decodes on a compiled kernel), triton (CUDA kernels), or auto (triton on CUDA, cpu "
                "on the CPU, where they build and serve the cache; else torch)"})

    def __post_init__(self) -> None:
        if self.cpu_blas_max_tokens < 0:
            raise ValueError(f"cpu_blas_max_tokens must be >= 0, got {self.cpu_blas_max_tokens}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {list(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Every engine option, grouped in sub-configs; `LLM(**kwargs)` and the CLI flags use the flat field names."""

    load: LoadConfig = field(default_factory=LoadConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    platform: PlatformConfig = field(default_factory=PlatformConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Route flat options (`block_size=32`) to their sub-configs; an unknown one is a ValueError listing all.
        vLLM's `speculative_config={"method": "ngram", ...}` is accepted too and spelled out as flat options."""
        speculative = speculative_options(kwargs.pop("speculative_config", None))
        kwargs = {**kwargs, **speculative}
        owners = option_sections()
        unknown = sorted(set(kwargs) - set(owners))
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(owners)}")
        grouped: dict[str, dict[str, Any]] = {section: {} for section in sub_configs()}
        for name, value in kwargs.items():
            grouped[owners[name]][name] = value
        return cls(**{section: sub_config(**grouped[section]) for section, sub_config in sub_configs().items()})


# vLLM's speculative_config keys -> the flat option names.
_SPECULATIVE_KEYS = {"method": "speculative_method", "num_speculative_tokens": "num_speculative_tokens",
                     "prompt_lookup_min": "prompt_lookup_min", "prompt_lookup_max": "prompt_lookup_max",
                     "disable_by_batch_size": "speculative_disable_by_batch_size", "model": "speculative_model",
                     "quantization": "speculative_quantization", "num_layers": "speculative_num_layers"}


def speculative_options(speculative_config: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's speculative_config dict as flat options; an unknown key is a ValueError listing the known ones."""
    if speculative_config is None:
        return {}
    unknown = sorted(set(speculative_config) - set(_SPECULATIVE_KEYS))
    if unknown:
        raise ValueError(f"unknown speculative_config key(s) {unknown}; known: {sorted(_SPECULATIVE_KEYS)}")
    return {_SPECULATIVE_KEYS[key]: value for key, value in speculative_config.items()}


def sub_configs() -> dict[str, type]:
    """EngineConfig's sections in order: field name -> sub-config class (load: LoadConfig, ...)."""
    hints = typing.get_type_hints(EngineConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(EngineConfig)}


def option_sections() -> dict[str, str]:
    """Each flat option name -> the EngineConfig section that holds it (block_size -> cache)."""
    owners: dict[str, str] = {}
    for section, sub_config in sub_configs().items():
        for f in dataclasses.fields(sub_config):
            # Flat names must stay unique: they are the LLM keyword arguments and the CLI flags.
            assert f.name not in owners, f"engine option {f.name!r} is in both {owners[f.name]} and {section}"
            owners[f.name] = section
    return owners


def _rope_settings(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """(theta, scaling) from either `rope_theta` + `rope_scaling` or transformers 5's `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = cfg.get("rope_scaling") or params or None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta), scaling


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def byte_size(name: str, value: str | int) -> int:
    """Bytes from an int or a size such as "1GiB", "512MiB", "2GB", "1.5g" (KiB/MiB/GiB/TiB binary, kB/MB/GB/TB
    decimal, B optional, any case); a ValueError naming option `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{name} must be bytes or a size like 1GiB / 512MiB, got {value!r}")
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"{name} must be bytes or a size like 1GiB / 512MiB, got {value!r}")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    return value


def _require_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
