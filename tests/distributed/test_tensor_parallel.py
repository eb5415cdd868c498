"""Tensor parallelism on gloo, two processes on this machine: TP=2 greedy tokens equal TP=1's.

Tiny random models of every attention kind the engine runs (MHA, GQA, MQA, an uneven split of 3 KV heads, MLA,
MoE, Gemma's sliding layers), the bundled model's float32 and GGUF weights, and the engine paths that change the
step's shape: batching, chunked prefill, preemption, prefix hits. Then what must not hang: a dead worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from tiny_models import CASES, PROMPTS

from kvserve import LLM, SamplingParams
from kvserve.distributed.executor import WorkerDiedError
from kvserve.distributed.parallel_state import tp_group
from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_server import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import ServerMetrics

NUM_NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
def generate(model: str, prompts: list = PROMPTS, params: SamplingParams = GREEDY, **options: Any) -> list[list[int]]:
    """Greedy tokens for `prompts`, with the engine shut down after (its workers gone, the group left)."""
    llm = LLM(model=model, show_progress=False, **options)
    try:
        return [output.outputs[0].token_ids for output in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_tokens_of_one(case, tiny_models):
    expected = generate(tiny_models[case], kv_cache_memory=8 * 2**20)
    assert generate(tiny_models[case], kv_cache_memory=8 * 2**20, tensor_parallel_size=2) == expected
    assert tp_group().world_size == 1  # the group was left


def test_chunked_preempted_and_prefix_hits_on_two_ranks(tiny_models):
    """Prompt chunks of 16 tokens, a cache too small for all three requests (so some are preempted and
    recomputed), and a repeated prompt that hits the prefix cache: the same tokens as one rank without them."""
    model = tiny_models["llama-gqa"]
    prompts = [*PROMPTS, PROMPTS[2]]
    expected = generate(model, prompts, kv_cache_memory=8 * 2**20)
    llm = LLM(model=model, show_progress=False, tensor_parallel_size=2, max_num_batched_tokens=16, block_size=16,
              kv_cache_memory=6 * 16 * 3 * 2 * 16 * 4)  # 6 blocks of 16 tokens of this rank's KV head
    try:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [output.outputs[0].token_ids for output in outputs] == expected
        assert llm.engine.scheduler.num_preemptions > 0
        assert outputs[3].num_cached_tokens > 0
        assert llm.engine.kv_manager.pool.num_used_blocks == 0
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("quantization", ["none", None])  # float32; GGUF-native Q4_1 (the default)
def test_bundled_model_on_two_ranks(quantization):
    """SmolLM2's 9 query and 3 KV heads split 6 + 3 (two KV heads and one); its Q4_1 rows are cut at whole
    blocks."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
    options = {} if quantization is None else {"quantization": quantization}
    expected = generate(None, prompts, **options)
    assert generate(None, prompts, tensor_parallel_size=2, **options) == expected


def test_a_dead_worker_fails_requests_and_health_instead_of_hanging(tiny_models):
    llm = LLM(model=tiny_models["llama-gqa"], show_progress=False, tensor_parallel_size=2,
              kv_cache_memory=8 * 2**20)
    try:
        (worker,) = llm.engine.workers.processes
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        with pytest.raises(WorkerDiedError, match="worker rank 1 .* exited"):
            llm.engine.check_health()
        (output,) = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)
        assert output.error is not None and "worker rank 1" in output.error
        assert llm.engine.kv_manager.pool.num_used_blocks == 0
    finally:
        llm.engine.shutdown()
    assert tp_group().world_size == 1


def test_what_cannot_be_split_is_refused_before_workers_start(tiny_models):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide or be a multiple of "
                                         "num_key_value_heads=2"):
        LLM(model=tiny_models["llama-gqa"], show_progress=False, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="draft_model' is not supported with tensor_parallel_size > 1"):
        LLM(model=tiny_models["llama-gqa"], show_progress=False, tensor_parallel_size=2,
            speculative_model=tiny_models["llama-mha"], num_speculative_tokens=2)
    assert tp_group().world_size == 1


def test_torchrun_ranks_serve_the_engine_on_rank_zero(tiny_models):
    """`torchrun --nproc-per-node 2 kvserve generate ... --tensor-parallel-size 2`: rank 0 runs the command, rank 1
    the worker loop; both exit cleanly, and rank 0 prints what one process does."""
    model = tiny_models["llama-gqa"]
    command = [sys.executable, "-m", "kvserve.cli", "generate", "Hello there", "--model", model, "--max-tokens", "8",
               "--temperature", "0", "--kv-cache-memory", str(8 * 2**20)]
    alone = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(port), "--no-python", *command, "--tensor-parallel-size", "2"],
                           capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout == alone and alone.strip()


def test_health_names_a_dead_worker(tiny_models):
    llm = LLM(model=tiny_models["llama-gqa"], show_progress=False, tensor_parallel_size=2,
              kv_cache_memory=8 * 2**20)
    metrics = ServerMetrics()
    async_engine = AsyncEngine(llm.engine, metrics)
    async_engine.start()
    try:
        with TestClient(build_app(async_engine, metrics, ServerConfig(served_model_name="tiny"))) as client:
            assert client.get("/health").status_code == 200
            (worker,) = llm.engine.workers.processes
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(10)
            response = client.get("/health")
            assert response.status_code == 503 and response.json()["error"]["code"] == "worker_dead"
            assert "worker rank 1" in response.json()["error"]["message"]
            completion = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4})
            assert "worker rank 1" in completion.text
    finally:
        async_engine.shutdown()
        llm.engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs")
@pytest.mark.parametrize("case", ["llama-gqa", "qwen3-uneven", "qwen2-moe"])
def test_two_gpus_over_nccl_give_the_tokens_of_one(case, tiny_models):
    options = {"device": "cuda", "kv_cache_memory": 64 * 2**20}
    expected = generate(tiny_models[case], **options)
    assert generate(tiny_models[case], tensor_parallel_size=2, **options) == expected
