"""Turns a SchedulerOutput into tensors, runs the model over the paged cache, and samples."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from tqdm import tqdm

from kvserve.attention.backend import AttentionMetadata, PrefillSeq, WindowMetadata
from kvserve.config import EngineConfig, ModelConfig
from kvserve.engine.scheduler import SampledTokens, ScheduledRequest, SchedulerOutput
from kvserve.kv.kv_cache import LayerKVCache, allocate_kv_caches
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.layers.linear import Linear
from kvserve.loader.weights import ModelSource
from kvserve.models.registry import build_model
from kvserve.platforms import Platform
from kvserve.runner.cache_plans import (
    ResidualSlots,
    StepSpan,
    held_blocks,
    int4_write_plan,
    key_positions,
    prefill_tail,
    window_visible,
)
from kvserve.sample.sampler import Sampler, SamplingMetadata


class ModelRunner:
    """Owns the model weights, the KV-cache tensors and the per-request sampling generators."""

    def __init__(self, config: EngineConfig, platform: Platform, model_config: ModelConfig, source: ModelSource,
                 max_model_len: int, show_progress: bool = True) -> None:
        self.platform = platform
        self.device = platform.device
        self.model = self._load_model(config.torch_dtype, model_config, source, max_model_len, show_progress)
        self.kv_caches: list[LayerKVCache] = []
        self.block_size = 0
        self.residual_slots: ResidualSlots | None = None  # int4 caches only
        self.window: int | None = None  # sinks + sliding window (StreamingLLM)
        self.num_sinks = 0
        # Unseeded requests share one generator, seeded by the engine's seed.
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self.generators: dict[str, torch.Generator] = {}

    def _load_model(self, dtype: torch.dtype, model_config: ModelConfig, source: ModelSource, max_model_len: int,
                    show_progress: bool) -> nn.Module:
        """Build the model on the device, give its layers the platform's kernels, stream the checkpoint in
        (with a progress bar) and let the layers process their weights."""
        model = build_model(model_config, max_model_len).to(self.device, dtype)
        self.platform.prepare_model(model, dtype)
        weights = tqdm(source.iter_weights(dtype), total=source.num_weight_tensors,
                       desc="Loading weights", unit="tensor", disable=not show_progress,
                       leave=False)
        with torch.no_grad():
            model.load_weights((name, t.to(self.device)) for name, t in weights)
        return model

    @property
    def packed_weight_bytes(self) -> int:
        """Bytes the linear methods hold beside the parameters (oneDNN-packed copies on a float32 CPU)."""
        return sum(module.method.derived_bytes(module) for module in self.model.modules()
                   if isinstance(module, Linear))

    @property
    def model_bytes(self) -> int:
        """Bytes of the model's parameters (tied weights counted once) and of their packed copies."""
        seen = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        return sum(seen.values()) + self.packed_weight_bytes

    def allocate_kv_cache(self, specs: list[KVCacheSpec], num_blocks: int, block_size: int,
                          num_residual_slots: int = 0) -> None:
        """Allocate the paged cache tensors once (int4: plus one residual slot per running request)."""
        dtype = next(self.model.parameters()).dtype
        self.kv_caches = allocate_kv_caches(specs, num_blocks, block_size, self.device, dtype, num_residual_slots)
        self.block_size = block_size
        if any(cache.is_int4 for cache in self.kv_caches):
            self.residual_slots = ResidualSlots(num_residual_slots)

    @torch.inference_mode()
    def profile_step(self, specs: list[KVCacheSpec], num_tokens: int, num_rows: int, block_size: int) -> int:
        """Run the largest step the scheduler can make over a scratch cache: one `num_tokens` prefill,
        logits and softmax for `num_rows` rows. Returns the scratch cache's bytes (freed on return)."""
        dtype = next(self.model.parameters()).dtype
        plain = [dataclasses.replace(spec, dtype=str(dtype).removeprefix("torch."), group_size=0)
                 for spec in specs]  # activations are what is measured; a plain cache needs no int4 plan
        num_blocks = -(-num_tokens // block_size)
        scratch = allocate_kv_caches(plain, num_blocks, block_size, self.device, dtype)
        tokens = torch.arange(num_tokens, device=self.device)
        metadata = AttentionMetadata(
            slot_mapping=tokens, num_decodes=0,
            decode_block_tables=torch.zeros(0, 0, dtype=torch.long, device=self.device),
            decode_mask=torch.zeros(0, 1, 1, 0, dtype=torch.bool, device=self.device),
            prefills=[PrefillSeq(0, num_tokens, num_tokens, torch.arange(num_blocks, device=self.device))])
        hidden = self.model(torch.zeros_like(tokens), tokens, scratch, metadata)
        rows = hidden[torch.arange(num_rows, device=self.device) % num_tokens]
        torch.softmax(self.model.compute_logits(rows), dim=-1)
        return sum(cache.num_bytes for cache in scratch)

    def set_window(self, window: int | None, num_sinks: int) -> None:
        """Attend with sinks + a sliding window (the KV manager evicts the blocks in between)."""
        self.window, self.num_sinks = window, num_sinks

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes held by the KV-cache tensors."""
        return sum(cache.num_bytes for cache in self.kv_caches)

    def release(self, request_ids: list[str]) -> None:
        """Forget per-request state of finished requests."""
        for request_id in request_ids:
            self.generators.pop(request_id, None)
            if self.residual_slots is not None:
                self.residual_slots.release(request_id)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> SampledTokens:
        """Run one step and sample a token for every request that reached the end of its tokens."""
        self.release(output.finished_request_ids)
        if self.residual_slots is not None:
            for request_id in output.preempted_request_ids:
                self.residual_slots.release(request_id)
        # Single-token queries first: the attention batches them in one call.
        items = sorted(output.scheduled, key=lambda s: s.num_new_tokens != 1)
        num_tokens = sum(item.num_new_tokens for item in items)
        with self.platform.step_context(num_tokens):
            return self._run(items)

    def _run(self, items: list[ScheduledRequest]) -> SampledTokens:
        """Forward the packed step, then sample the requests that reached the end of their tokens."""
        input_ids, positions, metadata = self.prepare_inputs(items)
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)
        sampling = [i for i, item in enumerate(items) if item.is_sampling]
        if not sampling:
            return SampledTokens({})
        last_rows = torch.tensor(_last_rows(items, sampling), device=self.device)
        logits = self.model.compute_logits(hidden[last_rows])  # [num_sampling, vocab]
        requests = [items[i].request for i in sampling]
        result = self.sampler(logits, self._sampling_metadata(requests))
        return SampledTokens(
            {r.request_id: t for r, t in zip(requests, result.token_ids, strict=True)},
            {r.request_id: lp for r, lp in zip(requests, result.logprobs, strict=True)})

    def prepare_inputs(self, items: list[ScheduledRequest]
                        ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Pack token ids and positions [T] and build the attention metadata."""
        block_size, device = self.block_size, self.device
        token_ids: list[int] = []
        positions: list[int] = []
        spans: list[StepSpan] = []
        slots: list[int] = []
        for item in items:
            start, count = item.num_computed_tokens, item.num_new_tokens
            slot = self.residual_slots.slot(item.request.request_id) if self.residual_slots else -1
            spans.append(StepSpan(len(token_ids), start, count, item.block_table, slot))
            token_ids.extend(item.request.all_token_ids[start:start + count])
            positions.extend(range(start, start + count))
            # Plain ints: a tensor per request would cost more than the arithmetic for decodes.
            table = item.block_table
            slots.extend(table[pos // block_size] * block_size + pos % block_size
                         for pos in range(start, start + count))
        num_decodes = sum(1 for item in items if item.num_new_tokens == 1)
        held = [held_blocks(item.block_table) for item in items]
        position_tensor = torch.tensor(positions, dtype=torch.long, device=device)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decodes=num_decodes,
            prefills=[self._prefill_seq(span, *blocks) for span, blocks in zip(spans[num_decodes:], held[num_decodes:],
                                                                                  strict=True)],
            **self._decode_tables(spans[:num_decodes], held[:num_decodes]),
        )
        if self.residual_slots is not None:
            columns = [len(blocks) - 1 for blocks, _ in held[:num_decodes]]
            metadata.int4 = int4_write_plan(spans, num_decodes, columns, block_size, device)
        if self.window is not None:
            metadata.window = self._window_metadata(position_tensor, metadata.num_decodes)
        return torch.tensor(token_ids, device=device), position_tensor, metadata

    def _prefill_seq(self, span: StepSpan, blocks: list[int], indices: list[int]) -> PrefillSeq:
        """A multi-token request's attention inputs: its held blocks, int4 tail and window mask."""
        device = self.device
        seq_len = span.start + span.count
        seq = PrefillSeq(span.first_row, span.count, seq_len, torch.tensor(blocks, dtype=torch.long, device=device))
        if self.residual_slots is not None:
            seq.residual = prefill_tail(span, len(blocks), self.block_size, device)
        if self.window is not None:
            query_pos = torch.arange(span.start, seq_len, device=device)
            seq.key_mask = window_visible(key_positions(indices, self.block_size, device), query_pos,
                                          self.window, self.num_sinks)
        return seq

    def _decode_tables(self, spans: list[StepSpan], held: list[tuple[list[int], list[int]]]
                       ) -> dict[str, torch.Tensor]:
        """Padded block tables [B, max_blocks] and the key mask [B, 1, 1, max_blocks * block_size]."""
        device, size = self.device, self.block_size
        max_blocks = max((len(blocks) for blocks, _ in held), default=0)
        padded = [blocks + [0] * (max_blocks - len(blocks)) for blocks, _ in held]
        block_tables = torch.tensor(padded, dtype=torch.long, device=device).view(len(held), max_blocks)
        query_pos = torch.tensor([span.start for span in spans], dtype=torch.long, device=device)
        if self.window is None:
            key_pos = torch.arange(max_blocks * size, device=device)
            mask = key_pos[None, :] <= query_pos[:, None]
        else:
            # Padding columns get a position past every query: never visible.
            far = max((span.start for span in spans), default=0) + 1
            key_pos = torch.stack([torch.cat([key_positions(indices, size, device),
                                              torch.full(((max_blocks - len(indices)) * size,), far, device=device)])
                                   for _, indices in held]) if held else torch.zeros(0, 0, dtype=torch.long)
            mask = window_visible(key_pos, query_pos[:, None], self.window, self.num_sinks)[:, 0]
        return {"decode_block_tables": block_tables, "decode_mask": mask[:, None, None, :],
                "decode_seq_lens": query_pos + 1}

    def _window_metadata(self, positions: torch.Tensor, num_decodes: int) -> WindowMetadata:
        """Each query's rotation back to the sink-query position S + W - 1 (see WindowMetadata)."""
        delta = (positions - (self.num_sinks + self.window - 1)).clamp_min(0)
        cos, sin = self.model.model.rotary.rotation(delta, next(self.model.parameters()).dtype)
        return WindowMetadata(self.num_sinks, self.window, (cos, -sin), delta[:num_decodes] > 0)

    def _sampling_metadata(self, requests: list) -> SamplingMetadata:
        generators = []
        for request in requests:
            seed = request.sampling_params.seed
            if seed is not None and request.request_id not in self.generators:
                self.generators[request.request_id] = torch.Generator(
                    device=self.device).manual_seed(seed)
            generators.append(self.generators.get(request.request_id))
        return SamplingMetadata(
            params=[r.sampling_params for r in requests],
            generators=generators,
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[r.output_token_ids for r in requests],
            eos_token_ids=requests[0].eos_token_ids,
        )


def _last_rows(items: list[ScheduledRequest], indices: list[int]) -> list[int]:
    """Row of each chosen request's last token in the packed batch."""
    ends, total = [], 0
    for item in items:
        total += item.num_new_tokens
        ends.append(total - 1)
    return [ends[i] for i in indices]
