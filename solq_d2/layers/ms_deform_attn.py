"""Multi-scale deformable attention: the functional op (compiled kernel or PyTorch) and the module.

PLACEHOLDER DISPATCH: until the compiled kernel lands, ``ms_deform_attn`` always runs
``ms_deform_attn_pytorch``. The signature and the module are final.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _ext
from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "MSDeformAttn"]

_ext.register_op("ms_deform_attn", "ms_deform_attn_forward", "ms_deform_attn_backward")


def ms_deform_attn(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    im2col_step: int = 64,
    impl: str = "auto",
):
    """Multi-scale deformable attention; see :func:`ms_deform_attn_pytorch` for shapes.

    Args:
        impl: "auto" (compiled kernel when available), "pytorch" (force the reference).
    """
    return ms_deform_attn_pytorch(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR), standard initialisation.

    Args:
        d_model: channels of queries and values.
        n_levels: feature levels L.
        n_heads: attention heads M (d_model must be divisible by it).
        n_points: sampling points P per head and level.
        impl: "auto" or "pytorch"; the latter forces the PyTorch path (export, debugging).
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, impl="auto"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query,
        reference_points,
        input_flatten,
        input_spatial_shapes,
        input_level_start_index,
        input_padding_mask=None,
    ):
        """
        Args:
            query: (B, Q, C).
            reference_points: (B, Q, L, 2) normalised (x, y), or (B, Q, L, 4) boxes (cx, cy, w, h).
            input_flatten: (B, S, C) values of all levels.
            input_spatial_shapes: (L, 2) int64 (H, W).
            input_level_start_index: (L,) int64.
            input_padding_mask: (B, S) bool, True for padding (zeroed in the values).

        Returns:
            (B, Q, C)
        """
        B, Q, _ = query.shape
        _, S, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(B, S, M, self.d_model // M)
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        weights = F.softmax(self.attention_weights(query).view(B, Q, M, L * P), -1)
        weights = weights.view(B, Q, M, L, P)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}"
            )
        out = ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, locations, weights, impl=self.impl
        )
        return self.output_proj(out)
