"""Set criterion of the DETR family: per-layer Hungarian matching and per-layer losses.

Losses are methods ``loss_<name>(outputs, targets, indices, num_boxes) -> dict`` selected by
name (``losses=("labels", "boxes", ...)``); a subclass adds a loss by defining ``loss_<name>``
(SOLQ: ``loss_vectors``; SOIT: its mask losses) and listing it. Every decoder layer is matched
independently; keys of the auxiliary layers get the suffix ``_{i}`` and those of the two-stage
encoder proposals ``_enc`` (their targets are class-agnostic: every label becomes 0).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .losses import focal_loss, giou_box_loss, l1_box_loss, one_hot_without_background
from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "expand_weight_dict"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def expand_weight_dict(
    weight_dict: Dict[str, float], num_aux: int, with_enc: bool = False
) -> Dict[str, float]:
    """Copy the weights to the auxiliary-layer keys ``<name>_{i}`` (i < num_aux) and, when
    ``with_enc``, to the encoder-proposal keys ``<name>_enc``."""
    out = dict(weight_dict)
    for i in range(num_aux):
        out.update({f"{k}_{i}": v for k, v in weight_dict.items()})
    if with_enc:
        out.update({f"{k}_enc": v for k, v in weight_dict.items()})
    return out


class SetCriterion(nn.Module):
    """Hungarian-matched set losses on the last layer, every auxiliary layer and (optionally)
    the two-stage encoder proposals.

    Args:
        num_classes: K (sigmoid classes; no "no-object" logit).
        matcher: :class:`HungarianMatcher`.
        weight_dict: loss name -> weight, already expanded to the ``_{i}``/``_enc`` keys
            (:func:`expand_weight_dict`); used by :meth:`weighted`.
        losses: names of the losses on the decoder outputs (``loss_<name>`` methods).
        enc_losses: names of the losses on the encoder proposals (two-stage).
        focal_alpha, focal_gamma: focal loss parameters.
        box_format: format of predicted / target ``boxes`` ("cxcywh" normalised, or "xyxy").
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Dict[str, float],
        losses: Sequence[str] = ("labels", "boxes"),
        enc_losses: Sequence[str] = ("labels", "boxes"),
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_format: str = "cxcywh",
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = list(losses)
        self.enc_losses = list(enc_losses)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.box_format = box_format
        for name in set(self.losses) | set(self.enc_losses):
            if not callable(getattr(self, f"loss_{name}", None)):
                raise ValueError(f"{type(self).__name__} has no loss named {name!r}")

    # ---- losses -------------------------------------------------------------------------------
    def loss_labels(self, outputs, targets, indices, num_boxes):
        """Focal loss over all queries and classes; logs ``class_error`` and
        ``cardinality_error`` (not weighted)."""
        logits = outputs["pred_logits"]
        idx = self._src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)])
        K = logits.shape[2]  # num_classes, or fewer for class-agnostic encoder proposals
        target_classes = torch.full(logits.shape[:2], K, dtype=torch.int64, device=logits.device)
        target_classes[idx] = target_classes_o
        onehot = one_hot_without_background(target_classes, K).to(logits.dtype)
        losses = {
            "loss_ce": focal_loss(logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma)
        }
        with torch.no_grad():
            if target_classes_o.numel() > 0:
                correct = logits[idx].argmax(-1) == target_classes_o
                losses["class_error"] = 100.0 - 100.0 * correct.float().mean()
            else:
                losses["class_error"] = logits.new_tensor(100.0)
            # DETR's definition: queries whose arg-max class is not the last class.
            tgt_lengths = torch.as_tensor(
                [len(t["labels"]) for t in targets], device=logits.device, dtype=torch.float32
            )
            card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
            losses["cardinality_error"] = (card_pred - tgt_lengths).abs().mean()
        return losses

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 and GIoU losses of the matched boxes."""
        idx = self._src_permutation_idx(indices)
        src = outputs["pred_boxes"][idx]
        tgt = torch.cat([t["boxes"][J] for t, (_, J) in zip(targets, indices)]).to(src)
        return {
            "loss_bbox": l1_box_loss(src, tgt, num_boxes),
            "loss_giou": giou_box_loss(src, tgt, num_boxes, self.box_format),
        }

    # ---- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _src_permutation_idx(indices: Indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    @staticmethod
    def _tgt_permutation_idx(indices: Indices):
        batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
        tgt_idx = torch.cat([tgt for _, tgt in indices])
        return batch_idx, tgt_idx

    def compute_num_boxes(self, targets: List[Dict], device) -> float:
        """Number of target boxes in the batch, averaged over processes, at least 1."""
        n = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device
        )
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            if world > 1:
                dist.all_reduce(n)
        return torch.clamp(n / world, min=1).item()

    def get_loss(self, name, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        return getattr(self, f"loss_{name}")(outputs, targets, indices, num_boxes)

    def enc_targets(self, targets: List[Dict]) -> List[Dict]:
        """Class-agnostic targets of the encoder proposals: every label becomes 0."""
        out = []
        for t in targets:
            t = dict(t)
            t["labels"] = torch.zeros_like(t["labels"])
            out.append(t)
        return out

    def match(self, outputs: Dict, targets: List[Dict]) -> Dict[str, Indices]:
        """Indices for the last layer (key ""), each aux layer ("_{i}") and the encoder ("_enc"),
        computed with one host copy of all cost matrices."""
        sets: List[Tuple[str, Dict, List[Dict]]] = [("", outputs, targets)]
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            sets.append((f"_{i}", aux, targets))
        if "enc_outputs" in outputs:
            sets.append(("_enc", outputs["enc_outputs"], self.enc_targets(targets)))
        result: Dict[str, Indices] = {}
        # targets differ between decoder and encoder sets (labels): match the two groups apart
        dec = [s for s in sets if s[0] != "_enc"]
        for (suffix, _, _), ind in zip(dec, self.matcher.match_many([s[1] for s in dec], targets)):
            result[suffix] = ind
        for suffix, out, tg in sets:
            if suffix == "_enc":
                result[suffix] = self.matcher(out, tg)
        return result

    def forward(
        self, outputs: Dict, targets: List[Dict], indices: Optional[Dict[str, Indices]] = None
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4), other per-query
                predictions used by the losses, optional ``aux_outputs`` (list of such dicts,
                one per earlier decoder layer) and ``enc_outputs`` (two-stage proposals).
            targets: B dicts with ``labels`` (T_i,) int64, ``boxes`` (T_i, 4) and whatever the
                losses need.
            indices: precomputed matching (as returned by :meth:`match`); computed if None.

        Returns:
            Unweighted losses (and logged statistics), suffixed as described in the module doc.
        """
        device = outputs["pred_logits"].device
        num_boxes = self.compute_num_boxes(targets, device)
        if indices is None:
            indices = self.match(outputs, targets)
        losses: Dict[str, torch.Tensor] = {}
        for name in self.losses:
            losses.update(self.get_loss(name, outputs, targets, indices[""], num_boxes))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            for name in self.losses:
                ls = self.get_loss(name, aux, targets, indices[f"_{i}"], num_boxes)
                losses.update({f"{k}_{i}": v for k, v in ls.items()})
        if "enc_outputs" in outputs:
            enc_t = self.enc_targets(targets)
            for name in self.enc_losses:
                ls = self.get_loss(name, outputs["enc_outputs"], enc_t, indices["_enc"], num_boxes)
                losses.update({f"{k}_enc": v for k, v in ls.items()})
        return losses

    def weighted(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Losses multiplied by their weight; keys without a weight (logged stats) dropped."""
        return {k: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, losses={self.losses}, enc_losses={self.enc_losses},"
            f" focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"
        )
