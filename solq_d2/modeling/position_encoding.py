"""2-D sine positional encoding with a padding mask (DETR / Deformable DETR)."""

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of the (y, x) position of every valid pixel of a feature map.

    For a valid pixel at row ``i`` and column ``j`` the positions are the counts of valid pixels
    up to it (``cumsum`` of the non-padding mask), so padded images get the same encoding as
    unpadded ones on their valid region. With ``normalize`` they are mapped to
    ``(count + offset) / (n_valid + eps) * scale``. Each axis gets ``num_pos_feats`` channels,
    ``[sin(p / T^(0/F)), cos(p / T^(0/F)), sin(p / T^(2/F)), cos(p / T^(2/F)), ...]`` with
    ``T = temperature`` and ``F = num_pos_feats``; the y channels come first.

    Deformable DETR, SOLQ and SOIT use ``offset=-0.5`` (pixel centres); DETR uses ``offset=0``.

    Args:
        num_pos_feats: channels per axis (half the output channels; d_model / 2).
        temperature: T above (10000 in every paper of this family).
        normalize: normalise the positions to ``[0, scale]`` by the valid size.
        scale: upper end of the normalised range (2*pi).
        offset: added to the 1-based cumulative counts before normalising.
        eps: added to the valid size in the normaliser.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: Optional[float] = None,
        offset: float = -0.5,
        eps: float = 1e-6,
    ):
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(
                f"PositionEmbeddingSine: num_pos_feats must be even, got {num_pos_feats}"
            )
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: `scale` needs normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mask: (B, H, W) bool, True on padding.

        Returns:
            (B, 2 * num_pos_feats, H, W) float32 encoding.
        """
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}, offset={self.offset}"
        )
