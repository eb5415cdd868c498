"""The KIVI int4 cache: blocks quantized once full (keys per channel, values per token), the tail kept exact."""

import random

import pytest
import torch

from kvserve.attention import torch_ref
from kvserve.attention.torch_ref import _attend_quantized, gather_kv, write_kv, write_kv_int4
from kvserve.kv.int4_residual import ResidualSlots, ResidualTails, StepSpan, int4_write_plan, prefill_tail
from kvserve.kv.kv_cache import allocate_kv_caches
from kvserve.kv.kv_quant import dequantize_int4, quantize_int4
from kvserve.kv.kv_spec import KVCacheSpec

BLOCK, HEADS, DIM = 8, 2, 16


def expected_cache_contents(tokens: torch.Tensor) -> torch.Tensor:
    """What reading a request back must give: full blocks round-tripped through int4, the tail exact."""
    expected = tokens.clone()
    num_full = tokens.shape[0] // BLOCK
    for block in range(num_full):
        rows = slice(block * BLOCK, (block + 1) * BLOCK)
        expected[rows] = dequantize_int4(*quantize_int4(tokens[rows], dim=0), torch.float32)
    return expected


def test_chunked_writes_match_whole_block_quantization():
    torch.manual_seed(0)
    rng = random.Random(0)
    spec = KVCacheSpec(HEADS, DIM, DIM, "int4", group_size=BLOCK)
    cache = allocate_kv_caches([spec], num_blocks=32, block_size=BLOCK, device="cpu", num_residual_slots=3)[0]
    slots = ResidualSlots(3)
    # Three requests, each with its own blocks; prefill chunks of any length, then single-token decodes.
    tables = {name: list(range(10 * i + 9, 10 * i - 1, -1)) for i, name in enumerate("abc")}
    keys = {name: torch.zeros(0, HEADS, DIM) for name in tables}
    for step in range(25):
        names = rng.sample(sorted(tables), k=rng.randint(1, 3))
        counts = {name: 1 if step > 10 else rng.randint(1, 13) for name in names}
        names.sort(key=lambda name: counts[name] != 1)  # decodes first, as the runner packs them
        spans, new_rows = [], []
        for name in names:
            start = keys[name].shape[0]
            spans.append(StepSpan(sum(s.count for s in spans), start, counts[name], tables[name], slots.slot(name)))
            new = torch.randn(counts[name], HEADS, DIM) * torch.linspace(0.1, 20, DIM)  # outlier channels
            keys[name] = torch.cat([keys[name], new])
            new_rows.append(new)
        num_decodes = sum(1 for name in names if counts[name] == 1)
        columns = [(s.start + s.count - 1) // BLOCK for s in spans[:num_decodes]]
        plan = int4_write_plan(spans, num_decodes, columns, BLOCK, torch.device("cpu"))
        step_keys = torch.cat(new_rows)
        write_kv_int4(step_keys, -step_keys, cache, plan)

        for span, name in zip(spans, names, strict=True):
            seq_len = span.start + span.count
            # The whole table, blocks past the newest one included (a draft model's lookahead slots).
            tails = prefill_tail(span, len(tables[name]), BLOCK, torch.device("cpu"))
            got_keys, got_values = gather_kv(cache, torch.tensor([tables[name]]), torch.float32, tails)
            expected = expected_cache_contents(keys[name])
            assert torch.equal(got_keys[0].transpose(0, 1)[:seq_len], expected)
            assert torch.equal(got_values[0].transpose(0, 1)[:seq_len],
                               _values_expected(-keys[name]))


def _values_expected(values: torch.Tensor) -> torch.Tensor:
    expected = values.clone()
    num_full = values.shape[0] // BLOCK * BLOCK
    expected[:num_full] = dequantize_int4(*quantize_int4(values[:num_full], dim=-1), torch.float32)
    return expected


def test_decode_tails_point_at_the_residual():
    spans = [StepSpan(0, 9, 1, [4, 5], slot=2), StepSpan(1, 15, 1, [6, 7], slot=0)]
    plan = int4_write_plan(spans, 2, [1, 1], BLOCK, torch.device("cpu"))
    # The second request fills its block: it is flushed from 7 residual tokens plus the step's row.
    assert plan.flush_blocks.tolist() == [7]
    assert plan.flush_from_residual[1].tolist() == list(range(0, 7))
    assert plan.flush_from_step[1].tolist() == [1]
    assert plan.residual_slots.tolist() == [2 * BLOCK + 1] and plan.residual_rows.tolist() == [0]
    assert plan.decode_tails.rows.tolist() == [0] and plan.decode_tails.slots.tolist() == [2]


def test_int4_round_trip_error_is_bounded_per_group():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 128, generator=generator)
    x[:, :, 7] *= 30  # an outlier channel: per-channel key scales keep it from coarsening the rest
    restored = dequantize_int4(*quantize_int4(x, dim=0), torch.float32)
    span = x.amax(dim=0) - x.amin(dim=0)
    # Half a step of (range / 15), plus float16 rounding of the scale and zero point.
    assert ((restored - x).abs() <= span / 30 * 1.01 + 1e-3 * x.abs().amax(dim=0)).all()
    per_token = dequantize_int4(*quantize_int4(x, dim=-1), torch.float32)
    assert (restored - x).norm() < 0.5 * (per_token - x).norm()  # why keys are quantized per channel
    constant = torch.full((8, 1, 4), 3.0)
    assert torch.equal(dequantize_int4(*quantize_int4(constant, dim=0), torch.float32), constant)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8", "int4"])
def test_segmented_attention_equals_attention_over_the_dequantized_history(kv_cache_dtype, monkeypatch):
    """Quantized caches are read DEQUANT_SEGMENT_TOKENS tokens at a time with an online softmax."""
    monkeypatch.setattr(torch_ref, "DEQUANT_SEGMENT_TOKENS", 64)  # 16 blocks: the 150-token request spans 3
    torch.manual_seed(0)
    block, heads, kv_heads, dim, num_blocks = 4, 6, 2, 16, 50
    spec = KVCacheSpec(kv_heads, dim, dim, kv_cache_dtype, group_size=block)
    cache = allocate_kv_caches([spec], num_blocks, block, "cpu", num_residual_slots=2)[0]
    lengths = [150, 37]  # past several segments, and within the first
    tables = [list(range(0, 38)), list(range(38, 48))]
    spans, rows = [], 0
    for index, (length, table) in enumerate(zip(lengths, tables, strict=True)):
        spans.append(StepSpan(rows, 0, length, table, slot=index))
        rows += length
    keys, values = torch.randn(rows, kv_heads, dim), torch.randn(rows, kv_heads, dim)
    if kv_cache_dtype == "int4":
        write_kv_int4(keys, values, cache, int4_write_plan(spans, 0, [], block, torch.device("cpu")))
    else:
        slots = torch.cat([torch.tensor(t)[torch.arange(n) // block] * block + torch.arange(n) % block
                           for n, t in zip(lengths, tables, strict=True)])
        write_kv(keys, values, cache, slots)
    padded = torch.tensor([t + [0] * (38 - len(t)) for t in tables])
    # Both lengths end inside a block: int4 reads those last blocks from the residual slots 0 and 1.
    tails = ResidualTails(torch.tensor([0, 1]), torch.tensor([len(t) - 1 for t in tables]), torch.tensor([0, 1]))
    key_pos = torch.arange(38 * block)
    mask = (key_pos[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]  # [B, 1, 1, L]
    query = torch.randn(2, kv_heads, heads // kv_heads, dim)
    streamed = _attend_quantized(query, None, cache, padded, mask, tails if kv_cache_dtype == "int4" else None,
                                 0, dim ** -0.5)
    full_keys, full_values = gather_kv(cache, padded, torch.float32, tails if kv_cache_dtype == "int4" else None)
    expected = torch.nn.functional.scaled_dot_product_attention(query, full_keys, full_values, attn_mask=mask,
                                                                scale=dim ** -0.5)
    torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=1e-5)
