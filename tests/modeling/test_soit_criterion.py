"""SOIT mask losses, padding conventions and the optional mask-aware matcher, on small synthetic
inputs checked against direct per-instance formulas (opera soit_head.loss_mask_single)."""

import pytest
import torch
import torch.nn.functional as F

from solq_d2.modeling.matcher import HungarianMatcher
from solq_d2.modeling.soit.criterion import SOITSetCriterion, soft_mask_targets, stride2_padding
from solq_d2.modeling.soit.dynamic_head import SOITDynamicMaskHead, aligned_bilinear
from solq_d2.modeling.soit.matcher import SOITHungarianMatcher

B, Q, K, H, W, C = 2, 6, 3, 5, 7, 8
HP, WP = 8 * H, 8 * W  # padded canvas (stride 8)
SIZES = [(HP, WP), (33, 41)]  # image 1 is padded


def _outputs(num_layers=3, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    head = SOITDynamicMaskHead()

    def layer():
        d = {
            "pred_logits": torch.randn(B, Q, K, generator=g),
            "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25,
            "pred_params": torch.randn(B, Q, head.param_dim, generator=g) * 0.5,
        }
        return {k: v.requires_grad_(requires_grad) for k, v in d.items()}

    layers = [layer() for _ in range(num_layers)]
    pad = torch.ones(B, H, W, dtype=torch.bool)
    for b, (h, w) in enumerate(SIZES):
        pad[b, : -(-h // 8), : -(-w // 8)] = False
    out = dict(layers[-1], aux_outputs=layers[:-1])
    out["mask_features"] = torch.randn(B, H, W, C, generator=g).requires_grad_(requires_grad)
    out["mask_padding"] = pad
    out["mask_valid_hw"] = torch.stack([(~pad[:, :, 0]).sum(1), (~pad[:, 0, :]).sum(1)], -1)
    return out


def _targets(counts=(2, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for (h, w), n in zip(SIZES, counts):
        masks = torch.zeros(n, HP, WP, dtype=torch.uint8)
        masks[:, :h, :w] = (torch.rand(n, h, w, generator=g) > 0.5).to(torch.uint8)
        boxes = torch.rand(n, 4, generator=g) * 0.4 + 0.3
        targets.append(
            {"labels": torch.randint(0, K, (n,), generator=g), "boxes": boxes, "masks": masks}
        )
    return targets


def _criterion(valid_only=False, mask_loss_layers=3, matcher=None):
    head = SOITDynamicMaskHead()
    weights = {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2, "loss_dice": 8, "loss_bce": 2}
    return SOITSetCriterion(
        num_classes=K,
        matcher=matcher or HungarianMatcher(2.0, 5.0, 2.0, focal_eps=1e-12),
        weight_dict={**weights, **{f"{k}_{i}": v for k, v in weights.items() for i in range(2)}},
        mask_head=head,
        mask_loss_layers=mask_loss_layers,
        valid_only=valid_only,
    )


def _reference_mask_losses(crit, outputs, targets, indices, suffix, valid_only):
    """Per image and instance, as opera: sigmoid of the aligned-x4 logits, soft targets, dice
    over all pixels, BCE summed and divided by the non-padded stride-2 pixels; / num_boxes."""
    layer = outputs if suffix == "" else outputs["aux_outputs"][int(suffix[1:])]
    head = crit.mask_head
    pad_s2 = (
        F.interpolate(
            outputs["mask_padding"][:, None].float(),
            scale_factor=4,
            mode="bilinear",
            align_corners=True,
        )[:, 0]
        != 0
    )
    dice = bce = 0.0
    for b, (src, tgt) in enumerate(indices[suffix]):
        for q, j in zip(src.tolist(), tgt.tolist()):
            logit = head(
                outputs["mask_features"],
                outputs["mask_valid_hw"],
                layer["pred_params"][b, q][None],
                torch.tensor([b]),
                layer["pred_boxes"][b, q, :2][None],
            )
            p = aligned_bilinear(logit[None], 4)[0, 0].sigmoid()
            t = F.interpolate(
                targets[b]["masks"][j][None, None].float(),
                size=p.shape,
                mode="bilinear",
                align_corners=True,
            )[0, 0]
            v = (~pad_s2[b]).float()
            if valid_only:
                p, t = p * v, t * v
            dice = dice + 1 - 2 * (p * t).sum() / ((p * p).sum() + (t * t).sum() + 1e-5)
            e = F.binary_cross_entropy(p, t, reduction="none")
            bce = bce + (e * v if valid_only else e).sum() / v.sum()
    n = sum(len(t["labels"]) for t in targets)
    return dice / n, bce / n


@pytest.mark.parametrize("valid_only", [False, True])
def test_mask_losses_match_per_instance_formulas(valid_only):
    crit = _criterion(valid_only=valid_only)
    outputs, targets = _outputs(), _targets()
    t = crit.prepare_mask_targets(outputs, targets)
    indices = crit.match(outputs, t)
    losses = crit(outputs, targets, indices)
    for suffix in ("", "_0", "_1"):
        dice, bce = _reference_mask_losses(crit, outputs, targets, indices, suffix, valid_only)
        torch.testing.assert_close(losses[f"loss_dice{suffix}"], dice, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses[f"loss_bce{suffix}"], bce, rtol=1e-5, atol=1e-6)
    # the padded image makes the two conventions differ
    other = _criterion(valid_only=not valid_only)(outputs, targets, indices)
    assert abs(other["loss_dice"] - losses["loss_dice"]) > 1e-4


def test_mask_loss_layers_and_weights():
    crit = _criterion(mask_loss_layers=1)
    losses = crit(_outputs(), _targets())
    assert {k for k in losses if "dice" in k or "bce" in k} == {"loss_dice", "loss_bce"}
    weighted = crit.weighted(losses)
    torch.testing.assert_close(weighted["loss_dice"], 8 * losses["loss_dice"])
    torch.testing.assert_close(weighted["loss_bce"], 2 * losses["loss_bce"])
    assert "class_error" not in weighted


def test_gradients_and_empty_images():
    crit = _criterion()
    # one image without objects: finite losses, gradients reach parameters and features
    outputs = _outputs(requires_grad=True)
    losses = crit(outputs, _targets(counts=(0, 2)))
    total = sum(crit.weighted(losses).values())
    assert torch.isfinite(total)
    total.backward()
    assert outputs["pred_params"].grad.abs().sum() > 0
    assert outputs["mask_features"].grad.abs().sum() > 0
    assert outputs["pred_params"].grad[0].abs().sum() == 0  # nothing matched in image 0
    # no objects at all: zero mask losses that still involve every mask input (DDP)
    outputs = _outputs(requires_grad=True)
    losses = crit(outputs, _targets(counts=(0, 0)))
    assert losses["loss_dice"] == 0 and losses["loss_bce_1"] == 0
    sum(crit.weighted(losses).values()).backward()
    assert outputs["pred_params"].grad is not None and outputs["mask_features"].grad is not None


def test_opera_padding_conventions():
    # fixture README point 4: the 349x453 image (stride 8: 44x57 valid of 48x64) has 175x227
    # non-padded stride-2 pixels for the BCE denominator, not 176x228
    pad = torch.ones(1, 48, 64, dtype=torch.bool)
    pad[0, :44, :57] = False
    assert (~stride2_padding(pad, 4)).sum() == 175 * 227
    masks = torch.zeros(1, 16, 16)
    masks[0, :7] = 1
    soft = soft_mask_targets(masks, (8, 8))
    assert soft.shape == (1, 8, 8) and soft.min() >= 0 and soft.max() <= 1
    assert 0 < soft[0, 3, 0] < 1  # bilinear (align_corners) resize: soft boundary
    assert soft_mask_targets(torch.zeros(0, 16, 16), (8, 8)).shape == (0, 8, 8)


def test_mask_aware_matching_uses_masks():
    """Two queries, two GTs: the boxes say q0 -> GT1, the masks say q0 -> GT0."""
    head = SOITDynamicMaskHead()
    outputs = _outputs(num_layers=1)
    params = torch.zeros(B, Q, head.param_dim)
    params[:, 0, -1] = 10.0  # b_out: query 0 predicts "everything"
    params[:, 1:, -1] = -10.0  # the others "nothing"
    outputs["pred_params"] = params
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    outputs["pred_boxes"] = boxes.repeat(B, Q // 2, 1)
    outputs["pred_logits"] = torch.zeros(B, Q, K)
    full = torch.ones(1, HP, WP, dtype=torch.uint8)
    empty = torch.zeros(1, HP, WP, dtype=torch.uint8)
    t = [
        {"labels": torch.tensor([0, 0]), "boxes": boxes.flip(0), "masks": torch.cat([full, empty])}
        for _ in range(B)
    ]
    base = HungarianMatcher(1.0, 5.0, 2.0)
    masked = SOITHungarianMatcher(
        mask_head=head,
        cost_dice=50.0,
        cost_mask=50.0,
        num_points=256,
        cost_class=1.0,
        cost_bbox=5.0,
        cost_giou=2.0,
    )
    crit = _criterion(matcher=masked)
    t = crit.prepare_mask_targets(outputs, t)
    q_box, g_box = base(outputs, t)[0]
    q_mask, g_mask = masked(outputs, t)[0]
    assert dict(zip(q_box.tolist(), g_box.tolist()))[0] == 1
    assert dict(zip(q_mask.tolist(), g_mask.tolist()))[0] == 0
    # encoder proposals (no pred_params) get the plain cost
    enc = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    torch.testing.assert_close(masked.cost_matrix(enc, t), base.cost_matrix(enc, t))
