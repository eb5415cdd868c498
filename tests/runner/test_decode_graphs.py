"""Decode graphs (runner/cuda_graphs.py): bucketed, padded replays give the tokens of plain eager steps.

Without a GPU the graphs are `EagerStep`s (the same static buffers, padding and captured metadata, re-run eagerly)
over the Triton backend under its interpreter: what a CUDA graph would replay, short of the capture itself. On a
GPU, test_decode_graphs_on_cuda captures real graphs.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see test_triton_attention.py
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.attention import triton_attention as ta  # noqa: E402
from kvserve.platforms.base import Platform  # noqa: E402
from kvserve.runner.cuda_graphs import EagerStep, capture_sizes  # noqa: E402

if not ta.IS_INTERPRETED and not torch.cuda.is_available():
    pytest.skip("triton_attention was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)
DEVICE = "cpu" if ta.IS_INTERPRETED else "cuda"
# Three requests that finish at different steps: decode steps of 3 rows (bucket 4 of max_num_seqs=5, padded) down
# to 1; a 40-token prompt in 16-token chunks beside the first decodes (mixed steps run eagerly).
PROMPTS = [{"prompt_token_ids": [1, 520, 3000, 45, 8800, 17]}, {"prompt_token_ids": [5, 42]},
           {"prompt_token_ids": list(range(300, 340))}]
PARAMS = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 7, 4)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> str:
    """A 2-layer GQA Llama (4 heads / 2 KV heads of 16) with random weights."""
    import transformers

    path: pathlib.Path = tmp_path_factory.mktemp("tiny-llama-graphs")
    config = transformers.LlamaConfig(vocab_size=len(word_tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.15)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    word_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def eager_graphs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give the CPU platform graphs that replay eagerly (CUDA keeps its real ones), unless enforce_eager."""
    if DEVICE == "cpu":
        monkeypatch.setattr(Platform, "decode_graph_capture",
                            lambda self: None if self.config.platform.enforce_eager else EagerStep)


def generate(model: str, **options: Any) -> tuple[list[list[int]], LLM]:
    llm = LLM(model=model, device=DEVICE, attention_backend="triton", max_num_seqs=5, max_model_len=256,
              max_num_batched_tokens=16, kv_cache_memory=2**20, show_progress=False, **options)
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs], llm


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_padded_bucket_replays_give_the_eager_tokens(tiny_llama: str, kv_cache_dtype: str,
                                                     eager_graphs_on_cpu: None) -> None:
    eager, eager_llm = generate(tiny_llama, enforce_eager=True, kv_cache_dtype=kv_cache_dtype)
    assert eager_llm.engine.runner.graphs is None
    replayed, llm = generate(tiny_llama, kv_cache_dtype=kv_cache_dtype)
    assert replayed == eager
    assert [len(tokens) for tokens in replayed] == [12, 7, 4]
    replays = llm.engine.runner.graphs.num_replays
    assert replays[4] and replays[1], replays  # 3 rows padded to 4; 1 row once the others finish
    # The same steps wrote the same slots: padding rows wrote nothing.
    for cache, eager_cache in zip(llm.engine.runner.kv_caches, eager_llm.engine.runner.kv_caches, strict=True):
        assert torch.equal(cache.key, eager_cache.key) and torch.equal(cache.value, eager_cache.value)


def test_ngram_verify_rows_replay_too(tiny_llama: str, eager_graphs_on_cpu: None) -> None:
    """A verify step's 1 + k single-token rows are decode rows: they replay when they fit a bucket."""
    spec = {"speculative_method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}
    eager, _ = generate(tiny_llama, enforce_eager=True, **spec)
    replayed, llm = generate(tiny_llama, **spec)
    assert replayed == eager
    assert sum(llm.engine.runner.graphs.num_replays.values())


def test_scratch_graphs_capture_every_bucket_over_a_cache_of_their_own(tiny_llama: str,
                                                                       eager_graphs_on_cpu: None) -> None:
    """What the CUDA platform measures before sizing the KV cache: the same buckets, over one scratch block; the
    engine's own cache and graphs are untouched. None where no graphs will be captured."""
    tokens, llm = generate(tiny_llama)
    runner = llm.engine.runner
    specs = runner.model.kv_cache_specs(llm.engine.config.cache.storage_dtype(llm.engine.config.load.dtype))
    cache = [(layer.key.clone(), layer.value.clone()) for layer in runner.kv_caches]
    scratch = runner.scratch_decode_graphs(specs, block_size=16)
    assert sorted(scratch.steps) == capture_sizes(5) and scratch is not runner.graphs
    assert all(layer.key.shape[0] == 1 for layer in scratch.kv_caches)
    assert scratch.static.block_table.shape == runner.graphs.static.block_table.shape  # the same split-KV grid
    for layer, (key, value) in zip(runner.kv_caches, cache, strict=True):
        assert torch.equal(layer.key, key) and torch.equal(layer.value, value)
    assert generate(tiny_llama)[0] == tokens
    int4 = [dataclasses.replace(spec, dtype="int4", group_size=16) for spec in specs]
    assert runner.scratch_decode_graphs(int4, block_size=16) is None  # int4's per-step plan is not captured
    eager = generate(tiny_llama, enforce_eager=True)[1].engine.runner
    assert eager.scratch_decode_graphs(specs, block_size=16) is None


def test_backends_that_read_host_lengths_run_eagerly(tiny_llama: str, eager_graphs_on_cpu: None) -> None:
    llm = LLM(model=tiny_llama, device=DEVICE, attention_backend="torch", kv_cache_memory=2**20,
              show_progress=False)
    assert llm.engine.runner.graphs is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_graphs_on_cuda(tiny_llama: str, dtype: str) -> None:
    eager, _ = generate(tiny_llama, enforce_eager=True, dtype=dtype)
    replayed, llm = generate(tiny_llama, dtype=dtype)
    assert llm.engine.runner.graphs is not None
    assert replayed == eager
