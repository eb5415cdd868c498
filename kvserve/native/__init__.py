"""Small C kernels for the CPU, compiled on first use with the system compiler and loaded with ctypes.

Each `<name>.c` here is built alone (`-O3 -march=native -fopenmp`) into ~/.cache/kvserve (or
$KVSERVE_CACHE_DIR), named by a hash of its source, the flags and the CPU's features, so an edit or another
CPU builds anew. The libraries link libgomp, which torch has already loaded, so their OpenMP
loops run on torch's thread pool and follow torch.set_num_threads. Without a compiler (or if a build
fails) `load` returns None and callers keep their torch path; the reason is logged once.
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

logger = logging.getLogger(__name__)

SOURCE_DIR = pathlib.Path(__file__).parent
# No reassociation (-fassociative-math): each kernel sums in its source's order, the same whatever rows run
# beside a row (with it gcc summed a row's lanes in a different order in each slot of a multi-row pass), which
# greedy equality under speculative decoding rests on; reductions are vectorized explicitly or by `omp simd`.
# No -ffast-math either: its startup code would switch the whole process to flush-to-zero.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-signed-zeros",
         "-fno-trapping-math", "-shared", "-fPIC")
# The GGUF block formats gguf_matmul.c computes on (ggml type names, lower case).
GGUF_KERNEL_TYPES = ("f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")
# Formats with eight rows interleaved (layers/gguf_ops.py: interleave_rows8): 8-bit-activation kernels only.
INTERLEAVED_TYPES = ("q4_0x8", "q4_1x8", "q8_0x8")
# The KV-cache storage dtypes paged_decode.c reads, in its enum kv_kind's order.
PAGED_KV_DTYPES = ("float32", "int8", "float16", "bfloat16")
_PTR, _INT64, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# Every exported C function: library -> {function: (return type, argument types)}, set once at load.
SIGNATURES: dict[str, dict[str, tuple[type | None, list[type]]]] = {
    "paged_decode": {"paged_decode_kv": (ctypes.c_int, [_PTR] * 5 + [_INT64] * 2 + [_PTR] * 4 + [_INT64] * 6
                                         + [_FLOAT]),
                     "paged_decode_int4": (ctypes.c_int, [_PTR] * 9 + [_INT64] + [_PTR] * 5 + [_INT64] * 6
                                           + [_FLOAT])},
    "gemv": {"gemv_f32": (None, [_PTR] * 3 + [_INT64] * 2)},
    "rms_norm": {"rms_norm_f32": (None, [_PTR] * 3 + [_INT64] * 2 + [_FLOAT])},
    "llama_decode": {"llama_decode_layers": (ctypes.c_int, [_PTR] * 3 + [_INT64] + [_PTR] * 5 + [_INT64]
                                             + [_PTR] * 3),
                     "llama_decode_attention": (ctypes.c_int, [_PTR] * 2 + [_INT64] + [_PTR] * 3 + [_INT64]
                                                + [_PTR] * 5 + [_INT64] + [_PTR] * 3),
                     "quantize_block_int4": (None, [_PTR] * 4 + [_INT64] * 4),
                     "llama_silu_mul": (None, [_PTR] * 2 + [_INT64] * 2),
                     "quantize_rows_i8": (None, [_PTR] * 3 + [_INT64] * 2),
                     "round_to_16bit": (None, [_PTR] * 2 + [_INT64] * 2)},
    "gguf_int8": {
        "gguf_quantize_activations": (None, [_PTR] * 2 + [_INT64] * 2),
        **{f"gguf_int8_matmul_{kind}": (None, [_PTR] * 3 + [_INT64] * 4)
           for kind in GGUF_KERNEL_TYPES[2:] + INTERLEAVED_TYPES},
    },
    "gguf_matmul": {
        **{f"gguf_matmul_{kind}": (None, [_PTR] * 3 + [_INT64] * 4) for kind in GGUF_KERNEL_TYPES},
        **{f"gguf_dequantize_{kind}": (None, [_PTR] * 3 + [_INT64] * 2) for kind in GGUF_KERNEL_TYPES},
    },
    "int_matmul": {
        "int8_matmul": (None, [_PTR] * 4 + [_INT64] * 4),
        "int4_matmul": (None, [_PTR] * 5 + [_INT64] * 5),
    },
}


def paged_kv_kind(dtype: object) -> int:
    """paged_decode.c's enum kv_kind for a cache tensor's torch dtype (one of PAGED_KV_DTYPES)."""
    return PAGED_KV_DTYPES.index(str(dtype).removeprefix("torch."))


KV_INT4 = len(PAGED_KV_DTYPES)  # paged_decode.c's KV_I4: int4 (KIVI) codes, whose tensors are uint8


def cache_dir() -> pathlib.Path:
    """Where built libraries are kept."""
    return pathlib.Path(os.environ.get("KVSERVE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "kvserve")


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The library built from `<name>.c`, its functions typed as in SIGNATURES, or None if it cannot be built here."""
    source = SOURCE_DIR / f"{name}.c"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.warning("no C compiler found: %s.c is not built, its callers stay on torch", name)
        return None
    # Every source and header here, not only this one: a file may #include another (llama_decode.c does).
    sources = b"".join(path.read_bytes() for path in sorted([*SOURCE_DIR.glob("*.c"), *SOURCE_DIR.glob("*.h")]))
    digest = hashlib.sha256(source.read_bytes() + sources + " ".join(FLAGS).encode() + _cpu_features().encode())
    library = cache_dir() / f"{name}-{digest.hexdigest()[:16]}.so"
    if not library.exists():
        try:
            _compile(compiler, source, library)
        except (OSError, subprocess.CalledProcessError) as error:
            details = getattr(error, "stderr", "") or error
            logger.warning("building %s failed, its callers stay on torch: %s", source.name, details)
            return None
    kernel = ctypes.CDLL(str(library))
    for function, (restype, argtypes) in SIGNATURES[name].items():
        getattr(kernel, function).restype = restype
        getattr(kernel, function).argtypes = argtypes
    return kernel


def _cpu_features() -> str:
    """The machine and its instruction-set flags: -march=native code from another CPU could crash on this one
    (a home directory shared between machines)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return platform.machine() + flags


def _compile(compiler: str, source: pathlib.Path, library: pathlib.Path) -> None:
    """Compile to a temporary name, then rename: concurrent builders never load a half-written file."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as tmp:
        partial = pathlib.Path(tmp.name)
    try:
        subprocess.run([compiler, *FLAGS, "-o", str(partial), str(source)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
