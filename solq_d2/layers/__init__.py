"""Ops and small layers; importable with torch alone (no Detectron2)."""
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch", "MSDeformAttn"]
from .soit_dyn_attn import soit_dyn_attn  # noqa: E402
from .soit_dyn_attn_pytorch import (  # noqa: E402
    soit_dyn_attn_pytorch,
    soit_dyn_param_dim,
    soit_dyn_split_params,
)

__all__ += ["soit_dyn_attn", "soit_dyn_attn_pytorch", "soit_dyn_param_dim", "soit_dyn_split_params"]
