"""Input projections of Deformable-DETR-style models (no FPN): 1x1 conv + GN per backbone level,
then extra levels made by 3x3 stride-2 convs (+ GN), and the per-level padding masks."""

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InputProjection", "downsample_padding_mask"]


def downsample_padding_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Padding mask of a feature map: legacy "nearest" interpolation of the image mask.

    Args:
        mask: (B, H, W) bool, True on padding (image resolution).
        size: (h, w) of the feature map.

    Returns:
        (B, h, w) bool.
    """
    return F.interpolate(mask[None].float(), size=tuple(int(s) for s in size))[0].to(torch.bool)


class InputProjection(nn.Module):
    """Project backbone levels to ``hidden_dim`` channels and add stride-2 extra levels.

    Level ``l < len(in_channels)``: ``GroupNorm(Conv1x1(C_l))``. Extra level ``l``: ``GroupNorm(
    Conv3x3_stride2(x))`` where ``x`` is the **raw** last backbone level for the first extra level
    and the previous projected level after that (Deformable DETR, SOLQ; mmdet ``ChannelMapper``
    with ``num_outs > len(in_channels)``, as in SOIT).

    Children are named ``"0"``, ``"1"``, ... each a ``Sequential(conv, gn)``, so the parameter
    names are Deformable DETR's ``input_proj.{l}.{0,1}.*`` when this module is stored as
    ``input_proj``.

    Args:
        in_channels: channels of the backbone levels used, finest first (e.g. [512, 1024, 2048]).
        hidden_dim: output channels d.
        num_levels: total number of output levels (>= len(in_channels)).
        bias: whether the convs have a bias (Deformable DETR: True; mmdet ChannelMapper: False).
        num_groups: GroupNorm groups.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        hidden_dim: int,
        num_levels: int,
        bias: bool = True,
        num_groups: int = 32,
    ):
        super().__init__()
        in_channels = list(in_channels)
        if not in_channels:
            raise ValueError("InputProjection: in_channels is empty")
        if num_levels < len(in_channels):
            raise ValueError(
                f"InputProjection: num_levels ({num_levels}) < number of backbone levels "
                f"({len(in_channels)})"
            )
        if hidden_dim % num_groups != 0:
            raise ValueError(
                f"InputProjection: hidden_dim ({hidden_dim}) must be divisible by the GroupNorm "
                f"groups ({num_groups})"
            )
        self.num_backbone_levels = len(in_channels)
        self.num_levels = num_levels
        for i, c in enumerate(in_channels):
            conv = nn.Conv2d(c, hidden_dim, kernel_size=1, bias=bias)
            self.add_module(str(i), nn.Sequential(conv, nn.GroupNorm(num_groups, hidden_dim)))
        c = in_channels[-1]
        for i in range(len(in_channels), num_levels):
            conv = nn.Conv2d(c, hidden_dim, kernel_size=3, stride=2, padding=1, bias=bias)
            self.add_module(str(i), nn.Sequential(conv, nn.GroupNorm(num_groups, hidden_dim)))
            c = hidden_dim
        self.reset_parameters()

    def reset_parameters(self):
        """Deformable DETR init: xavier-uniform conv weights, zero biases, GN weight 1 bias 0."""
        for proj in self:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            if proj[0].bias is not None:
                nn.init.constant_(proj[0].bias, 0)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, idx: int) -> nn.Module:
        return self._modules[str(idx)]

    def forward(self, features: List[torch.Tensor], mask: torch.Tensor):
        """
        Args:
            features: backbone maps, finest first, (B, C_l, H_l, W_l).
            mask: (B, H, W) bool image padding mask (True on padding).

        Returns:
            srcs: ``num_levels`` maps (B, hidden_dim, h_l, w_l).
            masks: ``num_levels`` bool padding masks (B, h_l, w_l), each interpolated from the
                image mask.
        """
        if len(features) != self.num_backbone_levels:
            raise ValueError(
                f"InputProjection expects {self.num_backbone_levels} feature maps, "
                f"got {len(features)}"
            )
        srcs = [self[i](f) for i, f in enumerate(features)]
        x = features[-1]
        for i in range(self.num_backbone_levels, self.num_levels):
            x = self[i](x)
            srcs.append(x)
        masks = [downsample_padding_mask(mask, s.shape[-2:]) for s in srcs]
        return srcs, masks
