"""``SolqD2Checkpointer``: safe loading, atomic saving, official-format detection.

Loading never executes code from a file:

* ``.pth`` (and any other extension): ``torch.load(..., weights_only=True)``; the only extra types
  allowed are ``argparse.Namespace`` (the official SOLQ file stores its training arguments in one)
  and numpy arrays/scalars (state dicts may hold them; rebuilding one runs no code). A file whose
  pickle references anything else raises :class:`UnsafeCheckpointError`.
* ``.pkl`` (Detectron2 / Caffe2 model-zoo files, which Detectron2 reads with plain ``pickle``):
  read by a restricted unpickler that can only rebuild numpy arrays, dtypes and plain containers.

Saving writes ``<name>.pth.tmp-<pid>``, flushes and fsyncs it, then ``os.replace``-s it onto
``<name>.pth`` and only then points ``last_checkpoint`` at it (also atomically), so a process
killed at any moment leaves either the previous or the new complete checkpoint, never a partial
one that ``--resume`` would pick up.

After reading a file, the modules ``solq_d2.checkpoint.convert_solq``, ``convert_soit`` and
``convert_queryinst`` are asked in this order whether it is an official checkpoint of their
method (``matches``); the first that says yes converts it (``convert``) and the converted weights
are loaded strictly: any missing or unexpected key or shape mismatch raises
:class:`CheckpointMismatchError` before the model is modified.
"""

import argparse
import contextlib
import importlib
import io
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Dict, List, Optional

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = [
    "SolqD2Checkpointer",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "check_converted_state",
    "CONVERTER_MODULES",
    "safe_torch_load",
    "safe_pickle_load",
]

logger = logging.getLogger(__name__)

# Tried in this order on every loaded file; a module that does not exist (yet) is skipped.
CONVERTER_MODULES = (
    "solq_d2.checkpoint.convert_solq",
    "solq_d2.checkpoint.convert_soit",
    "solq_d2.checkpoint.convert_queryinst",
)
# Types that may appear in a .pth file besides tensors, plain containers and numpy arrays.
SAFE_GLOBALS = [argparse.Namespace]
# Buffers a converted official checkpoint may lack: they are set from the config.
_CONFIG_BUFFERS = ("pixel_mean", "pixel_std")
_TMP_MARK = ".tmp-"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file references Python objects that solq_d2 refuses to unpickle."""


class CheckpointMismatchError(ValueError):
    """Converted weights do not match the model (missing/unexpected keys, wrong shapes)."""


def _unsafe_message(path: str, detail: str) -> str:
    return (
        f"Refusing to load checkpoint '{path}': it contains pickled Python objects other than "
        f"tensors, numpy arrays and plain containers ({detail}). solq_d2 never runs code from "
        "checkpoint files. If the file comes from a source you trust, load it yourself, save "
        "only its weights (`torch.save({'model': state_dict}, 'weights.pth')`) and load that."
    )


def safe_torch_load(path: str, extra_safe_globals=()) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors.

    Args:
        path: a local file.
        extra_safe_globals: classes allowed in addition to :data:`SAFE_GLOBALS`.

    Raises:
        UnsafeCheckpointError: the pickle references a global that is not allowed.
        RuntimeError: the file is truncated or not a torch file.
    """
    allowed = list(SAFE_GLOBALS) + _numpy_globals() + list(extra_safe_globals)
    ctx = (
        torch.serialization.safe_globals(allowed)
        if hasattr(torch.serialization, "safe_globals")
        else contextlib.nullcontext()  # older torch: Namespace-bearing files fail clearly below
    )
    try:
        with ctx, open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        detail = f"global '{found.group(1)}' is not allowed" if found else str(e).split("\n")[0]
        raise UnsafeCheckpointError(_unsafe_message(path, detail)) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise RuntimeError(
            f"Cannot read checkpoint '{path}': the file is truncated, corrupt or not a PyTorch "
            f"checkpoint ({type(e).__name__}: {e})"
        ) from e


def _numpy_globals() -> list:
    """What pickled numpy arrays/scalars reference (numpy 1 and 2 module paths)."""
    import numpy as np

    found = [np.ndarray, np.dtype]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found += [module._reconstruct, module.scalar]
        break
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: per-dtype classes
    if dtypes is not None:
        found += [
            c for c in vars(dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)
        ]
    return found


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds only numpy arrays/dtypes/scalars and ordered dicts; refuses every other global."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core."):
                try:  # numpy 2 moved numpy.core to numpy._core (the old path warns)
                    return getattr(importlib.import_module("numpy._core.multiarray"), name)
                except ImportError:
                    pass
            return getattr(importlib.import_module(module), name)
        if module == "numpy.dtypes":  # numpy >= 1.25 dtype classes (e.g. Float32DType)
            import numpy as np

            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and issubclass(obj, np.dtype):
                return obj
        raise UnsafeCheckpointError(f"global '{module}.{name}' is not allowed")


def safe_pickle_load(path: str) -> Any:
    """Load a Detectron2/Caffe2 ``.pkl`` model file without executing code from it.

    Only numpy arrays, dtypes, scalars and plain containers are rebuilt (``encoding="latin1"`` for
    Python 2 pickles, as Detectron2 does).

    Raises:
        UnsafeCheckpointError: the pickle references any other global.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(_unsafe_message(path, str(e))) from e
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise RuntimeError(
            f"Cannot read '{path}': the file is truncated or not a pickle ({type(e).__name__}: {e})"
        ) from e


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write_fn) -> None:
    """Write ``path`` through a fsync-ed temporary file in the same directory + ``os.replace``."""
    directory = os.path.dirname(path) or "."
    tmp = f"{path}{_TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def _is_complete_file(path: str) -> bool:
    """False for a missing file or a truncated zip (torch >= 1.6 format) checkpoint."""
    if not os.path.isfile(path):
        return False
    if path.endswith(".pth") and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            is_zip_format = f.read(4) == b"PK\x03\x04"
        return zipfile.is_zipfile(path) if is_zip_format else True
    return os.path.getsize(path) > 0


def _find_converter(checkpoint: Any):
    for module_name in CONVERTER_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue  # this method's converter has not been written / installed
            raise
        if module.matches(checkpoint):
            return module_name.rsplit(".", 1)[-1][len("convert_") :], module
    return None, None


def check_converted_state(model: torch.nn.Module, state: Dict[str, Any], method: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` fits ``model`` exactly.

    Every parameter and buffer of the model must be present with its shape, and nothing else
    (``pixel_mean``/``pixel_std`` may be absent: they come from the config). The message lists
    the missing, unexpected and mis-shaped names (first 50 of each).
    """
    model_state = model.state_dict()
    ignorable = {k for k in _CONFIG_BUFFERS if k in dict(model.named_buffers())}
    missing = sorted(set(model_state) - set(state) - ignorable)
    unexpected = sorted(set(state) - set(model_state))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in sorted(set(state) & set(model_state))
        if tuple(state[k].shape) != tuple(model_state[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def block(title: str, items: List[str]) -> str:
        if not items:
            return ""
        shown = "\n    ".join(items[:50])
        more = f"\n    ... and {len(items) - 50} more" if len(items) > 50 else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    raise CheckpointMismatchError(
        f"The converted official {method} checkpoint does not match the model "
        "(official weights are loaded strictly; check MODEL.META_ARCHITECTURE and the "
        f"model config against the checkpoint):"
        + block("missing in checkpoint", missing)
        + block("unexpected in checkpoint", unexpected)
        + block("shape mismatches", shapes)
    )


class SolqD2Checkpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` that loads safely, saves atomically and converts official
    SOLQ / SOIT / QueryInst checkpoints on the fly.

    Usage is Detectron2's: ``SolqD2Checkpointer(model, save_dir, **checkpointables)``, then
    ``.load(path)``, ``.resume_or_load(path, resume=...)``, ``.save(name)``.
    """

    # ---------------------------------------------------------------- loading
    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            data = safe_pickle_load(filename)
            if not isinstance(data, dict):
                raise ValueError(f"'{filename}' holds a {type(data).__name__}, not a dict")
            if "model" in data and "__author__" in data:  # Detectron2 model-zoo format
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            if "blobs" in data:  # Caffe2 / Detectron1 detection models
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

        loaded = safe_torch_load(filename)
        if not isinstance(loaded, dict):
            raise ValueError(
                f"Checkpoint '{filename}' holds a {type(loaded).__name__}; expected a dict "
                "(a state_dict, or {'model': state_dict, ...})"
            )
        method, converter = _find_converter(loaded)
        if converter is not None:
            return self._convert_official(filename, method, converter, loaded)
        if filename.endswith(".pyth"):  # pycls
            if "model_state" not in loaded:
                raise ValueError(f"pycls checkpoint '{filename}' has no 'model_state'")
            state = {
                k: v
                for k, v in loaded["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded

    def _convert_official(self, filename, method, converter, checkpoint) -> Dict[str, Any]:
        self.logger.info(
            f"'{filename}' is an official {method} checkpoint; converting it with "
            f"solq_d2.checkpoint.convert_{method}"
        )
        result = converter.convert(checkpoint, model=self.model)
        self.logger.info(
            f"Converted {len(result['model'])} tensors ({len(result.get('renames', []))} renamed,"
            f" {len(result.get('dropped', []))} dropped on purpose)"
        )
        return {
            "model": result["model"],
            "__author__": f"official {method} (converted by solq_d2)",
            "matching_heuristics": False,
            "__solq_d2_converted_from__": method,
        }

    def _load_model(self, checkpoint: Dict[str, Any]):
        method = checkpoint.pop("__solq_d2_converted_from__", None)
        if method is not None:
            self._check_strict(checkpoint["model"], method)
        return super()._load_model(checkpoint)

    def _check_strict(self, state: Dict[str, Any], method: str) -> None:
        check_converted_state(self.model, state, method)

    # ---------------------------------------------------------------- saving
    def _is_local(self) -> bool:
        return "://" not in self.save_dir

    def save(self, name: str, **kwargs: Any) -> None:
        """Atomically write ``<save_dir>/<name>.pth`` and point ``last_checkpoint`` at it."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local():  # remote storage through PathManager: no atomic rename
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)

        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"Invalid checkpoint name {name!r}")
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(save_file, lambda f: f.write(last_filename_basename.encode()))

    # ---------------------------------------------------------------- resuming
    def get_checkpoint_file(self) -> str:
        """The file named by ``last_checkpoint``; if it is missing or truncated (a run killed by
        an older, non-atomic writer), the newest complete ``*.pth`` in ``save_dir`` instead."""
        path = super().get_checkpoint_file()
        if not path or not self._is_local() or _is_complete_file(path):
            return path
        # Temporary files end in ".tmp-<pid>", never ".pth": fvcore's listing skips them.
        candidates = sorted(
            (p for p in self.get_all_checkpoint_files() if _is_complete_file(p)),
            key=os.path.getmtime,
        )
        fallback = candidates[-1] if candidates else ""
        self.logger.warning(
            f"last_checkpoint names '{path}', which is missing or incomplete; "
            + (f"resuming from '{fallback}' instead" if fallback else "no complete checkpoint")
        )
        return fallback

    def has_checkpoint(self) -> bool:
        """Whether ``save_dir`` has a ``last_checkpoint`` tag and a complete file to resume from."""
        return super().has_checkpoint() and bool(self.get_checkpoint_file())

    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        if path and _TMP_MARK in os.path.basename(path):
            raise ValueError(f"'{path}' is a partially written temporary checkpoint file")
        return super().load(path, checkpointables=checkpointables)
