"""Prefill/decode disaggregation (DistServe, Splitwise): a prefill instance computes prompts' KV, a decode
instance serves the requests and takes those blocks over the KV transfer link instead of prefilling them.

The decode instance accepts every request. Before queueing one, it asks the prefill instance for the prompt's full
blocks its prefix cache lacks; the prefill instance runs the prompt (one token out) through its own engine and
sends the blocks' K/V. The decode instance writes them into free blocks and registers them in its prefix cache,
so that the request, queued right after, finds them as a prefix hit and computes only the prompt's last partial
block: the scheduler, the runner and sampling are unchanged, a prefix the decode side holds is never sent, and a
block that was evicted before use is only recomputed, never wrong. Prompts shorter than a block go straight in.

The engine-side steps run on the engine thread (`AsyncEngine.call`), between steps, like everything that touches
the pool and the cache tensors. Refused: a hybrid (sliding-window) cache, int4 KV, sinks + window and tensor
parallelism (their blocks are not one plain slice per layer), and prefix caching off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvserve.distributed.kv_transfer import KVTransferLink
from kvserve.engine.async_engine import AsyncEngine, GenerateRequest
from kvserve.engine.engine import Engine
from kvserve.inputs import PromptInput
from kvserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode")


class PrefillUnavailableError(RuntimeError):
    """The prefill instance is gone: the requests that waited for it fail (later ones prefill here)."""


@dataclass(frozen=True)
class _Ask:
    """Decode -> prefill: the prompt, and the first block whose K/V the decode instance lacks."""

    prompt_token_ids: list[int]
    first_block: int


def check_disaggregation(engine: Engine) -> None:
    """ValueError unless the engine's blocks can be sent and taken as they are."""
    config = engine.config
    reasons = {
        "a hybrid (sliding-window) KV cache": engine.kv_groups.is_hybrid,
        "kv_cache_dtype='int4'": config.cache.kv_cache_dtype == "int4",
        "kv_window (sinks + window)": bool(config.cache.kv_window),
        "tensor_parallel_size > 1": config.parallel.tensor_parallel_size > 1,
        "enable_prefix_caching off": not config.cache.enable_prefix_caching,
    }
    refused = [reason for reason, applies in reasons.items() if applies]
    if refused:
        raise ValueError(f"prefill/decode disaggregation does not run with {', '.join(refused)}")


def layout(engine: Engine) -> dict:
    """What both ends must agree on for blocks to mean the same: model, block size, every block tensor's shape."""
    return {"model": engine.model_config.architecture, "vocab_size": engine.model_config.vocab_size,
            "block_size": engine.kv_manager.block_size, "tensors": engine.runner.kv_block_layout()}


# ---- engine thread -----------------------------------------------------------------------------------------------

def reusable_blocks(engine: Engine, token_ids: list[int]) -> int:
    """The prompt's full blocks a request could take from the prefix cache (one token is always computed)."""
    return (len(token_ids) - 1) // engine.kv_manager.block_size


def missing_blocks(engine: Engine, token_ids: list[int]) -> range:
    """The prompt's reusable blocks that the prefix cache does not hold."""
    cached = engine.kv_manager.find_cached_prefix(token_ids, record=False).num_blocks
    return range(cached, reusable_blocks(engine, token_ids))


def export_blocks(engine: Engine, token_ids: list[int], first_block: int) -> torch.Tensor:
    """The K/V bytes of the prompt's reusable blocks from `first_block` on (just computed by its request)."""
    prefix = engine.kv_manager.find_cached_prefix(token_ids, record=False)
    last = reusable_blocks(engine, token_ids)
    if prefix.num_blocks < last:
        raise RuntimeError(f"the prompt's blocks {first_block}..{last - 1} are not all cached "
                           f"({prefix.num_blocks} are)")
    return engine.runner.read_kv_blocks(prefix.blocks[first_block:last])


def import_blocks(engine: Engine, token_ids: list[int], first_block: int, data: torch.Tensor) -> int:
    """Write received blocks into free blocks, cached under the prompt's hashes; the number taken (0 when the pool
    has too few free blocks: the request then computes them)."""
    blocks = engine.kv_manager.import_blocks(token_ids, first_block, reusable_blocks(engine, token_ids) - first_block)
    if blocks is None:
        return 0
    engine.runner.write_kv_blocks(blocks, data)
    engine.kv_manager.pool.free(blocks)  # cached and free, last in line for eviction, until the request takes them
    return len(blocks)


# ---- the prefill instance ----------------------------------------------------------------------------------------

class PrefillService:
    """Answers the decode instance: for each ask, run the prompt here and send its blocks back."""

    def __init__(self, async_engine: AsyncEngine, address: str) -> None:
        self.async_engine = async_engine
        self.address = address
        self.num_prefilled = 0
        self._thread = threading.Thread(target=self._serve, name="kvserve-prefill-link", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            link = KVTransferLink("prefill", self.address)
            link.send_object(self.async_engine.call(layout).result())
            logger.info("KV transfer link to the decode instance at %s is up", self.address)
            while True:
                ask = link.recv_object()
                try:
                    data = loop.run_until_complete(self._prefill(ask))
                except Exception as error:  # a bad ask fails that request on the decode side, not the link
                    link.send_object({"error": f"{type(error).__name__}: {error}"})
                    continue
                link.send_object({"num_bytes": data.numel()})
                link.send_tensor(data)
                self.num_prefilled += 1
        except ConnectionError as error:
            logger.warning("the decode instance left the KV transfer link: %s", error)
        except Exception:  # the link never came up (no decode instance in time): this instance serves on alone
            logger.exception("the KV transfer link to %s failed", self.address)
        finally:
            loop.close()

    async def _prefill(self, ask: _Ask) -> torch.Tensor:
        request = GenerateRequest(f"prefill-{uuid.uuid4().hex}", {"prompt_token_ids": ask.prompt_token_ids},
                                  SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        stream = await self.async_engine.generate([request])
        async for output in stream:
            if output.error is not None:
                raise RuntimeError(output.error)
        read = self.async_engine.call(lambda engine: export_blocks(engine, ask.prompt_token_ids, ask.first_block))
        return await asyncio.wrap_future(read)


# ---- the decode instance -----------------------------------------------------------------------------------------

class DecodeConnector:
    """Fetches prompts' blocks from the prefill instance before their requests are queued here."""

    def __init__(self, async_engine: AsyncEngine, address: str) -> None:
        self.async_engine = async_engine
        self.input_processor = async_engine.engine.input_processor
        self._link: KVTransferLink | None = None
        self._lost: str | None = None
        # One transfer at a time: the link is one ordered stream. Its thread also waits for the peer to connect.
        self._transfers = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvserve-decode-link")
        self._transfers.submit(self._connect, address)
        self.num_fetched_blocks = 0

    def _connect(self, address: str) -> None:
        try:
            link = KVTransferLink("decode", address)
            theirs, ours = link.recv_object(), self.async_engine.call(layout).result()
            if theirs != ours:
                raise ValueError(f"the prefill instance's KV blocks differ from ours: {theirs} != {ours}")
        except Exception:  # no prefill instance: this one prefills everything itself
            logger.exception("the KV transfer link at %s did not come up", address)
            return
        self._link = link
        logger.info("KV transfer link to the prefill instance at %s is up", address)

    @property
    def is_connected(self) -> bool:
        return self._link is not None and self._lost is None

    async def prefetch(self, prompts: list[PromptInput]) -> None:
        """Fetch each prompt's missing full blocks into the prefix cache; PrefillUnavailableError if the prefill
        instance goes away meanwhile. Without a live peer (not yet connected, or lost), a no-op."""
        for prompt in {repr(p): p for p in prompts}.values():
            if not self.is_connected:
                return
            try:
                _, token_ids = self.input_processor.tokenize(prompt)
            except ValueError:  # the engine refuses it with the proper error when it is queued
                continue
            missing = await self._on_engine(functools.partial(missing_blocks, token_ids=token_ids))
            if not missing:
                continue
            data = await asyncio.wrap_future(self._transfers.submit(self._fetch, token_ids, missing.start))
            if data is not None:
                self.num_fetched_blocks += await self._on_engine(
                    functools.partial(import_blocks, token_ids=token_ids, first_block=missing.start, data=data))

    async def _on_engine(self, function: Callable[[Engine], Any]) -> Any:
        return await asyncio.wrap_future(self.async_engine.call(function))

    def _fetch(self, token_ids: list[int], first_block: int) -> torch.Tensor | None:
        """On the link's thread: ask, and receive the blocks (None if the prefill instance could not run it)."""
        if self._lost is not None:
            raise PrefillUnavailableError(self._lost)
        try:
            self._link.send_object(_Ask(token_ids, first_block))
            header = self._link.recv_object()
            if "error" in header:
                logger.warning("the prefill instance failed a prompt (prefilling it here): %s", header["error"])
                return None
            data = torch.empty(header["num_bytes"], dtype=torch.uint8)
            self._link.recv_tensor(data)
            return data
        except ConnectionError as error:
            self._lost = f"the prefill instance is gone ({error}); new requests prefill on this instance"
            logger.error("%s", self._lost)
            raise PrefillUnavailableError(self._lost) from error
