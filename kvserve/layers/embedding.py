"""The vocabulary embedding: an LM head's weight [vocab, hidden] read by row, through the same linear method."""

from __future__ import annotations

import torch

from kvserve.layers.linear import Linear
from kvserve.layers.quantization.base import LinearMethod


class VocabEmbedding(Linear):
    """ids [T] -> [T, hidden]. A Linear(hidden -> vocab), so that its weight is what a tied LM head multiplies
    with and any linear method's format (GGUF blocks included) serves both."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(hidden_size, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, hidden_size]."""
        return self.method.embedding(self, ids)

    def set_method(self, method: LinearMethod) -> None:
        """An embedding takes the method's lookup-only variant."""
        super().set_method(method.embedding_method())
