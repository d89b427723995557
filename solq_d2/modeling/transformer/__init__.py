"""Deformable DETR transformer shared by SOLQ and SOIT (encoder, decoder with box refinement,
two-stage proposals) and its helpers."""

from .deformable_transformer import (
    DeformableTransformer,
    DeformableTransformerDecoder,
    DeformableTransformerEncoder,
    DeformableTransformerOutput,
)
from .layers import DeformableTransformerDecoderLayer, DeformableTransformerEncoderLayer
from .two_stage import encoder_output_proposals, proposal_pos_embed
from .utils import (
    MLP,
    encoder_reference_points,
    flatten_levels,
    get_activation_fn,
    get_valid_ratio,
    inverse_sigmoid,
)

__all__ = [
    "DeformableTransformer",
    "DeformableTransformerDecoder",
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "DeformableTransformerOutput",
    "MLP",
    "encoder_output_proposals",
    "encoder_reference_points",
    "flatten_levels",
    "get_activation_fn",
    "get_valid_ratio",
    "inverse_sigmoid",
    "proposal_pos_embed",
]
