"""SetCriterion base (aux / encoder suffixes, empty images, extension by subclassing)."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

from solq_d2.modeling.criterion import SetCriterion, expand_weight_dict
from solq_d2.modeling.matcher import HungarianMatcher


def _outputs(B=2, Q=6, K=3, seed=0, n_aux=2, enc_tokens=None):
    g = torch.Generator().manual_seed(seed)

    def one(n):
        return {
            "pred_logits": torch.randn(B, n, K, generator=g).requires_grad_(),
            "pred_boxes": (torch.rand(B, n, 4, generator=g) * 0.4 + 0.3).requires_grad_(),
        }

    out = one(Q)
    out["aux_outputs"] = [one(Q) for _ in range(n_aux)]
    if enc_tokens:
        out["enc_outputs"] = one(enc_tokens)
    return out


def _targets(sizes=(2, 0), K=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "labels": torch.randint(0, K, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.3,
        }
        for n in sizes
    ]


def _criterion(**kw):
    weights = expand_weight_dict({"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}, 2, with_enc=True)
    return SetCriterion(num_classes=3, matcher=HungarianMatcher(), weight_dict=weights, **kw)


def test_expand_weight_dict():
    w = expand_weight_dict({"a": 1, "b": 2}, 2, with_enc=True)
    assert w == {"a": 1, "b": 2, "a_0": 1, "b_0": 2, "a_1": 1, "b_1": 2, "a_enc": 1, "b_enc": 2}


def test_losses_by_hand_with_aux_and_encoder():
    crit = _criterion()
    outputs, targets = _outputs(enc_tokens=9), _targets()
    losses = crit(outputs, targets)
    for suffix in ("", "_0", "_1", "_enc"):
        for k in ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"):
            assert k + suffix in losses, k + suffix
    # last layer by hand (num_boxes = 2)
    rows, cols = crit.matcher(outputs, targets)[0]
    logits = outputs["pred_logits"]
    onehot = torch.zeros_like(logits)
    onehot[0, rows, targets[0]["labels"][cols]] = 1
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    a_t = 0.25 * onehot + 0.75 * (1 - onehot)
    expected_ce = (a_t * ce * (1 - p_t) ** 2).mean(1).sum() / 2 * logits.shape[1]
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    src = outputs["pred_boxes"][0, rows]
    tgt = targets[0]["boxes"][cols]
    torch.testing.assert_close(losses["loss_bbox"], (src - tgt).abs().sum() / 2)
    giou = torch.diag(
        generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
    )
    torch.testing.assert_close(losses["loss_giou"], (1 - giou).sum() / 2)
    # encoder proposals are matched against class-agnostic targets (all labels 0)
    enc_t = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
    ref = SetCriterion(num_classes=3, matcher=HungarianMatcher(), weight_dict={})
    enc_only = ref(outputs["enc_outputs"], enc_t)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[k + "_enc"], enc_only[k])
    # weighted: only weighted keys, differentiable
    total = sum(crit.weighted(losses).values())
    assert "class_error_0" not in crit.weighted(losses)
    total.backward()
    assert outputs["aux_outputs"][1]["pred_boxes"].grad.abs().sum() > 0
    assert outputs["enc_outputs"]["pred_logits"].grad.abs().sum() > 0


def test_no_targets_in_batch():
    crit = _criterion()
    outputs, targets = _outputs(), _targets(sizes=(0, 0))
    losses = crit(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0 and losses["loss_ce"] > 0
    sum(crit.weighted(losses).values()).backward()


def test_extension_by_subclass_and_bad_names():
    class WithExtra(SetCriterion):
        def loss_extra(self, outputs, targets, indices, num_boxes):
            idx = self._src_permutation_idx(indices)
            return {"loss_extra": outputs["pred_extra"][idx].sum() / num_boxes}

    crit = WithExtra(
        num_classes=3,
        matcher=HungarianMatcher(),
        weight_dict=expand_weight_dict({"loss_extra": 1.0}, 2),
        losses=("labels", "extra"),
    )
    outputs = _outputs()
    for o in [outputs] + outputs["aux_outputs"]:
        o["pred_extra"] = torch.ones(2, 6)
    losses = crit(outputs, _targets(sizes=(2, 1)))
    assert losses["loss_extra"] == pytest.approx(3 / 3) and losses["loss_extra_1"] == pytest.approx(
        1
    )
    with pytest.raises(ValueError, match="no loss named"):
        SetCriterion(num_classes=3, matcher=HungarianMatcher(), weight_dict={}, losses=("masks",))


# ---- SOLQ criterion: parity with the official SetCriterion ---------------------------------------


def test_solq_criterion_matches_official():
    """Losses of all 6 layers (each with its own matching) on the fixture's synthetic targets."""
    from solq_d2.modeling.solq import DCTMaskCoder, SOLQCriterion

    from ..conftest import load_fixture

    fx = load_fixture("solq_r50_parity.pt")
    weights = expand_weight_dict(
        {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2, "loss_vector": 1}, 5, with_enc=True
    )
    assert {k: float(v) for k, v in fx["criterion"]["weight_dict"].items()} == weights
    crit = SOLQCriterion(
        num_classes=91,
        matcher=HungarianMatcher(2, 5, 2),
        weight_dict=weights,
        mask_coder=DCTMaskCoder(128, 256),
    )
    outputs = dict(fx["outputs"], aux_outputs=fx["aux_outputs"])
    t = fx["criterion"]["targets"][0]
    targets = [{k: t[k] for k in ("labels", "boxes", "xyxy_boxes", "masks")}]
    indices = crit.match(outputs, targets)
    rows, cols = indices[""][0]
    assert [rows.tolist(), cols.tolist()] == fx["criterion"]["matching_last_layer"][0]
    losses = crit(outputs, targets, indices)
    ref = fx["criterion"]["losses"]
    assert set(ref) <= set(losses)
    for k, v in ref.items():
        torch.testing.assert_close(losses[k], torch.tensor(v), rtol=1e-4, atol=0, msg=k)
    total = sum(crit.weighted(losses).values())
    torch.testing.assert_close(
        total, torch.tensor(fx["criterion"]["weighted_total"]), rtol=1e-4, atol=0
    )


def test_solq_vector_loss_normalisation_and_empty():
    from solq_d2.modeling.solq import DCTMaskCoder, SOLQCriterion

    coder = DCTMaskCoder(16, 10)
    masks = torch.zeros(2, 20, 30, dtype=torch.bool)
    masks[0, 2:10, 3:12] = True
    masks[1, 5:18, 10:28] = True
    xyxy = torch.tensor([[3.0, 2.0, 12.0, 10.0], [10.0, 5.0, 28.0, 18.0]])
    boxes = torch.stack(
        [
            (xyxy[:, 0] + xyxy[:, 2]) / 60,
            (xyxy[:, 1] + xyxy[:, 3]) / 40,
            (xyxy[:, 2] - xyxy[:, 0]) / 30,
            (xyxy[:, 3] - xyxy[:, 1]) / 20,
        ],
        1,
    )
    targets = [{"labels": torch.tensor([0, 1]), "boxes": boxes, "xyxy_boxes": xyxy, "masks": masks}]
    outputs = {
        "pred_logits": torch.randn(1, 4, 3),
        "pred_boxes": torch.rand(1, 4, 4) * 0.3 + 0.3,
        "pred_vectors": torch.randn(1, 4, 10, requires_grad=True),
    }
    kw = dict(num_classes=3, matcher=HungarianMatcher(), weight_dict={}, mask_coder=coder)
    crit_mean = SOLQCriterion(vector_loss_coef=3.0, vector_loss_norm="mean", **kw)
    crit_sum = SOLQCriterion(vector_loss_coef=3.0, vector_loss_norm="num_boxes", **kw)
    indices = crit_mean.match(outputs, targets)
    rows, cols = indices[""][0]
    target_vec = coder.encode(masks, xyxy)[cols]
    diff = (outputs["pred_vectors"][0, rows] - target_vec).abs()
    lm = crit_mean(outputs, targets, indices)["loss_vector"]
    ls = crit_sum(outputs, targets, indices)["loss_vector"]
    torch.testing.assert_close(lm, 3 * diff.mean())
    torch.testing.assert_close(ls, 3 * diff.sum() / 2)
    # no target in the batch: 0, still connected to the graph
    empty = [
        {
            "labels": torch.zeros(0, dtype=torch.int64),
            "boxes": torch.zeros(0, 4),
            "xyxy_boxes": torch.zeros(0, 4),
            "masks": torch.zeros(0, 20, 30, dtype=torch.bool),
        }
    ]
    le = crit_mean(outputs, empty)["loss_vector"]
    assert le == 0
    le.backward()
    assert outputs["pred_vectors"].grad is not None
    with pytest.raises(ValueError):
        SOLQCriterion(vector_loss_norm="sum", **kw)
