"""KV cache groups: how full-attention and sliding-window layers share one block pool (vLLM's hybrid KV cache).

Layers are split into groups of the same size, each group of one attention kind. A block of the pool holds
`block_size` tokens of one group's layers, so every block has the same bytes whatever group it serves, and a
request has one table per group. A sliding-window group's table keeps only the blocks its window can still see;
the others go back to the pool as the window moves. Layer j of every group reads the same tensors
(`slot_of[layer]`): the groups' tables never share a block.

Gemma 3 270M: 18 layers, 15 sliding (window 512) and 3 full, are six groups of three layers; a 32k-token request
holds 2,048 blocks in the full group and at most 33 (+ the step's chunk) in each of the five sliding ones.
A model whose layers are all of one kind is one group of all its layers: the plain cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

from kvserve.kv.kv_spec import KVCacheSpec


@dataclass(frozen=True)
class KVCacheGroups:
    """The layers of each group, in order, and each group's sliding window (None: full attention)."""

    layers: tuple[tuple[int, ...], ...]
    windows: tuple[int | None, ...]

    @classmethod
    def from_specs(cls, specs: list[KVCacheSpec]) -> KVCacheGroups:
        """Group the layers by attention kind, in groups of the largest size that divides every kind's count."""
        kinds: dict[int | None, list[int]] = {}
        for index, spec in enumerate(specs):
            kinds.setdefault(spec.sliding_window, []).append(index)
        if len({replace(spec, sliding_window=None) for spec in specs}) > 1:
            raise ValueError("a hybrid KV cache needs every layer to cache the same heads, sizes and dtype")
        size = math.gcd(*(len(layers) for layers in kinds.values()))
        groups = [(tuple(layers[i:i + size]), window) for window, layers in sorted(
            kinds.items(), key=lambda kind: kind[0] is not None) for i in range(0, len(layers), size)]
        return cls(tuple(layers for layers, _ in groups), tuple(window for _, window in groups))

    @property
    def num_groups(self) -> int:
        """Tables per request (one per group)."""
        return len(self.layers)

    @property
    def group_size(self) -> int:
        """Layers per group: the layers one block holds."""
        return len(self.layers[0])

    @property
    def is_hybrid(self) -> bool:
        """Whether some group slides (its tables drop blocks behind the window)."""
        return any(window is not None for window in self.windows)

    @cached_property
    def group_of(self) -> list[int]:
        """Each layer's group (read every step: computed once)."""
        return [group for _, group in sorted((layer, g) for g, layers in enumerate(self.layers) for layer in layers)]

    @cached_property
    def slot_of(self) -> list[int]:
        """Each layer's place in its group: the cache tensors it shares with that place in every other group."""
        return [slot for _, slot in sorted((layer, s) for layers in self.layers for s, layer in enumerate(layers))]

    def page_specs(self, specs: list[KVCacheSpec]) -> list[KVCacheSpec]:
        """The specs of one group's layers: what one block holds."""
        return [specs[layer] for layer in self.layers[0]]


def first_visible_block(num_computed_tokens: int, window: int, block_size: int) -> int:
    """The first block a sliding window of `window` tokens still sees from query position `num_computed_tokens`
    on (query q sees keys q - window < k <= q): blocks before it can go back to the pool."""
    return max(num_computed_tokens - window + 1, 0) // block_size


def blocks_per_request(windows: tuple[int | None, ...], num_tokens: int, block_size: int, chunk: int) -> int:
    """Blocks a request of `num_tokens` tokens holds at most, over all groups: all of its blocks in a full group;
    in a sliding one its window plus one step's chunk of `chunk` tokens, and one partly seen block."""
    blocks = -(-num_tokens // block_size)
    return sum(blocks if window is None else min(blocks, -(-(window - 1 + chunk) // block_size) + 1)
               for window in windows)


def max_context(windows: tuple[int | None, ...], num_blocks: int, block_size: int, chunk: int, limit: int) -> int:
    """The longest request, up to `limit` tokens, whose blocks fit in a pool of `num_blocks`."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if blocks_per_request(windows, middle, block_size, chunk) <= num_blocks:
            low = middle
        else:
            high = middle - 1
    return low
