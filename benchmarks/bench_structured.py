"""What structured output costs per decode step: the grammar bitmask fill (llguidance, on the engine side) and its
application to the logits (the sampler's hook), for 1 and 16 constrained rows, beside the plain greedy argmax that
an unconstrained step runs. Tokenizer only (the bundled SmolLM2-135M's 49,152 tokens); no model is loaded.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_structured.py > /tmp/structured.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from kvserve.config import ModelConfig
from kvserve.engine.request import Request
from kvserve.engine.sched_output import SchedulerOutput
from kvserve.loader.weights import open_model
from kvserve.sample.bitmask import apply_token_bitmask
from kvserve.sample.sampler import Sampler, SamplingMetadata
from kvserve.sampling_params import SamplingParams
from kvserve.structured.manager import StructuredOutputManager
from kvserve.structured.params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
                   "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
# Where the rows stand in their output: at the start, inside a string, before a key, inside an array.
PREFIXES = ['', '{"name":"Ada Love', '{"name":"Ada","age":36,', '{"name":"Ada","age":36,"tags":["a",']


def median_us(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `run` in microseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(manager: StructuredOutputManager, tokenizer: object, vocab_size: int, num_rows: int,
            repeats: int) -> dict[str, float]:
    """Fill, apply and the greedy baseline for `num_rows` constrained decode rows."""
    params = StructuredOutputsParams(json=SCHEMA)
    requests = {}
    for row in range(num_rows):
        request_id = f"r{num_rows}-{row}"
        manager.add_requests(params, [request_id])
        for token in tokenizer.encode(PREFIXES[row % len(PREFIXES)], add_special_tokens=False):
            assert manager.accept_token(request_id, token)
        request = Request(request_id, [1, 2], SamplingParams(), max_tokens=8)
        request.num_computed_tokens = 1  # a decode: its one new token is its last, so it samples
        requests[request_id] = request
    scheduled = {request_id: 1 for request_id in requests}

    def fill() -> SchedulerOutput:
        output = SchedulerOutput(num_scheduled_tokens=scheduled)
        manager.fill_bitmask(output, requests)
        return output

    bitmask = torch.from_numpy(fill().grammar_bitmask)
    logits = torch.randn(num_rows, vocab_size)
    rows = list(range(num_rows))
    greedy = [SamplingParams(temperature=0)] * num_rows
    plain = SamplingMetadata(greedy, [None] * num_rows, [[1]] * num_rows, [[2]] * num_rows)
    constrained = SamplingMetadata(greedy, [None] * num_rows, [[1]] * num_rows, [[2]] * num_rows)
    constrained.grammar_rows, constrained.grammar_bitmask = rows, bitmask
    sampler = Sampler()
    result = {
        "num_rows": num_rows,
        "fill_us": median_us(fill, repeats),
        "apply_us": median_us(lambda: apply_token_bitmask(logits.clone(), rows, bitmask), repeats),
        "clone_us": median_us(logits.clone, repeats),  # the apply includes this copy; the sampler makes it anyway
        "sampler_plain_greedy_us": median_us(lambda: sampler(logits, plain), repeats),
        "sampler_constrained_greedy_us": median_us(lambda: sampler(logits, constrained), repeats),
    }
    for request_id in requests:
        manager.free(request_id)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path or name (default: the bundled SmolLM2-135M)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = open_model(args.model)
    tokenizer = source.load_tokenizer()
    vocab_size = ModelConfig.from_hf_config(source.hf_config).vocab_size
    manager = StructuredOutputManager(tokenizer, vocab_size, {tokenizer.eos_token_id})
    start = time.perf_counter()
    _ = manager.tokenizer
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    manager.add_requests(StructuredOutputsParams(json=SCHEMA), ["compile"])
    compile_s = time.perf_counter() - start
    manager.free("compile")
    print(json.dumps({
        "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "vocab_size": vocab_size, "llguidance_tokenizer_s": round(tokenizer_s, 3),
        "schema_compile_s": round(compile_s, 4),
        "steps": [measure(manager, tokenizer, vocab_size, n, args.repeats) for n in (1, 16)],
    }, indent=2))


if __name__ == "__main__":
    main()
