"""Configuration: frozen dataclasses, the one source of truth for engine options and CLI flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

KV_CACHE_DTYPES = ("auto", "int8", "int4", "fp8")
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
DEFAULT_BLOCK_SIZE = 16
DEFAULT_INT4_GROUP = 64  # tokens per int4 key-scale group (and block): 3.5x smaller than float16 at d_h = 64
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
            # Qwen2 always has QKV bias; Llama-family configs say so with attention_bias.
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            # Llama's attention_bias covers o_proj too; Qwen2's QKV bias does not.
            o_proj_bias=cfg.get("attention_bias", False) and arch != "Qwen2ForCausalLM",
            use_qk_norm=arch == "Qwen3ForCausalLM",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            extra=dict(cfg),
        )


@dataclass(frozen=True)
class EngineConfig:
    """Every option of the engine; `LLM(**kwargs)` and the CLI flags are derived from these fields."""

    model: str | None = field(default=None, metadata={"help": "a .gguf file, an HF directory, "
                                                      "or nothing for the bundled SmolLM2-135M"})
    dtype: str = field(default="float32", metadata={"help": "weights and activations dtype"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    block_size: int | None = field(default=None, metadata={
        "help": f"tokens per KV-cache block; default {DEFAULT_BLOCK_SIZE}, or kv_residual_tokens with int4"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "context window (prompt + output); default: the model's, capped at 8192"})
    max_num_seqs: int = field(default=64, metadata={"help": "most requests running at once"})
    max_num_batched_tokens: int = field(default=512, metadata={
        "help": "token budget of one step (prefill chunks + decodes)"})
    kv_cache_memory: int | None = field(default=None, metadata={
        "help": "KV-cache size in bytes; default: kv_cache_memory_fraction of free memory (CPU) or what "
                "gpu_memory_utilization leaves (CUDA)"})
    kv_cache_memory_fraction: float = field(default=0.1, metadata={
        "help": "CPU: fraction of available memory for the KV cache when kv_cache_memory is unset"})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "CUDA, when kv_cache_memory is unset: the share of the GPU's memory kvserve may use in all; the "
                "KV cache gets what the weights and a profiled worst-case step leave"})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "KV-cache storage: auto (the model dtype), int8 or fp8 (e4m3) with per-token scales, or int4 "
                "(KIVI: keys per channel per block, values per token)"})
    kv_residual_tokens: int | None = field(default=None, metadata={
        "help": f"int4 only: tokens per key-quantization group, which is one KV block (default "
                f"{DEFAULT_INT4_GROUP}); a request's newest, incomplete group stays in full precision"})
    kv_window: int | None = field(default=None, metadata={
        "help": "attention sinks + sliding window (StreamingLLM): each token sees the kv_sinks first tokens and "
                "the last kv_window ones; blocks in between are freed, so memory stays bounded"})
    kv_sinks: int = field(default=4, metadata={"help": "with kv_window: leading tokens always kept (attention sinks)"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "reuse the KV blocks of a prompt prefix computed before"})
    enable_chunked_prefill: bool = field(default=True, metadata={
        "help": "split long prompts across steps, sharing them with decodes"})
    seed: int = field(default=0, metadata={"help": "seed of unseeded random sampling"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    cpu_native_kernels: bool = field(default=True, metadata={
        "help": "CPU float32: batch-1 decode matmuls and RMSNorm on kvserve's compiled kernels (built on first use "
                "with the system C compiler); without one, or when off, cpu_blas_max_tokens applies"})
    cpu_blas_max_tokens: int = field(default=1, metadata={
        "help": "CPU float32 without the compiled GEMV: steps of up to this many tokens run their matmuls on "
                "numpy's OpenBLAS with torch single-threaded (faster than MKL's GEMV for batch-1 decode); 0: off"})
    cpu_packed_weights: bool = field(default=True, metadata={
        "help": "CPU float32: also keep every linear weight in oneDNN's packed layout, for steps of several "
                "tokens (batched decode, prefill); costs a second copy of the weights"})
    attention_backend: str = field(default="auto", metadata={
        "help": "paged attention: torch (pure torch, any device and cache), cpu (torch with float32 decodes on a "
                "compiled kernel), triton (CUDA kernels; no int4, kv_window or MLA), or auto (triton on CUDA, cpu "
                "on the CPU, where they build and serve the cache; else torch)"})

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {list(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        for name in ("block_size", "kv_residual_tokens", "kv_window"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_blas_max_tokens < 0:
            raise ValueError(f"cpu_blas_max_tokens must be >= 0, got {self.cpu_blas_max_tokens}")
        if self.kv_sinks < 0:
            raise ValueError(f"kv_sinks must be >= 0, got {self.kv_sinks}")
        if self.kv_cache_dtype != "int4" and self.kv_residual_tokens is not None:
            raise ValueError("kv_residual_tokens applies only to kv_cache_dtype='int4'")
        if (self.kv_cache_dtype == "int4" and None not in (self.block_size, self.kv_residual_tokens)
                and self.block_size != self.kv_residual_tokens):
            raise ValueError(f"with kv_cache_dtype='int4' a block is one key-quantization group: block_size "
                             f"({self.block_size}) must equal kv_residual_tokens ({self.kv_residual_tokens})")
        _require_positive("max_num_seqs", self.max_num_seqs)
        _require_positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_model_len is not None:
            _require_positive("max_model_len", self.max_model_len)
        if self.kv_cache_memory is not None:
            _require_positive("kv_cache_memory", self.kv_cache_memory)
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1], "
                             f"got {self.kv_cache_memory_fraction}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Like the constructor, but an unknown option is a ValueError that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

    @property
    def cache_block_size(self) -> int:
        """Tokens per KV block: block_size, or for int4 the key-quantization group (kv_residual_tokens)."""
        if self.kv_cache_dtype == "int4":
            return self.kv_residual_tokens or self.block_size or DEFAULT_INT4_GROUP
        return self.block_size or DEFAULT_BLOCK_SIZE

    @property
    def cache_storage_dtype(self) -> str:
        """What the KV cache stores: the model dtype for `auto`, else the quantized format."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by `dtype`."""
        return _DTYPES[self.dtype]


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits the scheduler enforces each step."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True


def _rope_settings(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """(theta, scaling) from either `rope_theta` + `rope_scaling` or transformers 5's `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = cfg.get("rope_scaling") or params or None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta), scaling


def _require_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
