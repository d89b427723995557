"""Dynamic instance interaction ("DynamicConv" of Sparse R-CNN / QueryInst)."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DynamicConv"]


class DynamicConv(nn.Module):
    """Two per-query 1x1 convolutions whose weights are generated from the query.

    ``params = Linear(C -> 2*C*D)(q)`` gives ``W1`` (C x D) and ``W2`` (D x C); the RoI features
    (S*S positions x C) go through ``ReLU(LN_D(f @ W1))`` then ``ReLU(LN_C(f @ W2))``. With
    ``with_proj`` (box branch) the S*S*C result is flattened (position-major) and projected to C by
    ``ReLU(LN_C(Linear(S*S*C -> C)))``; without it (mask branch) the per-position features are
    returned.

    Parameter names follow Detectron2's Sparse R-CNN (``dynamic_layer``, ``norm1``, ``norm2``,
    ``out_layer``, ``norm3``); mmdet calls them ``dynamic_layer``, ``norm_in``, ``norm_out``,
    ``fc_layer``, ``fc_norm``.
    """

    def __init__(
        self, hidden_dim: int, dynamic_dim: int, pooler_resolution: int, with_proj: bool = True
    ):
        """
        Args:
            hidden_dim: C, channels of the queries and RoI features.
            dynamic_dim: D, width of the first generated 1x1 conv.
            pooler_resolution: S, side of the RoI feature map (only used with ``with_proj``).
            with_proj: add the flatten + Linear projection to C (box branch).
        """
        super().__init__()
        self.hidden_dim = hidden_dim
        self.dynamic_dim = dynamic_dim
        self.num_params = hidden_dim * dynamic_dim
        self.dynamic_layer = nn.Linear(hidden_dim, 2 * self.num_params)
        self.norm1 = nn.LayerNorm(dynamic_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.with_proj = with_proj
        if with_proj:
            self.out_layer = nn.Linear(hidden_dim * pooler_resolution**2, hidden_dim)
            self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(self, queries: torch.Tensor, roi_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            queries: (R, C), one query per RoI.
            roi_features: (R, C, S, S) pooled features.

        Returns:
            (R, C) with ``with_proj``, else (R, S*S, C) (position-major).
        """
        features = roi_features.flatten(2).transpose(1, 2)  # (R, S*S, C)
        params = self.dynamic_layer(queries)
        w1 = params[:, : self.num_params].view(-1, self.hidden_dim, self.dynamic_dim)
        w2 = params[:, self.num_params :].view(-1, self.dynamic_dim, self.hidden_dim)
        features = F.relu(self.norm1(torch.bmm(features, w1)))
        features = F.relu(self.norm2(torch.bmm(features, w2)))
        if self.with_proj:
            features = F.relu(self.norm3(self.out_layer(features.flatten(1))))
        return features
