"""Optimizer for DETR-family training: parameter groups by name and full-model gradient clipping.

The official SOLQ / SOIT / QueryInst recipes differ from Detectron2's default optimizer in three
ways, all driven by config keys (see ``solq_d2/engine/config.py``):

* AdamW instead of SGD (``SOLVER.OPTIMIZER``);
* LR multipliers chosen by parameter *name*: the backbone (``SOLVER.BACKBONE_MULTIPLIER``) and the
  deformable-attention offset / reference-point projections (``SOLVER.LINEAR_PROJ_MULTIPLIER``,
  ``SOLVER.LINEAR_PROJ_NAMES``);
* gradient clipping of the total norm over all parameters (``CLIP_TYPE: "full_model"``), not
  Detectron2's per-parameter clipping.
"""

import itertools
import logging
from typing import Any, Dict, Iterable, List, Optional, Sequence, Type

import torch
from torch import nn

from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups

__all__ = [
    "build_optimizer",
    "get_optimizer_params",
    "maybe_add_full_model_gradient_clipping",
    "NORM_MODULE_TYPES",
]

logger = logging.getLogger(__name__)


def _norm_module_types():
    types = [
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,  # Detectron2's NaiveSyncBatchNorm subclasses BatchNorm2d
        nn.GroupNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        nn.LayerNorm,
        nn.LocalResponseNorm,
    ]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    try:  # detectron2 main has a channels-first LayerNorm (ConvNeXt/ViTDet); v0.6 does not
        from detectron2.layers import LayerNorm as D2LayerNorm

        types.append(D2LayerNorm)
    except ImportError:
        pass
    return tuple(types)


NORM_MODULE_TYPES = _norm_module_types()
_EMBED_SUFFIXES = ("embed", "embedding", "embeddings")


def _is_embedding(module: nn.Module, local_name: str) -> bool:
    return isinstance(module, nn.Embedding) or local_name.endswith(_EMBED_SUFFIXES)


def get_optimizer_params(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: Optional[float] = None,
    weight_decay_embed: Optional[float] = None,
    weight_decay_bias: Optional[float] = None,
    bias_lr_factor: float = 1.0,
    backbone_multiplier: float = 1.0,
    linear_proj_multiplier: float = 1.0,
    linear_proj_names: Sequence[str] = (),
) -> List[Dict[str, Any]]:
    """Parameter groups with per-name LR multipliers and weight-decay overrides.

    Every trainable parameter gets ``lr = base_lr * m`` where ``m`` is the product of
    ``backbone_multiplier`` (full name starts with ``"backbone."``), ``linear_proj_multiplier``
    (full name contains one of ``linear_proj_names``) and ``bias_lr_factor`` (own name
    ``"bias"``). Weight decay is ``weight_decay`` except: parameters of normalisation layers
    (:data:`NORM_MODULE_TYPES`) get ``weight_decay_norm``; embeddings (``nn.Embedding`` parameters
    and parameters whose own name ends with "embed"/"embedding") get ``weight_decay_embed``;
    biases get ``weight_decay_bias``. ``None`` for one of these means "same as weight_decay".
    Parameters shared between modules appear once; frozen parameters are left out. Groups with
    equal hyper-parameters are merged (fewer groups make the multi-tensor optimizers faster).

    Args:
        model: the model (unwrapped or DDP-wrapped; a ``module.`` prefix is ignored).
        base_lr: the base learning rate.
        weight_decay: the default weight decay.

    Returns:
        list[dict]: groups for ``torch.optim.Optimizer``, each with ``params``, ``lr`` and
        ``weight_decay``.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    linear_proj_names = tuple(linear_proj_names)
    params: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            full_name = f"{module_name}.{local_name}" if module_name else local_name

            lr = base_lr
            if full_name.startswith("backbone."):
                lr *= backbone_multiplier
            if any(key in full_name for key in linear_proj_names):
                lr *= linear_proj_multiplier
            if local_name == "bias":
                lr *= bias_lr_factor

            wd = weight_decay
            if isinstance(module, NORM_MODULE_TYPES) and weight_decay_norm is not None:
                wd = weight_decay_norm
            elif _is_embedding(module, local_name) and weight_decay_embed is not None:
                wd = weight_decay_embed
            elif local_name == "bias" and weight_decay_bias is not None:
                wd = weight_decay_bias
            params.append({"params": [param], "lr": lr, "weight_decay": wd})
    if not params:
        raise ValueError("The model has no trainable parameters: nothing to optimize.")
    return reduce_param_groups(params)


def _clip_cfg_value(clip_cfg: CfgNode, name: str):
    value = float(getattr(clip_cfg, name))
    if not value > 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.{name} must be > 0, got {value}")
    return value


def maybe_add_full_model_gradient_clipping(
    cfg: CfgNode, optimizer_type: Type[torch.optim.Optimizer]
) -> Type[torch.optim.Optimizer]:
    """Wrap an optimizer class so that ``step()`` first clips the gradients.

    ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE``:

    * ``"full_model"``: the total ``NORM_TYPE``-norm of the gradients of *all* parameters of the
      optimizer is clipped to ``CLIP_VALUE`` (``torch.nn.utils.clip_grad_norm_`` over every
      group), as the official recipes do (``--clip_max_norm 0.1`` in SOLQ, ``grad_clip`` 0.1 in
      SOIT, 1.0 in QueryInst);
    * ``"value"`` / ``"norm"``: Detectron2's per-parameter clipping, unchanged.

    Returns ``optimizer_type`` itself when ``SOLVER.CLIP_GRADIENTS.ENABLED`` is False.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return optimizer_type
    if clip.CLIP_TYPE != "full_model":
        if clip.CLIP_TYPE not in ("value", "norm"):
            raise ValueError(
                f"Unknown SOLVER.CLIP_GRADIENTS.CLIP_TYPE {clip.CLIP_TYPE!r}; "
                "expected 'full_model', 'norm' or 'value'"
            )
        return maybe_add_gradient_clipping(cfg, optimizer_type)

    max_norm = _clip_cfg_value(clip, "CLIP_VALUE")
    norm_type = _clip_cfg_value(clip, "NORM_TYPE")

    class FullModelGradientClipping(optimizer_type):
        def step(self, closure=None):
            all_params = itertools.chain(*(group["params"] for group in self.param_groups))
            torch.nn.utils.clip_grad_norm_(all_params, max_norm, norm_type)
            return super().step(closure)

    FullModelGradientClipping.__name__ = optimizer_type.__name__ + "WithFullModelGradientClip"
    FullModelGradientClipping.__qualname__ = FullModelGradientClipping.__name__
    return FullModelGradientClipping


def _params_summary(groups: Iterable[Dict[str, Any]]) -> str:
    return ", ".join(
        f"{len(g['params'])} params @ lr={g['lr']:.3g} wd={g['weight_decay']:.3g}" for g in groups
    )


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer named by ``SOLVER.OPTIMIZER`` with solq_d2's parameter groups.

    Args:
        cfg: a config with solq_d2's keys (``add_solq_d2_config``).
        model: the model to optimize.

    Returns:
        torch.optim.Optimizer: AdamW or SGD (possibly wrapped for gradient clipping), whose
        parameter groups come from :func:`get_optimizer_params`.
    """
    s = cfg.SOLVER
    groups = get_optimizer_params(
        model,
        base_lr=s.BASE_LR,
        weight_decay=s.WEIGHT_DECAY,
        weight_decay_norm=s.WEIGHT_DECAY_NORM,
        weight_decay_embed=s.WEIGHT_DECAY_EMBED,
        weight_decay_bias=s.WEIGHT_DECAY_BIAS,
        bias_lr_factor=s.BIAS_LR_FACTOR,
        backbone_multiplier=s.BACKBONE_MULTIPLIER,
        linear_proj_multiplier=s.LINEAR_PROJ_MULTIPLIER,
        linear_proj_names=s.LINEAR_PROJ_NAMES,
    )
    name = s.OPTIMIZER.upper()
    if name == "ADAMW":
        betas = tuple(float(b) for b in s.ADAMW_BETAS)
        if len(betas) != 2:
            raise ValueError(f"SOLVER.ADAMW_BETAS must have 2 values, got {s.ADAMW_BETAS}")
        optimizer_type = maybe_add_full_model_gradient_clipping(cfg, torch.optim.AdamW)
        optimizer = optimizer_type(groups, lr=s.BASE_LR, betas=betas, weight_decay=s.WEIGHT_DECAY)
    elif name == "SGD":
        optimizer_type = maybe_add_full_model_gradient_clipping(cfg, torch.optim.SGD)
        optimizer = optimizer_type(
            groups,
            lr=s.BASE_LR,
            momentum=s.MOMENTUM,
            nesterov=s.NESTEROV,
            weight_decay=s.WEIGHT_DECAY,
        )
    else:
        raise ValueError(f"Unknown SOLVER.OPTIMIZER {s.OPTIMIZER!r}; expected 'ADAMW' or 'SGD'")
    logger.info(f"Optimizer {type(optimizer).__name__}: {_params_summary(groups)}")
    return optimizer
