"""The link between a prefill and a decode instance: a two-rank gloo process group of its own (not the default
group, which tensor parallelism may hold), reached through a TCPStore the decode instance hosts.

Plain data goes as pickled bytes in a uint8 tensor after its length; KV blocks go as one uint8 tensor. Every
call blocks; each side keeps the link to one thread. A peer that goes away fails the call at once (gloo sees the
closed socket), with ConnectionError.
"""

from __future__ import annotations

import pickle
from datetime import timedelta

import torch
import torch.distributed as dist

DECODE_RANK, PREFILL_RANK = 0, 1
# The link waits as long as a prompt may take to prefill on the peer; a dead peer fails the wait at once.
LINK_TIMEOUT = timedelta(hours=1)


class KVTransferLink:
    """One end of the link: `role` "decode" (rank 0, hosts the store at `address`) or "prefill" (rank 1)."""

    def __init__(self, role: str, address: str, connect_timeout: timedelta = timedelta(minutes=10)) -> None:
        host, _, port = address.rpartition(":")
        self.rank = DECODE_RANK if role == "decode" else PREFILL_RANK
        self.peer = PREFILL_RANK - self.rank
        store = dist.TCPStore(host or "127.0.0.1", int(port), 2, self.rank == DECODE_RANK,
                              timeout=connect_timeout)
        self._group = dist.ProcessGroupGloo(store, self.rank, 2, LINK_TIMEOUT)

    def send_object(self, obj: object) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        self.send_tensor(torch.tensor([data.numel()], dtype=torch.int64))
        self.send_tensor(data)

    def recv_object(self) -> object:
        length = torch.empty(1, dtype=torch.int64)
        self.recv_tensor(length)
        data = torch.empty(int(length), dtype=torch.uint8)
        self.recv_tensor(data)
        return pickle.loads(data.numpy().tobytes())

    def send_tensor(self, tensor: torch.Tensor) -> None:
        self._wait(self._group.send([tensor.contiguous()], self.peer, 0))

    def recv_tensor(self, tensor: torch.Tensor) -> None:
        """Fill `tensor` (its size must be the sender's)."""
        self._wait(self._group.recv([tensor], self.peer, 0))

    @staticmethod
    def _wait(work: dist.Work) -> None:
        try:
            work.wait()
        except RuntimeError as error:
            raise ConnectionError(f"the KV transfer peer is gone: {error}") from error
