"""SOIT's mask encoder: the stride-8 mask features F_mask from the encoder memory (SOIT §3.3)."""

import torch
from torch import nn

from ..transformer import DeformableTransformerEncoderLayer, encoder_reference_points

__all__ = ["SOITMaskEncoder"]


class SOITMaskEncoder(nn.Module):
    """Deformable encoder layer(s) on the stride-8 level of the encoder memory, then
    ``LayerNorm(Linear(d -> C_mask))`` (opera ``seg_encoder`` + ``mask_trans`` + ``mask_trans_norm``).

    The layers attend to that single level only (single-level deformable attention, 1 head and
    4 points in the authors' model), with the level's sine PE plus its level embedding as query
    PE and its pixel centres (scaled by the level's valid ratio) as reference points. No
    activation follows the LayerNorm.

    Args:
        d_model: channels d of the memory.
        mask_channels: C_mask.
        num_layers: encoder layers (0 = project the memory directly).
        n_heads, n_points: deformable attention heads and points.
        d_ffn, dropout, activation: FFN of each layer.
        msda_impl: "auto" or "pytorch".
    """

    def __init__(
        self,
        d_model: int = 256,
        mask_channels: int = 8,
        num_layers: int = 1,
        n_heads: int = 1,
        n_points: int = 4,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        msda_impl: str = "auto",
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableTransformerEncoderLayer(
                d_model=d_model,
                d_ffn=d_ffn,
                dropout=dropout,
                activation=activation,
                n_levels=1,
                n_heads=n_heads,
                n_points=n_points,
                msda_impl=msda_impl,
            )
            for _ in range(num_layers)
        )
        self.output_proj = nn.Linear(d_model, mask_channels)
        self.output_norm = nn.LayerNorm(mask_channels)
        self.mask_channels = mask_channels

    def forward(
        self,
        memory: torch.Tensor,
        pos: torch.Tensor,
        padding_mask: torch.Tensor,
        spatial_shape: torch.Tensor,
        valid_ratio: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            memory: (B, h*w, d) encoder memory of the stride-8 level.
            pos: (B, h*w, d) its sine PE + level embedding.
            padding_mask: (B, h*w) bool, True on padding.
            spatial_shape: (1, 2) int64 (h, w).
            valid_ratio: (B, 1, 2) valid ratio of the level.

        Returns:
            (B, h, w, C_mask) mask features F_mask.
        """
        h, w = (int(s) for s in spatial_shape[0])
        if memory.shape[1] != h * w:
            raise ValueError(f"mask encoder: memory has {memory.shape[1]} tokens, expected {h * w}")
        x = memory
        if len(self.layers):
            ref = encoder_reference_points([(h, w)], valid_ratio)
            start = spatial_shape.new_zeros(1)
            for layer in self.layers:
                x = layer(x, pos, ref, spatial_shape, start, padding_mask)
        x = self.output_norm(self.output_proj(x))
        return x.view(x.shape[0], h, w, self.mask_channels)
