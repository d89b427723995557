"""Dataset-mapper registry: ``INPUT.DATASET_MAPPER_NAME`` -> mapper class."""

from typing import Callable, Dict

__all__ = ["register_dataset_mapper", "build_dataset_mapper", "DATASET_MAPPERS"]

# name -> callable(cfg, is_train) returning a mapper (a @configurable class works as is).
DATASET_MAPPERS: Dict[str, Callable] = {}


def register_dataset_mapper(name: str):
    """Class decorator: make a mapper selectable with ``INPUT.DATASET_MAPPER_NAME name``.

    The registered object is called as ``obj(cfg, is_train)``.
    """

    def deco(obj):
        if name in DATASET_MAPPERS and DATASET_MAPPERS[name] is not obj:
            raise ValueError(f"a dataset mapper named {name!r} is already registered")
        DATASET_MAPPERS[name] = obj
        return obj

    return deco


def build_dataset_mapper(cfg, is_train: bool):
    """The dataset mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME`` (default "detr_instance").

    Use it as ``build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, True))``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in DATASET_MAPPERS:
        raise ValueError(
            f"INPUT.DATASET_MAPPER_NAME={name!r} is not a registered dataset mapper; "
            f"registered: {sorted(DATASET_MAPPERS)}"
        )
    return DATASET_MAPPERS[name](cfg, is_train)
