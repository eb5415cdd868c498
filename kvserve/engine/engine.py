"""The engine: requests in, one scheduler/runner step at a time, RequestOutputs out."""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvserve.attention.backend import AttentionRequirements
from kvserve.attention.selector import create_attention_backend
from kvserve.config import EngineConfig, ModelConfig
from kvserve.distributed.executor import TensorParallelRunner, TensorParallelWorkers, per_rank_threads
from kvserve.distributed.sharding import shard_heads
from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.request import Request, RequestStatus
from kvserve.engine.scheduler import Scheduler, SpecDecodeStats
from kvserve.engine.stop import check_stop
from kvserve.inputs import InputProcessor, PromptInput, read_chat_template
from kvserve.kv.dtypes import model_dtype_bytes
from kvserve.kv.int4_residual import num_residual_slots, residual_bytes
from kvserve.kv.kv_groups import KVCacheGroups, blocks_per_request, max_context
from kvserve.kv.kv_manager import KVCacheManager
from kvserve.kv.kv_memory import kv_memory_report, shape_from_hf_config
from kvserve.kv.kv_snapshot import kv_snapshot
from kvserve.kv.kv_spec import KVCacheSpec, bytes_per_block, bytes_per_token
from kvserve.kv.sinks_window import SinksWindow, max_blocks_per_request
from kvserve.loader.weights import open_model
from kvserve.models.registry import model_class
from kvserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvserve.platforms import get_platform
from kvserve.platforms.cuda_memory import GIB
from kvserve.runner.model_runner import ModelRunner
from kvserve.sampling_params import SamplingParams
from kvserve.spec.draft_model import load_draft_model
from kvserve.structured.manager import StructuredOutputManager

if TYPE_CHECKING:
    import torch

    from kvserve.attention.backend import AttentionBackend
    from kvserve.platforms import Platform

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Engine-wide numbers: load, KV-cache occupancy, memory and token counts."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_cache_usage: float
    num_preemptions: int
    num_prompt_tokens: int
    num_generation_tokens: int
    model_bytes: int
    kv_cache_bytes: int
    peak_rss_bytes: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which were found cached
    prompt_throughput: float  # prefill tokens (prompt chunks, recomputes) per second, over the last few seconds
    generation_throughput: float  # tokens generated per second, over the last few seconds
    spec_decode: SpecDecodeStats  # speculative decoding's drafts and acceptance so far (zeros when off)


@dataclass
class _Sequence:
    """One of a request's `n` samples: the scheduler's request plus its text state."""

    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[dict[int, float]] | None
    num_returned_tokens: int = 0


@dataclass
class _Group:
    """A user request: its prompt and its `n` sequences."""

    prompt: str | None
    prompt_token_ids: list[int]
    arrival_time: float
    sequences: list[_Sequence] = field(default_factory=list)
    # With prompt_logprobs: filled by the first sequence's prompt steps; the first prompt token has none.
    prompt_logprobs: list[dict[int, float] | None] | None = None


_WARM_UP_ID = "kvserve-warm-up"


class Engine:
    """Loads the model, owns scheduler, KV manager and runner, and steps them."""

    def __init__(self, config: EngineConfig, show_progress: bool = True) -> None:
        self.workers: TensorParallelWorkers | None = None
        try:
            self._build(per_rank_threads(config), show_progress)
        except BaseException:
            self.shutdown()  # the workers spawned so far, and the platform's settings
            raise

    def _build(self, config: EngineConfig, show_progress: bool) -> None:
        started = time.monotonic()
        self.config = config
        self.platform = get_platform(config)
        self.platform.configure()  # process-wide settings, undone by shutdown() where they can be
        self.device = self.platform.device
        source = open_model(config.load.model)
        self.model_config = ModelConfig.from_hf_config(source.hf_config)
        _check_parallel(config, self.model_config)
        self.tokenizer = source.load_tokenizer()
        if config.load.chat_template is not None:
            self.tokenizer.chat_template = read_chat_template(config.load.chat_template)
        max_model_len = default_max_model_len(config, self.model_config)
        architecture = model_class(self.model_config)
        if config.cache.kv_window and not architecture.supports_kv_window:
            raise ValueError(f"kv_window is not supported for {self.model_config.architecture}")
        storage_dtype = config.cache.storage_dtype(config.load.dtype)
        self.attention_backend = attention_backend_for(config, self.model_config, self.device)
        # Tensor parallelism: the worker processes join first (the layers are built as this rank's shards).
        self.workers = TensorParallelWorkers(config) if config.parallel.tensor_parallel_size > 1 else None
        # A draft model's cache: int8 under an int4 target (int4's per-block key scales and full-precision
        # residual block are the target's alone), else the target's format.
        draft_dtype = "int8" if storage_dtype == "int4" else storage_dtype
        draft = (load_draft_model(config, self.platform, self.model_config, max_model_len, draft_dtype,
                                  show_progress) if config.speculative.speculative_method == "draft_model" else None)
        runner = ModelRunner(config, self.platform, self.model_config, source, max_model_len, self.attention_backend,
                             show_progress, draft)
        self.runner = runner if self.workers is None else TensorParallelRunner(runner, self.workers)
        model = self.runner.model
        block_size = config.cache.resolved_block_size
        specs = model.kv_cache_specs(storage_dtype)
        draft_specs = [] if draft is None else draft.kv_cache_specs(draft_dtype)  # its layers in the same blocks
        if config.cache.kv_cache_dtype == "int4":  # keys share a per-channel scale across one block
            specs = [dataclasses.replace(spec, group_size=block_size) for spec in specs]
        self.kv_groups = KVCacheGroups.from_specs(specs)
        self._check_hybrid(draft_specs)
        self.kv_window = (SinksWindow(config.cache.kv_window, config.cache.kv_sinks, block_size)
                          if config.cache.kv_window else None)
        # int4: every running request keeps its newest, incomplete block in full precision.
        num_slots = num_residual_slots(specs, config.scheduler.max_num_seqs)
        self.kv_residual_bytes = residual_bytes(specs, block_size, config.load.torch_dtype, num_slots)
        num_blocks = self._num_kv_blocks(specs, max_model_len, draft_specs)
        self.runner.allocate_kv_cache(specs, num_blocks, block_size, num_slots, draft_specs)
        self.model_bytes = self.runner.model_bytes  # fixed from here on; summing it walks every module
        # A single request must always fit in the cache, or preemption could never make room; with a window
        # it only ever holds its sinks and window (checked in _num_kv_blocks), so the context is not capped.
        chunk = config.scheduler.max_num_batched_tokens
        self.max_model_len = (max_model_len if config.cache.kv_window
                              else max_context(self.kv_groups.windows, num_blocks, block_size, chunk, max_model_len))
        bytes_per = bytes_per_token(specs + draft_specs)
        self.kv_bytes_per_token = int(bytes_per) if bytes_per.denominator == 1 else float(bytes_per)
        self.kv_manager = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching,
                                         config.cache.kv_window, config.cache.kv_sinks, self.kv_groups.windows)
        self.runner.set_window(self.kv_window)
        self.scheduler = Scheduler(dataclasses.replace(config.scheduler, max_model_len=self.max_model_len),
                                   self.kv_manager, config.speculative.speculative_disable_by_batch_size,
                                   config.speculative.num_lookahead_tokens, config.cache.kv_cache_dtype == "int4")
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.input_processor = InputProcessor(self.tokenizer, self.model_config.vocab_size, self.max_model_len)
        self.structured = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self._groups: dict[str, _Group] = {}
        self._sequence_of: dict[str, tuple[str, int]] = {}  # child request id -> (group id, index)
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._throughput = ThroughputWindow()
        self._warm_up()
        logger.info("%s ready in %.1f s: model %.2f GiB; KV cache %.2f GiB (%s), %s blocks of %d tokens = %s tokens "
                    "of context; max_model_len %s", source.path.name, time.monotonic() - started,
                    self.model_bytes / GIB, self.runner.kv_cache_bytes / GIB, storage_dtype, f"{num_blocks:,}",
                    block_size, self._context_that_fits(num_blocks, block_size), f"{self.max_model_len:,}")

    def _warm_up(self) -> None:
        """Run one short greedy request through the whole path (its prefill, a decode, sampling, detokenizing), so
        that the first user's request does not pay for first calls (the native kernels' and oneDNN's set-up, the
        first pages of scratch memory). Nothing of it is kept: its blocks are not cached, its counts are reset."""
        caching, self.kv_manager.enable_prefix_caching = self.kv_manager.enable_prefix_caching, False
        length = max(min(8, self.max_model_len - 2), 1)
        prompt = [token % self.model_config.vocab_size for token in range(1, length + 1)]
        self.add_request(_WARM_UP_ID, {"prompt_token_ids": prompt},
                         SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        while self.has_unfinished_requests():
            for output in self.step():
                if output.error is not None:  # a model that cannot run one step must not start serving
                    raise RuntimeError(f"the warm-up request failed: {output.error}")
        self.step()  # an empty step tells the runner the request finished (it frees its state, int4's residual slot)
        self.kv_manager.enable_prefix_caching = caching
        self.kv_manager.num_prefix_queries = self.kv_manager.num_prefix_hits = 0
        self.scheduler.num_preemptions, self.scheduler.spec_stats = 0, SpecDecodeStats()
        self.num_prompt_tokens = self.num_generation_tokens = 0
        self._throughput = ThroughputWindow()

    def _context_that_fits(self, num_blocks: int, block_size: int) -> str:
        """Tokens of context the cache holds; with a hybrid cache, for one request, and how many more than a full
        cache of the same bytes would hold."""
        groups = self.kv_groups
        if not groups.is_hybrid:
            return f"{num_blocks * block_size:,}"
        full = num_blocks // groups.num_groups * block_size
        fits = max_context(groups.windows, num_blocks, block_size, self.config.scheduler.max_num_batched_tokens,
                           2**31)
        sliding = sum(window is not None for window in groups.windows)
        return (f"{fits:,} (hybrid: {groups.num_groups - sliding} full and {sliding} sliding-window groups of "
                f"{groups.group_size} layers; {fits / full:.1f}x the {full:,} of a full cache)")

    def _num_kv_blocks(self, specs: list[KVCacheSpec], max_model_len: int, draft_specs: list[KVCacheSpec]) -> int:
        """Blocks bought by the budget (after the int4 residual; a block holds the draft model's layers too), but
        no more than max_num_seqs requests need."""
        config = self.config
        budget = self._kv_budget(specs, max_model_len)
        block_size = config.cache.resolved_block_size
        per_block = bytes_per_block(self.kv_groups.page_specs(specs) + draft_specs, block_size)
        chunk = config.scheduler.max_num_batched_tokens
        per_request = (max_blocks_per_request(self.kv_window, chunk, max_model_len, block_size) if self.kv_window
                       else blocks_per_request(self.kv_groups.windows, max_model_len, block_size, chunk))
        num_blocks = min((budget - self.kv_residual_bytes) // per_block,
                         config.scheduler.max_num_seqs * per_request)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory of {budget} bytes is less than one block ({per_block} bytes)"
                             + (f" plus the int4 residual of max_num_seqs={config.scheduler.max_num_seqs} requests "
                                f"({self.kv_residual_bytes} bytes)" if self.kv_residual_bytes else ""))
        if config.cache.kv_window and num_blocks < per_request:
            raise ValueError(f"kv_cache_memory of {budget} bytes holds {num_blocks} blocks, but kv_window="
                             f"{config.cache.kv_window} with kv_sinks={config.cache.kv_sinks} and "
                             f"max_num_batched_tokens={config.scheduler.max_num_batched_tokens} needs {per_request} "
                             "blocks per request")
        return num_blocks

    def _check_hybrid(self, draft_specs: list[KVCacheSpec]) -> None:
        """Sliding-window layers (a hybrid KV cache) run without int4, a draft model and sinks + window: the first
        two lay their own data out per block of every layer, the third is another window."""
        if not self.kv_groups.is_hybrid:
            return
        name = self.model_config.architecture
        if self.config.cache.kv_cache_dtype == "int4":
            raise ValueError(f"kv_cache_dtype='int4' is not supported for {name}'s sliding-window layers; "
                             "use int8 or fp8")
        if draft_specs:
            raise ValueError(f"speculative_method='draft_model' is not supported for {name}'s sliding-window "
                             "layers; use ngram")
        if self.config.cache.kv_window:
            raise ValueError(f"kv_window is not supported for {name}: its layers have their own sliding window")

    def _kv_budget(self, specs: list[KVCacheSpec], max_model_len: int) -> int:
        """KV-cache bytes: kv_cache_memory if set, else what the platform allows (a fraction of the free memory;
        on CUDA what gpu_memory_utilization leaves after a profiling step)."""
        if self.config.cache.kv_cache_memory:
            return self.config.cache.kv_cache_memory
        budget = self.platform.kv_cache_budget(self.runner, specs, max_model_len)
        # Tensor-parallel ranks on one host share its memory (each holds its heads' share of every block).
        return budget // self.config.parallel.tensor_parallel_size if self.device.type == "cpu" else budget

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers; undo the platform's process-wide settings that can be undone (torch
        and BLAS thread counts)."""
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None
        if hasattr(self, "platform"):
            self.platform.restore()

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Validate and queue a request; raises ValueError naming the field and the limit."""
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        taken = [i for i in [request_id, *child_ids] if i in self._groups or i in self._sequence_of]
        if taken:
            raise ValueError(f"request_id {taken[0]!r} is already in use")
        processed = self.input_processor.process(prompt, params)
        token_ids = processed.prompt_token_ids
        arrival = time.monotonic() if arrival_time is None else arrival_time
        if params.structured_outputs is not None:  # compiles the grammar: an invalid one is a ValueError here
            self.structured.add_requests(params.structured_outputs, child_ids)
        group = _Group(processed.prompt, token_ids, arrival)
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        for index, child_id in enumerate(child_ids):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = dataclasses.replace(params, seed=params.seed + index)
            if index > 0 and params.prompt_logprobs is not None:
                # The samples share a prompt: the first one scores it, the others may use the prefix cache.
                child_params = dataclasses.replace(child_params, prompt_logprobs=None)
            request = Request(child_id, token_ids, child_params, processed.max_tokens, self.eos_token_ids,
                              arrival)
            detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, child_params)
            logprobs = [] if params.logprobs is not None else None
            group.sequences.append(_Sequence(request, detokenizer, logprobs))
            self._sequence_of[child_id] = (request_id, index)
        self._groups[request_id] = group
        for sequence in group.sequences:
            self.scheduler.add_request(sequence.request)
        self.num_prompt_tokens += len(token_ids)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; unknown ids are ignored."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for sequence in group.sequences:
            self.scheduler.finish_request(sequence.request.request_id,
                                          RequestStatus.FINISHED_ABORTED)
            self._sequence_of.pop(sequence.request.request_id, None)
            self.structured.free(sequence.request.request_id)

    def check_health(self) -> None:
        """WorkerDiedError if a tensor-parallel worker has exited (the engine cannot step any more)."""
        if self.workers is not None:
            self.workers.check_alive()

    def has_unfinished_requests(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._groups)

    # ---- stepping -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler/runner step; returns an output for every request that changed."""
        scheduled = self.scheduler.schedule()
        try:
            if self.structured.num_active:  # unconstrained steps build no mask
                self.structured.fill_bitmask(scheduled, self.scheduler.requests)
            sampled = self.runner.execute(scheduled)  # an empty step still tells the runner who finished
        except Exception as error:  # a failing step fails its requests, never the engine
            logger.exception("step failed")
            return self._fail(list(scheduled.num_scheduled_tokens), error)
        if scheduled.is_empty:
            return []
        changed: dict[str, _Group] = {}
        drafts = scheduled.scheduled_spec_decode_tokens
        num_prefill = sum(n for request_id, n in scheduled.num_scheduled_tokens.items()
                          if n - len(drafts.get(request_id, ())) > 1)  # verify steps are decodes
        self._throughput.record(num_prefill, sum(len(token_ids) for token_ids in sampled.sampled_token_ids))
        logprobs = dict(zip(sampled.req_ids, sampled.logprobs, strict=True))
        self._record_prompt_logprobs(sampled.prompt_logprobs)
        for request in self.scheduler.update(scheduled, sampled, self._check_stop):
            group_id, index = self._sequence_of[request.request_id]
            sequence = self._groups[group_id].sequences[index]
            step_logprobs = logprobs[request.request_id]
            if sequence.logprobs is not None and step_logprobs is not None:
                # Only the tokens the scheduler appended: a stop drops the ones sampled after it.
                sequence.logprobs.extend(step_logprobs[:request.num_output_tokens - len(sequence.logprobs)])
            changed[group_id] = self._groups[group_id]
        return [self._make_output(group_id, group) for group_id, group in changed.items()]

    def _record_prompt_logprobs(self, chunks: dict[str, tuple[int, list[dict[int, float]]]]) -> None:
        """Store the prompt logprobs a step computed at their place in the group's list (a prompt recomputed
        after a preemption overwrites the same places)."""
        for request_id, (first_index, entries) in chunks.items():
            group_id, _ = self._sequence_of.get(request_id, (None, 0))
            group = self._groups.get(group_id)
            if group is None or group.prompt_logprobs is None:
                continue  # aborted while the step ran
            group.prompt_logprobs[first_index:first_index + len(entries)] = entries

    def _check_stop(self, request: Request) -> RequestStatus | None:
        """Called once per appended token: its text first, then the stop decision (engine/stop.py)."""
        group_id, index = self._sequence_of[request.request_id]
        detokenizer = self._groups[group_id].sequences[index].detokenizer
        self.num_generation_tokens += 1
        match = detokenizer.append(request.output_token_ids[-1])
        status = check_stop(request, match)
        if match is not None and request.stop_reason == match.stop:
            detokenizer.stop_at(match)  # the text ends at the stop string
        if request.request_id in self.structured:
            status = self._check_grammar(request, status)
        return status

    def _check_grammar(self, request: Request, status: RequestStatus | None) -> RequestStatus | None:
        """Advance the request's grammar by its newest token: a complete grammar ends it with "stop"; a token
        the grammar rejects (the mask should make that impossible) fails it rather than return invalid output."""
        if not self.structured.accept_token(request.request_id, request.output_token_ids[-1]):
            return RequestStatus.FINISHED_ERROR
        if status is None and self.structured.is_terminated(request.request_id):
            request.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        return status

    def _fail(self, request_ids: list[str], error: Exception) -> list[RequestOutput]:
        outputs = []
        for child_id in request_ids:
            group_id, _ = self._sequence_of.get(child_id, (None, 0))
            group = self._groups.get(group_id)
            if group is None:
                continue
            for sequence in group.sequences:
                self.scheduler.finish_request(sequence.request.request_id,
                                              RequestStatus.FINISHED_ERROR)
            output = self._make_output(group_id, group)
            output.error = f"{type(error).__name__}: {error}"
            outputs.append(output)
        return outputs

    def _make_output(self, group_id: str, group: _Group) -> RequestOutput:
        completions = [self._completion(i, s) for i, s in enumerate(group.sequences)]
        finished = all(c.finished for c in completions)
        if finished:
            self._groups.pop(group_id, None)
            for sequence in group.sequences:
                self._sequence_of.pop(sequence.request.request_id, None)
                self.structured.free(sequence.request.request_id)
        return RequestOutput(group_id, group.prompt, group.prompt_token_ids, completions, finished,
                             self._metrics(group), num_cached_tokens=group.sequences[0].request.num_cached_tokens,
                             prompt_logprobs=group.prompt_logprobs)

    def _completion(self, index: int, sequence: _Sequence) -> CompletionOutput:
        request = sequence.request
        token_ids = list(request.output_token_ids)
        delta_ids = token_ids[sequence.num_returned_tokens:]
        sequence.num_returned_tokens = len(token_ids)
        # The delta first: on finishing it flushes a trailing partial character into the text.
        delta_text = sequence.detokenizer.next_delta(request.is_finished)
        return CompletionOutput(
            index=index,
            text=sequence.detokenizer.output_text,
            token_ids=token_ids,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            logprobs=sequence.logprobs,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
        )

    @staticmethod
    def _metrics(group: _Group) -> RequestMetrics:
        requests = [s.request for s in group.sequences]
        first = requests[0]
        finished = [r.finished_time for r in requests]
        return RequestMetrics(
            arrival_time=group.arrival_time,
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=first.first_token_time,
            last_token_time=first.last_token_time,
            finished_time=None if None in finished else max(finished),
            num_prompt_tokens=len(group.prompt_token_ids),
            num_generation_tokens=sum(r.num_output_tokens for r in requests),
            num_preemptions=sum(r.num_preemptions for r in requests),
        )

    def kv_snapshot(self) -> dict[str, Any]:
        """The KV cache's blocks and the requests' block tables now (kv/kv_snapshot.py; the web page's view)."""
        return kv_snapshot(self)

    def kv_memory(self, context: int, batch: int) -> dict[str, Any]:
        """`kvserve kv-memory --json` for this model: KV bytes per token of its attention and its MHA / GQA / MQA /
        MLA equivalents in every KV dtype, and totals for `context` tokens x `batch` sequences."""
        shape = shape_from_hf_config(self.model_config.extra, self.model_config.architecture)
        dtype = self.config.load.dtype
        report = kv_memory_report(shape, context=context, batch=batch, model_dtype_bytes=model_dtype_bytes(dtype))
        return {**report.to_dict(), "model_dtype": dtype, "kv_cache_dtype": self.config.cache.kv_cache_dtype}

    def stats(self) -> EngineStats:
        """Current load, KV occupancy, memory and cumulative token counts."""
        pool = self.kv_manager.pool
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=pool.num_used_blocks,
            kv_blocks_total=pool.num_blocks,
            kv_cache_usage=pool.usage,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            model_bytes=self.model_bytes,
            kv_cache_bytes=self.runner.kv_cache_bytes,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            prefix_cache_queries=self.kv_manager.num_prefix_queries,
            prefix_cache_hits=self.kv_manager.num_prefix_hits,
            prompt_throughput=self._throughput.rate(0),
            generation_throughput=self._throughput.rate(1),
            spec_decode=self.scheduler.spec_stats.snapshot(),
        )


class ThroughputWindow:
    """Token counts of recent steps, for tokens-per-second rates over a sliding window."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._steps: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, generated tokens)

    def record(self, num_prompt_tokens: int, num_generated: int) -> None:
        """Log one step's counts now."""
        now = time.monotonic()
        self._steps.append((now, num_prompt_tokens, num_generated))
        while self._steps and self._steps[0][0] < now - self.window_s:
            self._steps.popleft()

    def rate(self, column: int) -> float:
        """Tokens per second of column 0 (prompt) or 1 (generated) over the window."""
        if len(self._steps) < 2:
            return 0.0
        elapsed = self._steps[-1][0] - self._steps[0][0]
        total = sum(step[1 + column] for step in list(self._steps)[1:])
        return total / elapsed if elapsed > 0 else 0.0


def attention_backend_for(config: EngineConfig, model_config: ModelConfig, device: torch.device) -> AttentionBackend:
    """The configured attention backend, checked against what the model and the cache need."""
    architecture = model_class(model_config)
    return create_attention_backend(config.platform.attention_backend, AttentionRequirements(
        device, config.cache.storage_dtype(config.load.dtype), use_window=bool(config.cache.kv_window),
        use_mla=architecture.uses_mla, use_sliding_window=architecture.uses_sliding_window(model_config),
        logits_soft_cap=architecture.logits_soft_cap(model_config),
        int8_queries=config.platform.cpu_gguf_int8_activations))


def default_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    """max_model_len, else the model's context up to 8192 (the cache may cap it further)."""
    return config.scheduler.max_model_len or min(model_config.max_position_embeddings, 8192)


def build_runner(config: EngineConfig, show_progress: bool = True) -> tuple[ModelRunner, Platform]:
    """A tensor-parallel worker's runner (its rank's shard of the model), built as the engine builds its own."""
    platform = get_platform(config)
    platform.configure()
    source = open_model(config.load.model)
    model_config = ModelConfig.from_hf_config(source.hf_config)
    backend = attention_backend_for(config, model_config, platform.device)
    runner = ModelRunner(config, platform, model_config, source, default_max_model_len(config, model_config), backend,
                         show_progress)
    return runner, platform


def _check_parallel(config: EngineConfig, model_config: ModelConfig) -> None:
    """Before any worker starts: the heads split over the ranks, and no draft model (its own layers would need
    splitting too)."""
    world_size = config.parallel.tensor_parallel_size
    if world_size == 1:
        return
    for rank in range(world_size):
        shard_heads(model_config.num_heads, model_config.num_kv_heads, rank, world_size)
    if config.speculative.speculative_method == "draft_model":
        raise ValueError("speculative_method='draft_model' is not supported with tensor_parallel_size > 1; "
                         "use ngram")
