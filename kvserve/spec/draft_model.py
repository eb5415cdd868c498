"""The draft-model proposer: a second, smaller model (or the target's own file at a lower precision, or its first
layers) proposes each request's next tokens greedily, over its own paged KV cache.

One pool, one budget: the draft's cache has the target's blocks (the same block ids and block tables, its own
layers' tensors), so a block's bytes are the target's plus the draft's, and the KV manager, prefix caching and
preemption need nothing new. The scheduler gives every request that samples `num_speculative_tokens` slots of
lookahead, where the draft writes the K/V of the drafts it feeds back to itself.

Keeping in step: `draft_num_computed` counts a request's leading tokens whose draft K/V is written. After the
target's step the draft catches up in one packed pass (a prompt chunk the target just computed, or the accepted
tokens and the one just sampled), whose last row gives the first draft; then it decodes the others one at a time,
batched across requests. Of the drafts it fed itself, those the target accepts are the same tokens at the same
positions, so their K/V is kept; the rest are overwritten on the next catch-up. The draft only decides how many
drafts are accepted, never which tokens come out: the target verifies each one.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kvserve.attention.backend import AttentionBackend, AttentionRequirements
from kvserve.attention.selector import create_attention_backend
from kvserve.config import EngineConfig, ModelConfig
from kvserve.kv.kv_cache import LayerKVCache, allocate_kv_caches
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.kv.sinks_window import SinksWindow
from kvserve.kv.window_layout import SinksWindowLayout
from kvserve.loader.weights import open_model
from kvserve.models.registry import model_class
from kvserve.platforms import Platform
from kvserve.runner.attention_inputs import build_common_metadata, single_token_rows
from kvserve.runner.input_batch import CachedRequestState, StepBatch
from kvserve.runner.model_runner import load_model, num_accepted


class DraftModelProposer:
    """Greedy drafts from `model`: up to `max_drafts` tokens per request per step."""

    def __init__(self, model: nn.Module, attention_backend: AttentionBackend, platform: Platform,
                 max_drafts: int) -> None:
        self.model = model
        self.attention_backend = attention_backend
        self.platform = platform
        self.device = platform.device
        self.max_drafts = max_drafts
        self.kv_caches: list[LayerKVCache] = []
        self.block_size = 0
        self.window: SinksWindowLayout | None = None

    def kv_cache_specs(self, dtype: str) -> list[KVCacheSpec]:
        """The draft's layers in the shared blocks."""
        return self.model.kv_cache_specs(dtype)

    def allocate_kv_cache(self, specs: list[KVCacheSpec], num_blocks: int, block_size: int,
                          dtype: torch.dtype) -> None:
        """The draft's tensors for the target's `num_blocks` blocks."""
        self.kv_caches = allocate_kv_caches(specs, num_blocks, block_size, self.device, dtype)
        self.block_size = block_size
        self.model.fused_decode = self.platform.fused_decode(self.model, self.attention_backend, self.kv_caches)

    def set_window(self, window: SinksWindow | None, dtype: torch.dtype) -> None:
        """Attend with the target's sinks + window: the blocks between are evicted for both models at once."""
        self.window = SinksWindowLayout.for_model(window, self.model, dtype)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(cache.num_bytes for cache in self.kv_caches)

    def propose_step(self, batch: StepBatch, sampled: list[list[int]], wanted: dict[int, int]
                     ) -> dict[str, list[int]]:
        """Catch the draft up on the step's prompt chunks and on the requests that draft, then draft `wanted[i]`
        tokens for request i of the batch (fewer where its blocks end)."""
        rows = []  # (state, its known tokens, first position to feed, drafts wanted)
        for index, state in enumerate(batch.requests):
            if sampled[index] and index not in wanted:
                continue  # no drafts wanted (they proved mostly wrong): the draft need not follow
            if sampled[index]:
                tokens = [*state.all_token_ids, *sampled[index]]
            else:  # a prompt chunk: the draft follows the target up to where it computed
                tokens = state.all_token_ids[:batch.num_computed_tokens[index] + batch.num_new_tokens[index]]
            start = state.draft_num_computed + num_accepted(state.draft_fed, tokens[state.draft_num_computed:])
            state.draft_num_computed, state.draft_fed = start, []
            room = len(state.block_table) * self.block_size - len(tokens)  # lookahead slots beyond the last token
            if room < 0 or start >= len(tokens):
                continue  # nothing to catch up on, or no slot for the newest token: no drafts this time
            rows.append((state, tokens, start, min(wanted.get(index, 0), room + 1)))
        if not rows:
            return {}
        rows.sort(key=lambda row: len(row[1]) - row[2] > self.max_drafts + 1)  # the ones run as decodes first
        drafts = self._catch_up(rows)
        for step in range(1, max(wanted for *_, wanted in rows)):
            self._decode([(state, tokens, wanted) for state, tokens, _, wanted in rows if wanted > step], drafts)
        return {state.req_id: drafts[state.req_id] for state, *_ in rows if state.req_id in drafts}

    def _catch_up(self, rows: list[tuple[CachedRequestState, list[int], int, int]]) -> dict[str, list[int]]:
        """Feed each request's unseen tokens; the first draft of each request that wants drafts."""
        counts = [len(tokens) - start for _, tokens, start, _ in rows]
        input_ids = [token for _, tokens, start, _ in rows for token in tokens[start:]]
        hidden = self._forward([state for state, *_ in rows], [start for _, _, start, _ in rows], counts, input_ids)
        for state, tokens, _, _ in rows:
            state.draft_num_computed = len(tokens)
        ends = torch.tensor(counts, device=self.device).cumsum(0) - 1
        drafting = [i for i, (*_, wanted) in enumerate(rows) if wanted > 0]
        if not drafting:
            return {}
        first = self._greedy(hidden[ends[drafting]])
        return {rows[i][0].req_id: [token] for i, token in zip(drafting, first, strict=True)}

    def _decode(self, rows: list[tuple[CachedRequestState, list[int], int]], drafts: dict[str, list[int]]) -> None:
        """One more draft for each request: feed its newest draft, after its known tokens and earlier drafts."""
        if not rows:
            return
        states = [state for state, _, _ in rows]
        fed = [drafts[state.req_id][-1] for state in states]
        positions = [len(tokens) + len(drafts[state.req_id]) - 1 for state, tokens, _ in rows]
        hidden = self._forward(states, positions, [1] * len(rows), fed)
        for state, token in zip(states, self._greedy(hidden), strict=True):
            state.draft_fed = drafts[state.req_id][:]  # K/V written ahead: kept where the target accepts them
            drafts[state.req_id].append(token)

    def _forward(self, states: list[CachedRequestState], starts: list[int], counts: list[int],
                 input_ids: list[int]) -> torch.Tensor:
        """The draft over the packed rows (request i: `counts[i]` tokens from position `starts[i]`; the short
        ones first) -> hidden states [T, draft hidden]. A short row (the accepted tokens and the one sampled) runs
        as that many single-token rows, each attending to the tokens before it, so it takes the decode kernels."""
        rows = single_token_rows([s.req_id for s in states], starts, counts, [s.block_table for s in states],
                                 [count <= self.max_drafts + 1 for count in counts])
        common = build_common_metadata(*rows, self.block_size, self.device, self.window)
        metadata = self.attention_backend.build_metadata(common)
        ids = torch.tensor(input_ids, device=self.device)
        return self.model(ids, common.positions, self.kv_caches, metadata)

    def _greedy(self, hidden: torch.Tensor) -> list[int]:
        """The draft's most likely token after each row [N, hidden] (a point-mass draft: num_accepted in the
        runner keeps sampling exact)."""
        return self.model.compute_logits(hidden).argmax(dim=-1).tolist()


def load_draft_model(config: EngineConfig, platform: Platform, target: ModelConfig, max_model_len: int,
                     kv_cache_dtype: str, show_progress: bool = True) -> DraftModelProposer:
    """The speculative_model, loaded as the target is (speculative_quantization, speculative_num_layers applied);
    ValueError unless its vocabulary is the target's."""
    spec = config.speculative
    source = open_model(spec.speculative_model)
    model_config = ModelConfig.from_hf_config(source.hf_config)
    if model_config.vocab_size != target.vocab_size:
        raise ValueError(f"speculative_model {spec.speculative_model!r} has a vocabulary of "
                         f"{model_config.vocab_size} tokens, the target {target.vocab_size}: a draft must share the "
                         "target's tokenizer")
    if spec.speculative_num_layers is not None:
        if spec.speculative_num_layers > model_config.num_layers:
            raise ValueError(f"speculative_num_layers ({spec.speculative_num_layers}) must be <= the draft's "
                             f"{model_config.num_layers} layers")
        model_config = dataclasses.replace(model_config, num_layers=spec.speculative_num_layers)
    architecture = model_class(model_config)
    if config.cache.kv_window and not architecture.supports_kv_window:
        raise ValueError(f"kv_window is not supported for the speculative_model's {model_config.architecture}")
    dtype = config.load.torch_dtype
    backend = create_attention_backend(config.platform.attention_backend, AttentionRequirements(
        platform.device, kv_cache_dtype, use_window=bool(config.cache.kv_window), use_mla=architecture.uses_mla))
    quantization = platform.resolve_quantization(spec.speculative_quantization, source, dtype)
    model = load_model(platform, dtype, quantization, model_config, source, max_model_len, backend, show_progress)
    return DraftModelProposer(model, backend, platform, spec.num_speculative_tokens)
