"""CPU paged attention with a compiled decode kernel (cpu_paged_decode.c); prefill and the rest stay on torch_ref.

Why: a batched decode step on torch copies every sequence's blocks into a padded tensor, then SDPA reads the
copy again, so the KV cache is streamed about three times per layer. The C kernel reads each block once, in
place, and only up to each sequence's own length. It is compiled on first use with the system C compiler
(`-O3 -march=native -fopenmp`, cached under ~/.cache/kvserve); without a compiler the engine stays on torch.
It runs on torch's OpenMP thread pool: the library is linked against libgomp, which torch has already loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import torch

from kvserve.attention import torch_ref
from kvserve.attention.backend import AttentionMetadata
from kvserve.kv.kv_cache import LayerKVCache

logger = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("cpu_paged_decode.c")
# Reassociation lets gcc vectorize the dot products; no -ffast-math, whose startup code would switch the
# whole process to flush-to-zero.
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-shared", "-fPIC")
_INT64 = ctypes.c_int64


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("KVSERVE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "kvserve")


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library (built once per source, flags and machine), or None if it cannot be built."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.warning("no C compiler found: CPU decode attention stays on torch")
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(_FLAGS).encode() + platform.machine().encode()).hexdigest()[:16]
    library = _cache_dir() / f"cpu_paged_decode-{digest}.so"
    if not library.exists():
        try:
            _compile(compiler, library)
        except (OSError, subprocess.CalledProcessError) as error:
            details = getattr(error, "stderr", "") or error
            logger.warning("building %s failed, CPU decode attention stays on torch: %s", SOURCE.name, details)
            return None
    kernel = ctypes.CDLL(str(library))
    kernel.paged_decode_f32.restype = ctypes.c_int
    kernel.paged_decode_f32.argtypes = [ctypes.c_void_p] * 6 + [_INT64] * 6 + [ctypes.c_float]
    return kernel


def _compile(compiler: str, library: pathlib.Path) -> None:
    """Compile to a temporary name, then rename: concurrent builders never load a half-written file."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as tmp:
        partial = pathlib.Path(tmp.name)
    try:
        subprocess.run([compiler, *_FLAGS, "-o", str(partial), str(SOURCE)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)


def available() -> bool:
    """Whether the compiled kernel can run here."""
    return load_kernel() is not None


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                    metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """torch_ref.paged_attention, with the decode rows of plain float32 caches on the compiled kernel."""
    plain = (query.dtype == torch.float32 and cache.key.dtype == torch.float32 and metadata.window is None
             and cache.key.shape[-1] == cache.value.shape[-1])
    return torch_ref.paged_attention(query, key, value, cache, metadata, scale, decode=decode if plain else None)


def decode(query: torch.Tensor, cache: LayerKVCache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query token per sequence: query [B, Hq, D] -> [B, Hq, D]."""
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = cache.key.shape
    query = query.contiguous()
    tables = metadata.decode_block_tables.contiguous()
    seq_lens = metadata.decode_seq_lens
    if seq_lens is None:  # metadata built by hand (tests): the key mask tells each length
        seq_lens = metadata.decode_mask.view(batch, -1).sum(dim=-1)
    seq_lens = seq_lens.to(torch.int64).contiguous()
    if batch and int(seq_lens.max()) > tables.shape[1] * block_size:  # the kernel trusts the tables: check
        raise ValueError(f"a decode attends {int(seq_lens.max())} tokens but its block table holds "
                         f"{tables.shape[1] * block_size}")
    out = torch.empty_like(query)
    status = load_kernel().paged_decode_f32(
        query.data_ptr(), cache.key.data_ptr(), cache.value.data_ptr(), tables.data_ptr(), seq_lens.data_ptr(),
        out.data_ptr(), batch, num_kv_heads, num_heads // num_kv_heads, head_dim, block_size, tables.shape[1],
        scale)
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its score buffers")
    return out
