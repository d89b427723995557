"""SOIT's prediction heads: per-layer class and box branches and the shared mask-parameter MLP."""

import math
from typing import Tuple

import torch
from torch import nn

from ..transformer import MLP

__all__ = ["SOITPredictionHeads"]


class SOITPredictionHeads(nn.Module):
    """Class, box and mask-parameter branches applied to every decoder layer (SOIT.md §5).

    * ``class_embed[k]``: ``Linear(d, K)`` for decoder layer k, bias initialised to the focal
      prior -log((1-0.01)/0.01); with two-stage one more (index ``num_layers``) scores the
      encoder proposals. Each layer has its own copy (opera clones them).
    * ``bbox_embed[k]``: MLP d -> d -> d -> 4 predicting inverse-sigmoid deltas, last layer
      zero-initialised (single-stage: the first layer's w/h bias -2); cloned like ``class_embed``.
    * ``param_embed``: MLP d -> d -> ... -> D predicting the instance's dynamic-layer parameters,
      **one module shared by all decoder layers** (opera ``seg_branches`` are aliases of one
      MLP); PyTorch default initialisation, as in opera.

    Args:
        hidden_dim: d.
        num_classes: K.
        num_layers: decoder layers.
        param_dim: D.
        param_hidden_layers: hidden Linear+ReLU layers of ``param_embed`` (opera: 2).
        two_stage: add the encoder-proposal branches.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_classes: int,
        num_layers: int,
        param_dim: int,
        param_hidden_layers: int = 2,
        two_stage: bool = True,
    ):
        super().__init__()
        n = num_layers + int(two_stage)
        self.num_layers = num_layers
        self.two_stage = two_stage
        self.class_embed = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(n))
        self.bbox_embed = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(n))
        self.param_embed = MLP(hidden_dim, hidden_dim, param_dim, param_hidden_layers + 1)
        self.reset_parameters()

    def reset_parameters(self):
        bias = -math.log((1 - 0.01) / 0.01)
        for m in self.class_embed:
            nn.init.constant_(m.bias, bias)
        for m in self.bbox_embed:
            nn.init.zeros_(m.layers[-1].weight)
            nn.init.zeros_(m.layers[-1].bias)
        if not self.two_stage:  # learned reference points: start from small boxes (opera, D-DETR)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

    @property
    def decoder_bbox_embed(self):
        """The box heads of the decoder layers (used for iterative refinement)."""
        return self.bbox_embed[: self.num_layers]

    def forward(self, hs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hs: (L, B, Q, d) decoder output of every layer.

        Returns:
            class logits (L, B, Q, K) and mask parameters (L, B, Q, D).
        """
        if hs.shape[0] != self.num_layers:
            raise ValueError(f"expected {self.num_layers} decoder layers, got {hs.shape[0]}")
        logits = torch.stack([self.class_embed[k](hs[k]) for k in range(self.num_layers)])
        return logits, self.param_embed(hs)
