"""solq_d2: SOLQ, SOIT and QueryInst as Detectron2 meta-architectures.

``import solq_d2`` registers the meta-architectures (``SOLQ``, ``SOIT``, ``QueryInst``), the
dataset mappers and the synthetic "shapes" dataset with Detectron2, and exposes
:func:`add_solq_d2_config`. The torch-only parts (``solq_d2.layers``: ops and their PyTorch
fallbacks) import without Detectron2.
"""
import importlib.util

__version__ = "0.1.0"

if importlib.util.find_spec("detectron2") is not None:
    from .config import add_solq_d2_config  # noqa: F401
    from . import data, modeling  # noqa: F401  (registration)
else:

    def __getattr__(name):
        if name in ("add_solq_d2_config", "modeling", "data", "engine", "checkpoint"):
            raise ImportError(
                f"solq_d2.{name} needs Detectron2, which is not installed: run `make setup` "
                "(see INSTALL.md for the installation policy)"
            )
        raise AttributeError(name)
