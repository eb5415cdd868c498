"""Apply packed allowed-token bitmasks (structured output's grammars) to rows of logits."""

from __future__ import annotations

import torch


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 bitmask -> [rows, vocab_size] bool, True where the token is allowed.

    Bit j of word w stands for token 32 * w + j (llguidance's layout). Tokens past the mask's width are not
    allowed: the tokenizer does not know them, so no grammar can produce them.
    """
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    allowed = bits.flatten(1).bool()  # [rows, words * 32]
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    return torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]), value=False)


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, the logits [num_rows, vocab] of the tokens that `bitmask` [len(rows), words]
    forbids in the listed rows; the other rows are untouched."""
    allowed = unpack_bitmask(bitmask.to(logits.device), logits.shape[1])  # [len(rows), vocab]
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(~allowed, float("-inf")))
