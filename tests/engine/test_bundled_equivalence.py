"""The bundled SmolLM2-135M end to end: exact greedy tokens against transformers, against our own
no-cache recompute, and across every scheduling feature (chunking, batching, preemption)."""

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.loader.weights import resolve_model_path
from kvserve.runner.attention_inputs import build_common_metadata

NUM_NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
TEXT_PROMPTS = [
    "The capital of France is",
    "请用中文介绍一下长城。",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory=64 * 2**20, show_progress=False)


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> list[list[int]]:
    """Token ids of the text prompts plus one chat-templated conversation."""
    tokenizer = llm.get_tokenizer()
    chat = llm.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])
    return [tokenizer.encode(p) for p in TEXT_PROMPTS] + [chat]


def generate_ids(llm: LLM, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def expected(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt generated alone: the plain path every feature must reproduce."""
    return [generate_ids(llm, [p])[0] for p in prompts]


def test_matches_transformers_on_same_gguf_weights(prompts, expected):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    path = resolve_model_path(None)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for prompt, ours in zip(prompts, expected, strict=True):
        # An explicit mask: without one, generate() masks every pad token (id 2), and this
        # model's pad is its <|im_end|>, which chat prompts contain.
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS,
                                 do_sample=False, eos_token_id=None,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert ours == out[0, len(prompt):].tolist()


def greedy_without_cache(llm: LLM, prompt: list[int], num_new: int) -> list[int]:
    """Recompute the whole sequence at every step (no KV reuse); the engine must be idle."""
    runner = llm.engine.runner
    block_size = runner.block_size
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(num_new):
            n = len(ids)
            # The whole sequence as one prefill over blocks 0, 1, ... (never a decode: the prompts are longer)
            common = build_common_metadata(["recompute"], [0], [n], [list(range(-(-n // block_size)))], block_size,
                                           runner.device)
            metadata = runner.attention_backend.build_metadata(common)
            hidden = runner.model(torch.tensor(ids), torch.arange(n), runner.kv_caches, metadata)
            ids.append(int(runner.model.compute_logits(hidden[-1:]).argmax()))
    return ids[len(prompt):]


def test_paged_cache_matches_recompute_without_cache(llm, prompts, expected):
    for prompt, ours in zip(prompts[:2], expected[:2], strict=True):
        assert ours == greedy_without_cache(llm, prompt, NUM_NEW_TOKENS)


def test_batch_of_16_mixed_lengths_matches_each_alone(llm, prompts, expected):
    batch = [prompts[i % len(prompts)][: 3 + 2 * i] for i in range(16)]
    alone = [generate_ids(llm, [p])[0] for p in batch]
    assert generate_ids(llm, batch) == alone
    assert llm.stats().kv_blocks_used == 0


def test_chunked_prefill_matches_unchunked(prompts, expected):
    chunked = LLM(kv_cache_memory=64 * 2**20, max_num_batched_tokens=5, show_progress=False)
    assert generate_ids(chunked, prompts) == expected


def test_unchunked_scheduling_matches(prompts, expected):
    unchunked = LLM(kv_cache_memory=64 * 2**20, enable_chunked_prefill=False,
                    max_model_len=512, max_num_batched_tokens=512, show_progress=False)
    assert generate_ids(unchunked, prompts) == expected


def test_forced_preemption_matches(prompts, expected):
    # 12 blocks of 16 tokens hold at most ~3 of these sequences: the rest are preempted and
    # recomputed, and must still produce exactly the same tokens.
    block_bytes = 16 * 30 * 2 * 3 * 64 * 4
    small = LLM(kv_cache_memory=12 * block_bytes, show_progress=False)
    outputs = small.generate([{"prompt_token_ids": p} for p in prompts * 2], GREEDY,
                             use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected * 2
    assert small.stats().kv_blocks_used == 0


def test_plain_torch_path_matches(prompts, expected, monkeypatch):
    """Every matmul and norm on torch (no compiled GEMV, RMSNorm or OpenBLAS for batch-1 decode, no oneDNN-packed
    weights for steps of several rows) and torch_ref's attention instead of the compiled decode kernel: the
    default's tokens, for the prompts batched together."""
    from kvserve.attention import cpu_native
    from kvserve.layers import host_blas, native_ops, onednn

    calls = []  # the stand-ins would break the run if called
    monkeypatch.setattr(host_blas, "matmul", lambda *args: calls.append("openblas"))
    monkeypatch.setattr(onednn, "linear", lambda *args: calls.append("onednn"))
    monkeypatch.setattr(native_ops, "gemv", lambda *args: calls.append("gemv"))
    monkeypatch.setattr(native_ops, "rms_norm", lambda *args: calls.append("rms_norm"))
    monkeypatch.setattr(cpu_native, "decode", lambda *args: calls.append("cpu_native"))
    plain = LLM(kv_cache_memory=64 * 2**20, cpu_native_kernels=False, cpu_blas_max_tokens=0,
                cpu_packed_weights=False, attention_backend="torch", show_progress=False)
    assert generate_ids(plain, prompts) == expected
    assert not calls


@pytest.mark.parametrize("option", [{"cpu_packed_weights": False}, {"cpu_native_kernels": False},
                                    {"attention_backend": "torch"}],
                         ids=["cpu_packed_weights", "cpu_native_kernels", "attention_backend=torch"])
def test_each_cpu_fast_path_off_alone_matches(option, prompts, expected):
    """One fast path off at a time: the default's tokens, each prompt alone (batch-1 steps) and all batched."""
    from kvserve.attention.torch_backend import TorchAttentionBackend

    # The float32 fast paths: the GGUF file dequantized (its default, computing on the blocks, is tested above).
    llm = LLM(kv_cache_memory=64 * 2**20, quantization="none", show_progress=False, **option)
    linear = llm.engine.runner.model.lm_head
    if "cpu_packed_weights" in option:
        assert linear.packed_weight is None
    elif "cpu_native_kernels" in option:  # batch-1 matmuls fall back to OpenBLAS
        assert not linear.method.use_gemv and llm.engine.platform.blas_step.max_tokens == 1
    else:
        assert type(llm.engine.attention_backend) is TorchAttentionBackend
    assert [generate_ids(llm, [p])[0] for p in prompts] == expected
    assert generate_ids(llm, prompts) == expected


def test_default_decodes_run_on_the_compiled_kernel(llm, prompts, monkeypatch):
    from kvserve.attention import cpu_native

    if not cpu_native.available():
        pytest.skip("no C compiler: the kernel could not be built")
    rows: list[int] = []
    real = cpu_native.decode
    monkeypatch.setattr(cpu_native, "decode", lambda q, *rest: rows.append(q.shape[0]) or real(q, *rest))
    monkeypatch.setattr(llm.engine.runner.model, "fused_decode", None)  # the modules' path, layer by layer
    generate_ids(llm, prompts[:2], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert rows == [2] * 2 * llm.engine.model_config.num_layers
