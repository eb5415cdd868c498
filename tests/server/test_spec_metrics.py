"""The speculative-decoding counters advance by the engine's totals, named as vLLM's."""

import dataclasses

from prometheus_client.parser import text_string_to_metric_families

from kvserve.engine.engine import EngineStats
from kvserve.engine.scheduler import SpecDecodeStats
from kvserve.server.metrics import ServerMetrics


def stats_with(spec: SpecDecodeStats) -> EngineStats:
    zeros = {f.name: 0 for f in dataclasses.fields(EngineStats)}
    return EngineStats(**{**zeros, "spec_decode": spec})


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_spec_decode_counters_follow_the_engine_totals():
    metrics = ServerMetrics()
    spec = SpecDecodeStats()
    spec.record(num_drafts=4, num_accepted=2)
    metrics.on_stats(stats_with(spec.snapshot()))
    spec.record(num_drafts=3, num_accepted=3)
    metrics.on_stats(stats_with(spec.snapshot()))
    metrics.on_stats(stats_with(spec.snapshot()))  # no new step: no change
    values = samples(metrics)
    assert values[("kvserve:spec_decode_num_drafts_total", ())] == 2
    assert values[("kvserve:spec_decode_num_draft_tokens_total", ())] == 7
    assert values[("kvserve:spec_decode_num_accepted_tokens_total", ())] == 5
    per_position = {labels[0][1]: value for (name, labels), value in values.items()
                    if name == "kvserve:spec_decode_num_accepted_tokens_per_pos_total"}
    assert per_position == {"0": 2, "1": 2, "2": 1}
    assert spec.acceptance_rate == 5 / 7 and spec.mean_acceptance_length == 1 + 5 / 2
