"""DeepSeek-V2/V3 (MLA + MoE) against Hugging Face transformers: exact greedy tokens, latent cache, absorbed decode.

Tiny random-weight models: with and without query LoRA, dense-only and MoE (softmax/sigmoid scoring, grouped
top-k, V3's score correction bias), interleaved and plain RoPE, YaRN with mscale; through prefill, chunked
prefill, decode, batching and preemption.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch
import transformers

from kvserve import LLM, SamplingParams
from kvserve.attention.backend import AttentionRequirements
from kvserve.attention.mla import write_latent
from kvserve.attention.torch_backend import TorchAttentionBackend
from kvserve.attention.torch_metadata import TorchAttentionMetadata
from kvserve.attention.torch_ref import gather_kv
from kvserve.config import ModelConfig
from kvserve.kv.kv_cache import allocate_kv_caches
from kvserve.kv.kv_memory import kv_memory_report, load_shape
from kvserve.models.deepseek import DeepseekForCausalLM
from kvserve.models.registry import build_model
from kvserve.runner.attention_inputs import build_common_metadata

NUM_NEW_TOKENS = 32
PROMPTS = [[1, 520, 3000, 45, 8800, 17, 99, 250], [5, 42], list(range(300, 341))]
KV_LORA_RANK, ROPE_DIM = 32, 8
NUM_LAYERS = 2
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}
MOE = {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1}

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # V3: query LoRA, sigmoid scoring with grouped top-k and a correction bias, interleaved YaRN RoPE.
    "v3-lora-moe-yarn": ("DeepseekV3Config", {"q_lora_rank": 48, **MOE, "n_shared_experts": 1, "n_group": 4,
                                              "topk_group": 2, "norm_topk_prob": True,
                                              "routed_scaling_factor": 2.5, "rope_parameters": YARN}),
    # V3 without query LoRA, all layers dense, plain (rotate-half) RoPE.
    "v3-dense-plain-rope": ("DeepseekV3Config", {"q_lora_rank": None, "first_k_dense_replace": NUM_LAYERS,
                                                 "n_group": 1, "topk_group": 1, "rope_interleave": False}),
    # V2-Lite style: no query LoRA, softmax greedy top-k, two shared experts.
    "v2-lite-moe": ("DeepseekV2Config", {"q_lora_rank": None, **MOE, "n_shared_experts": 2,
                                         "topk_method": "greedy", "routed_scaling_factor": 1.5}),
    # V2 with query LoRA, group-limited greedy routing and YaRN.
    "v2-lora-grouped-yarn": ("DeepseekV2Config", {"q_lora_rank": 48, **MOE, "n_shared_experts": 1,
                                                  "topk_method": "group_limited_greedy", "n_group": 4,
                                                  "topk_group": 2, "rope_parameters": YARN}),
}


def make_hf_model(config_name: str, overrides: dict[str, Any], vocab_size: int) -> Any:
    """A tiny random-weight transformers DeepSeek model in float32 (eval mode)."""
    settings = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **overrides}
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=KV_LORA_RANK, qk_nope_head_dim=16,
        qk_rope_head_dim=ROPE_DIM, v_head_dim=24, max_position_embeddings=256, tie_word_embeddings=False,
        # Larger weights than the usual 0.02 give peaked logits: no near-ties for greedy to flip.
        initializer_range=0.15, **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # V3's correction bias starts at zero: make it matter, so a bug in it cannot hide
        for layer in model.model.layers:
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0, 0.1)
    return model.eval()


_REFERENCES: dict[str, tuple[pathlib.Path, Any, list[list[int]]]] = {}
BACKEND = TorchAttentionBackend(AttentionRequirements(torch.device("cpu"), "float32", use_window=False, use_mla=True))


def step_metadata(num_computed_tokens: list[int], num_new_tokens: list[int], block_tables: list[list[int]],
                  block_size: int) -> TorchAttentionMetadata:
    """The torch backend's metadata of one step, built as the runner builds it."""
    common = build_common_metadata([f"request-{i}" for i in range(len(block_tables))], num_computed_tokens,
                                   num_new_tokens, block_tables, block_size, torch.device("cpu"))
    return BACKEND.build_metadata(common)


def reference(case: str, tmp_path_factory: pytest.TempPathFactory,
              tokenizer: Any) -> tuple[pathlib.Path, Any, list[list[int]]]:
    """(saved HF directory, HF model, HF greedy tokens per prompt), built once per case."""
    if case not in _REFERENCES:
        config_name, overrides = CASES[case]
        hf_model = make_hf_model(config_name, overrides, len(tokenizer))
        path = tmp_path_factory.mktemp(case)
        hf_model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        expected = []
        for prompt in PROMPTS:
            with torch.no_grad():
                out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False,
                                        eos_token_id=None,
                                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
            expected.append(out[0, len(prompt):].tolist())
        _REFERENCES[case] = (path, hf_model, expected)
    return _REFERENCES[case]


def generate(llm: LLM) -> list[list[int]]:
    """Greedy tokens for all PROMPTS, batched in one call."""
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [output.outputs[0].token_ids for output in outputs]


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_deepseek_matches_transformers(case: str, tmp_path_factory: pytest.TempPathFactory,
                                            tokenizer: Any) -> None:
    path, _, expected = reference(case, tmp_path_factory, tokenizer)
    llm = LLM(model=str(path), kv_cache_memory=4 * 2**20, show_progress=False)
    assert generate(llm) == expected


@pytest.mark.parametrize("case", ["v3-lora-moe-yarn", "v2-lite-moe"])
def test_chunked_and_preempted_match_transformers(case: str, tmp_path_factory: pytest.TempPathFactory,
                                                  tokenizer: Any) -> None:
    path, _, expected = reference(case, tmp_path_factory, tokenizer)
    # 8-token steps chunk every prompt; 24 blocks of 4 tokens cannot hold all three requests at their full
    # length (3 + 9 + 19 blocks at the end), so the scheduler must preempt and recompute.
    bytes_per_block = NUM_LAYERS * (KV_LORA_RANK + ROPE_DIM) * 4 * 4
    llm = LLM(model=str(path), block_size=4, max_num_batched_tokens=8, kv_cache_memory=24 * bytes_per_block,
              show_progress=False)
    assert generate(llm) == expected
    assert llm.stats().num_preemptions > 0


def test_int8_latent_cache_is_close(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> None:
    path, hf_model, expected = reference("v3-lora-moe-yarn", tmp_path_factory, tokenizer)
    llm = LLM(model=str(path), kv_cache_dtype="int8", kv_cache_memory=4 * 2**20, show_progress=False)
    cache = llm.engine.runner.kv_caches[0]
    assert cache.key.dtype == torch.int8 and cache.value.shape[-1] == 0
    # The first token comes from the prompt's fresh latents; later ones read quantized latents back, and
    # random-weight logits are too flat (top-2 margins ~1% of their spread) for tokens to be a fair check.
    assert [tokens[0] for tokens in generate(llm)] == [tokens[0] for tokens in expected]
    model = _model_from_hf(hf_model)
    exact, quantized = (_decode_logits(model, PROMPTS[2], dtype) for dtype in ("float32", "int8"))
    with torch.no_grad():  # the float32 latent cache gives transformers' logits; int8 stays close to them
        hf_logits = hf_model(torch.tensor([PROMPTS[2] + [7]])).logits[0, -1]
    torch.testing.assert_close(exact, hf_logits, rtol=1e-4, atol=1e-4)
    assert (quantized - exact).abs().max() < 0.1 * exact.std()  # measured: ~0.03


@torch.inference_mode()
def _decode_logits(model: DeepseekForCausalLM, prompt: list[int], kv_cache_dtype: str) -> torch.Tensor:
    """Logits [vocab] of one decode step after prefilling `prompt` (plus token 7) into a fresh cache."""
    block_size, tokens = 4, torch.tensor(prompt + [7])
    num_blocks = -(-len(tokens) // block_size)
    caches = allocate_kv_caches(model.kv_cache_specs(kv_cache_dtype), num_blocks, block_size, device="cpu")
    table, positions = list(range(num_blocks)), torch.arange(len(tokens))
    prefill = step_metadata([0], [len(prompt)], [table], block_size)
    model(tokens[:-1], positions[:-1], caches, prefill)
    decode = step_metadata([len(prompt)], [1], [table], block_size)
    return model.compute_logits(model(tokens[-1:], positions[-1:], caches, decode))[0]


def _model_from_hf(hf_model: Any) -> DeepseekForCausalLM:
    """Our model with the HF model's in-memory weights (transformers' stacked 3-D expert tensors)."""
    config = ModelConfig.from_hf_config(hf_model.config.to_dict())
    model = build_model(config, max_position=128, attention_backend=BACKEND)
    assert isinstance(model, DeepseekForCausalLM)
    with torch.no_grad():
        model.load_weights(hf_model.state_dict().items())
    return model


@torch.inference_mode()
def test_absorbed_decode_matches_up_projection(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> None:
    _, hf_model, _ = reference("v3-lora-moe-yarn", tmp_path_factory, tokenizer)
    model = _model_from_hf(hf_model)
    block_size, lengths = 4, [11, 6]  # two requests already cached, in blocks 0-2 and 3-4
    caches = allocate_kv_caches(model.kv_cache_specs("float32"), num_blocks=6, block_size=block_size,
                                device="cpu")
    cache = caches[0]
    # The cache holds d_c + d_rope elements per token per layer: one latent "head", no value.
    assert cache.key.shape[-2] * cache.key.shape[-1] == KV_LORA_RANK + ROPE_DIM and cache.value.shape[-1] == 0
    tables = torch.tensor([[0, 1, 2], [3, 4, 0]])
    torch.manual_seed(1)
    attn = model.model.layers[0].self_attn
    for index, length in enumerate(lengths):  # fill the cache with each request's prompt latents
        hidden = torch.randn(length, 64)
        positions = torch.arange(length)
        slots = tables[index][positions // block_size] * block_size + positions % block_size
        _, _, latent = attn.project(model.model.rotary.lookup(positions, torch.float32), hidden)
        write_latent(latent, cache, slots)
    # One decode token per request at position `length`, absorbed against the cached latents ...
    positions = torch.tensor(lengths)
    slots = tables[torch.arange(2), positions // block_size] * block_size + positions % block_size
    q_nope, q_rope, latent = attn.project(model.model.rotary.lookup(positions, torch.float32), torch.randn(2, 64))
    write_latent(latent, cache, slots)
    metadata = step_metadata(lengths, [1, 1], tables.tolist(), block_size)
    absorbed = attn.attend_absorbed(q_nope, q_rope, cache, metadata)  # [2, H, d_v]
    # ... equals up-projecting each request's latents to per-head K/V and attending over them.
    latents, _ = gather_kv(cache, tables, torch.float32)  # [2, 1, L, d_c + d_rope]
    for index, length in enumerate(lengths):
        expanded = attn.attend_expanded(q_nope[index:index + 1], q_rope[index:index + 1],
                                        latents[index, 0, :length + 1])
        torch.testing.assert_close(absorbed[index:index + 1], expanded, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_prefill_with_cached_prefix_matches_fresh_prefill(tmp_path_factory: pytest.TempPathFactory,
                                                          tokenizer: Any) -> None:
    _, hf_model, _ = reference("v2-lite-moe", tmp_path_factory, tokenizer)
    model = _model_from_hf(hf_model)
    caches = allocate_kv_caches(model.kv_cache_specs("float32"), num_blocks=4, block_size=4, device="cpu")
    tokens = torch.tensor(PROMPTS[0] + [7, 8, 9])  # 11 tokens in blocks 0-2

    def run(start: int, stop: int) -> torch.Tensor:
        metadata = step_metadata([start], [stop - start], [[0, 1, 2]], block_size=4)
        return model(tokens[start:stop], torch.arange(start, stop), caches, metadata)

    whole = run(0, 11)
    run(0, 5)  # a 5-token chunk first, then the rest attends over the cached prefix
    tail = run(5, 11)
    torch.testing.assert_close(tail, whole[5:], rtol=1e-5, atol=1e-5)


def test_int4_and_kv_window_rejected(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> None:
    path, hf_model, _ = reference("v3-dense-plain-rope", tmp_path_factory, tokenizer)
    with pytest.raises(ValueError, match="int4.*not supported for MLA"):
        LLM(model=str(path), kv_cache_dtype="int4", kv_cache_memory=2**20, show_progress=False)
    model = build_model(ModelConfig.from_hf_config(hf_model.config.to_dict()), max_position=64,
                        attention_backend=BACKEND)
    with pytest.raises(ValueError, match="int4.*not supported for MLA"):
        model.kv_cache_specs("int4")
    with pytest.raises(ValueError, match="kv_window is not supported for DeepseekV3ForCausalLM"):
        LLM(model=str(path), kv_window=64, kv_cache_memory=2**20, show_progress=False)


def test_kv_memory_reports_latent_for_hf_config(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> None:
    path, _, _ = reference("v3-dense-plain-rope", tmp_path_factory, tokenizer)
    shape = load_shape(str(path))
    real = kv_memory_report(shape, model_dtype_bytes=4).row("real")
    assert real.layout.attention == "MLA"
    assert real.layout.elements_per_token_per_layer == KV_LORA_RANK + ROPE_DIM
    llm = LLM(model=str(path), kv_cache_memory=2**20, show_progress=False)
    assert llm.engine.kv_bytes_per_token == real.bytes_per_token["float32"] == NUM_LAYERS * 40 * 4
