"""Turns a SchedulerOutput into tensors, runs the model over the paged cache, and samples."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

from kvserve.attention.backend import AttentionMetadata, PrefillSeq, WindowMetadata
from kvserve.engine.sched_output import ModelRunnerOutput, SchedulerOutput
from kvserve.kv.kv_cache import LayerKVCache, allocate_kv_caches
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.kv.window_eviction import WindowEviction
from kvserve.layers.host_blas import host_blas_step
from kvserve.layers.linear import Linear
from kvserve.layers.norm import RMSNorm
from kvserve.loader.weights import ModelSource
from kvserve.runner.cache_plans import (
    ResidualSlots,
    StepSpan,
    held_blocks,
    int4_write_plan,
    key_positions,
    prefill_tail,
    window_visible,
)
from kvserve.runner.input_batch import CachedRequestState, InputBatch, StepBatch
from kvserve.sample.sampler import Sampler, SamplingMetadata


class ModelRunner:
    """Owns the model weights, the KV-cache tensors, its copy of the running requests and their generators."""

    def __init__(self, model: nn.Module, device: torch.device, seed: int = 0) -> None:
        self.model = model
        self.device = device
        self.kv_caches: list[LayerKVCache] = []
        self.block_size = 0
        self.residual_slots: ResidualSlots | None = None  # int4 caches only
        self.window: int | None = None  # sinks + sliding window (StreamingLLM)
        self.num_sinks = 0
        self.cpu_blas_max_tokens = 0  # steps of up to this many tokens use host_blas (0: never)
        self.packed_weight_bytes = 0  # oneDNN copies of the Linear weights (float32 CPU)
        # Unseeded requests share one generator, seeded by the engine's seed.
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        # A seeded request's generator outlives a preemption: its random stream goes on where it stopped.
        self.generators: dict[str, torch.Generator] = {}
        self.input_batch = InputBatch()

    def load_weights(self, source: ModelSource, dtype: torch.dtype, show_progress: bool) -> None:
        """Stream the checkpoint's tensors into the model, with a progress bar."""
        weights = tqdm(source.iter_weights(dtype), total=source.num_weight_tensors,
                       desc="Loading weights", unit="tensor", disable=not show_progress,
                       leave=False)
        with torch.no_grad():
            self.model.load_weights((name, t.to(self.device)) for name, t in weights)

    def prepare_cpu_layers(self, pack_for_onednn: bool, use_native_ops: bool) -> None:
        """Float32 CPU: give every Linear a oneDNN-packed copy of its weight (faster steps of several rows) and/or
        route one-row matmuls and every RMSNorm to the compiled kernels (layers/native_ops.py)."""
        linears = [module for module in self.model.modules() if isinstance(module, Linear)]
        if pack_for_onednn:
            self.packed_weight_bytes = sum(module.pack_for_onednn() for module in linears)
        for module in linears:
            module.use_native_gemv = use_native_ops
        for module in self.model.modules():
            if isinstance(module, RMSNorm):
                module.use_native = use_native_ops

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
        self.input_batch.window = None if window is None else WindowEviction(window, num_sinks, self.block_size)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes held by the KV-cache tensors."""
        return sum(cache.num_bytes for cache in self.kv_caches)

    def release(self, finished_req_ids: Sequence[str], preempted_req_ids: Sequence[str] = ()) -> None:
        """Forget the generators of finished requests and the int4 residual slots of finished and preempted ones."""
        for request_id in finished_req_ids:
            self.generators.pop(request_id, None)
        if self.residual_slots is not None:
            for request_id in [*finished_req_ids, *preempted_req_ids]:
                self.residual_slots.release(request_id)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        """Apply the step's diffs, run it, and sample a token for every request that reached its last token."""
        self.release(output.finished_req_ids, output.preempted_req_ids)
        batch = self.input_batch.update(output)
        if not batch.requests:
            return ModelRunnerOutput([], [], [])
        use_host_blas = output.total_num_scheduled_tokens <= self.cpu_blas_max_tokens
        with host_blas_step() if use_host_blas else contextlib.nullcontext():
            return self._run(batch)

    def _run(self, batch: StepBatch) -> ModelRunnerOutput:
        """Forward the packed step, then sample the requests that reached the end of their tokens."""
        input_ids, positions, metadata = self.prepare_inputs(batch)
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)
        sampled: list[list[int]] = [[] for _ in batch.requests]
        logprobs: list[list[dict[int, float]] | None] = [None] * len(batch.requests)
        if batch.sampling:
            last_rows = torch.tensor(_last_rows(batch.num_new_tokens, batch.sampling), device=self.device)
            logits = self.model.compute_logits(hidden[last_rows])  # [num_sampling, vocab]
            states = [batch.requests[i] for i in batch.sampling]
            result = self.sampler(logits, self._sampling_metadata(states))
            for index, token_id, token_logprobs in zip(batch.sampling, result.token_ids, result.logprobs,
                                                       strict=True):
                sampled[index] = [token_id]
                logprobs[index] = None if token_logprobs is None else [token_logprobs]
        return ModelRunnerOutput(batch.req_ids, sampled, logprobs)

    def prepare_inputs(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Token ids and positions [T] of the packed step, and the attention metadata."""
        block_size, device = self.block_size, self.device
        positions: list[int] = []
        spans: list[StepSpan] = []
        slots: list[int] = []
        for state, start, count, table in zip(batch.requests, batch.num_computed_tokens, batch.num_new_tokens,
                                              batch.block_tables, strict=True):
            slot = self.residual_slots.slot(state.req_id) if self.residual_slots else -1
            spans.append(StepSpan(len(positions), start, count, table, slot))
            positions.extend(range(start, start + count))
            # Plain ints: a tensor per request would cost more than the arithmetic for decodes.
            slots.extend(table[pos // block_size] * block_size + pos % block_size
                         for pos in range(start, start + count))
        num_decodes = sum(1 for count in batch.num_new_tokens if count == 1)
        held = [held_blocks(table) for table in batch.block_tables]
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
        return torch.tensor(batch.token_ids, device=device), position_tensor, metadata

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

    def _sampling_metadata(self, requests: list[CachedRequestState]) -> SamplingMetadata:
        generators = []
        for request in requests:
            seed = request.sampling_params.seed
            if seed is not None and request.req_id not in self.generators:
                self.generators[request.req_id] = torch.Generator(
                    device=self.device).manual_seed(seed)
            generators.append(self.generators.get(request.req_id))
        return SamplingMetadata(
            params=[r.sampling_params for r in requests],
            generators=generators,
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[r.output_token_ids for r in requests],
            eos_token_ids=requests[0].eos_token_ids,
        )


def _last_rows(num_new_tokens: list[int], indices: list[int]) -> list[int]:
    """Row of each chosen request's last token in the packed batch."""
    ends, total = [], 0
    for count in num_new_tokens:
        total += count
        ends.append(total - 1)
    return [ends[i] for i in indices]
