"""Tensor parallelism on torch.distributed: this process's rank, the sharding rules, and the worker processes."""
