"""Loading of the compiled extension ``solq_d2._C``; never raises.

Ops ask :func:`available` whether the extension can serve them. When it cannot, they use their
pure-PyTorch implementation and :func:`warn_fallback` logs, once per process, why and how to fix
it. Set ``SOLQ_D2_DISABLE_EXT=1`` to hide the extension (the PyTorch paths are then used, as on a
machine where it failed to build).
"""
import functools
import importlib
import logging
import os

__all__ = [
    "available",
    "reason",
    "load",
    "build_info",
    "has_op",
    "warn_fallback",
    "register_op",
    "op_report",
]

logger = logging.getLogger(__name__)

_FIX = (
    "rebuild it with `make setup` (or `pip install --no-build-isolation -e .` in the project "
    "root) and check `python -m solq_d2.utils.collect_env`"
)


@functools.lru_cache(maxsize=None)
def _load():
    if os.environ.get("SOLQ_D2_DISABLE_EXT", "0") == "1":
        return None, "disabled by SOLQ_D2_DISABLE_EXT=1"
    try:
        return importlib.import_module("solq_d2._C"), ""
    except ImportError as e:  # not built, or built against another torch (undefined symbol)
        return None, f"solq_d2._C could not be imported ({e})"
    except OSError as e:  # a broken shared object
        return None, f"solq_d2._C could not be loaded ({e})"


def load():
    """The extension module, or None."""
    return _load()[0]


def available() -> bool:
    return load() is not None


def reason() -> str:
    """Why the extension is unavailable ('' when it is available)."""
    return _load()[1]


def has_op(name: str) -> bool:
    """Whether ``torch.ops.solq_d2.<name>`` was registered by the extension."""
    if not available():
        return False
    import torch

    return hasattr(torch.ops.solq_d2, name)


def build_info() -> dict:
    """What the extension was built with: compiler, CUDA kernels, CUDA version and archs."""
    ext = load()
    if ext is None:
        return {"available": False, "reason": reason()}
    return {
        "available": True,
        "file": ext.__file__,
        "compiler": ext.get_compiler_version(),
        "cuda": bool(ext.has_cuda()),
        "cuda_version": ext.get_cuda_version() or None,
        "cuda_archs": ext.get_cuda_archs() or None,
    }


_warned = set()


def warn_fallback(op: str, why: str = "") -> None:
    """Log once per (op, reason) that ``op`` runs on its PyTorch implementation."""
    why = why or reason()
    if (op, why) in _warned:
        return
    _warned.add((op, why))
    logger.warning(
        f"solq_d2: {op} uses its pure-PyTorch implementation (slower, more memory) because "
        f"{why}. To use the compiled kernel, {_FIX}."
    )


# public op name -> names of its torch.ops.solq_d2 kernels (filled by the op modules at import)
_OPS = {}


def register_op(public_name: str, *kernel_names: str) -> None:
    """Declare that ``solq_d2.layers.<public_name>`` is served by ``torch.ops.solq_d2.<kernels>``."""
    _OPS[public_name] = kernel_names


def op_report() -> dict:
    """For each registered op: which implementation it uses on CPU and on CUDA tensors."""
    info = build_info()
    report = {}
    for name, kernels in sorted(_OPS.items()):
        compiled = all(has_op(k) for k in kernels)
        if not compiled:
            why = reason() or f"torch.ops.solq_d2.{{{','.join(kernels)}}} not registered"
            report[name] = {"cpu": f"pytorch ({why})", "cuda": f"pytorch ({why})"}
            continue
        report[name] = {
            "cpu": "compiled (solq_d2._C, C++)",
            "cuda": "compiled (solq_d2._C, CUDA)"
            if info.get("cuda")
            else "pytorch (solq_d2._C was built without CUDA)",
        }
    return report
