"""QueryInst's dynamic mask head (mmdet ``DynamicMaskHead``)."""

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ConvTranspose2d, get_norm
from torch import nn

from .dynamic_conv import DynamicConv

__all__ = ["DynamicMaskHead"]


class DynamicMaskHead(nn.Module):
    """DynConv^mask (no projection, no residual) on 14x14 RoI features, then 4 x [3x3 conv (with
    bias) + norm + ReLU], a 2x2 stride-2 deconvolution + ReLU and a 1x1 conv to K class-specific
    mask logits (28 x 28).

    Names follow Detectron2's ``MaskRCNNConvUpsampleHead`` (``mask_fcn{i}``, ``deconv``,
    ``predictor``); the dynamic conv is ``dynamic_conv``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        hidden_dim: int = 256,
        dynamic_dim: int = 64,
        pooler_resolution: int = 14,
        num_convs: int = 4,
        conv_dim: int = 256,
        norm: str = "BN",
    ):
        """
        Args:
            num_classes: K, number of class-specific mask channels.
            hidden_dim: C, channels of queries and RoI features.
            dynamic_dim: D of the dynamic conv.
            pooler_resolution: side of the mask RoI features (14).
            num_convs: convs of the FCN.
            conv_dim: channels of the FCN convs and the deconvolution.
            norm: Detectron2 norm name for the FCN convs ("BN" official, "" none).
        """
        super().__init__()
        self.dynamic_conv = DynamicConv(hidden_dim, dynamic_dim, pooler_resolution, False)
        self.conv_norm_relus = []
        in_channels = hidden_dim
        for k in range(num_convs):
            conv = Conv2d(
                in_channels,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=True,  # official FCNMaskHead keeps the bias in front of BN
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            self.add_module(f"mask_fcn{k + 1}", conv)
            self.conv_norm_relus.append(conv)
            in_channels = conv_dim
        self.deconv = ConvTranspose2d(in_channels, conv_dim, kernel_size=2, stride=2)
        self.predictor = Conv2d(conv_dim, num_classes, kernel_size=1)

    def forward(self, roi_features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """
        Args:
            roi_features: (R, C, S, S) mask RoI features.
            queries: (R, C) the stage's attention queries q* of those RoIs.

        Returns:
            (R, K, 2S, 2S) mask logits.
        """
        x = self.dynamic_conv(queries, roi_features)  # (R, S*S, C)
        x = x.transpose(1, 2).reshape(roi_features.shape)
        for layer in self.conv_norm_relus:
            x = layer(x)
        x = F.relu(self.deconv(x))
        return self.predictor(x)
