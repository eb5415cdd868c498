"""The compiled CPU decode kernel (the `cpu` backend) against the pure-torch oracle, and how it is chosen."""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from paged_cases import assert_same_cache, backend_for, clone_cache, make_step, run_backend, run_int4_steps

from kvserve import native
from kvserve.attention import cpu_native, torch_ref
from kvserve.attention.backend import AttentionRequirements
from kvserve.attention.cpu_native import CpuAttentionBackend
from kvserve.attention.selector import create_attention_backend
from kvserve.attention.torch_backend import TorchAttentionBackend
from kvserve.kv import kv_quant
from kvserve.runner.attention_inputs import build_common_metadata

HAS_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None
needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler to build the kernel")

SHAPES = [  # (num_kv_heads, group, head_dim, block_size)
    (3, 3, 64, 16),  # SmolLM2: GQA 9 / 3
    (4, 1, 32, 16),  # MHA
    (1, 4, 128, 8),  # MQA (Gemma 3 270M: 4 / 1), head_dim 128
    (2, 4, 16, 4),
    (2, 2, 24, 8),  # a head dim that is not a multiple of 16: the kernel's plain loops, not its AVX-512 ones
    (3, 1, 8, 4),  # token rows of 24 values: a 16-bit row is widened 16 values at a time, then its tail one by one
]
REQUESTS = [(1, 1), (16, 1), (17, 1), (40, 1), (5, 1), (33, 5), (9, 9)]  # (seq_len, query_len): 5 decodes, 2 prefills
CPU = torch.device("cpu")


def needs(kv_cache_dtype: str = "float32", device: torch.device = CPU, use_window: bool = False,
          use_mla: bool = False, int8_queries: bool = False) -> AttentionRequirements:
    return AttentionRequirements(device, kv_cache_dtype, use_window, use_mla, int8_queries=int8_queries)


def _both(step) -> tuple[torch.Tensor, torch.Tensor]:
    """Run torch_ref and the cpu backend on their own copies of the cache; the caches must end up equal."""
    ref_cache, native_cache = clone_cache(step.cache), clone_cache(step.cache)
    expected = torch_ref.paged_attention(step.query, step.key, step.value, ref_cache, step.metadata, step.scale)
    actual = run_backend(backend_for("cpu", step), step, native_cache)
    assert_same_cache(native_cache, ref_cache)
    return actual, expected


@needs_kernel
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hkv{s[0]}-g{s[1]}-d{s[2]}-bs{s[3]}")
def test_mixed_step_matches_torch_ref(shape, kv_cache_dtype):
    """float32, float16, bfloat16 and int8 caches of a float32 model (torch_ref widens or dequantizes the same stored
    values: the same math, so float rounding apart)."""
    num_kv_heads, group, head_dim, block_size = shape
    step = make_step(REQUESTS, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=block_size,
                     kv_cache_dtype=kv_cache_dtype)
    assert backend_for("cpu", step).use_kernel
    actual, expected = _both(step)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)  # float rounding; a wrong key is off by O(1)


@needs_kernel
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "float16", "bfloat16", "int8"])
def test_many_decodes_share_the_threads(kv_cache_dtype):
    """64 sequences of 1-300 tokens: every row is a sequence of its own length (no padding leaks in)."""
    gen = torch.Generator().manual_seed(1)
    requests = [(int(n), 1) for n in torch.randint(1, 300, (64,), generator=gen)]
    step = make_step(requests, num_kv_heads=3, group=3, head_dim=64, block_size=16, seed=1,
                     kv_cache_dtype=kv_cache_dtype)
    actual, expected = _both(step)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)  # float rounding; a wrong key is off by O(1)


@needs_kernel
@pytest.mark.parametrize("block_size", [16, 24])  # 24 does not divide the kernel's 128-token spans
def test_long_sequences_split_into_spans_match_torch_ref(block_size):
    """Sequences of one to six 128-token spans (and a token past a span) are attended span by span, in parallel,
    and merged: the same attention as one softmax over the whole sequence."""
    requests = [(700, 1), (128, 1), (129, 1), (257, 1), (3, 1)]
    step = make_step(requests, num_kv_heads=3, group=3, head_dim=64, block_size=block_size, seed=2)
    actual, expected = _both(step)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


@dataclass
class RowsCase:
    """A random paged cache and query rows that share one block table, row r attending seq_lens[r] tokens."""

    key: torch.Tensor  # [num_blocks, block_size, Hkv, D]: float32 / 16-bit, or int8 codes
    value: torch.Tensor
    scales: tuple[torch.Tensor, torch.Tensor] | tuple[None, None]  # int8: [num_blocks, block_size, Hkv, 1] each
    query: torch.Tensor  # [rows, Hq, D]
    tables: torch.Tensor  # [rows, max_blocks]
    seq_lens: torch.Tensor  # [rows]
    group: int


def _rows_case(shape, kv_cache_dtype: str, first_len: int, num_rows: int, scale_size: float = 1.0) -> RowsCase:
    gen = torch.Generator().manual_seed(3)
    num_kv_heads, group, head_dim, block_size = shape
    max_blocks = (first_len + num_rows + block_size - 1) // block_size
    key, value = (torch.randn(max_blocks + 8, block_size, num_kv_heads, head_dim, generator=gen) for _ in range(2))
    scales = (None, None)
    if kv_cache_dtype == "int8":
        key, value = ((x * 40).clamp(-127, 127).to(torch.int8) for x in (key, value))
        scales = tuple(torch.rand(max_blocks + 8, block_size, num_kv_heads, 1, generator=gen) * scale_size
                       for _ in range(2))
    elif kv_cache_dtype != "float32":
        key, value = key.to(getattr(torch, kv_cache_dtype)), value.to(getattr(torch, kv_cache_dtype))
    query = torch.randn(num_rows, num_kv_heads * group, head_dim, generator=gen)
    tables = torch.randperm(max_blocks + 8, generator=gen)[:max_blocks].repeat(num_rows, 1).contiguous()
    return RowsCase(key, value, scales, query, tables, torch.arange(first_len, first_len + num_rows), group)


def _attend(case: RowsCase, rows: slice = slice(None), int8_queries: bool = False, kernels=None) -> torch.Tensor:
    """The kernel's attention of case's rows `rows` (scale 1/8)."""
    kernels = kernels or native.load("paged_decode")
    query, (_, block_size, num_kv_heads, head_dim) = case.query[rows], case.key.shape
    out = torch.empty_like(query)
    status = kernels.paged_decode_kv(query.data_ptr(), case.key.data_ptr(), case.value.data_ptr(),
                                     *(None if x is None else x.data_ptr() for x in case.scales),
                                     native.paged_kv_kind(case.key.dtype), int(int8_queries),
                                     case.tables[rows].data_ptr(), case.seq_lens[rows].data_ptr(), None,
                                     out.data_ptr(), out.shape[0], num_kv_heads, case.group, head_dim, block_size,
                                     case.tables.shape[1], 0.125)
    assert status == 0
    return out


@needs_kernel
@pytest.mark.parametrize("kv_cache_dtype", ["float32", "int8", "int8-queries", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: f"hkv{s[0]}-g{s[1]}-d{s[2]}-bs{s[3]}")
@pytest.mark.parametrize(("first_len", "num_rows"), [(700, 5), (766, 5), (250, 11)],
                         ids=["within-a-span", "across-a-span-end", "more-rows-than-share-a-read"])
def test_a_row_gives_the_same_bits_alone_or_among_others(first_len: int, num_rows: int, shape, kv_cache_dtype):
    """Rows with one block table (a request verifying drafts) share each key and value read, and spans depend on a
    row's length only: each row rounds as it does alone (one sequence), bit for bit. 766-770 cross a span end (128
    tokens), so the shorter rows have one span fewer; 11 rows are more than the kernel attends together (8)."""
    case = _rows_case(shape, kv_cache_dtype.removesuffix("-queries"), first_len, num_rows)
    int8_queries = kv_cache_dtype == "int8-queries"
    together = _attend(case, int8_queries=int8_queries)
    for row in range(num_rows):
        assert torch.equal(_attend(case, slice(row, row + 1), int8_queries), together[row:row + 1])


def _int8_query_attention(case: RowsCase) -> torch.Tensor:
    """paged_decode.c's attention with int8 queries, from its definition: each query head rounded as kv_quant rounds
    keys, score = ((float32)(q codes . k codes) * key scale) * (q scale * 1/8) in float32; softmax and p v in
    float64."""
    codes, query_scale = kv_quant.quantize(case.query, "int8")  # [R, Hq, D], [R, Hq, 1]
    block_size = case.key.shape[1]
    key_scale, value_scale = case.scales
    rows = []
    for row, length in enumerate(case.seq_lens.tolist()):
        blocks = case.tables[row, :(length + block_size - 1) // block_size]

        def tokens(x: torch.Tensor, blocks=blocks, length=length) -> torch.Tensor:  # [nb, bs, Hkv, .] -> [n, Hq, .]
            return x[blocks].flatten(0, 1)[:length].repeat_interleave(case.group, dim=1)

        dots = (codes[row, :, None].long() * tokens(case.key).long().transpose(0, 1)).sum(-1)  # [Hq, length]
        scores = (dots.float() * tokens(key_scale)[..., 0].T) * (query_scale[row] * 0.125)
        weights = torch.softmax(scores.double(), dim=-1)
        rows.append(torch.einsum("hn,nhd->hd", weights, tokens(case.value).double() * tokens(value_scale).double()))
    return torch.stack(rows).float()


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hkv{s[0]}-g{s[1]}-d{s[2]}-bs{s[3]}")
def test_int8_queries_match_their_definition(shape):
    """cpu_gguf_int8_activations with an int8 cache: Q.K on 8-bit queries (VNNI over transposed keys where the CPU
    has it and head_dim is a multiple of 16, else plain loops) is the rounding its definition says, not float
    queries': those are off by much more than the tolerance."""
    case = _rows_case(shape, "int8", first_len=300, num_rows=3, scale_size=0.02)
    expected = _int8_query_attention(case)
    torch.testing.assert_close(_attend(case, int8_queries=True), expected, atol=1e-6, rtol=1e-5)  # measured 6e-8
    assert (_attend(case) - expected).abs().max() > 1e-5  # measured 4e-5 (head_dim 8) to 2e-3


@needs_kernel
@pytest.mark.skipif("avx512_vnni" not in pathlib.Path("/proc/cpuinfo").read_text(errors="replace")
                    if pathlib.Path("/proc/cpuinfo").exists() else True, reason="no AVX-512 VNNI here")
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3]], ids=["d64", "d128", "d16"])
def test_int8_queries_give_the_same_bits_without_vnni(shape, monkeypatch, tmp_path):
    """The VNNI pass (keys transposed and made unsigned) against paged_decode.c built without VNNI (integer loops
    per row): exact integer sums, so the same bits."""
    case = _rows_case(shape, "int8", first_len=300, num_rows=5)
    with_vnni = _attend(case, int8_queries=True)
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-mno-avx512vnni"))
    native.load.cache_clear()
    try:
        without = _attend(case, int8_queries=True, kernels=native.load("paged_decode"))
    finally:
        monkeypatch.undo()
        native.load.cache_clear()
    assert torch.equal(with_vnni, without)


@needs_kernel
def test_int8_queries_are_for_int8_caches_on_the_kernel():
    assert CpuAttentionBackend(needs("int8", int8_queries=True)).int8_queries
    assert not CpuAttentionBackend(needs("int8")).int8_queries
    assert not CpuAttentionBackend(needs("float16", int8_queries=True)).int8_queries
    assert not CpuAttentionBackend(needs("int8", use_window=True, int8_queries=True)).int8_queries


@needs_kernel
@pytest.mark.parametrize("kv_residual", ["read", "ignored"])
def test_an_int4_cache_matches_torch_ref_step_by_step(kv_residual, monkeypatch):
    """KIVI int4 decodes on the kernel (codes dequantized as read, each request's incomplete block from its residual
    slot) against torch_ref's over paged_cases.INT4_STEPS. "ignored": told of no incomplete block, the kernel reads
    stale codes there, so the same check must fail in the steps with decodes (this test's own mutation)."""
    calls: list[int] = []
    real = cpu_native.decode
    monkeypatch.setattr(cpu_native, "decode", lambda q, *rest: calls.append(q.shape[0]) or real(q, *rest))
    backends = {"torch": TorchAttentionBackend(needs("int4")), "cpu": CpuAttentionBackend(needs("int4"))}

    def forget_tails(name, metadata):
        if name == "cpu" and kv_residual == "ignored":
            metadata.decode_residual.columns.fill_(-1)

    outputs = run_int4_steps(backends, "cpu", forget_tails)
    assert calls == [2, 4]  # the decodes of steps 2 and 3
    mismatches = [not torch.allclose(out["cpu"], out["torch"], rtol=1e-4, atol=1e-5) for out in outputs]
    assert mismatches == ([False] * 3 if kv_residual == "read" else [False, True, True])


@needs_kernel
def test_other_caches_stay_on_torch_ref(monkeypatch):
    """The kernel reads float32, float16, bfloat16, int8 and int4 only: for an fp8 cache the cpu backend runs
    torch_ref's decode, so the outputs are identical (the choice is made once, when the backend is created)."""
    step = make_step(REQUESTS, num_kv_heads=2, group=2, head_dim=32, block_size=8, kv_cache_dtype="fp8")
    monkeypatch.setattr(cpu_native, "decode", lambda *args: pytest.fail("the kernel ran"))
    assert not backend_for("cpu", step).use_kernel
    actual, expected = _both(step)
    assert torch.equal(actual, expected)


@needs_kernel
def test_window_and_mla_stay_on_torch_ref():
    assert not CpuAttentionBackend(needs(use_window=True)).use_kernel
    assert not CpuAttentionBackend(needs(use_mla=True)).use_kernel
    assert not CpuAttentionBackend(needs("int8", use_window=True)).use_kernel
    assert CpuAttentionBackend(needs()).use_kernel and CpuAttentionBackend(needs("int8")).use_kernel


@needs_kernel
def test_the_kernel_is_what_runs_the_decodes(monkeypatch):
    calls: list[int] = []
    real = cpu_native.decode
    monkeypatch.setattr(cpu_native, "decode", lambda q, *rest: calls.append(q.shape[0]) or real(q, *rest))
    step = make_step(REQUESTS, num_kv_heads=3, group=3, head_dim=64, block_size=16)
    _both(step)
    assert calls == [5]


def test_a_table_shorter_than_the_sequence_is_refused():
    """The kernel trusts the block tables, so the step's metadata builder refuses a table too short, once per step."""
    with pytest.raises(ValueError, match="a request attends 40 tokens but its block table holds 32"):
        build_common_metadata(["a", "b"], [9, 39], [1, 1], [[3], [0, 1]], 16, CPU)


def test_cpu_attention_is_refused_on_another_device():
    with pytest.raises(ValueError, match="attention_backend='cpu' cannot serve this model: it runs on cpu only, "
                                         "not cuda"):
        create_attention_backend("cpu", needs(device=torch.device("cuda")))


@needs_kernel
def test_auto_picks_the_kernel_on_cpu():
    backend = create_attention_backend("auto", needs())
    assert isinstance(backend, CpuAttentionBackend) and backend.use_kernel


@pytest.fixture
def no_compiler(monkeypatch, tmp_path) -> Iterator[None]:
    """An empty kernel cache and a compiler that does not exist (native.load remembers its builds: reset it)."""
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native.load.cache_clear()
    yield
    monkeypatch.undo()
    native.load.cache_clear()


@pytest.mark.usefixtures("no_compiler")
def test_without_a_compiler_auto_falls_back_and_cpu_is_refused():
    assert not cpu_native.available()
    assert type(create_attention_backend("auto", needs())) is TorchAttentionBackend
    with pytest.raises(ValueError, match="attention_backend='cpu' needs a C compiler"):
        create_attention_backend("cpu", needs())


@needs_kernel
def test_a_failed_build_is_reported_and_falls_back(monkeypatch, tmp_path, caplog):
    """A compiler that fails (here: `false`) leaves the engine on torch, with the reason in the log."""
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    native.load.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert not cpu_native.available()
        assert "stay on torch" in caplog.text
        assert not list(tmp_path.iterdir())  # no half-written library left behind
    finally:
        monkeypatch.undo()
        native.load.cache_clear()


@needs_kernel
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_sliding_window_decodes_on_the_kernel_match_torch_ref(kv_cache_dtype):
    """A sliding-window group's decodes (tables from the first visible block, keys from the window's first): the
    kernel reads each row's [start, end), torch_ref masks; lengths within, at and far past the window."""
    window, block_size = 40, 16
    requests = [(1, 1), (30, 1), (41, 1), (100, 1), (300, 1)]
    step = make_step(requests, num_kv_heads=2, group=3, head_dim=64, block_size=block_size,
                     kv_cache_dtype=kv_cache_dtype)
    tables = [row[:count].tolist() for row, count in zip(step.common.block_table, step.common.num_blocks_host,
                                                         strict=True)]
    common = build_common_metadata([f"request-{i}" for i in range(len(requests))], [s - 1 for s, _ in requests],
                                   [1] * len(requests), tables, block_size, CPU, sliding_window=window)
    kernel_backend, torch_backend = backend_for("cpu", step), backend_for("torch", step)
    kernel_metadata = kernel_backend.build_metadata(common)
    assert kernel_metadata.decode_mask is None and kernel_metadata.decode_key_starts.tolist() == [0, 0, 1, 12, 4]
    actual = kernel_backend.forward(step.query, step.key, step.value, clone_cache(step.cache), kernel_metadata,
                                    step.scale)
    expected = torch_backend.forward(step.query, step.key, step.value, clone_cache(step.cache),
                                     torch_backend.build_metadata(common), step.scale)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
