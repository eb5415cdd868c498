"""Teacher-forced perplexity through the engine's own paged cache: how much a KV-cache scheme costs in quality."""

from __future__ import annotations

import math

import torch

from kvserve.engine.engine import Engine
from kvserve.engine.request import Request
from kvserve.runner.input_batch import CachedRequestState, StepBatch
from kvserve.sampling_params import SamplingParams


@torch.inference_mode()
def perplexity(engine: Engine, token_ids: list[int], chunk: int = 64) -> float:
    """exp(mean NLL) of each next token, fed `chunk` tokens per step (later chunks read earlier ones from the
    cache: quantized, windowed, whatever the engine runs with). The engine must be idle."""
    if len(token_ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(token_ids)}")
    manager, runner = engine.kv_manager, engine.runner
    request = Request("perplexity", list(token_ids), SamplingParams(max_tokens=1), max_tokens=1)
    state = CachedRequestState(request.request_id, request.prompt_token_ids, [], request.all_token_ids,
                               request.sampling_params, frozenset(), [], 0)
    nll = 0.0
    try:
        for start in range(0, len(token_ids) - 1, chunk):
            end = min(start + chunk, len(token_ids) - 1)
            manager.evict_outside_window(request.request_id, start)
            if not manager.allocate_slots(request.request_id, end):
                raise ValueError(f"the KV cache ({manager.num_blocks} blocks) cannot hold {end} tokens")
            table = manager.block_table(request.request_id)
            step = StepBatch([state], [start], [end - start], [table], token_ids[start:end], sampling=[])
            input_ids, positions, metadata = runner.prepare_inputs(step)
            hidden = runner.model(input_ids, positions, runner.kv_caches, metadata)
            logprobs = torch.log_softmax(runner.model.compute_logits(hidden), dim=-1)  # [n, vocab]
            targets = torch.tensor(token_ids[start + 1:end + 1], device=logprobs.device)
            nll -= logprobs.gather(1, targets[:, None]).sum().item()
    finally:
        manager.free(request.request_id)
        runner.release([request.request_id])
    return math.exp(nll / (len(token_ids) - 1))
