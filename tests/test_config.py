"""EngineConfig: flat options route to their sub-configs, each sub-config validates its fields, flags derive."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvserve.cli import build_parser, engine_kwargs
from kvserve.config import (
    CacheConfig,
    EngineConfig,
    LoadConfig,
    ParallelConfig,
    PlatformConfig,
    SchedulerConfig,
    SpeculativeConfig,
    option_sections,
    sub_configs,
)


def test_flat_options_route_to_their_sub_configs():
    config = EngineConfig.from_kwargs(model="m.gguf", block_size=32, max_num_seqs=4, num_threads=2,
                                      attention_backend="torch", tensor_parallel_size=1)
    assert config.load == LoadConfig(model="m.gguf")
    assert config.cache == CacheConfig(block_size=32)
    assert config.scheduler == SchedulerConfig(max_num_seqs=4)
    assert config.platform == PlatformConfig(num_threads=2, attention_backend="torch")
    assert config.parallel == ParallelConfig() and config.speculative == SpeculativeConfig()
    assert EngineConfig.from_kwargs() == EngineConfig()


def test_every_flat_name_is_unique_and_known():
    names = [f.name for sub_config in sub_configs().values() for f in dataclasses.fields(sub_config)]
    assert len(names) == len(set(names)) == len(option_sections())
    with pytest.raises(ValueError, match=r"unknown engine option\(s\) \['blocksize'\]; known: .*'block_size'"):
        EngineConfig.from_kwargs(blocksize=16)


def test_config_is_frozen_and_replaceable():
    config = EngineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache.block_size = 8  # type: ignore[misc]
    resolved = dataclasses.replace(config.scheduler, max_model_len=128)
    assert resolved.max_model_len == 128 and config.scheduler.max_model_len is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dtype": "float64"}, r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'float64'"),
    ({"kv_cache_dtype": "int2"},
     r"kv_cache_dtype must be one of \['auto', 'float32', 'float16', 'bfloat16', 'int8', 'int4', 'fp8'\]"),
    ({"block_size": 0}, r"block_size must be >= 1, got 0"),
    ({"kv_cache_memory": 0}, r"kv_cache_memory must be >= 1, got 0"),
    ({"kv_cache_memory": "1 gigabyte"}, r"kv_cache_memory must be bytes or a size like 1GiB / 512MiB, got '1 gig"),
    ({"kv_cache_memory": "0MiB"}, r"kv_cache_memory must be >= 1, got 0"),
    ({"kv_cache_memory_fraction": 1.5}, r"kv_cache_memory_fraction must be in \(0, 1\], got 1.5"),
    ({"gpu_memory_utilization": 0}, r"gpu_memory_utilization must be in \(0, 1\], got 0"),
    ({"kv_window": 0}, r"kv_window must be >= 1, got 0"),
    ({"kv_sinks": -1}, r"kv_sinks must be >= 0, got -1"),
    ({"kv_residual_tokens": 32}, r"kv_residual_tokens applies only to kv_cache_dtype='int4'"),
    ({"kv_cache_dtype": "int4", "block_size": 16, "kv_residual_tokens": 32},
     r"block_size \(16\) must equal kv_residual_tokens \(32\)"),
    ({"max_num_seqs": 0}, r"max_num_seqs must be >= 1, got 0"),
    ({"max_num_batched_tokens": 0}, r"max_num_batched_tokens must be >= 1, got 0"),
    ({"max_model_len": 0}, r"max_model_len must be >= 1, got 0"),
    ({"tensor_parallel_size": 0}, r"tensor_parallel_size must be >= 1, got 0"),
    ({"speculative_method": "eagle"},
     r"speculative_method must be one of \('ngram', 'draft_model'\) or None, got 'eagle'"),
    ({"speculative_method": "ngram"},
     r"num_speculative_tokens must be in \[1, 16\] with speculative_method='ngram', got 0"),
    ({"speculative_config": {"method": "ngram", "draft_tensor_parallel_size": 1}},
     r"unknown speculative_config key\(s\) \['draft_tensor_parallel_size'\]"),
    ({"speculative_config": {"method": "ngram", "model": "draft.gguf", "num_speculative_tokens": 3}},
     r"speculative_model must be set with speculative_method='draft_model' and only then, got "
     r"speculative_model='draft.gguf' with speculative_method='ngram'"),
    ({"speculative_method": "draft_model", "num_speculative_tokens": 3},
     r"speculative_model must be set with speculative_method='draft_model' and only then"),
    ({"speculative_model": "draft.gguf", "num_speculative_tokens": 3, "speculative_quantization": "fp4"},
     r"speculative_quantization must be one of \['none', 'gguf', 'int8', 'int4', 'awq'\], got 'fp4'"),
    ({"speculative_model": "draft.gguf", "num_speculative_tokens": 3, "speculative_num_layers": 0},
     r"speculative_num_layers must be >= 1, got 0"),
    ({"speculative_method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     r"prompt_lookup_min \(4\) must be >= 1 and <= prompt_lookup_max \(2\)"),
    ({"speculative_disable_by_batch_size": 0}, r"speculative_disable_by_batch_size must be >= 1, got 0"),
    ({"num_speculative_tokens": 3}, r"num_speculative_tokens must be 0 without a speculative_method, got 3"),
    ({"cpu_blas_max_tokens": -1}, r"cpu_blas_max_tokens must be >= 0, got -1"),
    ({"attention_backend": "flash"}, r"attention_backend must be one of \['auto', 'torch', 'cpu', 'triton'\]"),
])
def test_each_sub_config_rejects_bad_values_naming_the_field(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_kwargs(**kwargs)


def test_derived_block_size_storage_and_torch_dtype():
    assert CacheConfig().resolved_block_size == 16
    assert CacheConfig(block_size=32).resolved_block_size == 32
    assert CacheConfig(kv_cache_dtype="int4").resolved_block_size == 64  # the default key-quantization group
    assert CacheConfig(kv_cache_dtype="int4", kv_residual_tokens=32).resolved_block_size == 32
    assert CacheConfig(kv_cache_dtype="int4", block_size=32).resolved_block_size == 32
    assert CacheConfig().storage_dtype("bfloat16") == "bfloat16"
    assert CacheConfig(kv_cache_dtype="fp8").storage_dtype("bfloat16") == "fp8"
    assert LoadConfig(dtype="bfloat16").torch_dtype == torch.bfloat16


def test_cli_flags_round_trip_to_the_same_config():
    args = build_parser().parse_args(["generate", "hi", "--block-size", "32", "--no-enable-prefix-caching",
                                      "--kv-cache-dtype", "int8", "--max-num-seqs", "3"])
    config = EngineConfig.from_kwargs(**engine_kwargs(args))
    assert config == EngineConfig.from_kwargs(block_size=32, enable_prefix_caching=False, kv_cache_dtype="int8",
                                              max_num_seqs=3)
    assert engine_kwargs(build_parser().parse_args(["serve"])) == engine_kwargs(
        build_parser().parse_args(["generate", "x"]))


@pytest.mark.parametrize(("size", "size_bytes"), [
    ("1GiB", 2**30), ("512MiB", 512 * 2**20), ("64 mib", 64 * 2**20), ("2GB", 2 * 10**9), ("1.5k", 1500),
    ("4096", 4096), (4096, 4096)])
def test_kv_cache_memory_takes_sizes_with_units(size, size_bytes):
    assert CacheConfig(kv_cache_memory=size).kv_cache_memory == size_bytes
    args = build_parser().parse_args(["generate", "hi", "--kv-cache-memory", str(size)])
    assert EngineConfig.from_kwargs(**engine_kwargs(args)).cache.kv_cache_memory == size_bytes


def test_help_groups_flags_by_sub_config_and_shows_defaults(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for section in sub_configs():
        assert f"engine: {section}:" in out
    assert "--max-num-seqs MAX_NUM_SEQS most requests running at once (default: 64)" in out
    assert "(default: auto)" in out and "--attention-backend" in out


def test_vllm_speculative_config_routes_to_the_flat_options():
    ngram = EngineConfig.from_kwargs(speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                         "prompt_lookup_max": 4})
    assert ngram.speculative == SpeculativeConfig("ngram", 3, prompt_lookup_max=4)
    assert ngram.speculative.prompt_lookup_min == 4 and ngram.speculative.num_lookahead_tokens == 0
    draft = EngineConfig.from_kwargs(speculative_config={"model": "d.gguf", "num_speculative_tokens": 3,
                                                         "quantization": "gguf", "num_layers": 8})
    assert draft.speculative.speculative_method == "draft_model"  # inferred from the model, as vLLM does
    assert (draft.speculative.speculative_model, draft.speculative.speculative_quantization,
            draft.speculative.speculative_num_layers) == ("d.gguf", "gguf", 8)
    assert draft.speculative.num_lookahead_tokens == 3  # the draft writes its drafts' K/V ahead
