"""Turns a SchedulerOutput into tensors, runs the model over the paged cache, and samples."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from kvserve.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    CommonAttentionMetadata,
    GroupedAttentionMetadata,
)
from kvserve.config import EngineConfig, ModelConfig
from kvserve.distributed.parallel_state import tp_group
from kvserve.engine.sched_output import ModelRunnerOutput, SchedulerOutput
from kvserve.kv.int4_residual import Int4ResidualLayout
from kvserve.kv.kv_cache import LayerKVCache, allocate_kv_caches
from kvserve.kv.kv_groups import KVCacheGroups
from kvserve.kv.kv_spec import KVCacheSpec
from kvserve.kv.sinks_window import SinksWindow
from kvserve.kv.window_layout import SinksWindowLayout
from kvserve.layers.linear import Linear
from kvserve.loader.weights import ModelSource
from kvserve.models.registry import build_model
from kvserve.platforms import Platform
from kvserve.runner.attention_inputs import build_common_metadata, single_token_rows
from kvserve.runner.cuda_graphs import CapturedStep, DecodeGraphs, StepFunction
from kvserve.runner.input_batch import CachedRequestState, InputBatch, StepBatch
from kvserve.runner.prompt_logprobs import compute_prompt_logprobs
from kvserve.sample.sampler import Sampler, SamplingMetadata
from kvserve.spec.ngram import NgramProposer

if TYPE_CHECKING:
    from kvserve.spec.draft_model import DraftModelProposer

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model weights, the KV-cache tensors, its copy of the running requests and their generators."""

    def __init__(self, config: EngineConfig, platform: Platform, model_config: ModelConfig, source: ModelSource,
                 max_model_len: int, attention_backend: AttentionBackend, show_progress: bool = True,
                 draft: DraftModelProposer | None = None) -> None:
        self.platform = platform
        self.device = platform.device
        self.dtype = config.load.torch_dtype  # activations (quantized weights are stored in other dtypes)
        self.attention_backend = attention_backend  # the one the model's attention layers run on
        # The weight format: gguf (the file's blocks, computed on) or None (dequantized to the model dtype).
        self.quantization = platform.resolve_quantization(config.load.quantization, source, config.load.torch_dtype)
        self.model = load_model(platform, config.load.torch_dtype, self.quantization, model_config, source,
                                max_model_len, attention_backend, show_progress)
        self.kv_caches: list[LayerKVCache] = []
        self.kv_groups = KVCacheGroups(((),), (None,))  # set with the cache
        self.block_size = 0
        self.int4: Int4ResidualLayout | None = None  # int4 caches only
        self.window: SinksWindowLayout | None = None  # sinks + sliding window (StreamingLLM)
        # Unseeded requests share one generator, seeded by the engine's seed.
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.load.seed))
        # A seeded request's generator outlives a preemption: its random stream goes on where it stopped.
        self.generators: dict[str, torch.Generator] = {}
        self.input_batch = InputBatch()
        self.max_num_seqs, self.max_model_len = config.scheduler.max_num_seqs, max_model_len
        self.graphs: DecodeGraphs | None = None  # decode steps replayed from CUDA graphs (captured with the cache)
        spec = config.speculative
        self.draft = draft  # the draft model, when it proposes
        self.proposer: NgramProposer | DraftModelProposer | None = draft
        if spec.speculative_method == "ngram":
            self.proposer = NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)

    @property
    def model_bytes(self) -> int:
        """Bytes of the model's parameters (tied weights counted once) and of their packed copies, and of the
        draft model's."""
        return weight_bytes(self.model) + (0 if self.draft is None else weight_bytes(self.draft.model))

    @property
    def packed_weight_bytes(self) -> int:
        """Bytes the target's linear methods hold beside its parameters (oneDNN-packed copies on a float32 CPU)."""
        return packed_bytes(self.model)

    def allocate_kv_cache(self, specs: list[KVCacheSpec], num_blocks: int, block_size: int,
                          num_residual_slots: int = 0, draft_specs: list[KVCacheSpec] | None = None) -> None:
        """Allocate the paged cache tensors once (int4: plus one residual slot per running request; a draft
        model: its layers in the same blocks)."""
        dtype = self.dtype
        self.kv_groups = KVCacheGroups.from_specs(specs)
        # Layer j of every KV group reads the same tensors (its group's tables never share their blocks).
        slots = allocate_kv_caches(self.kv_groups.page_specs(specs), num_blocks, block_size, self.device, dtype,
                                   num_residual_slots)
        self.kv_caches = [slots[slot] for slot in self.kv_groups.slot_of]
        self.block_size = block_size
        self.model.fused_decode = self.platform.fused_decode(self.model, self.attention_backend, self.kv_caches)
        if any(cache.is_int4 for cache in self.kv_caches):
            self.int4 = Int4ResidualLayout(num_residual_slots, block_size)
        if self.draft is not None:
            self.draft.allocate_kv_cache(draft_specs, num_blocks, block_size, dtype)
        self._capture_graphs(specs)

    def _graph_capture(self, specs: list[KVCacheSpec]) -> Callable[[StepFunction], CapturedStep] | None:
        """The platform's graph capture where the backend and a cache of these specs allow decode graphs, else
        None (every step runs eagerly)."""
        capture = self.platform.decode_graph_capture()
        if (capture is None or not self.attention_backend.supports_cuda_graphs or tp_group().world_size > 1
                or KVCacheGroups.from_specs(specs).num_groups > 1 or any(spec.dtype == "int4" for spec in specs)):
            return None
        return capture

    def _capture_graphs(self, specs: list[KVCacheSpec]) -> None:
        """Capture the decode graphs where the platform, the backend and the cache allow. A failed capture is
        logged and leaves the eager path: slower, still exact."""
        capture = self._graph_capture(specs)
        if capture is None or self.model.fused_decode is not None:
            return
        graphs = DecodeGraphs(self.model, self.attention_backend, self.kv_caches, self.max_num_seqs,
                              -(-self.max_model_len // self.block_size), self.block_size, self.device)
        try:
            graphs.capture(capture)
        except Exception as error:  # noqa: BLE001 - any capture failure: run eagerly, say why
            logger.warning("CUDA graph capture failed (%s: %s): every step runs eagerly; --enforce-eager skips "
                           "the capture", type(error).__name__, error)
            return
        self.graphs = graphs

    @torch.inference_mode()
    def scratch_decode_graphs(self, specs: list[KVCacheSpec], block_size: int) -> DecodeGraphs | None:
        """The decode graphs the cache of these specs will get, captured now over a one-block scratch cache into
        a memory pool of their own: what the platform measures to set their pool aside from the KV budget (they
        are captured after the cache is allocated). None where no graphs will be captured."""
        capture = self._graph_capture(specs)
        if capture is None:
            return None
        scratch = allocate_kv_caches(specs, 1, block_size, self.device, self.dtype)
        graphs = DecodeGraphs(self.model, self.attention_backend, scratch, self.max_num_seqs,
                              -(-self.max_model_len // block_size), block_size, self.device)
        graphs.capture(capture)
        return graphs

    @torch.inference_mode()
    def profile_step(self, specs: list[KVCacheSpec], num_tokens: int, num_rows: int, block_size: int) -> int:
        """Run the largest step the scheduler can make over a scratch cache: one `num_tokens` prefill,
        logits and softmax for `num_rows` rows. Returns the scratch cache's bytes (freed on return)."""
        dtype = self.dtype
        plain = [dataclasses.replace(spec, dtype=str(dtype).removeprefix("torch."), group_size=0)
                 for spec in specs]  # activations are what is measured; a plain cache needs no int4 plan
        num_blocks = -(-num_tokens // block_size)
        scratch = allocate_kv_caches(plain, num_blocks, block_size, self.device, dtype)
        common = build_common_metadata(["profile"], [0], [num_tokens], [list(range(num_blocks))], block_size,
                                       self.device)
        tokens = common.positions
        hidden = self.model(torch.zeros_like(tokens), tokens, scratch, self.attention_backend.build_metadata(common))
        rows = hidden[torch.arange(num_rows, device=self.device) % num_tokens]
        torch.softmax(self.model.compute_logits(rows), dim=-1)
        return sum(cache.num_bytes for cache in scratch)

    def set_window(self, window: SinksWindow | None) -> None:
        """Attend with sinks + a sliding window (the KV manager evicts the blocks in between; the runner's copy of
        each block table follows the same rule)."""
        self.input_batch.window = window
        if window is not None:
            self.graphs = None  # the captured metadata has no window layout
        if self.draft is not None:
            self.draft.set_window(window, self.dtype)
        self.window = SinksWindowLayout.for_model(window, self.model, self.dtype)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes held by the KV-cache tensors (the draft model's included)."""
        draft = 0 if self.draft is None else self.draft.kv_cache_bytes
        return sum(cache.num_bytes for cache in {id(cache): cache for cache in self.kv_caches}.values()) + draft

    def _block_tensors(self) -> list[torch.Tensor]:
        """Every per-block cache tensor ([num_blocks, ...]: keys, values, their scales), layer by layer."""
        names = ("key", "value", "key_scale", "value_scale")
        return [tensor for cache in self.kv_caches for name in names
                if (tensor := getattr(cache, name)) is not None and tensor.numel()]

    def kv_block_layout(self) -> list[tuple[tuple[int, ...], str]]:
        """(shape of one block, dtype) of each per-block tensor: what another instance's blocks must match."""
        return [(tuple(tensor.shape[1:]), str(tensor.dtype)) for tensor in self._block_tensors()]

    def read_kv_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """The blocks' contents in every per-block tensor, as bytes [n] uint8 (host memory)."""
        index = torch.tensor(block_ids, device=self.device)
        parts = [tensor.index_select(0, index).reshape(len(block_ids), -1).view(torch.uint8).reshape(-1)
                 for tensor in self._block_tensors()]
        return torch.cat(parts).cpu()

    def write_kv_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Fill the blocks from bytes read by `read_kv_blocks` on an instance of the same layout."""
        index = torch.tensor(block_ids, device=self.device)
        offset = 0
        for tensor in self._block_tensors():
            shape = (len(block_ids), *tensor.shape[1:])
            size = math.prod(shape) * tensor.element_size()
            part = data[offset:offset + size].clone()  # its own storage: aligned for the dtype's view
            tensor.index_copy_(0, index, part.view(tensor.dtype).view(shape).to(self.device))
            offset += size
        if offset != data.numel():
            raise ValueError(f"received {data.numel()} bytes of KV blocks, expected {offset}")

    def release(self, finished_req_ids: Sequence[str], preempted_req_ids: Sequence[str] = ()) -> None:
        """Forget the generators of finished requests and the int4 residual slots of finished and preempted ones."""
        for request_id in finished_req_ids:
            self.generators.pop(request_id, None)
        if self.int4 is not None:
            for request_id in [*finished_req_ids, *preempted_req_ids]:
                self.int4.release(request_id)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        """Apply the step's diffs, run it, and sample a token for every request that reached its last token."""
        self.release(output.finished_req_ids, output.preempted_req_ids)
        batch = self.input_batch.update(output)
        if not batch.requests:
            return ModelRunnerOutput([], [], [])
        with self.platform.step_context(output.total_num_scheduled_tokens):
            return self._run(batch)

    def _run(self, batch: StepBatch) -> ModelRunnerOutput:
        """Forward the packed step, then sample the requests that reached the end of their tokens: one token each,
        or, for a request verifying k drafts, one at each of its last 1 + k rows, kept while they match."""
        hidden = self._forward(batch)
        if not tp_group().is_driver:  # a tensor-parallel worker: its part of the logits' gathers, no sampling
            self._worker_logits(batch, hidden)
            return ModelRunnerOutput(batch.req_ids, [[] for _ in batch.requests], [])
        sampled: list[list[int]] = [[] for _ in batch.requests]
        logprobs: list[list[dict[int, float]] | None] = [None] * len(batch.requests)
        if batch.sampling:
            drafts = [batch.drafts[i] for i in batch.sampling]
            rows = torch.tensor(_sampling_rows(batch.num_new_tokens, batch.sampling, drafts), device=self.device)
            logits = self.model.compute_logits(hidden[rows])  # [sampling rows, vocab]
            states = [batch.requests[i] for i in batch.sampling]
            result = self.sampler(logits, self._with_grammar(self._sampling_metadata(states, drafts), batch))
            row = 0
            for index, request_drafts in zip(batch.sampling, drafts, strict=True):
                tokens = result.token_ids[row:row + len(request_drafts) + 1]
                count = num_accepted(request_drafts, tokens) + 1
                sampled[index] = tokens[:count]
                if request_drafts:
                    batch.requests[index].drafting.update(len(request_drafts), count - 1, self.proposer.max_drafts)
                if result.logprobs[row] is not None:
                    logprobs[index] = result.logprobs[row:row + count]
                row += len(request_drafts) + 1
        prompt_logprobs = compute_prompt_logprobs(self.model, hidden, batch)  # {} unless a request asked
        return ModelRunnerOutput(batch.req_ids, sampled, logprobs, prompt_logprobs, self._propose(batch, sampled))

    def _worker_logits(self, batch: StepBatch, hidden: torch.Tensor) -> None:
        """The LM head calls the driver makes this step (each gathers every rank's vocabulary slice)."""
        if batch.sampling:
            drafts = [batch.drafts[i] for i in batch.sampling]
            self.model.compute_logits(hidden[_sampling_rows(batch.num_new_tokens, batch.sampling, drafts)])
        compute_prompt_logprobs(self.model, hidden, batch)

    def _propose(self, batch: StepBatch, sampled: list[list[int]]) -> dict[str, list[int]]:
        """Draft tokens for each request that sampled, from its tokens and the ones just sampled, unless the
        scheduler will verify none next step (a grammar-constrained request's drafts are masked row by row)."""
        if self.proposer is None or not batch.propose_drafts:
            return {}
        wanted = {}  # batch index -> drafts to propose
        for index, (state, tokens) in enumerate(zip(batch.requests, sampled, strict=True)):
            num_drafts = state.drafting.wanted(self.proposer.max_drafts) if tokens else 0
            if num_drafts:
                wanted[index] = num_drafts
        return self.proposer.propose_step(batch, sampled, wanted)

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        """Hidden states [T, hidden_size] of the packed step: from a decode graph where one fits, else eagerly."""
        ids, commons = self._common_inputs(batch)
        if self.graphs is not None and len(commons) == 1 and self.graphs.fits(commons[0]):
            return self.graphs.run(ids, commons[0])
        return self.model(ids, commons[0].positions, self.kv_caches, self._attention_metadata(commons))

    def prepare_inputs(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Token ids and positions [T] of the packed step, and the backend's attention metadata (once for every
        layer)."""
        ids, commons = self._common_inputs(batch)
        return ids, commons[0].positions, self._attention_metadata(commons)

    def _common_inputs(self, batch: StepBatch) -> tuple[torch.Tensor, list[CommonAttentionMetadata]]:
        """Token ids [T] of the packed step and the common metadata of each KV group (one but for a hybrid
        cache)."""
        # A decode verifying k drafts attends as 1 + k single-token rows: verify steps run on the decode kernels.
        rows = single_token_rows(batch.req_ids, batch.num_computed_tokens, batch.num_new_tokens, batch.block_tables,
                                 [bool(drafts) for drafts in batch.drafts])
        ids = torch.tensor(batch.token_ids, device=self.device)
        groups = self.kv_groups
        if groups.num_groups == 1:
            return ids, [build_common_metadata(*rows, self.block_size, self.device, self.window, self.int4,
                                               groups.windows[0])]
        # A hybrid cache: each group's tables are every num_groups-th entry of the request's interleaved table.
        req_ids, computed, counts, tables = rows
        return ids, [build_common_metadata(req_ids, computed, counts,
                                           [table[group::groups.num_groups] for table in tables], self.block_size,
                                           self.device, sliding_window=window)
                     for group, window in enumerate(groups.windows)]

    def _attention_metadata(self, commons: list[CommonAttentionMetadata]) -> AttentionMetadata:
        """The backend's metadata of the step (a hybrid cache: one per group, chosen layer by layer)."""
        if len(commons) == 1:
            return self.attention_backend.build_metadata(commons[0])
        return GroupedAttentionMetadata([self.attention_backend.build_metadata(common) for common in commons],
                                        self.kv_groups.group_of)

    def _sampling_metadata(self, requests: list[CachedRequestState], drafts: list[list[int]]) -> SamplingMetadata:
        """One row per sampling position: a request verifying k drafts has 1 + k rows, row j seeing its output
        followed by the first j drafts (penalties and min_tokens count them; its generator draws row by row)."""
        for request in requests:
            seed = request.sampling_params.seed
            if seed is not None and request.req_id not in self.generators:
                self.generators[request.req_id] = torch.Generator(
                    device=self.device).manual_seed(seed)
        rows = [(request, request_drafts[:j]) for request, request_drafts in zip(requests, drafts, strict=True)
                for j in range(len(request_drafts) + 1)]
        return SamplingMetadata(
            params=[r.sampling_params for r, _ in rows],
            generators=[self.generators.get(r.req_id) for r, _ in rows],
            prompt_token_ids=[r.prompt_token_ids for r, _ in rows],
            output_token_ids=[[*r.output_token_ids, *d] if d else r.output_token_ids for r, d in rows],
            eos_token_ids=requests[0].eos_token_ids,
        )

    def _with_grammar(self, metadata: SamplingMetadata, batch: StepBatch) -> SamplingMetadata:
        """Add the step's grammar bitmask (structured output), its rows mapped to sampling rows: a constrained
        request's 1 + k rows (k drafts) are consecutive in both."""
        if batch.grammar_bitmask is not None:
            first_row, row = {}, 0
            for index in batch.sampling:
                first_row[batch.requests[index].req_id] = (row, len(batch.drafts[index]) + 1)
                row += len(batch.drafts[index]) + 1
            metadata.grammar_rows = [start + j for req_id in batch.structured_output_req_ids
                                     for start, count in [first_row[req_id]] for j in range(count)]
            metadata.grammar_bitmask = torch.from_numpy(batch.grammar_bitmask).to(self.device)
        return metadata

def load_model(platform: Platform, dtype: torch.dtype, quantization: str | None, model_config: ModelConfig,
               source: ModelSource, max_model_len: int, attention_backend: AttentionBackend,
               show_progress: bool = True) -> nn.Module:
    """Build the model on the platform's device, give its layers the platform's kernels for the weight format,
    stream the checkpoint in (with a progress bar) and let the layers process their weights."""
    model = build_model(model_config, max_model_len, attention_backend).to(platform.device, dtype)
    platform.prepare_model(model, dtype, quantization)
    weights = source.iter_weights(dtype, keep_quantized=True) if quantization == "gguf" else source.iter_weights(dtype)
    weights = tqdm(weights, total=source.num_weight_tensors, desc="Loading weights", unit="tensor",
                   disable=not show_progress, leave=False)
    with torch.no_grad():
        model.load_weights((name, t.to(platform.device)) for name, t in weights)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters (tied weights counted once) and of their packed copies."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values()) + packed_bytes(model)


def packed_bytes(model: nn.Module) -> int:
    """Bytes a model's linear methods hold beside its parameters (oneDNN-packed copies on a float32 CPU)."""
    return sum(module.method.derived_bytes(module) for module in model.modules() if isinstance(module, Linear))


def _sampling_rows(num_new_tokens: list[int], indices: list[int], drafts: list[list[int]]) -> list[int]:
    """Rows of the packed batch that sample: each chosen request's last 1 + len(its drafts) rows."""
    ends, total = [], 0
    for count in num_new_tokens:
        total += count
        ends.append(total)
    return [row for i, request_drafts in zip(indices, drafts, strict=True)
            for row in range(ends[i] - len(request_drafts) - 1, ends[i])]


def num_accepted(drafts: list[int], sampled: list[int]) -> int:
    """How many leading drafts the target sampled too. Exact in distribution for drafts that are single
    guesses (n-gram, a greedy draft model): sampling x ~ p and accepting d when x == d accepts with
    probability p(d), and a rejected position's x is distributed as p without d, renormalized: the
    rejection-sampling rule of Leviathan et al. for a draft distribution that is a point mass."""
    count = 0
    for draft, token in zip(drafts, sampled, strict=False):
        if draft != token:
            break
        count += 1
    return count
