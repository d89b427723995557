"""Post-norm deformable encoder and decoder layers (Deformable DETR).

Parameter names follow Deformable DETR (and so the official SOLQ checkpoints):
encoder ``self_attn, norm1, linear1, linear2, norm2``; decoder ``cross_attn, norm1, self_attn,
norm2, linear1, linear2, norm3``.
"""

from typing import Optional

import torch
from torch import nn

from solq_d2.layers import MSDeformAttn

from .utils import get_activation_fn

__all__ = ["DeformableTransformerEncoderLayer", "DeformableTransformerDecoderLayer"]


def _with_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


class DeformableTransformerEncoderLayer(nn.Module):
    """``x = LN1(x + Drop(MSDA(x + pos, ref, x)))``; ``x = LN2(x + Drop(W2 Drop(act(W1 x))))``.

    Args:
        d_model: channels d.
        d_ffn: FFN hidden size.
        dropout: dropout probability (attention output and FFN).
        activation: FFN activation name.
        n_levels, n_heads, n_points: MSDA levels L, heads M, points per head and level P.
        msda_impl: "auto" or "pytorch" (see :class:`solq_d2.layers.MSDeformAttn`).
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        msda_impl: str = "auto",
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=msda_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = get_activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """
        Args:
            src: (B, S, d) tokens; pos: (B, S, d) positional + level embedding.
            reference_points: (B, S, L, 2); spatial_shapes: (L, 2) int64;
            level_start_index: (L,) int64; padding_mask: (B, S) bool (True on padding) or None.

        Returns:
            (B, S, d)
        """
        src2 = self.self_attn(
            _with_pos(src, pos),
            reference_points,
            src,
            spatial_shapes,
            level_start_index,
            padding_mask,
        )
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerDecoderLayer(nn.Module):
    """Self-attention (``nn.MultiheadAttention``) -> ``norm2``; deformable cross-attention ->
    ``norm1``; FFN -> ``norm3`` (Deformable DETR's names and order).

    Args: as :class:`DeformableTransformerEncoderLayer`; the self-attention also uses ``dropout``.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        msda_impl: str = "auto",
    ):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=msda_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = get_activation_fn(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        memory,
        spatial_shapes,
        level_start_index,
        padding_mask,
    ):
        """
        Args:
            tgt: (B, Q, d) content queries; query_pos: (B, Q, d) positional queries.
            reference_points: (B, Q, L, 2) points or (B, Q, L, 4) boxes, already multiplied by
                the valid ratios.
            memory: (B, S, d) encoder output; the rest as in the encoder layer.

        Returns:
            (B, Q, d)
        """
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(
            q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1), need_weights=False
        )[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(
            _with_pos(tgt, query_pos),
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            padding_mask,
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))
