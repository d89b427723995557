"""Two-stage Deformable DETR: one fixed proposal per encoder token, and the sine embedding of the
selected proposals (used by SOIT; optional for SOLQ)."""

import math
from typing import Sequence, Tuple

import torch

__all__ = ["encoder_output_proposals", "proposal_pos_embed"]


def encoder_output_proposals(
    memory: torch.Tensor,
    memory_padding_mask: torch.Tensor,
    spatial_shapes: Sequence[Sequence[int]],
    min_valid: float = 0.01,
    max_valid: float = 0.99,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed proposals at every encoder token and the memory with invalid tokens zeroed.

    Token (i, j) of level l gets the box ``((j + 0.5) / valid_W_l, (i + 0.5) / valid_H_l,
    0.05 * 2**l, 0.05 * 2**l)`` (normalised cxcywh). A proposal is invalid when a coordinate is
    outside ``(min_valid, max_valid)`` or the token is padding; invalid proposals are ``+inf`` in
    inverse-sigmoid space and their memory is set to 0 (Deformable DETR / mmdet
    ``gen_encoder_output_proposals``).

    Args:
        memory: (B, S, C) encoder output.
        memory_padding_mask: (B, S) bool, True on padding.
        spatial_shapes: (H_l, W_l) per level (python ints).

    Returns:
        output_memory: (B, S, C) memory with padded / invalid tokens set to 0 (before the
            ``enc_output`` Linear + LayerNorm, which the caller applies).
        output_proposals: (B, S, 4) proposals in inverse-sigmoid space (+inf when invalid).
    """
    B = memory.shape[0]
    proposals = []
    start = 0
    for lvl, (H, W) in enumerate(spatial_shapes):
        mask_l = memory_padding_mask[:, start : start + H * W].view(B, H, W)
        valid_H = torch.sum(~mask_l[:, :, 0], 1)
        valid_W = torch.sum(~mask_l[:, 0, :], 1)
        ys = torch.linspace(0, H - 1, H, dtype=torch.float32, device=memory.device)
        xs = torch.linspace(0, W - 1, W, dtype=torch.float32, device=memory.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_W.unsqueeze(-1), valid_H.unsqueeze(-1)], 1).view(B, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(B, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
        proposals.append(torch.cat((grid, wh), -1).view(B, -1, 4))
        start += H * W
    output_proposals = torch.cat(proposals, 1)
    valid = ((output_proposals > min_valid) & (output_proposals < max_valid)).all(-1, keepdim=True)
    output_proposals = torch.log(output_proposals / (1 - output_proposals))
    output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
    output_proposals = output_proposals.masked_fill(~valid, float("inf"))
    output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
    output_memory = output_memory.masked_fill(~valid, 0.0)
    return output_memory, output_proposals


def proposal_pos_embed(
    proposals: torch.Tensor,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
) -> torch.Tensor:
    """Sine embedding of proposal boxes given in inverse-sigmoid space.

    The boxes are **activated** first (``sigmoid``), multiplied by ``scale``, and each of the four
    coordinates (cx, cy, w, h, in that order) gets ``num_pos_feats`` channels interleaving
    ``sin`` (even channels) and ``cos`` (odd channels) of ``x / temperature**(2*(k//2)/F)``
    (Deformable DETR / mmdet ``get_proposal_pos_embed``; the SOIT fixture README point 1).

    Args:
        proposals: (B, Q, 4) unactivated boxes.

    Returns:
        (B, Q, 4 * num_pos_feats).
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = proposals.sigmoid() * scale
    pos = pos[:, :, :, None] / dim_t
    return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)
