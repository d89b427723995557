"""Checkpoints: :class:`SolqD2Checkpointer` and the official-format converters.

``convert_<method>.py`` modules (official SOLQ / SOIT / QueryInst → solq_d2 names) import only
torch, so they can be used without Detectron2; the checkpointer, which subclasses Detectron2's
``DetectionCheckpointer``, is imported on first access.
"""

__all__ = [
    "SolqD2Checkpointer",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "check_converted_state",
    "safe_torch_load",
    "safe_pickle_load",
]


def __getattr__(name):
    if name in __all__:
        from . import checkpointer

        return getattr(checkpointer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
