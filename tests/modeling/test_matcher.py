"""HungarianMatcher: costs by hand, optimality by brute force, edge cases, official matching."""

import itertools

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from solq_d2.modeling.matcher import HungarianMatcher, focal_class_cost

from ..conftest import load_fixture


def _random_case(B=2, Q=5, K=4, sizes=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(B, Q, K, generator=g) * 2,
        "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.2,
    }
    targets = [
        {
            "labels": torch.randint(0, K, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.2,
        }
        for n in sizes
    ]
    return outputs, targets


def test_cost_matrix_by_hand():
    m = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    outputs, targets = _random_case()
    C = m.cost_matrix(outputs, targets)
    assert C.shape == (2, 5, 5)
    b, q, t = 1, 3, 4  # image 1, query 3, target 4 (= second target of image 1)
    logit = outputs["pred_logits"][b, q, targets[1]["labels"][1]]
    p = torch.sigmoid(logit)
    cls = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p**2 * -torch.log(1 - p + 1e-8)
    ob, tb = outputs["pred_boxes"][b, q], targets[1]["boxes"][1]
    l1 = (ob - tb).abs().sum()
    giou = generalized_box_iou(
        box_convert(ob[None], "cxcywh", "xyxy"), box_convert(tb[None], "cxcywh", "xyxy")
    )[0, 0]
    torch.testing.assert_close(C[b, q, t], 2 * cls + 5 * l1 - 2 * giou)


def test_assignment_is_optimal_brute_force():
    m = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    for seed in range(5):
        outputs, targets = _random_case(seed=seed)
        C = m.cost_matrix(outputs, targets)
        indices = m(outputs, targets)
        start = 0
        for i, (rows, cols) in enumerate(indices):
            n = len(targets[i]["labels"])
            c = C[i, :, start : start + n]
            start += n
            assert len(rows) == len(cols) == n
            assert torch.all(rows[1:] > rows[:-1])  # sorted, distinct queries
            best = min(
                sum(c[q, j].item() for j, q in enumerate(perm))
                for perm in itertools.permutations(range(c.shape[0]), n)
            )
            got = sum(c[r, s].item() for r, s in zip(rows.tolist(), cols.tolist()))
            assert got == pytest.approx(best, abs=1e-5)


def test_obvious_assignment():
    """Each target is a perfect match of one query."""
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.2, 0.4]])
    logits = torch.full((1, 3, 3), -5.0)
    logits[0, 0, 2] = logits[0, 1, 0] = logits[0, 2, 1] = 5.0
    outputs = {"pred_logits": logits, "pred_boxes": boxes[None]}
    targets = [{"labels": torch.tensor([1, 2, 0]), "boxes": boxes[[2, 0, 1]]}]
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 2, 0]


def test_empty_targets_and_more_targets_than_queries():
    m = HungarianMatcher()
    outputs, targets = _random_case(B=3, Q=3, sizes=(0, 5, 2))
    indices = m(outputs, targets)
    assert [len(r) for r, _ in indices] == [0, 3, 2]
    rows, cols = indices[1]
    assert sorted(rows.tolist()) == [0, 1, 2] and len(set(cols.tolist())) == 3
    outputs, targets = _random_case(B=2, sizes=(0, 0))
    assert all(len(r) == 0 and r.dtype == torch.int64 for r, _ in m(outputs, targets))


def test_xyxy_box_format_uses_l1_on_xyxy():
    """QueryInst (mmdet BBoxL1Cost): L1 on normalised xyxy boxes."""
    m = HungarianMatcher(cost_class=0, cost_bbox=1, cost_giou=0, box_format="xyxy")
    outputs = {
        "pred_logits": torch.zeros(1, 2, 2),
        "pred_boxes": torch.tensor([[[0.1, 0.1, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8]]]),
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.4, 0.8, 0.8]])}]
    C = m.cost_matrix(outputs, targets)
    torch.testing.assert_close(
        C[0, :, 0], torch.tensor([0.4 + 0.3 + 0.5 + 0.4, 0.0 + 0.1 + 0.1 + 0.0])
    )
    with pytest.raises(ValueError):
        HungarianMatcher(box_format="xywh")


def test_match_many_equals_separate_calls_and_rejects_nan():
    m = HungarianMatcher()
    sets = [_random_case(seed=s)[0] for s in range(3)]
    _, targets = _random_case()
    many = m.match_many(sets, targets)
    for outputs, ind in zip(sets, many):
        for (r1, c1), (r2, c2) in zip(ind, m(outputs, targets)):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)
    sets[1]["pred_boxes"][0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        m.match_many(sets, targets)


def test_focal_class_cost_eps():
    logits = torch.tensor([[30.0, -30.0]])
    c8 = focal_class_cost(logits, torch.tensor([1]), eps=1e-8)
    c12 = focal_class_cost(logits, torch.tensor([1]), eps=1e-12)
    assert c12 > c8  # smaller eps: larger -log(p + eps) for p ~ 1e-13


def test_official_solq_matching():
    """The official matcher's result on the fixture's last layer and synthetic targets."""
    fx = load_fixture("solq_r50_parity.pt")
    t = fx["criterion"]["targets"][0]
    indices = HungarianMatcher(2, 5, 2)(
        fx["outputs"], [{"labels": t["labels"], "boxes": t["boxes"]}]
    )
    rows, cols = indices[0]
    assert [rows.tolist(), cols.tolist()] == fx["criterion"]["matching_last_layer"][0]
