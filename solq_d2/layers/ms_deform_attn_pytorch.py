"""Pure-PyTorch multi-scale deformable attention: the reference, the fallback and the export path."""
from typing import List

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_pytorch"]


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    im2col_step: int = 64,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``grid_sample`` (bilinear, zeros, align_corners=False).

    Computes in float64 for float64 values and in float32 otherwise (float16/bfloat16 inputs are
    upcast, as the compiled kernel accumulates in float32), and returns value's dtype.

    Args:
        value: (B, S, M, D), S = sum_l H_l * W_l tokens of all levels, level-major, row-major.
        spatial_shapes: (L, 2) integer, (H_l, W_l) per level.
        level_start_index: (L,) integer, start of each level in S (unused: derived from shapes).
        sampling_locations: (B, Q, M, L, P, 2), normalised (x, y); pixel (i, j) has its centre at
            ((j + 0.5) / W_l, (i + 0.5) / H_l).
        attention_weights: (B, Q, M, L, P).
        im2col_step: accepted for compatibility with Deformable DETR's op and ignored.

    Returns:
        (B, Q, M * D)
    """
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes: List[List[int]] = spatial_shapes.tolist()
    if len(shapes) != L:
        raise ValueError(f"sampling_locations has {L} levels but spatial_shapes has {len(shapes)}")
    if sum(h * w for h, w in shapes) != S:
        raise ValueError(
            f"value has {S} tokens but spatial_shapes {shapes} sum to {sum(h * w for h, w in shapes)}"
        )
    out_dtype = value.dtype
    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    value = value.to(dtype)
    grids = 2 * sampling_locations.to(dtype) - 1  # grid_sample coordinates
    attention_weights = attention_weights.to(dtype)
    out = value.new_zeros(B * M, D, Q, P)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        start += h * w
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * M, Q, P, 2)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        a = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(B * M, 1, Q, P)
        out = out + s * a
    return out.sum(-1).view(B, M * D, Q).transpose(1, 2).contiguous().to(out_dtype)
