"""The oracle for prompt logprobs: one plain forward of the whole sequence through our model, over a scratch
cache (no chunks, no prefix cache, no batch), log_softmax at every position."""

from __future__ import annotations

import pytest
import torch

from kvserve.kv.kv_cache import allocate_kv_caches
from kvserve.runner.attention_inputs import build_common_metadata
from kvserve.runner.model_runner import ModelRunner


@torch.inference_mode()
def full_forward_logprobs(runner: ModelRunner, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position of `token_ids`: [len, vocab] float32 (row p predicts p + 1).

    Touches neither the engine's KV cache nor its scheduler; the caller makes sure nothing else runs the model.
    """
    num_tokens, block_size = len(token_ids), runner.block_size
    dtype = runner.dtype
    specs = runner.model.kv_cache_specs(str(dtype).removeprefix("torch."))
    num_blocks = -(-num_tokens // block_size)
    scratch = allocate_kv_caches(specs, num_blocks, block_size, runner.device, dtype)
    common = build_common_metadata(["reference"], [0], [num_tokens], [list(range(num_blocks))], block_size,
                                   runner.device)
    metadata = runner.attention_backend.build_metadata(common)
    hidden = runner.model(torch.tensor(token_ids, device=runner.device), common.positions, scratch, metadata)
    return torch.log_softmax(runner.model.compute_logits(hidden).float(), dim=-1)


def assert_matches_reference(prompt_logprobs: list, token_ids: list[int], reference: torch.Tensor,
                             num_top: int, atol: float = 2e-4) -> None:
    """vLLM's shape (None first, then per token {token: logprob} plus the top `num_top`), equal to the oracle."""
    assert len(prompt_logprobs) == len(token_ids)
    assert prompt_logprobs[0] is None
    for position, entry in enumerate(prompt_logprobs[1:]):
        row = reference[position]  # predicts token_ids[position + 1]
        assert token_ids[position + 1] in entry
        assert num_top <= len(entry) <= num_top + 1  # the top ones, plus the prompt token if not among them
        for token_id, value in entry.items():
            assert value == pytest.approx(row[token_id].item(), abs=atol)
        # Compared by value: a near tie may order two ids differently.
        best = sorted(entry.values(), reverse=True)[:num_top]
        assert best == pytest.approx(row.topk(num_top).values.tolist(), abs=atol)
