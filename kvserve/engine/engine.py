"""The engine: requests in, one scheduler/runner step at a time, RequestOutputs out."""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from collections import deque
from dataclasses import dataclass, field

from kvserve.config import EngineConfig, ModelConfig, SchedulerConfig
from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.request import Request, RequestStatus
from kvserve.engine.scheduler import Scheduler
from kvserve.kv.kv_cache import residual_bytes_per_slot
from kvserve.kv.kv_manager import KVCacheManager
from kvserve.kv.kv_spec import KVCacheSpec, bytes_per_block, bytes_per_token
from kvserve.loader.weights import open_model
from kvserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvserve.platforms import get_platform
from kvserve.platforms.cuda_memory import GIB
from kvserve.runner.model_runner import ModelRunner
from kvserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptInput = str | list[int] | dict


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


class Engine:
    """Loads the model, owns scheduler, KV manager and runner, and steps them."""

    def __init__(self, config: EngineConfig, show_progress: bool = True) -> None:
        self.config = config
        self.platform = get_platform(config)
        self.platform.configure()  # process-wide settings, undone by shutdown() where they can be
        self.device = self.platform.device
        source = open_model(config.model)
        self.model_config = ModelConfig.from_hf_config(source.hf_config)
        self.tokenizer = source.load_tokenizer()
        max_model_len = config.max_model_len or min(self.model_config.max_position_embeddings, 8192)
        self.runner = ModelRunner(config, self.platform, self.model_config, source, max_model_len, show_progress)
        model = self.runner.model
        if config.kv_window and not model.supports_kv_window:
            raise ValueError(f"kv_window is not supported for {self.model_config.architecture}")
        block_size = config.cache_block_size
        specs = model.kv_cache_specs(config.cache_storage_dtype)
        if config.kv_cache_dtype == "int4":  # keys share a per-channel scale across one block
            specs = [dataclasses.replace(spec, group_size=block_size) for spec in specs]
        # int4: every running request keeps its newest, incomplete block in full precision.
        num_residual_slots = config.max_num_seqs if config.kv_cache_dtype == "int4" else 0
        self.kv_residual_bytes = num_residual_slots * residual_bytes_per_slot(specs, block_size, config.torch_dtype)
        num_blocks = self._num_kv_blocks(specs, max_model_len)
        self.runner.allocate_kv_cache(specs, num_blocks, block_size, num_residual_slots)
        logger.info("KV cache: %d blocks of %d tokens, %.2f GiB (%s); model %.2f GiB", num_blocks, block_size,
                    self.runner.kv_cache_bytes / GIB, config.cache_storage_dtype, self.runner.model_bytes / GIB)
        # A single request must always fit in the cache, or preemption could never make room; with a window
        # it only ever holds its sinks and window (checked in _num_kv_blocks), so the context is not capped.
        self.max_model_len = max_model_len if config.kv_window else min(max_model_len, num_blocks * block_size)
        bytes_per = bytes_per_token(specs)
        self.kv_bytes_per_token = int(bytes_per) if bytes_per.denominator == 1 else float(bytes_per)
        self.kv_manager = KVCacheManager(num_blocks, block_size, config.enable_prefix_caching,
                                         config.kv_window, config.kv_sinks)
        self.runner.set_window(config.kv_window, config.kv_sinks)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill), self.kv_manager)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._groups: dict[str, _Group] = {}
        self._sequence_of: dict[str, tuple[str, int]] = {}  # child request id -> (group id, index)
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._throughput = ThroughputWindow()

    def _num_kv_blocks(self, specs: list[KVCacheSpec], max_model_len: int) -> int:
        """Blocks bought by the budget (after the int4 residual), but no more than max_num_seqs requests need."""
        config = self.config
        budget = self._kv_budget(specs, max_model_len)
        block_size = config.cache_block_size
        per_block = bytes_per_block(specs, block_size)
        per_request = self._max_blocks_per_request(max_model_len)
        num_blocks = min((budget - self.kv_residual_bytes) // per_block, config.max_num_seqs * per_request)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory of {budget} bytes is less than one block ({per_block} bytes)"
                             + (f" plus the int4 residual of max_num_seqs={config.max_num_seqs} requests "
                                f"({self.kv_residual_bytes} bytes)" if self.kv_residual_bytes else ""))
        if config.kv_window and num_blocks < per_request:
            raise ValueError(f"kv_cache_memory of {budget} bytes holds {num_blocks} blocks, but kv_window="
                             f"{config.kv_window} with kv_sinks={config.kv_sinks} and max_num_batched_tokens="
                             f"{config.max_num_batched_tokens} needs {per_request} blocks per request")
        return num_blocks

    def _kv_budget(self, specs: list[KVCacheSpec], max_model_len: int) -> int:
        """KV-cache bytes: kv_cache_memory if set, else what the platform allows (a fraction of the free memory;
        on CUDA what gpu_memory_utilization leaves after a profiling step)."""
        if self.config.kv_cache_memory:
            return self.config.kv_cache_memory
        return self.platform.kv_cache_budget(self.runner, specs, max_model_len)

    def shutdown(self) -> None:
        """Undo the platform's process-wide settings that can be undone (torch and BLAS thread counts)."""
        self.platform.restore()

    def _max_blocks_per_request(self, max_model_len: int) -> int:
        """Blocks one request can hold at once: its whole context, or with a window its sinks + window + chunk."""
        config, size = self.config, self.config.cache_block_size
        if not config.kv_window:
            return -(-max_model_len // size)
        chunk = min(config.max_num_batched_tokens, max_model_len)
        return -(-config.kv_sinks // size) + -(-(config.kv_window - 1 + chunk) // size) + 1

    # ---- requests -------------------------------------------------------------------------

    def tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """A prompt as (text or None, token ids): a string, a list of ids, or {"prompt_token_ids": ...}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt", "")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt) if prompt else []
        return None, list(prompt)

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Validate and queue a request; raises ValueError naming the field and the limit."""
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        taken = [i for i in [request_id, *child_ids] if i in self._groups or i in self._sequence_of]
        if taken:
            raise ValueError(f"request_id {taken[0]!r} is already in use")
        text, token_ids = self.tokenize(prompt)
        self._validate_prompt(token_ids)
        params.verify(self.model_config.vocab_size)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        group = _Group(text, token_ids, arrival)
        room = self.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        for index, child_id in enumerate(child_ids):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = dataclasses.replace(params, seed=params.seed + index)
            request = Request(child_id, token_ids, child_params, max_tokens, self.eos_token_ids,
                              arrival)
            detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, child_params)
            logprobs = [] if params.logprobs is not None else None
            group.sequences.append(_Sequence(request, detokenizer, logprobs))
            self._sequence_of[child_id] = (request_id, index)
        self._groups[request_id] = group
        for sequence in group.sequences:
            self.scheduler.add_request(sequence.request)
        self.num_prompt_tokens += len(token_ids)

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt must not be empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is "
                             f"{self.max_model_len} (prompt plus at least one generated token)")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids must be in [0, {vocab}), got {bad[0]}")

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; unknown ids are ignored."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for sequence in group.sequences:
            self.scheduler.finish_request(sequence.request.request_id,
                                          RequestStatus.FINISHED_ABORTED)
            self._sequence_of.pop(sequence.request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._groups)

    # ---- stepping -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler/runner step; returns an output for every request that changed."""
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            self.runner.release(scheduled.finished_request_ids)
            return []
        try:
            sampled = self.runner.execute(scheduled)
        except Exception as error:  # a failing step fails its requests, never the engine
            logger.exception("step failed")
            return self._fail([s.request.request_id for s in scheduled.scheduled], error)
        changed: dict[str, _Group] = {}
        num_prefill = sum(s.num_new_tokens for s in scheduled.scheduled if s.num_new_tokens > 1)
        self._throughput.record(num_prefill, len(sampled.token_ids))
        for request in self.scheduler.update(scheduled, sampled):
            group_id, index = self._sequence_of[request.request_id]
            sequence = self._groups[group_id].sequences[index]
            self._on_token(sequence, sampled.logprobs.get(request.request_id))
            changed[group_id] = self._groups[group_id]
        return [self._make_output(group_id, group) for group_id, group in changed.items()]

    def _on_token(self, sequence: _Sequence, logprobs: dict[int, float] | None) -> None:
        request = sequence.request
        self.num_generation_tokens += 1
        if sequence.logprobs is not None and logprobs is not None:
            sequence.logprobs.append(logprobs)
        stop = sequence.detokenizer.append(request.output_token_ids[-1])
        if stop is None:
            return
        request.stop_reason = stop
        if request.is_finished:  # the same token also hit max_tokens: the stop string names the reason
            request.status = RequestStatus.FINISHED_STOPPED
        else:
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)

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
        return RequestOutput(group_id, group.prompt, group.prompt_token_ids, completions, finished,
                             self._metrics(group), num_cached_tokens=group.sequences[0].request.num_cached_tokens)

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
            model_bytes=self.runner.model_bytes,
            kv_cache_bytes=self.runner.kv_cache_bytes,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            prefix_cache_queries=self.kv_manager.num_prefix_queries,
            prefix_cache_hits=self.kv_manager.num_prefix_hits,
            prompt_throughput=self._throughput.rate(0),
            generation_throughput=self._throughput.rate(1),
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
