"""The one weight path into a model: checkpoint (name, tensor) pairs -> parameters, checked for completeness.

A model declares
- `packed_modules_mapping`: fused module -> the checkpoint modules it packs, in output order, e.g.
  {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}; a checkpoint `...q_proj.weight` then loads shard 0 of our
  `...qkv_proj.weight`;
- `checkpoint_tensors(name, tensor)`: its renames, splits and skips, as the (our name, tensor) pairs a checkpoint
  tensor stands for (none for a skipped one).
Each parameter carries a `weight_loader(param, tensor, shard_id)` (`default_weight_loader` unless set) and
its number of shards (1 unless packed). With tensor parallelism, a module's `checkpoint_part(attribute, tensor,
shard id)` first cuts the tensor to this rank's part (layers/linear.py). A loader that also fills sibling
parameters of its module (a method that quantizes at load fills a weight's scales from the weight) returns their
attribute names. A complete load fills every shard of every parameter exactly once; anything else is a ValueError
naming the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

# (param, tensor, shard id) -> None, or the names of sibling parameters the call filled as well
WeightLoader = Callable[[nn.Parameter, torch.Tensor, "int | None"], "Iterable[str] | None"]


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None = None) -> None:
    """Copy a whole tensor into `param`; ValueError on a shape mismatch."""
    check_shape(param, tensor)
    param.data.copy_(tensor)


def check_shape(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """ValueError unless `tensor` has `target`'s shape."""
    if target.shape != tensor.shape:
        raise ValueError(f"has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")


def set_weight_loader(param: nn.Parameter, loader: WeightLoader, num_shards: int = 1) -> None:
    """Give `param` its loader and the number of shards a complete checkpoint fills."""
    param.weight_loader = loader
    param.num_shards = num_shards


def load_model_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load every checkpoint tensor, check that each parameter shard was filled exactly once, then let each
    module with a `process_weights_after_loading()` derive what it needs from its weights."""
    params = dict(model.named_parameters())  # tied parameters appear once, under their first name
    modules = dict(model.named_modules())
    packed = getattr(model, "packed_modules_mapping", {})
    loaded: set[tuple[str, int | None]] = set()
    for checkpoint_name, checkpoint_tensor in weights:
        for name, tensor in model.checkpoint_tensors(checkpoint_name, checkpoint_tensor):
            try:
                loaded |= _load_one(params, modules, packed, loaded, name, tensor)
            except (ValueError, IndexError) as error:
                raise ValueError(f"checkpoint tensor {checkpoint_name!r}: {error}") from None
    missing = sorted(_expected_shards(params) - loaded, key=str)
    if missing:
        names = [name if shard is None else f"{name} (shard {shard})" for name, shard in missing[:5]]
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) {model.config.architecture} needs, e.g. {names}")
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()


def _load_one(params: dict[str, nn.Parameter], modules: dict[str, nn.Module], packed: dict[str, list[str]],
              loaded: set[tuple[str, int | None]], name: str, tensor: torch.Tensor) -> set[tuple[str, int | None]]:
    """Load one tensor under our name; returns the (parameter, shard) pairs it filled."""
    name, shard_id = _packed_target(packed, name)
    param = params.get(name)
    if param is None:
        raise ValueError(f"no parameter {name!r} in the model")
    num_shards = getattr(param, "num_shards", 1)
    shards = [shard_id] if shard_id is not None else _shards(num_shards)
    filled = {(name, shard) for shard in shards}
    if filled & loaded:
        raise ValueError(f"loads {name!r} a second time")
    module, _, attribute = name.rpartition(".")
    cut = getattr(modules[module], "checkpoint_part", None)
    if cut is not None:
        tensor = cut(attribute, tensor, shard_id)
    siblings = getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard_id) or ()
    also = {(f"{module}.{sibling}", shard) for sibling in siblings for shard in shards}
    if also & loaded:
        raise ValueError(f"fills {sorted(also & loaded)[0][0]!r}, which the checkpoint loaded already")
    return filled | also


def _packed_target(packed: dict[str, list[str]], name: str) -> tuple[str, int | None]:
    """(our parameter name, shard id) for a checkpoint module packed into a fused one, else (name, None)."""
    for fused, parts in packed.items():
        for shard_id, part in enumerate(parts):
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), shard_id
    return name, None


def _shards(num_shards: int) -> list[int | None]:
    """The shard ids of a parameter: [None] for a plain one, 0..n-1 for a packed one."""
    return [None] if num_shards == 1 else list(range(num_shards))


def _expected_shards(params: dict[str, nn.Parameter]) -> set[tuple[str, int | None]]:
    """Every (parameter, shard) a complete checkpoint fills."""
    return {(name, shard) for name, param in params.items() for shard in _shards(getattr(param, "num_shards", 1))}
