"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured once over static buffers.

A decode-only step of n rows runs the graph of the smallest bucket >= n. The runner's step inputs are copied into
the static buffers the graph was captured on (token ids, positions, slot mapping, sequence lengths, block tables);
rows n..bucket are padding: slot -1 (the K/V write skips it), length 1 over whatever block their table row holds,
outputs never read. The attention backend's metadata is built inside the captured call, so its derived tensors
(int32 lengths, views of the table) are part of the graph, and the host values it reads (the bucket's size, the
table's full width) are the same at every replay: a backend serves graphs only where that holds
(`supports_cuda_graphs`).

`CapturedStep` is the graph seam: CUDA graphs on a GPU, `EagerStep` (the same buffers and padding, re-run eagerly)
where there is no GPU, so that the bucket logic is tested on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from kvserve.attention.backend import AttentionBackend, CommonAttentionMetadata
from kvserve.kv.kv_cache import LayerKVCache

logger = logging.getLogger(__name__)

StepFunction = Callable[[], torch.Tensor]  # runs the model on the static buffers -> hidden [bucket, hidden_size]


class CapturedStep(Protocol):
    """A step function made replayable: `replay()` runs it on the buffers' current contents."""

    def replay(self) -> torch.Tensor: ...


class EagerStep:
    """No graph: replay calls the function again (the CPU's stand-in for a CUDA graph, for tests)."""

    def __init__(self, function: StepFunction) -> None:
        self.function = function
        function()  # as a capture would: a first run (nothing is written: every slot is padding)

    def replay(self) -> torch.Tensor:
        return self.function()


class CudaGraphStep:
    """The function captured into a CUDA graph; replay re-runs its kernels and refreshes its static output."""

    def __init__(self, function: StepFunction, pool: tuple[int, int]) -> None:
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels), as torch's graph docs ask.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            function()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = function()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


def cuda_graph_capture() -> Callable[[StepFunction], CapturedStep]:
    """Capture CUDA graphs that share one memory pool (the buckets run one at a time)."""
    pool = torch.cuda.graph_pool_handle()
    return lambda function: CudaGraphStep(function, pool)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch-size buckets: powers of two below max_num_seqs, then max_num_seqs itself."""
    sizes, size = [], 1
    while size < max_num_seqs:
        sizes.append(size)
        size *= 2
    return [*sizes, max_num_seqs]


@dataclass
class StaticInputs:
    """The buffers every graph reads, sized for the largest bucket: [B] each, block_table [B, max_blocks]."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor  # [B + 1]: 0, 1, ..., B (one token per row), never rewritten
    block_table: torch.Tensor

    @classmethod
    def allocate(cls, max_rows: int, max_blocks: int, device: torch.device) -> StaticInputs:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        return cls(zeros(max_rows), zeros(max_rows), torch.full((max_rows,), -1, dtype=torch.long, device=device),
                   torch.ones(max_rows, dtype=torch.long, device=device),
                   torch.arange(max_rows + 1, dtype=torch.long, device=device), zeros(max_rows, max_blocks))

    def bucket_metadata(self, size: int, block_size: int) -> CommonAttentionMetadata:
        """A decode step of `size` rows over views of the buffers; host values fixed for every replay (each row
        attends over the table's full width: the kernels stop at the row's length on the device)."""
        max_blocks = self.block_table.shape[1]
        return CommonAttentionMetadata(
            positions=self.positions[:size], slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            num_computed_tokens=self.positions[:size], block_table=self.block_table[:size], num_reqs=size,
            num_decode_tokens=size, block_size=block_size, query_start_loc_host=list(range(size + 1)),
            seq_lens_host=[max_blocks * block_size] * size, num_blocks_host=[max_blocks] * size, max_query_len=1)

    def fill(self, input_ids: torch.Tensor, common: CommonAttentionMetadata, size: int) -> None:
        """Copy a decode step's n rows in and pad rows n..size (no write, length 1)."""
        n, width = common.num_reqs, common.block_table.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(common.positions)
        self.slot_mapping[:n].copy_(common.slot_mapping)
        self.seq_lens[:n].copy_(common.seq_lens)
        self.block_table[:n, :width].copy_(common.block_table)  # columns past `width` are never read
        if size > n:
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(1)


class DecodeGraphs:
    """Replayable decode steps of a model over its KV caches, one per bucket of batch sizes."""

    def __init__(self, model: nn.Module, backend: AttentionBackend, kv_caches: list[LayerKVCache],
                 max_num_seqs: int, max_blocks_per_seq: int, block_size: int, device: torch.device) -> None:
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        self.static = StaticInputs.allocate(self.sizes[-1], max_blocks_per_seq, device)
        self.steps: dict[int, CapturedStep] = {}
        self.num_replays: dict[int, int] = dict.fromkeys(self.sizes, 0)  # bucket -> steps it ran (tests, logs)

    def capture(self, capture: Callable[[StepFunction], CapturedStep]) -> None:
        """Capture every bucket, largest first (the smaller graphs then fit in the memory the largest freed)."""
        started = time.monotonic()
        for size in reversed(self.sizes):
            self.steps[size] = capture(self._step_function(size))
        logger.info("captured decode graphs for batch sizes %s in %.1f s", self.sizes, time.monotonic() - started)

    def _step_function(self, size: int) -> StepFunction:
        static, common = self.static, self.static.bucket_metadata(size, self.block_size)

        def step() -> torch.Tensor:
            metadata = self.backend.build_metadata(common)  # inside the graph: its derived tensors replay too
            return self.model(static.input_ids[:size], static.positions[:size], self.kv_caches, metadata)

        return step

    def fits(self, common: CommonAttentionMetadata) -> bool:
        """Whether a step can replay a graph: decodes only (one token per row), at most the largest bucket, and
        no per-step layout the captured metadata lacks (sinks + window, int4 residual, a sliding-window group)."""
        return (common.num_decode_tokens == common.num_reqs <= self.sizes[-1] and common.num_reqs > 0
                and common.window is None and common.int4 is None and common.sliding_window is None
                and common.block_table.shape[1] <= self.static.block_table.shape[1])

    def run(self, input_ids: torch.Tensor, common: CommonAttentionMetadata) -> torch.Tensor:
        """Hidden states [n, hidden_size] of a decode step of n rows, from the smallest bucket >= n."""
        size = next(size for size in self.sizes if size >= common.num_reqs)
        self.static.fill(input_ids, common, size)
        self.num_replays[size] += 1
        return self.steps[size].replay()[:common.num_reqs]
