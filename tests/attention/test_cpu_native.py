"""The compiled CPU decode kernel (cpu_native) against the pure-torch oracle, and its fallbacks."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
import torch
from paged_cases import assert_same_cache, clone_cache, make_step

from kvserve import native
from kvserve.attention import cpu_native, torch_ref
from kvserve.attention.selector import select_attention

HAS_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None
needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler to build the kernel")

SHAPES = [  # (num_kv_heads, group, head_dim, block_size)
    (3, 3, 64, 16),  # SmolLM2: GQA 9 / 3
    (4, 1, 32, 16),  # MHA
    (1, 4, 128, 8),  # MQA (Gemma 3 270M: 4 / 1), head_dim 128
    (2, 4, 16, 4),
]
REQUESTS = [(1, 1), (16, 1), (17, 1), (40, 1), (5, 1), (33, 5), (9, 9)]  # (seq_len, query_len): 5 decodes, 2 prefills


@pytest.fixture
def fresh_selection() -> Iterator[None]:
    select_attention.cache_clear()
    yield
    select_attention.cache_clear()


def _both(step, with_seq_lens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run torch_ref and cpu_native on their own copies of the cache; the caches must end up equal."""
    ref_cache, native_cache = clone_cache(step.cache), clone_cache(step.cache)
    metadata = step.metadata
    if with_seq_lens:
        metadata.decode_seq_lens = metadata.decode_mask.view(metadata.num_decodes, -1).sum(dim=-1)
    expected = torch_ref.paged_attention(step.query, step.key, step.value, ref_cache, metadata, step.scale)
    actual = cpu_native.paged_attention(step.query, step.key, step.value, native_cache, metadata, step.scale)
    assert_same_cache(native_cache, ref_cache)
    return actual, expected


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hkv{s[0]}-g{s[1]}-d{s[2]}-bs{s[3]}")
@pytest.mark.parametrize("with_seq_lens", [True, False], ids=["seq_lens", "mask"])
def test_mixed_step_matches_torch_ref(shape, with_seq_lens):
    num_kv_heads, group, head_dim, block_size = shape
    step = make_step(REQUESTS, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=block_size)
    actual, expected = _both(step, with_seq_lens)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)  # float rounding; a wrong key is off by O(1)


@needs_kernel
def test_many_decodes_share_the_threads():
    """64 sequences of 1-300 tokens: every row is a sequence of its own length (no padding leaks in)."""
    gen = torch.Generator().manual_seed(1)
    requests = [(int(n), 1) for n in torch.randint(1, 300, (64,), generator=gen)]
    step = make_step(requests, num_kv_heads=3, group=3, head_dim=64, block_size=16, seed=1)
    actual, expected = _both(step, with_seq_lens=True)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)  # float rounding; a wrong key is off by O(1)


@needs_kernel
def test_quantized_caches_stay_on_torch_ref():
    """int8 has no compiled kernel: the same torch_ref code runs, so the outputs are identical."""
    step = make_step(REQUESTS, num_kv_heads=2, group=2, head_dim=32, block_size=8, kv_cache_dtype="int8")
    actual, expected = _both(step, with_seq_lens=True)
    assert torch.equal(actual, expected)


@needs_kernel
def test_the_kernel_is_what_runs_the_decodes(monkeypatch):
    calls: list[int] = []
    real = cpu_native.decode
    monkeypatch.setattr(cpu_native, "decode", lambda q, *rest: calls.append(q.shape[0]) or real(q, *rest))
    step = make_step(REQUESTS, num_kv_heads=3, group=3, head_dim=64, block_size=16)
    _both(step, with_seq_lens=True)
    assert calls == [5]


@needs_kernel
def test_a_table_shorter_than_the_sequence_is_refused():
    """The kernel trusts the block tables, so a decode that would read past its table is stopped first."""
    step = make_step([(40, 1)], num_kv_heads=3, group=3, head_dim=64, block_size=16)
    metadata = step.metadata
    metadata.decode_block_tables = metadata.decode_block_tables[:, :2]  # 32 slots for 40 tokens
    metadata.decode_seq_lens = torch.tensor([40])
    with pytest.raises(ValueError, match="a decode attends 40 tokens but its block table holds 32"):
        cpu_native.decode(step.query, step.cache, metadata, step.scale)


@pytest.mark.usefixtures("fresh_selection")
def test_cpu_attention_is_refused_on_another_device(monkeypatch):
    monkeypatch.setenv("KVSERVE_ATTENTION", "cpu")
    with pytest.raises(ValueError, match="KVSERVE_ATTENTION=cpu runs on the CPU only, not cuda"):
        select_attention(torch.device("cuda"))


@needs_kernel
@pytest.mark.usefixtures("fresh_selection")
def test_auto_picks_the_kernel_on_cpu(monkeypatch):
    monkeypatch.delenv("KVSERVE_ATTENTION", raising=False)
    assert select_attention(torch.device("cpu")) is cpu_native.paged_attention


@pytest.fixture
def no_compiler(monkeypatch, tmp_path) -> Iterator[None]:
    """An empty kernel cache and a compiler that does not exist."""
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native.load.cache_clear()
    select_attention.cache_clear()
    yield
    monkeypatch.undo()
    native.load.cache_clear()
    select_attention.cache_clear()


@pytest.mark.usefixtures("no_compiler")
def test_without_a_compiler_auto_falls_back_and_cpu_is_refused(monkeypatch):
    assert not cpu_native.available()
    monkeypatch.delenv("KVSERVE_ATTENTION", raising=False)
    assert select_attention(torch.device("cpu")) is torch_ref.paged_attention
    select_attention.cache_clear()
    monkeypatch.setenv("KVSERVE_ATTENTION", "cpu")
    with pytest.raises(ValueError, match="KVSERVE_ATTENTION=cpu needs a C compiler"):
        select_attention(torch.device("cpu"))


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
