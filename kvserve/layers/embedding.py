"""The vocabulary embedding and the LM head: a weight [vocab, hidden] read by row or multiplied with, through the
same linear method; with tensor parallelism each rank holds an equal slice of the vocabulary."""

from __future__ import annotations

import torch

from kvserve.distributed.parallel_state import all_gather, all_reduce, tp_group
from kvserve.distributed.sharding import padded_split
from kvserve.layers.linear import Linear
from kvserve.layers.quantization.base import LinearMethod


class _VocabParallel(Linear):
    """Linear(hidden -> vocab) whose rows are this rank's vocabulary ids [vocab_start, vocab_start + vocab_length),
    zero-padded to an equal share on every rank."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        tp = tp_group()
        if tp.world_size == 1:
            super().__init__(hidden_size, vocab_size)
            self.vocab_start, self.vocab_length = 0, vocab_size
        else:
            (start, length), padded = padded_split(vocab_size, tp.rank, tp.world_size)
            super().__init__(hidden_size, padded, output_ranges=[(start, length)])
            self.vocab_start, self.vocab_length = start, length
        # Every rank's real (unpadded) share, in rank order: what the gathered logits keep of each part.
        self.rank_lengths = [padded_split(vocab_size, rank, tp.world_size)[0][1] for rank in range(tp.world_size)]


class VocabEmbedding(_VocabParallel):
    """ids [T] -> [T, hidden]. A Linear(hidden -> vocab), so that its weight is what a tied LM head multiplies
    with and any linear method's format (GGUF blocks included) serves both."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, hidden_size]; with tensor parallelism each rank looks up the ids it holds and the ranks
        sum (one of them holds each id)."""
        if self.output_ranges is None:
            return self.method.embedding(self, ids)
        local = ids - self.vocab_start
        held = (local >= 0) & (local < self.vocab_length)
        rows = self.method.embedding(self, torch.where(held, local, 0))
        return all_reduce(rows.masked_fill(~held[..., None], 0))

    def set_method(self, method: LinearMethod) -> None:
        """An embedding takes the method's lookup-only variant."""
        super().set_method(method.embedding_method())


class LMHead(_VocabParallel):
    """hidden [N, hidden] -> logits [N, vocab]; with tensor parallelism every rank scores its slice of the
    vocabulary and the slices are gathered on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.method.apply(self, hidden)
        if self.output_ranges is None:
            return logits
        parts = zip(all_gather(logits), self.rank_lengths, strict=True)
        return torch.cat([part[:, :length] for part, length in parts], dim=1)
