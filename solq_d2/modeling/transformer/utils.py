"""Small helpers of the deformable transformer: inverse sigmoid, MLP heads, valid ratios and
encoder reference points."""

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "inverse_sigmoid",
    "MLP",
    "get_activation_fn",
    "get_valid_ratio",
    "encoder_reference_points",
    "flatten_levels",
]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(x / (1 - x))``, x clamped to [0, 1] and both terms to >= eps (D-DETR, mmdet)."""
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (DETR's box/vector heads).

    Parameter names are ``layers.{i}.{weight,bias}`` as in DETR / Deformable DETR / SOLQ.

    Args:
        input_dim, hidden_dim, output_dim: feature sizes.
        num_layers: number of Linear layers (>= 1).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs at least one layer, got num_layers={num_layers}")
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def get_activation_fn(name: str):
    """The FFN activation by name ("relu", "gelu", "glu")."""
    fns = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in fns:
        raise ValueError(f"activation should be one of {sorted(fns)}, got {name!r}")
    return fns[name]


def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Valid (unpadded) fraction of a feature map along each axis.

    Args:
        mask: (B, H, W) bool, True on padding (padding is at the bottom/right).

    Returns:
        (B, 2) float32 ``(valid_W / W, valid_H / H)``, from the first column / first row.
    """
    _, H, W = mask.shape
    valid_H = torch.sum(~mask[:, :, 0], 1)
    valid_W = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_W.float() / W, valid_H.float() / H], -1)


def encoder_reference_points(
    spatial_shapes: Sequence[Sequence[int]], valid_ratios: torch.Tensor
) -> torch.Tensor:
    """Reference points of the encoder tokens: pixel centres normalised by the valid size.

    Args:
        spatial_shapes: (H_l, W_l) per level (python ints).
        valid_ratios: (B, L, 2) from :func:`get_valid_ratio`.

    Returns:
        (B, S, L, 2) normalised (x, y) of every token, scaled by every level's valid ratio.
    """
    device = valid_ratios.device
    refs = []
    for lvl, (H, W) in enumerate(spatial_shapes):
        ys = torch.linspace(0.5, H - 0.5, H, dtype=torch.float32, device=device)
        xs = torch.linspace(0.5, W - 0.5, W, dtype=torch.float32, device=device)
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
        refs.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


def flatten_levels(maps: List[torch.Tensor]) -> torch.Tensor:
    """Concatenate (B, C, H_l, W_l) maps into (B, sum H_l*W_l, C), level-major, row-major."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
