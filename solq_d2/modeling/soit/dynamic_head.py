"""SOIT's instance-aware mask head: the generated deformable-attention layer of every instance
(computed by the fused op :func:`solq_d2.layers.soit_dyn_attn`) and the aligned x4 upsampling."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["aligned_bilinear", "SOITDynamicMaskHead", "valid_sizes"]


def aligned_bilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Upsample so that output pixel ``factor * i`` sits exactly on input pixel ``i``.

    CondInst's "aligned bilinear" (used by SOIT): replicate-pad the bottom/right by one pixel,
    resize bilinearly with ``align_corners=True`` to ``(factor*H + 1, factor*W + 1)``,
    replicate-pad the top/left by ``factor // 2`` and crop to ``(factor*H, factor*W)``.

    Args:
        x: (N, C, H, W).
        factor: integer upsampling factor >= 1.

    Returns:
        (N, C, factor*H, factor*W).
    """
    if x.dim() != 4:
        raise ValueError(f"aligned_bilinear expects (N, C, H, W), got {tuple(x.shape)}")
    if int(factor) != factor or factor < 1:
        raise ValueError(f"aligned_bilinear needs an integer factor >= 1, got {factor}")
    factor = int(factor)
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    if x.numel() == 0:
        return x.new_zeros(*x.shape[:2], factor * h, factor * w)
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def valid_sizes(mask: torch.Tensor) -> torch.Tensor:
    """Valid (rows, cols) of each padding mask, counted on its first column / row.

    Args:
        mask: (B, H, W) bool, True on padding (bottom/right).

    Returns:
        (B, 2) int64.
    """
    return torch.stack([(~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)], -1)


class SOITDynamicMaskHead(nn.Module):
    """Mask logits of instances from their generated parameters (SOIT §3.2, SOIT.md §6).

    For instance n of image b the layer is a single-level deformable attention over the stride-8
    mask features F (C channels) with ``num_heads`` heads of ``num_points`` points, whose
    offset, attention and output projections (weights and biases, D = (C+1)(3·M·K+1) numbers)
    are the query's parameter vector. Queries are ``F + RelPE(centre of the query's box)``, values
    are ``F`` with the padding zeroed, and a ReLU precedes the output projection. This module has
    no weights; it validates shapes and calls the fused op.

    Args:
        mask_channels: C.
        num_heads: M_d (C must be divisible by it).
        num_points: K.
        upsample: factor of :func:`aligned_bilinear` applied by :meth:`upsample`.
        pos_embed: "rel" (relative to the box centre), "abs" (centre (0, 0)) or "none".
    """

    def __init__(
        self,
        mask_channels: int = 8,
        num_heads: int = 4,
        num_points: int = 4,
        upsample: int = 4,
        pos_embed: str = "rel",
    ):
        super().__init__()
        if mask_channels % num_heads != 0:
            raise ValueError(
                f"SOIT: MASK_CHANNELS ({mask_channels}) must be divisible by DYN_HEADS "
                f"({num_heads})"
            )
        if pos_embed not in ("rel", "abs", "none"):
            raise ValueError(
                f"SOIT: DYN_POS_EMBED must be 'rel', 'abs' or 'none', got {pos_embed!r}"
            )
        if pos_embed != "none" and mask_channels % 4 != 0:
            raise ValueError(
                f"SOIT: a sine PE needs MASK_CHANNELS divisible by 4, got {mask_channels}"
            )
        if upsample < 1 or int(upsample) != upsample:
            raise ValueError(f"SOIT: MASK_UPSAMPLE must be a positive integer, got {upsample}")
        self.mask_channels = mask_channels
        self.num_heads = num_heads
        self.num_points = num_points
        self.upsample_factor = int(upsample)
        self.pos_embed = pos_embed

    @property
    def param_dim(self) -> int:
        """D = (C+1)(3·M·K+1): length of one instance's parameter vector (441 by default)."""
        return (self.mask_channels + 1) * (3 * self.num_heads * self.num_points + 1)

    def forward(
        self,
        fmask: torch.Tensor,
        valid_hw: torch.Tensor,
        params: torch.Tensor,
        img_idx: torch.Tensor,
        centers: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Stride-8 mask logits of T instances of any images, in one fused call.

        Args:
            fmask: (B, H, W, C) mask features (channels last); padded pixels need not be zero.
            valid_hw: (B, 2) valid rows/cols of each image at this stride.
            params: (T, D) generated parameters.
            img_idx: (T,) int64 image of each instance.
            centers: (T, 2) (cx, cy) of each instance's box, normalised by its unpadded image
                size; detached (no gradient reaches the boxes through the PE).

        Returns:
            (T, H, W) logits.
        """
        from solq_d2.layers.soit_dyn_attn import soit_dyn_attn

        if fmask.dim() != 4 or fmask.shape[-1] != self.mask_channels:
            raise ValueError(
                f"SOIT mask features must be (B, H, W, {self.mask_channels}), "
                f"got {tuple(fmask.shape)}"
            )
        if params.dim() != 2 or params.shape[1] != self.param_dim:
            raise ValueError(
                f"SOIT mask parameters must be (T, {self.param_dim}), got {tuple(params.shape)}"
            )
        T = params.shape[0]
        if centers is None or self.pos_embed == "abs":
            centers = params.new_zeros(T, 2)
        return soit_dyn_attn(
            fmask,
            valid_hw,
            params,
            img_idx,
            centers.detach(),
            num_heads=self.num_heads,
            num_points=self.num_points,
            pos_embed=self.pos_embed != "none",
        )

    def upsample(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, H, W) stride-8 logits -> (T, f*H, f*W) logits at stride 8/f (aligned bilinear)."""
        return aligned_bilinear(logits[:, None], self.upsample_factor)[:, 0]

    def extra_repr(self) -> str:
        return (
            f"mask_channels={self.mask_channels}, num_heads={self.num_heads}, "
            f"num_points={self.num_points}, param_dim={self.param_dim}, "
            f"upsample={self.upsample_factor}, pos_embed={self.pos_embed!r}"
        )
