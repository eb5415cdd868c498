"""Apply packed allowed-token bitmasks (structured output's grammars) to rows of logits."""

from __future__ import annotations

import torch


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 bitmask -> [rows, vocab_size] int32, 1 where the token is allowed, else 0.

    Bit j of word w stands for token 32 * w + j (llguidance's layout). Tokens past the mask's width are not
    allowed: the tokenizer does not know them, so no grammar can produce them.
    """
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    # An arithmetic shift copies the sign bit, so the & 1 is needed for every j, bit 31 included.
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)  # [rows, words, 32] -> [rows, words * 32]
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]), value=0)


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, the logits [num_rows, vocab] of the tokens that `bitmask` [len(rows), words]
    forbids in the listed rows; the other rows are untouched."""
    bits = unpack_bitmask(bitmask.to(logits.device), logits.shape[1])  # [len(rows), vocab] 0/1
    # +inf where allowed, -inf where not, and a minimum: branch-free, where masked_fill_ with a grammar's
    # scattered mask was several times slower on CPU (benchmarks/bench_structured.py).
    bound = bits.to(logits.dtype).sub_(0.5).mul_(float("inf"))  # [len(rows), vocab]
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        torch.minimum(logits, bound, out=logits)
        return
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits.index_copy_(0, index, torch.minimum(logits.index_select(0, index), bound))
