"""Deformable DETR transformer shared by SOLQ and SOIT: encoder, decoder with (optional)
iterative box refinement, and the (optional) two-stage query selection.

Prediction heads stay in the meta-architecture; the transformer receives them as arguments:
the per-layer box heads (``bbox_embed``) for refinement and the encoder-proposal heads
(``enc_class_embed``, ``enc_bbox_embed``) for two-stage. Everything a method needs downstream
(memory, masks, shapes, valid ratios, the encoder PE, proposals and top-k indices) is returned in
:class:`DeformableTransformerOutput`.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from detectron2.config import configurable
from torch import nn

from solq_d2.layers import MSDeformAttn

from .layers import DeformableTransformerDecoderLayer, DeformableTransformerEncoderLayer
from .two_stage import encoder_output_proposals, proposal_pos_embed
from .utils import encoder_reference_points, flatten_levels, get_valid_ratio, inverse_sigmoid

__all__ = [
    "DeformableTransformer",
    "DeformableTransformerEncoder",
    "DeformableTransformerDecoder",
    "DeformableTransformerOutput",
]

BoxHead = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DeformableTransformerOutput:
    """What :meth:`DeformableTransformer.forward` returns (B images, Q queries, S tokens,
    L_dec decoder layers, d channels, K encoder-proposal classes).

    Attributes:
        hs: (L_dec, B, Q, d) decoder output of every layer.
        pred_boxes: (L_dec, B, Q, 4) normalised cxcywh boxes of every layer,
            ``sigmoid(bbox_embed[k](hs[k]) + inverse_sigmoid(ref_k))`` (only the first two
            coordinates get the reference when it is a point); differentiable (the reference
            itself is detached after layer 0, as in Deformable DETR). None without ``bbox_embed``.
        init_reference: (B, Q, 2) points (single-stage) or (B, Q, 4) boxes (two-stage): the
            reference of decoder layer 0.
        inter_references: (L_dec, B, Q, 2 or 4) detached reference after each layer (the input
            reference of the next layer; equal to ``pred_boxes`` with box refinement).
        memory: (B, S, d) encoder output.
        mask_flatten: (B, S) bool, True on padding.
        lvl_pos_embed_flatten: (B, S, d) sine PE + level embedding of every token.
        spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64;
        valid_ratios: (B, L, 2) (valid_W / W_l, valid_H / H_l).
        enc_outputs_class: (B, S, K) encoder-proposal logits (two-stage only).
        enc_outputs_coord: (B, S, 4) sigmoid encoder-proposal boxes (two-stage only; exactly 1.0
            for invalid tokens, whose proposal is +inf).
        enc_topk_indices: (B, Q) token index of each query (two-stage only).
    """

    hs: torch.Tensor
    pred_boxes: Optional[torch.Tensor]
    init_reference: torch.Tensor
    inter_references: torch.Tensor
    memory: torch.Tensor
    mask_flatten: torch.Tensor
    lvl_pos_embed_flatten: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor
    enc_outputs_class: Optional[torch.Tensor] = None
    enc_outputs_coord: Optional[torch.Tensor] = None
    enc_topk_indices: Optional[torch.Tensor] = None


class DeformableTransformerEncoder(nn.Module):
    """``num_layers`` :class:`DeformableTransformerEncoderLayer` (``layer_kwargs`` each)."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableTransformerEncoderLayer(**layer_kwargs) for _ in range(num_layers)
        )
        self.num_layers = num_layers

    def forward(
        self, src, spatial_shapes_list, spatial_shapes, level_start_index, valid_ratios, pos, mask
    ):
        """
        Args:
            src: (B, S, d); spatial_shapes_list: python (H_l, W_l) pairs; spatial_shapes: the same
                as an (L, 2) int64 tensor; level_start_index: (L,); valid_ratios: (B, L, 2);
                pos: (B, S, d); mask: (B, S) bool.

        Returns:
            (B, S, d) memory.
        """
        reference_points = encoder_reference_points(spatial_shapes_list, valid_ratios)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, level_start_index, mask)
        return out


class DeformableTransformerDecoder(nn.Module):
    """``num_layers`` :class:`DeformableTransformerDecoderLayer` with box prediction per layer.

    Args:
        num_layers: decoder layers.
        box_refine: feed each layer's (detached) predicted box to the next layer as its reference
            (Deformable DETR "iterative bounding box refinement").
        layer_kwargs: arguments of every layer.
    """

    def __init__(self, num_layers: int, box_refine: bool = False, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableTransformerDecoderLayer(**layer_kwargs) for _ in range(num_layers)
        )
        self.num_layers = num_layers
        self.box_refine = box_refine

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        memory,
        spatial_shapes,
        level_start_index,
        valid_ratios,
        mask,
        bbox_embed: Optional[Sequence[BoxHead]] = None,
    ):
        """
        Args:
            tgt, query_pos: (B, Q, d); reference_points: (B, Q, 2) or (B, Q, 4) normalised to
                the valid image region; memory: (B, S, d); valid_ratios: (B, L, 2);
                mask: (B, S) bool; bbox_embed: ``num_layers`` box heads (d -> 4 deltas in
                inverse-sigmoid space) or None.

        Returns:
            hs (L_dec, B, Q, d), boxes (L_dec, B, Q, 4) or None, references (L_dec, B, Q, 2|4).
        """
        if self.box_refine and bbox_embed is None:
            raise ValueError("box refinement needs the per-layer box heads (bbox_embed)")
        if bbox_embed is not None and len(bbox_embed) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} box heads, got {len(bbox_embed)}")
        out = tgt
        hs, boxes, refs = [], [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ratios = torch.cat([valid_ratios, valid_ratios], -1)
            else:
                ratios = valid_ratios
            ref_input = reference_points[:, :, None] * ratios[:, None]
            out = layer(out, query_pos, ref_input, memory, spatial_shapes, level_start_index, mask)
            hs.append(out)
            if bbox_embed is not None:
                delta = bbox_embed[lid](out)
                ref_unact = inverse_sigmoid(reference_points)
                if reference_points.shape[-1] == 4:
                    box = (delta + ref_unact).sigmoid()
                else:
                    box = torch.cat([delta[..., :2] + ref_unact, delta[..., 2:]], -1).sigmoid()
                boxes.append(box)
                if self.box_refine:
                    reference_points = box.detach()
            refs.append(reference_points)
        boxes = torch.stack(boxes) if boxes else None
        return torch.stack(hs), boxes, torch.stack(refs)


class DeformableTransformer(nn.Module):
    """Deformable DETR encoder-decoder (post-norm), optionally two-stage.

    Parameter names are Deformable DETR's: ``level_embed``, ``encoder.layers.*``,
    ``decoder.layers.*``, ``reference_points`` (single-stage), ``enc_output``,
    ``enc_output_norm``, ``pos_trans``, ``pos_trans_norm`` (two-stage).

    Args:
        d_model: channels d (SOLQ released models: 384; Deformable DETR / SOIT: 256).
        nhead: attention heads M.
        num_encoder_layers, num_decoder_layers: layer counts.
        dim_feedforward: FFN hidden size.
        dropout: dropout probability everywhere.
        activation: FFN activation.
        num_feature_levels: L.
        enc_n_points, dec_n_points: MSDA sampling points per head and level.
        box_refine: iterative box refinement in the decoder.
        two_stage: queries from the top-scoring encoder proposals instead of learned embeddings.
        two_stage_num_proposals: number of proposals kept (= number of queries) in two-stage.
        msda_impl: "auto" or "pytorch" (``MODEL.MSDA.IMPL``).
    """

    @configurable
    def __init__(
        self,
        *,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        box_refine: bool = False,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
        msda_impl: str = "auto",
    ):
        super().__init__()
        if d_model % 2 != 0:
            raise ValueError(f"d_model must be even (sine position encoding), got {d_model}")
        self.d_model = d_model
        self.nhead = nhead
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        common = dict(
            d_model=d_model,
            d_ffn=dim_feedforward,
            dropout=dropout,
            activation=activation,
            n_levels=num_feature_levels,
            n_heads=nhead,
            msda_impl=msda_impl,
        )
        self.encoder = DeformableTransformerEncoder(
            num_encoder_layers, n_points=enc_n_points, **common
        )
        self.decoder = DeformableTransformerDecoder(
            num_decoder_layers, box_refine=box_refine, n_points=dec_n_points, **common
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    @classmethod
    def from_config(cls, cfg):
        t = cfg.MODEL.DEFORMABLE_TRANSFORMER
        return {
            "d_model": t.HIDDEN_DIM,
            "nhead": t.NHEADS,
            "num_encoder_layers": t.ENC_LAYERS,
            "num_decoder_layers": t.DEC_LAYERS,
            "dim_feedforward": t.DIM_FEEDFORWARD,
            "dropout": t.DROPOUT,
            "activation": t.ACTIVATION,
            "num_feature_levels": t.NUM_FEATURE_LEVELS,
            "enc_n_points": t.ENC_N_POINTS,
            "dec_n_points": t.DEC_N_POINTS,
            "box_refine": t.WITH_BOX_REFINE,
            "two_stage": t.TWO_STAGE,
            "two_stage_num_proposals": t.TWO_STAGE_NUM_PROPOSALS,
            "msda_impl": cfg.MODEL.MSDA.IMPL,
        }

    @property
    def num_decoder_layers(self) -> int:
        return self.decoder.num_layers

    def _reset_parameters(self):
        """Deformable DETR init: xavier on every matrix, MSDA reset, xavier reference points,
        N(0, 1) level embeddings."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: List[torch.Tensor],
        masks: List[torch.Tensor],
        pos_embeds: List[torch.Tensor],
        query_embed: Optional[torch.Tensor] = None,
        bbox_embed: Optional[Sequence[BoxHead]] = None,
        enc_class_embed: Optional[BoxHead] = None,
        enc_bbox_embed: Optional[BoxHead] = None,
    ) -> DeformableTransformerOutput:
        """
        Args:
            srcs: L maps (B, d, H_l, W_l) from the input projection.
            masks: L bool padding masks (B, H_l, W_l), True on padding.
            pos_embeds: L position encodings (B, d, H_l, W_l).
            query_embed: (Q, 2d) learned queries, ``[:, :d]`` positional and ``[:, d:]`` content
                (single-stage; ignored in two-stage).
            bbox_embed: one box head per decoder layer (needed for box refinement and for
                ``pred_boxes``).
            enc_class_embed, enc_bbox_embed: encoder-proposal heads (two-stage): the top
                ``two_stage_num_proposals`` tokens by ``enc_class_embed(.)[..., 0]`` become the
                queries.

        Returns:
            :class:`DeformableTransformerOutput`.
        """
        if not (len(srcs) == len(masks) == len(pos_embeds) == self.num_feature_levels):
            raise ValueError(
                f"expected {self.num_feature_levels} levels of srcs/masks/pos_embeds, got "
                f"{len(srcs)}/{len(masks)}/{len(pos_embeds)}"
            )
        shapes_list = [tuple(int(s) for s in src.shape[-2:]) for src in srcs]
        device = srcs[0].device
        src_flatten = flatten_levels(srcs)
        mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)
        lvl_pos_embed_flatten = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                for lvl, p in enumerate(pos_embeds)
            ],
            1,
        )
        spatial_shapes = torch.as_tensor(shapes_list, dtype=torch.long, device=device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        valid_ratios = torch.stack([get_valid_ratio(m) for m in masks], 1)

        memory = self.encoder(
            src_flatten,
            shapes_list,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            lvl_pos_embed_flatten,
            mask_flatten,
        )

        B, S, d = memory.shape
        enc_class = enc_coord = topk_idx = None
        if self.two_stage:
            if enc_class_embed is None or enc_bbox_embed is None:
                raise ValueError("two-stage needs enc_class_embed and enc_bbox_embed")
            k = self.two_stage_num_proposals
            if S < k:
                raise ValueError(
                    f"two-stage selects {k} proposals but the feature maps have only {S} tokens "
                    "(image too small): use larger inputs or a smaller TWO_STAGE_NUM_PROPOSALS"
                )
            out_memory, out_proposals = encoder_output_proposals(memory, mask_flatten, shapes_list)
            out_memory = self.enc_output_norm(self.enc_output(out_memory))
            enc_class = enc_class_embed(out_memory)
            enc_coord_unact = enc_bbox_embed(out_memory) + out_proposals
            topk_idx = torch.topk(enc_class[..., 0], k, dim=1)[1]
            topk_coords_unact = torch.gather(
                enc_coord_unact, 1, topk_idx.unsqueeze(-1).expand(-1, -1, 4)
            ).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(
                self.pos_trans(proposal_pos_embed(topk_coords_unact, num_pos_feats=d // 2))
            )
            query_pos, tgt = torch.split(pos_trans_out, d, dim=2)
            enc_coord = enc_coord_unact.sigmoid()
        else:
            if query_embed is None:
                raise ValueError("single-stage DeformableTransformer needs query_embed (Q, 2d)")
            if query_embed.dim() != 2 or query_embed.shape[1] != 2 * d:
                raise ValueError(
                    f"query_embed must be (Q, {2 * d}), got {tuple(query_embed.shape)}"
                )
            query_pos, tgt = torch.split(query_embed, d, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(B, -1, -1)
            tgt = tgt.unsqueeze(0).expand(B, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        init_reference = reference_points

        hs, boxes, inter_refs = self.decoder(
            tgt,
            query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            mask_flatten,
            bbox_embed=bbox_embed,
        )
        return DeformableTransformerOutput(
            hs=hs,
            pred_boxes=boxes,
            init_reference=init_reference,
            inter_references=inter_refs,
            memory=memory,
            mask_flatten=mask_flatten,
            lvl_pos_embed_flatten=lvl_pos_embed_flatten,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            enc_outputs_class=enc_class,
            enc_outputs_coord=enc_coord,
            enc_topk_indices=topk_idx,
        )
