"""Turns a SchedulerOutput into tensors, runs the model over the paged cache, and samples."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from kvserve.attention.backend import AttentionMetadata, PrefillSeq
from kvserve.engine.scheduler import SampledTokens, ScheduledRequest, SchedulerOutput
from kvserve.kv.kv_cache import LayerKVCache, allocate_kv_caches
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.loader.weights import ModelSource
from kvserve.sample.sampler import Sampler, SamplingMetadata


class ModelRunner:
    """Owns the model weights, the KV-cache tensors and the per-request sampling generators."""

    def __init__(self, model: nn.Module, device: torch.device, seed: int = 0) -> None:
        self.model = model
        self.device = device
        self.kv_caches: list[LayerKVCache] = []
        self.block_size = 0
        # Unseeded requests share one generator, seeded by the engine's seed.
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        self.generators: dict[str, torch.Generator] = {}

    def load_weights(self, source: ModelSource, dtype: torch.dtype, show_progress: bool) -> None:
        """Stream the checkpoint's tensors into the model, with a progress bar."""
        weights = tqdm(source.iter_weights(dtype), total=source.num_weight_tensors,
                       desc="Loading weights", unit="tensor", disable=not show_progress,
                       leave=False)
        with torch.no_grad():
            self.model.load_weights((name, t.to(self.device)) for name, t in weights)

    @property
    def model_bytes(self) -> int:
        """Bytes of the model's parameters (tied weights counted once)."""
        seen = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        return sum(seen.values())

    def allocate_kv_cache(self, specs: list[KVCacheSpec], num_blocks: int, block_size: int) -> None:
        """Allocate the paged cache tensors once."""
        self.kv_caches = allocate_kv_caches(specs, num_blocks, block_size, self.device)
        self.block_size = block_size

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes held by the KV-cache tensors."""
        return sum(cache.num_bytes for cache in self.kv_caches)

    def release(self, request_ids: list[str]) -> None:
        """Forget per-request state of finished requests."""
        for request_id in request_ids:
            self.generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> SampledTokens:
        """Run one step and sample a token for every request that reached the end of its tokens."""
        self.release(output.finished_request_ids)
        # Single-token queries first: the attention batches them in one call.
        items = sorted(output.scheduled, key=lambda s: s.num_new_tokens != 1)
        input_ids, positions, metadata = self._prepare_inputs(items)
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

    def _prepare_inputs(self, items: list[ScheduledRequest]
                        ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Pack token ids and positions [T] and build the attention metadata."""
        block_size, device = self.block_size, self.device
        token_ids: list[int] = []
        positions: list[int] = []
        decode_slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_seq_lens: list[int] = []
        prefill_slots: list[torch.Tensor] = []
        prefills: list[PrefillSeq] = []
        for item in items:
            start, count = item.num_computed_tokens, item.num_new_tokens
            token_ids.extend(item.request.all_token_ids[start:start + count])
            if count == 1:
                positions.append(start)
                decode_slots.append(item.block_table[start // block_size] * block_size
                                    + start % block_size)
                decode_tables.append(item.block_table)
                decode_seq_lens.append(start + 1)
                continue
            positions.extend(range(start, start + count))
            table = torch.tensor(item.block_table, dtype=torch.long, device=device)
            pos = torch.arange(start, start + count, device=device)
            prefill_slots.append(table[pos // block_size] * block_size + pos % block_size)
            prefills.append(PrefillSeq(len(token_ids) - count, count, start + count, table))
        slots = torch.tensor(decode_slots, dtype=torch.long, device=device)
        metadata = AttentionMetadata(
            slot_mapping=torch.cat([slots, *prefill_slots]) if prefill_slots else slots,
            num_decodes=len(decode_slots),
            prefills=prefills,
            **self._decode_tables(decode_tables, decode_seq_lens),
        )
        return (torch.tensor(token_ids, device=device), torch.tensor(positions, device=device),
                metadata)

    def _decode_tables(self, tables: list[list[int]], seq_lens: list[int]) -> dict[str, torch.Tensor]:
        """Padded block tables [B, max_blocks] and the key mask [B, 1, 1, max_blocks * block_size]."""
        max_blocks = max((len(t) for t in tables), default=0)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        block_tables = torch.tensor(padded, dtype=torch.long, device=self.device)
        key_pos = torch.arange(max_blocks * self.block_size, device=self.device)
        lens = torch.tensor(seq_lens, dtype=torch.long, device=self.device)
        mask = (key_pos[None, :] < lens[:, None])[:, None, None, :]
        return {"decode_block_tables": block_tables.view(len(tables), max_blocks),
                "decode_mask": mask}

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
