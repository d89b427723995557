"""Training: :class:`Trainer` (a Detectron2 ``DefaultTrainer``), the optimizer builder with
name-based LR multipliers, weight-decay groups and full-model gradient clipping."""

from .config import add_engine_config
from .optimizer import build_optimizer, get_optimizer_params, maybe_add_full_model_gradient_clipping
from .trainer import (
    Trainer,
    build_mapper,
    check_model_num_classes,
    create_ddp_model,
    model_num_classes,
)

__all__ = [
    "Trainer",
    "add_engine_config",
    "build_optimizer",
    "get_optimizer_params",
    "maybe_add_full_model_gradient_clipping",
    "build_mapper",
    "create_ddp_model",
    "check_model_num_classes",
    "model_num_classes",
]
