"""Ops and small layers; importable with torch alone (no Detectron2)."""
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch", "MSDeformAttn"]
