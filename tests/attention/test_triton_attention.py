"""Triton paged-attention kernels against the pure-torch oracle (torch_ref).

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
here before triton is imported). On a CUDA machine the same checks run compiled, on the GPU:
one process cannot hold both builds of a kernel, and test_triton_gpu.py needs the compiled one.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest

# The interpreter runs tl.dot as a numpy matmul; multithreaded OpenBLAS on small tiles and busy cores was
# ~30x slower than one thread. Effective only if numpy is not loaded yet (torch loads it: set before).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from paged_cases import (  # noqa: E402
    Step,
    assert_same_cache,
    backend_for,
    clone_cache,
    make_step,
    run_backend,
    run_int4_steps,
)

from kvserve.attention import torch_ref  # noqa: E402
from kvserve.attention import triton_attention as ta  # noqa: E402
from kvserve.attention.backend import AttentionRequirements  # noqa: E402
from kvserve.attention.selector import create_attention_backend  # noqa: E402
from kvserve.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from kvserve.config import EngineConfig  # noqa: E402
from kvserve.kv.kv_cache import LayerKVCache, allocate_kv_caches  # noqa: E402
from kvserve.kv.kv_spec import KVCacheSpec  # noqa: E402

if not ta.IS_INTERPRETED and not torch.cuda.is_available():
    pytest.skip("triton_attention was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)
DEVICE = "cpu" if ta.IS_INTERPRETED else "cuda"
# The interpreter decodes e4m3 in software; compiled, the fp8 type exists from sm_89 on.
HAS_NATIVE_FP8 = ta.IS_INTERPRETED or torch.cuda.get_device_capability() >= (8, 9)
TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32


def run_reference(step: Step) -> tuple[torch.Tensor, LayerKVCache]:
    """torch_ref on its own copy of the cache: (output [T, Hq, D], cache after the write)."""
    cache = clone_cache(step.cache)
    out = torch_ref.paged_attention(step.query, step.key, step.value, cache, step.metadata, step.scale)
    return out, cache


# ---------------------------------------------------------------------------- write_kv


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "float16", "bfloat16", "int8", "fp8"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_write_kv_is_bit_exact(kv_cache_dtype: str, head_dim: int) -> None:
    step = make_step([(40, 1), (300, 200)], num_kv_heads=3, group=1, head_dim=head_dim, block_size=16,
                     kv_cache_dtype=kv_cache_dtype, device=DEVICE)
    expected = clone_cache(step.cache)
    torch_ref.write_kv(step.key, step.value, expected, step.metadata.slot_mapping)
    ta.write_kv(step.key, step.value, step.cache, step.metadata.slot_mapping)
    assert_same_cache(step.cache, expected)


def test_write_kv_skips_negative_slots() -> None:
    step = make_step([(50, 20)], num_kv_heads=2, group=1, head_dim=64, block_size=16, kv_cache_dtype="int8",
                     device=DEVICE)
    slots = step.metadata.slot_mapping.clone()
    slots[::3] = -1  # padding rows
    keep = slots >= 0
    expected = clone_cache(step.cache)
    torch_ref.write_kv(step.key[keep], step.value[keep], expected, slots[keep])
    ta.write_kv(step.key, step.value, step.cache, slots)
    assert_same_cache(step.cache, expected)


def test_fp8_encoding_matches_torch() -> None:
    # A row whose absmax is 448 gets scale 1, so the codes are the fp8 encoding of the values themselves:
    # subnormals, ties between codes, the top of the range and random values over every exponent.
    specials = torch.tensor([448.0, -448.0, 0.0, -0.0, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -6,
                             2.0 ** -6 * 1.0625, 1.0625, 1.1875, 17.0, 19.0, 232.0, 240.0, 440.0, 447.9])
    gen = torch.Generator().manual_seed(0)
    randoms = torch.randn(1024 - len(specials), generator=gen) * 2.0 ** torch.randint(-12, 8, (1024 - len(specials),),
                                                                                    generator=gen)
    values = torch.cat([specials, randoms.clamp(-448, 448)]).view(16, 1, 64)
    values[:, 0, 0] = 448.0
    cache = make_step([(16, 2)], num_kv_heads=1, group=1, head_dim=64, block_size=16, kv_cache_dtype="fp8",
                      device=DEVICE).cache
    ta.write_kv(values.to(DEVICE), values.to(DEVICE), cache, torch.arange(16, device=DEVICE))
    assert torch.equal(cache.key_scale[0].flatten().cpu(), torch.ones(16))
    expected = values.to(torch.float8_e4m3fn).view(torch.uint8).view(16, 64)
    assert torch.equal(cache.key[0, :, 0].cpu(), expected)


@triton.jit
def _fp8_decode_both(codes_ptr, bits_ptr, native_ptr, BLOCK: tl.constexpr, NATIVE: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    codes = tl.load(codes_ptr + offs)
    tl.store(bits_ptr + offs, ta._fp8_decode(codes))
    if NATIVE:
        tl.store(native_ptr + offs, codes.to(tl.float8e4nv, bitcast=True).to(tl.float32))


def test_fp8_decoding_matches_torch() -> None:
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)  # no NaN codes
    codes = torch.cat([codes, codes[:2]]).to(DEVICE)  # 256 lanes
    by_bits, native = torch.empty(256, device=DEVICE), torch.empty(256, device=DEVICE)
    _fp8_decode_both[(1,)](codes, by_bits, native, BLOCK=256, NATIVE=HAS_NATIVE_FP8)
    expected = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(by_bits, expected)
    if HAS_NATIVE_FP8:
        assert torch.equal(native, expected)


# ---------------------------------------------------------------------------- decode

DECODE_CASES = [
    # head_dim, group (Hq / Hkv), block_size, kv_cache_dtype, seq_lens, partition_size
    (64, 1, 16, "auto", [1, 17, 300], 512),
    (128, 3, 32, "auto", [2000, 5, 513], 512),
    (64, 8, 16, "int8", [1500, 64, 1], 512),
    (128, 8, 32, "fp8", [700, 2], 256),
    (64, 3, 32, "fp8", [2048, 1030], 512),
    (128, 1, 16, "int8", [257, 999], 256),
]


@pytest.mark.parametrize(("head_dim", "group", "block_size", "kv_cache_dtype", "seq_lens", "partition_size"),
                         DECODE_CASES)
def test_decode_matches_reference(head_dim: int, group: int, block_size: int, kv_cache_dtype: str,
                                  seq_lens: list[int], partition_size: int) -> None:
    step = make_step([(n, 1) for n in seq_lens], num_kv_heads=2, group=group, head_dim=head_dim,
                     block_size=block_size, kv_cache_dtype=kv_cache_dtype, device=DEVICE)
    expected, expected_cache = run_reference(step)
    md = step.metadata
    ta.write_kv(step.key, step.value, step.cache, md.slot_mapping)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = ta.decode_attention(step.query, step.cache, md.decode_block_tables, seq_lens_t, step.scale,
                              partition_size=partition_size)
    assert_same_cache(step.cache, expected_cache)
    torch.testing.assert_close(out, expected, **TOL)


def test_partitioning_caps_the_grid_of_a_wide_table() -> None:
    assert ta.partitioning(2048, 512) == (512, 4)
    assert ta.partitioning(40_960, 512) == (2048, 20)  # Qwen3's max_model_len: 20 partitions, not 80
    assert ta.partitioning(ta.MAX_PARTITIONS * 512 + 1, 512) == (1024, ta.MAX_PARTITIONS // 2 + 1)


def test_decode_with_the_partitions_capped_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table of 8 partitions' worth under a cap of 2: each partition covers four times the keys."""
    monkeypatch.setattr(ta, "MAX_PARTITIONS", 2)
    seq_lens = [2000, 5, 513, 1024]
    step = make_step([(n, 1) for n in seq_lens], num_kv_heads=2, group=3, head_dim=64, block_size=16,
                     kv_cache_dtype="int8", device=DEVICE)
    expected, _ = run_reference(step)
    md = step.metadata
    ta.write_kv(step.key, step.value, step.cache, md.slot_mapping)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    assert ta.partitioning(md.decode_block_tables.shape[1] * 16, 256) == (1024, 2)
    out = ta.decode_attention(step.query, step.cache, md.decode_block_tables, seq_lens_t, step.scale,
                              partition_size=256)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.skipif(not HAS_NATIVE_FP8, reason="no e4m3 type before sm_89")
def test_decode_native_fp8_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sm_89+ hardware e4m3 decode (interpreted here) gives the same attention as the bit decode."""
    monkeypatch.setattr(ta, "_use_native_fp8", lambda device: True)
    step = make_step([(600, 1), (33, 1)], num_kv_heads=2, group=3, head_dim=64, block_size=16,
                     kv_cache_dtype="fp8", device=DEVICE)
    expected, _ = run_reference(step)
    out = run_backend(backend_for("triton", step), step)
    torch.testing.assert_close(out, expected, **TOL)


# ---------------------------------------------------------------------------- prefill

PREFILL_CASES = [
    # head_dim, group, block_size, kv_cache_dtype, (seq_len, query_len) per sequence
    (64, 1, 16, "auto", [(300, 300), (45, 20)]),
    (128, 3, 32, "auto", [(1100, 600), (64, 64)]),
    (64, 8, 32, "int8", [(700, 700), (513, 2)]),
    (128, 1, 16, "fp8", [(2000, 300)]),
    (64, 3, 16, "fp8", [(90, 90), (400, 130)]),
]


@pytest.mark.parametrize(("head_dim", "group", "block_size", "kv_cache_dtype", "requests"), PREFILL_CASES)
def test_prefill_matches_reference(head_dim: int, group: int, block_size: int, kv_cache_dtype: str,
                                   requests: list[tuple[int, int]]) -> None:
    step = make_step(requests, num_kv_heads=2, group=group, head_dim=head_dim, block_size=block_size,
                     kv_cache_dtype=kv_cache_dtype, device=DEVICE)
    expected, expected_cache = run_reference(step)
    md = step.metadata
    ta.write_kv(step.key, step.value, step.cache, md.slot_mapping)
    starts = [0] + torch.tensor([q for _, q in requests]).cumsum(0).tolist()
    query_start_loc = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([s for s, _ in requests], dtype=torch.int32, device=DEVICE)
    tables = torch.nn.utils.rnn.pad_sequence([p.block_table for p in md.prefills], batch_first=True)
    out = ta.prefill_attention(step.query, step.cache, query_start_loc, seq_lens, tables,
                               max(q for _, q in requests), step.scale, key=step.key, value=step.value)
    assert_same_cache(step.cache, expected_cache)
    torch.testing.assert_close(out, expected, **TOL)


# ---------------------------------------------------------------------------- the backend


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "float16", "bfloat16", "int8", "fp8"])
def test_mixed_batch_through_backend(kv_cache_dtype: str) -> None:
    requests = [(1, 1), (260, 1), (777, 1), (150, 150), (600, 90)]  # 3 decodes, a prompt, a chunk after a prefix
    step = make_step(requests, num_kv_heads=2, group=3, head_dim=64, block_size=16,
                     kv_cache_dtype=kv_cache_dtype, device=DEVICE)
    expected, expected_cache = run_reference(step)
    out = run_backend(backend_for("triton", step), step)
    assert_same_cache(step.cache, expected_cache)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_soft_capped_scores_match_reference(kv_cache_dtype: str) -> None:
    """Gemma 2's attention logit soft cap in both kernels (decodes, a prompt, a chunk after a prefix): a cap of 1.5
    moves these scores (about N(0, 1)) well past the tolerance, so a kernel that skipped it would fail."""
    requests = [(1, 1), (260, 1), (150, 150), (600, 90)]
    step = make_step(requests, num_kv_heads=2, group=3, head_dim=64, block_size=16,
                     kv_cache_dtype=kv_cache_dtype, device=DEVICE)
    cache = clone_cache(step.cache)
    expected = torch_ref.paged_attention(step.query, step.key, step.value, cache, step.metadata, step.scale,
                                         soft_cap=1.5)
    needs = AttentionRequirements(torch.device(DEVICE), step.kv_cache_dtype, False, False, logits_soft_cap=1.5)
    out = run_backend(create_attention_backend("triton", needs), step)
    torch.testing.assert_close(out, expected, **TOL)


def test_sink_queries_laid_out_unlike_the_queries_are_refused() -> None:
    """The kernels index the sink queries with the queries' strides: a transposed copy must not be read."""
    step = make_step([(40, 1), (33, 1)], num_kv_heads=2, group=3, head_dim=64, block_size=16, device=DEVICE)
    tables, lengths = step.metadata.decode_block_tables, torch.tensor([40, 33], dtype=torch.int32, device=DEVICE)
    sink_query = step.query.transpose(0, 1).contiguous().transpose(0, 1)  # same shape, other strides
    rows = ta.SinksWindowRows(4, 8, sink_query, tables.to(torch.int32), lengths, lengths.long())
    with pytest.raises(ValueError, match="sink queries and held columns must be laid out as the queries and the "
                                         "block table"):
        ta.decode_attention(step.query, step.cache, tables, lengths, step.scale, sinks_window=rows)


@pytest.mark.parametrize("kv_residual", ["read", "ignored"])
def test_an_int4_cache_matches_the_torch_backend_step_by_step(kv_residual: str) -> None:
    """KIVI int4 through both backends (paged_cases.INT4_STEPS: decodes, prompts and a chunk after a cached prefix
    over two decode partitions). "ignored": the kernels told of no incomplete block read stale codes there, so the
    same check must fail in the steps that have such blocks (this test's own mutation)."""
    needs = AttentionRequirements(torch.device(DEVICE), "int4", use_window=False, use_mla=False)
    backends = {name: create_attention_backend(name, needs) for name in ("torch", "triton")}

    def forget_tails(name: str, metadata: ta.TritonAttentionMetadata) -> None:
        if name == "triton" and kv_residual == "ignored":
            metadata.decode_residual = metadata.prefill_residual = None

    outputs = run_int4_steps(backends, DEVICE, forget_tails)
    mismatches = [not torch.allclose(out["triton"], out["torch"], **TOL) for out in outputs]
    assert mismatches == ([False] * 3 if kv_residual == "read" else [False, True, True])


def test_write_kv_refuses_an_int4_cache() -> None:
    """int4 blocks are quantized whole from the residual (torch_ref.write_kv_int4), never token by token here."""
    step = make_step([(20, 1)], num_kv_heads=2, group=1, head_dim=64, block_size=16, device=DEVICE)
    spec = KVCacheSpec(2, 64, 64, "int4", group_size=16)
    cache = allocate_kv_caches([spec], 4, 16, DEVICE, num_residual_slots=1)[0]
    with pytest.raises(ValueError, match=r"an int4 cache is written block by block from its residual "
                                         r"\(torch_ref.write_kv_int4\)"):
        ta.write_kv(step.key, step.value, cache, step.metadata.slot_mapping)


def test_metadata_is_derived_from_the_common_metadata() -> None:
    step = make_step([(30, 1), (40, 10)], num_kv_heads=2, group=1, head_dim=64, block_size=16, device=DEVICE)
    metadata = backend_for("triton", step).build_metadata(step.common)
    assert metadata.decode_seq_lens.tolist() == [30] and metadata.decode_seq_lens.dtype == torch.int32
    assert metadata.query_start_loc.tolist() == [1, 11] and metadata.prefill_seq_lens.tolist() == [40]
    assert metadata.decode_block_tables.tolist() == step.common.block_table[:1, :2].tolist()
    assert metadata.prefill_block_tables.tolist() == step.common.block_table[1:, :3].tolist()
    assert metadata.max_query_len == 10


# ---------------------------------------------------------------------------- selection


def test_attention_backend_option() -> None:
    from kvserve.attention import cpu_native  # auto on CPU: the compiled decode kernel where it builds

    needs = AttentionRequirements(torch.device("cpu"), "float32", use_window=False, use_mla=False)
    expected = cpu_native.CpuAttentionBackend if cpu_native.available() else TorchAttentionBackend
    assert type(create_attention_backend("auto", needs)) is expected
    assert type(create_attention_backend("torch", needs)) is TorchAttentionBackend
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        create_attention_backend("cuda-please", needs)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig.from_kwargs(attention_backend="cuda-please")
    if ta.IS_INTERPRETED:
        assert type(create_attention_backend("triton", needs)) is ta.TritonAttentionBackend


# ---------------------------------------------------------------------------- end to end


def _tiny_llama(path: pathlib.Path, tokenizer: Any) -> str:
    """A 3-layer GQA Llama (8 heads / 2 KV heads of 32) with random weights, saved as an HF checkpoint."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=256,
                                      num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=False,
                                      initializer_range=0.15, rope_theta=10000.0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> str:
    """The checkpoint, written once for both KV-cache dtypes."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"), word_tokenizer)


@pytest.mark.parametrize(("kv_cache_dtype", "window"), [("auto", {}), ("fp8", {}), ("int4", {}),
                                                      ("auto", {"kv_window": 24, "kv_sinks": 5}),
                                                      ("int8", {"kv_window": 24, "kv_sinks": 5}),
                                                      ("int4", {"kv_window": 24, "kv_sinks": 5, "block_size": 16})],
                         ids=["auto", "fp8", "int4", "sinks-window", "sinks-window-int8", "sinks-window-int4"])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's numpy meeting a NaN: a stale slot read
def test_tiny_llama_greedy_tokens_match_torch_path(tiny_llama: str, kv_cache_dtype: str, window: dict) -> None:
    """Attention sinks + window: the 70-token prompt and the decodes run past the 24-token window (blocks of 16)."""
    from kvserve import LLM, SamplingParams

    # A 70-token prompt in 32-token chunks: prefills over a cached prefix, mixed with decodes.
    prompts = [{"prompt_token_ids": ids} for ids in ([1, 520, 3000, 45, 8800, 17, 99, 250], [5, 42],
                                                     list(range(300, 370)))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(model=tiny_llama, device=DEVICE, kv_cache_memory=4 * 2**20, max_num_batched_tokens=32,
                  max_num_seqs=4, kv_cache_dtype=kv_cache_dtype, attention_backend=backend, show_progress=False,
                  **window)
        assert llm.engine.attention_backend.name == backend
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens["triton"] == tokens["torch"]
    assert all(len(t) == 8 for t in tokens["triton"])
