"""The pure-Python core (scheduler, block pool, KV manager, prefix cache, config, KV dtypes) imports without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

TORCH_FREE_MODULES = [
    "kvserve.engine.scheduler",
    "kvserve.kv.block_pool",
    "kvserve.kv.kv_manager",
    "kvserve.kv.prefix_cache",
    "kvserve.config",
    "kvserve.kv.dtypes",
    "kvserve.kv.kv_spec",
    "kvserve.structured.params",
]

# A meta-path finder that makes `import torch` (and any torch submodule) fail, as if torch were not installed.
_BLOCK_TORCH = textwrap.dedent("""
    import importlib, sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked: {name}")
            return None

    sys.meta_path.insert(0, BlockTorch())
    for module in sys.argv[1:]:
        importlib.import_module(module)
""")


def import_without_torch(*modules: str) -> subprocess.CompletedProcess[str]:
    """Import `modules` in a fresh interpreter where importing torch raises ImportError."""
    return subprocess.run([sys.executable, "-c", _BLOCK_TORCH, *modules], capture_output=True, text=True,
                          timeout=120)


def test_core_modules_import_without_torch() -> None:
    result = import_without_torch(*TORCH_FREE_MODULES)
    assert result.returncode == 0, result.stderr


def test_the_block_catches_a_torch_import() -> None:
    # The check has teeth: a module that needs torch fails under the same block.
    result = import_without_torch("kvserve.kv.kv_cache")
    assert result.returncode != 0 and "torch is blocked" in result.stderr
