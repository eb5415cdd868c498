"""Tensor-parallel workers: ranks 1..N-1 as processes, each with its own ModelRunner holding its shard of every
layer, executing every call the driver's runner makes (the same SchedulerOutput, sent as plain data).

The engine process is rank 0 (the driver): it schedules, and its runner samples. Workers start with
torch.multiprocessing (spawn) on this machine, or are already there under torchrun (`RANK` / `WORLD_SIZE` /
`MASTER_ADDR` in the environment: rank 0 runs the engine, the others `run_worker`).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.multiprocessing as mp

from kvserve.distributed.parallel_state import broadcast_object, destroy_tensor_parallel, init_tensor_parallel, tp_group

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from kvserve.config import EngineConfig
    from kvserve.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_SHUTDOWN = "shutdown"
_JOIN_POLL_S = 0.05


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker is gone: the engine cannot run another step."""


def torchrun_rank() -> int | None:
    """This process's rank when torchrun started it (RANK in the environment), else None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None


def per_rank_threads(config: EngineConfig) -> EngineConfig:
    """Without num_threads, each of this machine's ranks gets an equal share of its cores."""
    world_size = config.parallel.tensor_parallel_size
    if world_size == 1 or config.platform.num_threads:
        return config
    local_ranks = min(world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    threads = max(1, len(os.sched_getaffinity(0)) // local_ranks)
    return dataclasses.replace(config, platform=dataclasses.replace(config.platform, num_threads=threads))


class TensorParallelWorkers:
    """The worker processes (spawned ones, or torchrun's) and the driver's side of the group."""

    def __init__(self, config: EngineConfig) -> None:
        world_size = config.parallel.tensor_parallel_size
        self.processes: list[BaseProcess] = []
        self._stopped = False
        atexit.register(self.shutdown)  # a script that never shuts its engine down still stops its workers cleanly
        backend = "nccl" if _uses_cuda(config) else "gloo"
        if torchrun_rank() is not None:
            _check_torchrun(world_size)
            init_tensor_parallel(0, world_size, "env://", backend)
            return
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.get_context("spawn")
        for rank in range(1, world_size):
            process = context.Process(target=run_worker, args=(config, rank, init_method),
                                      name=f"kvserve-tp-worker-{rank}", daemon=True)
            process.start()
            self.processes.append(process)
        try:
            self._join(world_size, init_method, backend)
        except BaseException:
            for process in self.processes:
                process.terminate()
            raise

    def _join(self, world_size: int, init_method: str, backend: str) -> None:
        """Join the group as rank 0, failing at once (not after the long timeout) if a worker dies first."""
        failure: list[BaseException] = []

        def join() -> None:
            try:
                init_tensor_parallel(0, world_size, init_method, backend)
            except BaseException as error:  # re-raised on the caller's thread
                failure.append(error)

        joining = threading.Thread(target=join, name="kvserve-tp-join", daemon=True)
        joining.start()
        while joining.is_alive():
            joining.join(_JOIN_POLL_S)
            if joining.is_alive():
                self.check_alive()
        if failure:
            raise failure[0]

    def check_alive(self) -> None:
        """WorkerDiedError if a spawned worker has exited."""
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                raise WorkerDiedError(f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with code "
                                      f"{process.exitcode}; the engine cannot run (restart it)")

    def call(self, method: str, *args: Any) -> None:
        """Have every worker's runner call `method(*args)` (the driver then makes the same call)."""
        self.check_alive()
        try:
            broadcast_object((method, args))
        except RuntimeError as error:
            self._raise_if_died(error)

    def _raise_if_died(self, error: RuntimeError) -> None:
        """A collective failed: say which worker died if one did (it may take a moment to be reaped)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            self.check_alive()
            time.sleep(_JOIN_POLL_S)
        raise WorkerDiedError(f"a tensor-parallel collective failed: {error}") from error

    def shutdown(self, timeout: float = 10.0) -> None:
        """Tell the workers to exit, wait for them (terminating the ones that do not), and leave the group."""
        if self._stopped or tp_group().world_size == 1:
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        try:
            if all(process.is_alive() for process in self.processes):
                broadcast_object((_SHUTDOWN, ()))
        except RuntimeError:
            pass  # a worker is gone already: the others see the closed sockets and exit
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(1.0)
        destroy_tensor_parallel()


class TensorParallelRunner:
    """The driver's ModelRunner, whose state-changing calls every worker's runner makes too, in the same order;
    everything else (the model, byte counts) is the driver's."""

    def __init__(self, local: ModelRunner, workers: TensorParallelWorkers) -> None:
        self.local = local
        self.workers = workers

    def __getattr__(self, name: str) -> Any:
        return getattr(self.local, name)

    def allocate_kv_cache(self, *args: Any) -> None:
        self.workers.call("allocate_kv_cache", *args)
        self.local.allocate_kv_cache(*args)

    def set_window(self, *args: Any) -> None:
        self.workers.call("set_window", *args)
        self.local.set_window(*args)

    def profile_step(self, *args: Any) -> int:
        self.workers.call("profile_step", *args)
        return self.local.profile_step(*args)

    def execute(self, *args: Any) -> Any:
        self.workers.call("execute", *args)
        return self.local.execute(*args)

    def shutdown(self) -> None:
        self.workers.shutdown()


def run_worker(config: EngineConfig, rank: int, init_method: str = "env://") -> None:
    """A worker's life: join the group, build this rank's runner, then make every call the driver sends until it
    says to stop (or its sockets close: the driver is gone)."""
    from kvserve.engine.engine import build_runner  # the engine module imports this one

    config = per_rank_threads(config)
    world_size = config.parallel.tensor_parallel_size
    if init_method == "env://":
        _check_torchrun(world_size)
    if _uses_cuda(config):  # one GPU per rank on this machine, before NCCL binds one
        torch.cuda.set_device(rank % torch.cuda.device_count())
    init_tensor_parallel(rank, world_size, init_method, "nccl" if _uses_cuda(config) else "gloo")
    try:
        runner, platform = build_runner(config, show_progress=False)
        while True:
            method, args = broadcast_object()
            if method == _SHUTDOWN:
                break
            if method in ("allocate_kv_cache", "profile_step"):
                args = (own_specs(runner, args[0]), *args[1:])
            getattr(runner, method)(*args)
        platform.restore()
    finally:
        destroy_tensor_parallel()


def own_specs(runner: ModelRunner, specs: list) -> list:
    """The driver's KV-cache specs with this rank's KV heads (an uneven split gives ranks different counts)."""
    own = runner.model.kv_cache_specs(specs[0].dtype)
    return [dataclasses.replace(spec, num_kv_heads=mine.num_kv_heads) for spec, mine in zip(specs, own, strict=True)]


def _uses_cuda(config: EngineConfig) -> bool:
    return config.load.device.startswith("cuda")


def _check_torchrun(world_size: int) -> None:
    """torchrun's WORLD_SIZE must be the tensor-parallel size (one rank per process)."""
    started = int(os.environ["WORLD_SIZE"])
    if started != world_size:
        raise ValueError(f"tensor_parallel_size={world_size}, but torchrun started WORLD_SIZE={started} processes")


def _free_port() -> int:
    """A free loopback port for the group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
