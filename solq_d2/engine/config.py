"""Training and evaluation keys of solq_d2 (``SOLVER.*``, ``TEST.*``); see solq_d2/config.py.

Detectron2's own solver keys are reused with their meaning unchanged: ``SOLVER.BASE_LR``,
``SOLVER.WEIGHT_DECAY``, ``SOLVER.WEIGHT_DECAY_NORM``, ``SOLVER.WEIGHT_DECAY_BIAS``,
``SOLVER.BIAS_LR_FACTOR``, ``SOLVER.MOMENTUM``, ``SOLVER.NESTEROV``, ``SOLVER.STEPS``,
``SOLVER.CLIP_GRADIENTS.*`` (which gains ``CLIP_TYPE: "full_model"``), ``TEST.EVAL_PERIOD``.
"""

from detectron2.config import CfgNode as CN  # noqa: F401

__all__ = ["add_engine_config"]


def add_engine_config(cfg):
    """Add the optimizer / evaluation keys to ``cfg`` (one comment per key)."""
    # Optimizer class: "ADAMW" (torch.optim.AdamW; SOLQ, SOIT and QueryInst all train with it,
    # e.g. SOLQ main.py `torch.optim.AdamW`) or "SGD" (Detectron2's default; uses SOLVER.MOMENTUM
    # and SOLVER.NESTEROV).
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # (beta1, beta2) of AdamW: exponential decay rates of the first and second moment estimates.
    # torch's defaults, which all three official recipes use.
    cfg.SOLVER.ADAMW_BETAS = (0.9, 0.999)
    # LR multiplier (dimensionless) for every parameter whose name starts with "backbone.".
    # Deformable DETR / SOLQ: --lr_backbone 2e-5 with --lr 2e-4, i.e. 0.1.
    # Default 1.0 (no change).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    # LR multiplier (dimensionless) for parameters whose name contains one of
    # SOLVER.LINEAR_PROJ_NAMES (the deformable-attention offset / reference-point projections).
    # SOLQ main.py --lr_linear_proj_mult 0.1; opera SOIT paramwise_cfg lr_mult 0.1. A parameter that
    # is also in the backbone gets the product of both multipliers. Default 1.0 (no change).
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 1.0
    # Substrings of parameter names that select the "linear projection" group above.
    # SOLQ main.py --lr_linear_proj_names ['reference_points', 'sampling_offsets'].
    cfg.SOLVER.LINEAR_PROJ_NAMES = ["sampling_offsets", "reference_points"]
    # Weight decay for embedding parameters: parameters of nn.Embedding modules (query embeddings)
    # and parameters whose own name ends with "embed"/"embedding" (e.g. the deformable
    # transformer's level_embed). Default 0.0 as in Mask2Former's solver; the official SOLQ/SOIT
    # recipes decay everything with SOLVER.WEIGHT_DECAY (1e-4), so their configs set it to 1e-4.
    # (Detectron2's SOLVER.WEIGHT_DECAY_NORM plays the same role for normalisation layers.)
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0

    # Tasks evaluated by COCOEvaluator ("bbox", "segm"); every solq_d2 model predicts both.
    cfg.TEST.EVAL_TASKS = ["bbox", "segm"]
    return cfg
