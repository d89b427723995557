"""SOIT losses: the DETR set losses plus dice and BCE mask losses on the decoder layers."""

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..criterion import SetCriterion
from .dynamic_head import SOITDynamicMaskHead

__all__ = ["SOITSetCriterion", "soft_mask_targets", "stride2_padding"]


def soft_mask_targets(masks: torch.Tensor, size) -> torch.Tensor:
    """GT masks zero-padded to the batch canvas -> soft targets at the mask-loss resolution.

    opera resizes the padded bitmasks bilinearly with ``align_corners=True`` (values in [0, 1]).

    Args:
        masks: (N, Hp, Wp) bool / float masks on the padded canvas.
        size: (H', W') target size (the stride-2 map: 4*h3 x 4*w3).

    Returns:
        (N, H', W') float32.
    """
    if masks.shape[0] == 0:
        return masks.new_zeros((0,) + tuple(size), dtype=torch.float32)
    m = masks[None].to(torch.float32)
    return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=True)[0]


def stride2_padding(padding_s8: torch.Tensor, factor: int) -> torch.Tensor:
    """Padding mask of the upsampled map as opera computes it: bilinear (``align_corners=True``)
    upsampling of the stride-8 mask; any non-zero value counts as padding.

    Args:
        padding_s8: (B, h, w) bool, True on padding.

    Returns:
        (B, factor*h, factor*w) bool.
    """
    h, w = padding_s8.shape[-2:]
    m = F.interpolate(
        padding_s8[:, None].float(),
        size=(factor * h, factor * w),
        mode="bilinear",
        align_corners=True,
    )
    return m[:, 0] != 0


class SOITSetCriterion(SetCriterion):
    """:class:`SetCriterion` (focal, L1, GIoU on every decoder layer and the encoder proposals)
    plus SOIT's mask losses on the last ``mask_loss_layers`` decoder layers.

    The mask losses reuse each layer's Hungarian assignment (opera re-runs the same assigner).
    All matched instances of all images and layers go through the dynamic head in one call; their
    stride-8 logits are upsampled (aligned bilinear) and compared with the soft GT masks:

    * ``loss_dice``: Σ_instances [1 - 2Σpt / (Σp² + Σt² + 1e-5)] / num_boxes, p = sigmoid;
    * ``loss_bce``: Σ_instances Σ_pixels BCE(p, t) / (#non-padded pixels of its image) / num_boxes.

    With ``valid_only=False`` (opera) both sums run over all pixels of the padded canvas (the
    BCE denominator still counts non-padded pixels only); ``valid_only=True`` restricts both to
    the non-padded pixels.

    Extra ``outputs`` keys: ``pred_params`` (B, Q, D) in every decoder-layer dict,
    ``mask_features`` (B, h, w, C), ``mask_valid_hw`` (B, 2), ``mask_padding`` (B, h, w) bool.
    Extra ``targets`` key: ``masks`` (N_i, Hp, Wp) GT masks on the padded canvas.

    Args:
        mask_head: the dynamic head (no weights; shared with the model).
        mask_loss_layers: number of last decoder layers with mask losses.
        valid_only: padding handling, see above.
        other args: :class:`SetCriterion`.
    """

    def __init__(
        self,
        *,
        mask_head: SOITDynamicMaskHead,
        mask_loss_layers: int = 6,
        valid_only: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # a plain attribute: the head has no weights and already belongs to the model
        self.__dict__["mask_head"] = mask_head
        self.mask_loss_layers = mask_loss_layers
        self.valid_only = valid_only

    def prepare_mask_targets(self, outputs: Dict, targets: List[Dict]) -> List[Dict]:
        """Add ``soft_masks`` (N_i, f*h, f*w) to every target (computed once for all layers)."""
        h, w = outputs["mask_features"].shape[1:3]
        f = self.mask_head.upsample_factor
        out = []
        for t in targets:
            t = dict(t)
            if "soft_masks" not in t:
                t["soft_masks"] = soft_mask_targets(t["masks"], (f * h, f * w))
            out.append(t)
        return out

    def match(self, outputs: Dict, targets: List[Dict]) -> Dict:
        """:meth:`SetCriterion.match`; the mask features are visible to every decoder layer's
        matching (needed by a mask-aware matcher)."""
        ctx = {k: outputs[k] for k in ("mask_features", "mask_valid_hw") if k in outputs}
        aux = [dict(a, **ctx) for a in outputs.get("aux_outputs", [])]
        return super().match(dict(outputs, aux_outputs=aux), targets)

    def forward(
        self, outputs: Dict, targets: List[Dict], indices: Optional[Dict] = None
    ) -> Dict[str, torch.Tensor]:
        """Unweighted losses: those of :class:`SetCriterion` plus ``loss_dice``/``loss_bce``
        (suffixed ``_{i}`` for the auxiliary layers)."""
        targets = self.prepare_mask_targets(outputs, targets)
        if indices is None:
            indices = self.match(outputs, targets)
        losses = super().forward(outputs, targets, indices)
        num_boxes = self.compute_num_boxes(targets, outputs["pred_logits"].device)
        losses.update(self.mask_losses(outputs, targets, indices, num_boxes))
        return losses

    def mask_losses(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        aux = outputs.get("aux_outputs", [])
        layers = [(f"_{i}", o) for i, o in enumerate(aux)] + [("", outputs)]
        layers = layers[max(0, len(layers) - self.mask_loss_layers) :]
        if not layers:
            return {}
        fmask = outputs["mask_features"]
        # gather the matched instances of every layer: params, box centres, image, GT mask
        params, centers, img_idx, gt_idx, counts = [], [], [], [], []
        offsets = torch.cumsum(
            torch.as_tensor([0] + [len(t["labels"]) for t in targets[:-1]]), 0
        ).to(fmask.device)
        for suffix, out in layers:
            b, src = self._src_permutation_idx(indices[suffix])
            b, src = b.to(fmask.device), src.to(fmask.device)
            tgt = torch.cat([j for _, j in indices[suffix]]).to(fmask.device)
            params.append(out["pred_params"][b, src])
            centers.append(out["pred_boxes"][b, src, :2].detach())
            img_idx.append(b)
            gt_idx.append(offsets[b] + tgt)
            counts.append(len(b))
        params, centers = torch.cat(params), torch.cat(centers)
        img_idx, gt_idx = torch.cat(img_idx), torch.cat(gt_idx)

        if params.shape[0] == 0:
            # no positives anywhere: keep every mask parameter in the graph (DDP), value 0
            zero = 0.0 * (fmask.sum() + sum(o["pred_params"].sum() for _, o in layers))
            losses = {}
            for suffix, _ in layers:
                losses[f"loss_dice{suffix}"] = zero
                losses[f"loss_bce{suffix}"] = zero
            return losses

        logits = self.mask_head(fmask, outputs["mask_valid_hw"], params, img_idx, centers)
        logits = self.mask_head.upsample(logits).flatten(1)  # (T, P) at stride 8 / factor
        soft = torch.cat([t["soft_masks"] for t in targets])[gt_idx].flatten(1)
        pad = stride2_padding(outputs["mask_padding"], self.mask_head.upsample_factor)
        valid = (~pad).flatten(1).to(logits.dtype)  # (B, P)
        n_valid = valid.sum(1).clamp(min=1)

        losses = {}
        for (suffix, _), x, t, b in zip(
            layers, logits.split(counts), soft.split(counts), img_idx.split(counts)
        ):
            p = x.sigmoid()
            bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
            if self.valid_only:
                v = valid[b]
                p, t, bce = p * v, t * v, bce * v
            dice = 1 - 2 * (p * t).sum(1) / ((p * p).sum(1) + (t * t).sum(1) + 1e-5)
            losses[f"loss_dice{suffix}"] = dice.sum() / num_boxes
            losses[f"loss_bce{suffix}"] = (bce.sum(1) / n_valid[b]).sum() / num_boxes
        return losses
