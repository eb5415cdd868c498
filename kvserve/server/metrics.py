"""Prometheus metrics of the server, fed by the engine thread (an EngineObserver)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from kvserve.engine.engine import EngineStats
from kvserve.outputs import RequestOutput

PREFIX = "kvserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; wide enough for a 2-core CPU (seconds per token under load) and a GPU (milliseconds).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
_REQUEST_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ServerMetrics:
    """The `kvserve:` histograms, gauges and counters, in their own registry."""

    def __init__(self) -> None:
        # The *_created series (one timestamp per counter) only clutter a scrape.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to finish.",
                             buckets=_REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Arrival to first scheduled.",
                                    buckets=_REQUEST_BUCKETS, registry=r)
        self.running = Gauge(PREFIX + "num_requests_running", "Sequences being computed.", registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Sequences waiting to be scheduled.", registry=r)
        self.kv_usage = Gauge(PREFIX + "kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens received.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter(PREFIX + "request_success", "Finished requests, by finish reason.",
                               ["finished_reason"], registry=r)
        self.failure = Counter(PREFIX + "request_failure", "Requests that failed inside the engine.",
                               registry=r)
        self.preemptions = Counter(PREFIX + "preemptions", "Sequences preempted to free KV blocks.",
                                   registry=r)
        # Response cache (server/response_cache.py): lookups of deterministic requests, and those answered.
        self.response_cache_queries = Counter(PREFIX + "response_cache_queries",
                                              "Deterministic requests looked up in the response cache.", registry=r)
        self.response_cache_hits = Counter(PREFIX + "response_cache_hits",
                                           "Requests answered from the response cache.", registry=r)
        # Speculative decoding, as vLLM counts it: verify steps, drafts, accepted drafts (and by draft position).
        self.spec_drafts = Counter(PREFIX + "spec_decode_num_drafts", "Requests' verify steps with drafts.",
                                   registry=r)
        self.spec_draft_tokens = Counter(PREFIX + "spec_decode_num_draft_tokens", "Draft tokens proposed.",
                                         registry=r)
        self.spec_accepted_tokens = Counter(PREFIX + "spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                                            registry=r)
        self.spec_accepted_per_pos = Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                             "Draft tokens accepted, by position in the draft.", ["position"],
                                             registry=r)
        # Engine totals at the last on_stats call, so that counters advance by the difference.
        self._last_totals = (0,) * 6
        self._last_accepted_per_pos: list[int] = []
        self._last_token_time: dict[tuple[str, int], float] = {}  # (request id, sample index) -> time

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def latency_totals(self) -> dict[str, float]:
        """Sums and counts of the TTFT and ITL histograms so far (a watcher takes differences for recent means)."""
        totals = {}
        for name, histogram in (("ttft", self.ttft), ("itl", self.itl)):
            for sample in histogram.collect()[0].samples:
                if sample.name.endswith(("_sum", "_count")):
                    totals[f"{name}{sample.name[sample.name.rindex('_'):]}"] = sample.value
        return totals

    # ---- EngineObserver -------------------------------------------------------------------

    def on_output(self, output: RequestOutput, now: float) -> None:
        """Record TTFT / ITL for new tokens, and latencies plus outcome once finished."""
        metrics = output.metrics
        for completion in output.outputs:
            num_new = len(completion.delta_token_ids)
            if num_new == 0:
                continue
            key = (output.request_id, completion.index)
            last = self._last_token_time.get(key)
            if last is None:
                if completion.index == 0 and metrics.time_to_first_token is not None:
                    self.ttft.observe(metrics.time_to_first_token)
            else:
                # A step that yields several tokens (speculation) spreads its gap over them.
                for _ in range(num_new):
                    self.itl.observe((now - last) / num_new)
            self._last_token_time[key] = now
        if output.finished:
            self._finish(output)

    def _finish(self, output: RequestOutput) -> None:
        self._forget(output.request_id, len(output.outputs))
        metrics = output.metrics
        if output.error is not None or any(c.finish_reason == "error" for c in output.outputs):
            self.failure.inc()
            return
        if metrics.e2e_latency is not None:
            self.e2e.observe(metrics.e2e_latency)
        if metrics.queue_time is not None:
            self.queue_time.observe(metrics.queue_time)
        for completion in output.outputs:
            self.success.labels(finished_reason=completion.finish_reason or "stop").inc()

    def on_abort(self, request_id: str) -> None:
        """Count a request whose client left."""
        self._forget(request_id)
        self.success.labels(finished_reason="abort").inc()

    def on_error(self, request_id: str) -> None:
        """Count a request ended by an error outside the step."""
        self._forget(request_id)
        self.failure.inc()

    def on_stats(self, stats: EngineStats) -> None:
        """Refresh the gauges and advance the token and preemption counters."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        spec = stats.spec_decode
        totals = (stats.num_prompt_tokens, stats.num_generation_tokens, stats.num_preemptions, spec.num_drafts,
                  spec.num_draft_tokens, spec.num_accepted_tokens)
        counters = (self.prompt_tokens, self.generation_tokens, self.preemptions, self.spec_drafts,
                    self.spec_draft_tokens, self.spec_accepted_tokens)
        for counter, new, old in zip(counters, totals, self._last_totals, strict=True):
            if new > old:
                counter.inc(new - old)
        self._last_totals = totals
        last = self._last_accepted_per_pos
        for position, new in enumerate(spec.accepted_per_position):
            old = last[position] if position < len(last) else 0
            if new > old:
                self.spec_accepted_per_pos.labels(position=str(position)).inc(new - old)
        self._last_accepted_per_pos = list(spec.accepted_per_position)

    def _forget(self, request_id: str, num_samples: int | None = None) -> None:
        keys = [k for k in self._last_token_time if k[0] == request_id] if num_samples is None \
            else [(request_id, i) for i in range(num_samples)]
        for key in keys:
            self._last_token_time.pop(key, None)
