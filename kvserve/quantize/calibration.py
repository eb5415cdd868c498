"""Calibration for AWQ: which text, and what each linear layer's inputs look like on it.

The text is a file's lines from a fraction on (`split_lines`): for WikiText-2's test split, the second half of
its lines calibrates and benchmarks/bench_quant.py evaluates on the first half, so the two never share a token.
The float model runs over it in the engine (prefill only), and a hook on each chosen Linear records its input
rows x [T, in]: the mean |x| per input channel over every token, and an evenly strided sample of whole rows for
the scale search's layer-output error.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import torch
from torch import nn

from kvserve.llm import LLM
from kvserve.sampling_params import SamplingParams

CALIBRATION_START = 0.5  # the fraction of the file's lines where calibration text starts (WikiText-2: its 2nd half)


def split_lines(text: str, fraction: float) -> tuple[str, str]:
    """(the first `fraction` of the lines, the rest), each joined back with newlines."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the calibration start must be a fraction of the lines in [0, 1), got {fraction}")
    lines = text.splitlines(keepends=True)
    cut = int(len(lines) * fraction)
    return "".join(lines[:cut]), "".join(lines[cut:])


def calibration_sequences(llm: LLM, path: pathlib.Path, start: float, num_tokens: int,
                          seq_len: int) -> list[list[int]]:
    """`num_tokens` tokens of the file's lines from `start` on, in sequences of `seq_len` (the last may be
    shorter); ValueError if the text has fewer."""
    text = split_lines(path.read_text(encoding="utf-8"), start)[1]
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    if len(ids) < num_tokens:
        raise ValueError(f"{path} from line fraction {start} has {len(ids)} tokens; calibration needs {num_tokens}")
    ids = ids[:num_tokens]
    return [ids[i:i + seq_len] for i in range(0, num_tokens, seq_len)]


@dataclass
class LinearInputs:
    """What a Linear saw: the sum of |x| per input channel over `count` rows, and up to `max_samples` rows."""

    stride: int  # keep every stride-th row seen
    max_samples: int
    abs_sum: torch.Tensor | None = None  # [in] float64
    count: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)  # rows [k, in]
    num_samples: int = 0

    def record(self, x: torch.Tensor) -> None:
        """Add the rows of x [T, in]."""
        x = x.detach().float()
        row_sum = x.abs().sum(dim=0, dtype=torch.float64)
        self.abs_sum = row_sum if self.abs_sum is None else self.abs_sum + row_sum
        first = (-self.count) % self.stride  # the first row of this call on the global stride
        picked = x[first::self.stride][:self.max_samples - self.num_samples]
        if picked.numel():
            self.samples.append(picked.clone())
            self.num_samples += picked.shape[0]
        self.count += x.shape[0]

    def mean_abs(self) -> torch.Tensor:
        """Mean |x| per input channel [in], float32."""
        return (self.abs_sum / max(self.count, 1)).float()

    def sample_rows(self) -> torch.Tensor:
        """The kept rows [k, in]."""
        return torch.cat(self.samples)


def collect_inputs(llm: LLM, modules: dict[str, nn.Module], sequences: list[list[int]],
                   max_samples: int) -> dict[str, LinearInputs]:
    """Run `sequences` through the engine's model (prefill only, one token generated and dropped) and record the
    inputs of each named module."""
    total = sum(len(seq) for seq in sequences)
    stride = max(1, total // max_samples)
    inputs = {name: LinearInputs(stride, max_samples) for name in modules}
    handles = [module.register_forward_pre_hook(lambda _module, args, name=name: inputs[name].record(args[0]))
               for name, module in modules.items()]
    try:
        # max_tokens=1: the token comes from the prefill's last position, so no decode step reaches the hooks.
        llm.generate([{"prompt_token_ids": seq} for seq in sequences], SamplingParams(max_tokens=1),
                     use_tqdm=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs
