"""QueryInst building blocks and the meta-architecture on a tiny configuration (CPU).

Parity with the official code on real R50 weights is in test_queryinst_parity.py; a short
training run on the shapes dataset is in test_queryinst_train.py.
"""

import math

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from torchvision.ops import roi_align

import solq_d2
from solq_d2.modeling.queryinst import (
    DynamicConv,
    QueryInstCriterion,
    assign_rois_to_levels,
    decode_box_deltas,
)
from solq_d2.modeling.queryinst.criterion import dice_loss
from solq_d2.modeling.queryinst.pooler import QueryInstROIPooler
from solq_d2.modeling.queryinst.postprocess import paste_masks, rescale_instances, select_topk
from solq_d2.modeling.queryinst.stage import SCALE_CLAMPS

from ..conftest import ROOT, requires_cuda


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP synchronisation costs on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(**overrides):
    """Base-QueryInst with a ResNet-18 FPN, 32-d queries, 5 queries, 2 stages, 4 classes."""
    cfg = get_cfg()
    solq_d2.add_solq_d2_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / "QueryInst" / "Base-QueryInst.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
            "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.RESNETS.DEPTH", 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.NORM", "GN",
            "MODEL.FPN.OUT_CHANNELS", 32,
            "MODEL.QUERYINST.HIDDEN_DIM", 32, "MODEL.QUERYINST.NUM_HEADS", 4,
            "MODEL.QUERYINST.DIM_FEEDFORWARD", 64, "MODEL.QUERYINST.DYNAMIC_DIM", 8,
            "MODEL.QUERYINST.NUM_QUERIES", 5, "MODEL.QUERYINST.NUM_STAGES", 2,
            "MODEL.QUERYINST.STAGE_LOSS_WEIGHTS", [1.0, 1.0],
            "MODEL.QUERYINST.MASK_CONV_DIM", 16, "MODEL.QUERYINST.MASK_NUM_CONVS", 2,
            "MODEL.QUERYINST.NUM_CLASSES", 4, "MODEL.QUERYINST.TEST_TOPK", 7,
        ]
    )  # fmt: skip
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


def _instances(h, w, boxes, classes, mask_kind):
    inst = Instances((h, w))
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if mask_kind == "polygon":
        inst.gt_masks = PolygonMasks(
            [
                [np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]
                for x0, y0, x1, y1 in boxes.tolist()
            ]
        )
    else:
        m = torch.zeros((len(boxes), h, w), dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            m[i, y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(m)
    return inst


def batch_with_edge_cases():
    """Three images of different sizes: 2 GT (polygons), no GT, and 8 GT (> 5 queries, bitmaps)."""
    g = torch.Generator().manual_seed(0)
    many = [[8 * i, 4 * i, 8 * i + 30, 4 * i + 25] for i in range(8)]
    specs = [
        (96, 128, [[10, 12, 60, 70], [50, 20, 120, 90]], [0, 3], "polygon"),
        (80, 112, [], [], "bitmask"),
        (100, 96, many, [i % 4 for i in range(8)], "bitmask"),
    ]
    batch = []
    for h, w, boxes, classes, kind in specs:
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append(
            {
                "image": image,
                "height": h,
                "width": w,
                "instances": _instances(h, w, boxes, classes, kind),
            }
        )
    return batch


# ------------------------------------------------------------------------------------ pieces
def test_decode_box_deltas():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 100.0]])
    assert torch.equal(decode_box_deltas(torch.zeros(1, 4), boxes), boxes)
    # dx = 0.2 / 2 of w = 40 -> +4; dw = log(2) -> w = 80 around the shifted centre (34, 60)
    deltas = torch.tensor([[0.2, 0.0, math.log(2.0), 0.0]])
    expected = torch.tensor([[34.0 - 40.0, 20.0, 34.0 + 40.0, 100.0]])
    torch.testing.assert_close(decode_box_deltas(deltas, boxes), expected)


def test_decode_box_deltas_scale_clamp():
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    deltas = torch.tensor([[0.0, 0.0, -10.0, 10.0]])
    lim = abs(math.log(16 / 1000))
    mmdet = decode_box_deltas(deltas, boxes, scale_clamp=SCALE_CLAMPS["mmdet"])
    w, h = mmdet[0, 2] - mmdet[0, 0], mmdet[0, 3] - mmdet[0, 1]
    torch.testing.assert_close(w, torch.tensor(100 * math.exp(-lim)))  # lower bound applies
    torch.testing.assert_close(h, torch.tensor(100 * math.exp(lim)))
    d2 = decode_box_deltas(deltas, boxes, scale_clamp=SCALE_CLAMPS["d2"])
    torch.testing.assert_close(d2[0, 2] - d2[0, 0], torch.tensor(100 * math.exp(-10.0)))
    torch.testing.assert_close(d2[0, 3] - d2[0, 1], torch.tensor(100 * 100000.0 / 16))


def test_assign_rois_to_levels_finest_scale():
    sides = [10.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 2000.0]
    rois = torch.tensor([[0.0, 0.0, 0.0, s, s] for s in sides])
    levels = assign_rois_to_levels(rois, num_levels=4, finest_scale=56.0)
    assert levels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # non-square: sqrt(w * h) decides (224 x 56 -> 112 -> level 1)
    assert assign_rois_to_levels(torch.tensor([[0.0, 0, 0, 224, 56]]), 4, 56.0).tolist() == [1]


def test_pooler_uses_the_assigned_level_with_aligned_roialign():
    torch.manual_seed(0)
    feats = [torch.randn(2, 3, 64 // 2**i, 64 // 2**i) for i in range(4)]
    pooler = QueryInstROIPooler((5, 5), (1 / 4, 1 / 8, 1 / 16, 1 / 32), 2, "ROIAlignV2")
    rois = torch.tensor([[0, 3.0, 4.0, 40.0, 50.0], [1, 0.0, 0.0, 470.0, 460.0], [1, 5, 5, 9, 9]])
    out = pooler(feats, rois)
    for r, lvl in zip(rois, [0, 3, 0]):
        ref = roi_align(feats[lvl], r[None], (5, 5), 1 / 4 / 2**lvl, 2, aligned=True)
        torch.testing.assert_close(out[rois.tolist().index(r.tolist())][None], ref)
    assert pooler(feats, rois[:0]).shape == (0, 3, 5, 5)


def test_dynamic_conv_matches_per_roi_reference():
    torch.manual_seed(0)
    conv = DynamicConv(hidden_dim=8, dynamic_dim=4, pooler_resolution=3, with_proj=True)
    q, x = torch.randn(5, 8), torch.randn(5, 8, 3, 3)
    out = conv(q, x)
    ln = torch.nn.functional.layer_norm
    for i in range(5):
        p = conv.dynamic_layer(q[i])
        w1, w2 = p[:32].view(8, 4), p[32:].view(4, 8)
        f = x[i].flatten(1).t()  # (9 positions, 8 channels)
        f = ln(f @ w1, (4,), conv.norm1.weight, conv.norm1.bias).relu()
        f = ln(f @ w2, (8,), conv.norm2.weight, conv.norm2.bias).relu()
        f = conv.out_layer(f.reshape(-1))
        ref = ln(f, (8,), conv.norm3.weight, conv.norm3.bias).relu()
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-6)
    mask_conv = DynamicConv(8, 4, 3, with_proj=False)
    assert mask_conv(q, x).shape == (5, 9, 8)
    assert not hasattr(mask_conv, "out_layer")


def test_dice_loss_values():
    m = torch.zeros(2, 4, 4)
    m[:, :2] = 1
    loss = dice_loss(m.clone(), m)
    torch.testing.assert_close(loss, 1 - 16 / (16 + 1e-5) * torch.ones(2))
    assert torch.allclose(dice_loss(torch.zeros(2, 4, 4), m), torch.ones(2))
    p = torch.full((1, 4, 4), 0.5)
    # 2 * (0.5 * 8) / (16 * 0.25 + 8) = 8 / 12
    torch.testing.assert_close(dice_loss(p, m[:1]), torch.tensor([1 - 8 / (12 + 1e-5)]))


def test_mask_targets_are_cropped_by_clipped_predicted_boxes():
    """The dice target of a positive is its GT bitmap (padded batch) RoIAligned with the stage's
    detached predicted box clipped to the padded image (mmdet ``mask_target``)."""
    crit = QueryInstCriterion(num_classes=2, stage_weights=[1.0])
    masks = torch.zeros(1, 40, 40, dtype=torch.bool)
    masks[0, :, :20] = True  # left half
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.0, 0, 20, 40]]), "masks": masks}
    ]
    # predicted box extends beyond the padded image on the left: clipped to [0, 40] -> the left
    # half of the box is the object, the right half is not
    boxes = torch.tensor([[[-40.0, 0.0, 40.0, 40.0]]])
    probs_logits = torch.full((1, 2, 28, 28), 20.0)  # p = 1 everywhere
    out = {
        "pred_boxes": boxes,
        "pos_mask_logits": probs_logits,
        "indices": [(torch.tensor([0]), torch.tensor([0]))],
    }
    loss = crit._mask_loss(out, targets, out["indices"], torch.tensor([1]), num_pos=1.0)
    # target: left 14 columns on, right 14 off; p = 1: dice = 1 - 2 * 392 / (784 + 392)
    torch.testing.assert_close(loss, torch.tensor(8.0 * (1 - 2 * 392 / (784 + 392 + 1e-5))))


# ----------------------------------------------------------------------------- meta-arch
def test_num_classes_drives_every_head():
    model = build_model(
        tiny_cfg(
            **{
                "MODEL.QUERYINST.NUM_CLASSES": 7,
                "MODEL.QUERYINST.NUM_STAGES": 3,
                "MODEL.QUERYINST.STAGE_LOSS_WEIGHTS": [1.0] * 3,
            }
        )
    )
    assert len(model.head.head_series) == len(model.head.mask_heads) == 3
    for stage, mask_head in zip(model.head.head_series, model.head.mask_heads):
        assert stage.class_logits.out_features == 7
        assert mask_head.predictor.out_channels == 7
    assert model.criterion.num_classes == 7
    assert model.init_proposal_boxes.weight.shape == (5, 4)
    torch.testing.assert_close(
        model.init_proposal_boxes.weight, torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 5)
    )
    bias = -math.log((1 - 0.01) / 0.01)
    torch.testing.assert_close(model.head.head_series[0].class_logits.bias, torch.full((7,), bias))
    assert torch.count_nonzero(model.head.mask_heads[0].predictor.bias) == 0


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("MODEL.QUERYINST.HIDDEN_DIM", 48, "HIDDEN_DIM"),
        ("MODEL.QUERYINST.SCALE_CLAMP", "none", "SCALE_CLAMP"),
        ("MODEL.QUERYINST.STAGE_LOSS_WEIGHTS", [1.0], "STAGE_LOSS_WEIGHTS"),
        ("MODEL.QUERYINST.IN_FEATURES", ["p2", "p9"], "IN_FEATURES"),
    ],
)
def test_config_mistakes_give_clear_errors(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_model(tiny_cfg(**{key: value}))


def test_training_batch_with_empty_image_and_more_gt_than_queries():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    losses = model(batch_with_edge_cases())
    names = {f"stage{s}_loss_{k}" for s in range(2) for k in ("cls", "bbox", "iou", "mask")}
    assert set(losses) == names
    for k, v in losses.items():
        assert v.ndim == 0 and torch.isfinite(v), k
        assert v.item() > 0, k
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # RoIAlign gives no gradient to box coordinates, so the learned boxes only get one through
    # the stage-1 box losses; everything else must be reached
    assert no_grad == [], no_grad
    assert model.init_proposal_boxes.weight.grad.abs().sum() > 0


def test_training_batch_without_any_gt():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    batch = [b for b in batch_with_edge_cases() if len(b["instances"]) == 0] * 2
    before = model.head.mask_heads[0].mask_fcn1.norm.running_mean.clone()
    losses = model(batch)
    assert losses["stage0_loss_mask"].item() == 0.0 and losses["stage0_loss_bbox"].item() == 0.0
    assert losses["stage1_loss_cls"].item() > 0
    sum(losses.values()).backward()
    # the mask heads saw no RoI: their parameters get zero gradients, BN statistics stay finite
    grad = model.head.mask_heads[1].predictor.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0
    assert torch.equal(model.head.mask_heads[0].mask_fcn1.norm.running_mean, before)


def test_inference_outputs_at_requested_sizes():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.eval()
    batch = batch_with_edge_cases()[:2]
    batch[0]["height"], batch[0]["width"] = 192, 256  # x2
    batch[1].pop("height"), batch[1].pop("width")  # default: input size
    with torch.no_grad():
        out = model(batch)
    assert [o["instances"].image_size for o in out] == [(192, 256), (80, 112)]
    for o in out:
        inst = o["instances"]
        assert len(inst) == 7  # TEST_TOPK (<= 5 queries x 4 classes)
        assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape[1:] == inst.image_size
        assert torch.all(inst.scores[:-1] >= inst.scores[1:])
        assert inst.pred_classes.min() >= 0 and inst.pred_classes.max() < 4
    # raw (not post-processed) detections are in input pixels with 28x28 probabilities
    with torch.no_grad():
        raw = model.inference(batch, do_postprocess=False)
    assert raw[0].image_size == (96, 128) and raw[0].pred_masks.shape == (7, 1, 28, 28)
    torch.testing.assert_close(out[0]["instances"].pred_boxes.tensor, raw[0].pred_boxes.tensor * 2)


def test_topk_selects_query_class_pairs():
    logits = torch.full((2, 3, 2), -10.0)
    logits[0, 1, 0], logits[0, 1, 1], logits[0, 2, 1] = 3.0, 2.0, 1.0  # query 1 twice
    logits[1, 0, 0] = 5.0
    boxes = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    calls = []

    def mask_logits_fn(batch_idx, query_idx):  # logit of (b, q, class c) = 100 b + 10 q + c
        calls.append(list(zip(batch_idx.tolist(), query_idx.tolist())))
        value = 100.0 * batch_idx + 10.0 * query_idx
        return (value[:, None] + torch.arange(2.0))[:, :, None, None].expand(-1, -1, 28, 28)

    res = select_topk(logits, boxes, [(50, 60), (40, 30)], 3, mask_logits_fn)
    assert res[0].pred_classes.tolist() == [0, 1, 1]
    assert torch.equal(res[0].pred_boxes.tensor, boxes[0, [1, 1, 2]])
    # each detection takes its own class channel of its query's masks
    torch.testing.assert_close(
        res[0].pred_masks[:, 0, 0, 0], torch.tensor([10.0, 11, 21]).sigmoid()
    )
    assert (
        res[1].pred_classes[0] == 0
        and res[1].pred_masks[0, 0, 0, 0] == torch.tensor(100.0).sigmoid()
    )
    # the mask head runs once, on the distinct detected queries of the batch
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0])) <= 6
    assert {(0, 1), (0, 2), (1, 0)} <= set(calls[0])
    assert [r.image_size for r in res] == [(50, 60), (40, 30)]


def test_detections_equal_masks_of_all_queries():
    """Running the last mask head on the detected queries only gives the masks the official code
    gets by running it on all queries."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.eval()
    batch = batch_with_edge_cases()
    with torch.no_grad():
        images = model.preprocess_image(batch)
        features, outputs = model.forward_stages(images, all_stage_masks=True)
        results = model.detections(features, outputs, images, batch, do_postprocess=False)
    last = outputs[-1]
    K = last["pred_logits"].shape[-1]
    for b, res in enumerate(results):
        top = last["pred_logits"][b].sigmoid().flatten().topk(len(res)).indices
        expected = last["pred_mask_logits"][b].flatten(0, 1)[top].sigmoid()
        torch.testing.assert_close(res.pred_masks[:, 0], expected)
        assert torch.equal(res.pred_classes, top % K)


def test_rescale_keeps_unclipped_boxes_by_default():
    res = Instances((50, 100))
    res.pred_boxes = Boxes(torch.tensor([[-10.0, 10.0, 60.0, 70.0]]))  # outside the image
    res.scores = torch.tensor([0.9])
    res.pred_classes = torch.tensor([0])
    res.pred_masks = torch.ones(1, 1, 28, 28)
    out = rescale_instances(res, 100, 200)
    assert out.pred_boxes.tensor.tolist() == [[-20.0, 20.0, 120.0, 140.0]]
    m = out.pred_masks[0]
    assert m.shape == (100, 200) and m[25:, :115].all()  # pasted with the unclipped box
    assert not m[:20].any() and not m[:, 120:].any()
    assert res.pred_boxes.tensor.tolist() == [[-10.0, 10.0, 60.0, 70.0]]  # input untouched
    clipped = rescale_instances(res, 100, 200, clip_boxes=True)
    assert clipped.pred_boxes.tensor.tolist() == [[0.0, 20.0, 120.0, 100.0]]


def test_paste_masks_boxes_outside_the_image():
    probs = torch.ones(3, 28, 28)
    boxes = torch.tensor(
        [[-50.0, 5.0, -10.0, 20.0], [5.0, 5.0, 15.0, 45.0], [90.0, 0.0, 140.0, 10.0]]
    )
    out = paste_masks(probs, boxes, (40, 60), 0.5)
    assert out.shape == (3, 40, 60)
    assert not out[0].any() and not out[2].any()  # wholly outside: empty
    assert out[1, 7:40, 6:14].all() and not out[1, :, 15:].any()  # cut at the image border


def test_box_only_model_is_sparse_rcnn():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**{"MODEL.MASK_ON": False}))
    assert not model.mask_on and not hasattr(model.head, "mask_heads")
    model.train()
    losses = model(batch_with_edge_cases())
    assert not any("mask" in k for k in losses) and len(losses) == 2 * 3
    model.eval()
    with torch.no_grad():
        (out,) = model(batch_with_edge_cases()[:1])
    assert not out["instances"].has("pred_masks") and len(out["instances"]) == 7


@requires_cuda
def test_cuda_train_and_inference():
    model = build_model(tiny_cfg(**{"MODEL.DEVICE": "cuda"}))
    model.train()
    losses = model(batch_with_edge_cases())
    assert all(v.is_cuda and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(batch_with_edge_cases())
    assert all(o["instances"].pred_masks.is_cuda for o in out)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (ROOT / "configs" / "QueryInst").glob("*.yaml"))
)
def test_configs_merge_and_agree(name):
    cfg = get_cfg()
    solq_d2.add_solq_d2_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / "QueryInst" / name))
    q = cfg.MODEL.QUERYINST
    assert cfg.MODEL.META_ARCHITECTURE == "QueryInst" and cfg.MODEL.MASK_ON
    assert len(q.STAGE_LOSS_WEIGHTS) == q.NUM_STAGES
    assert q.HIDDEN_DIM == cfg.MODEL.FPN.OUT_CHANNELS
    assert cfg.INPUT.FORMAT == "RGB" and cfg.INPUT.MASK_FORMAT == "bitmask"
    if "shapes" in name:
        assert q.NUM_CLASSES == 4 and cfg.DATASETS.TRAIN == ("shapes_train",)
        assert build_model(cfg).head.num_stages == q.NUM_STAGES
    else:  # official recipes: max_per_img = num_proposals; 1 epoch = 7330 iterations
        assert q.NUM_CLASSES == 80 and q.TEST_TOPK == q.NUM_QUERIES
        assert cfg.SOLVER.MAX_ITER in (12 * 7330, 36 * 7330)
        assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    if "300q" in name:
        assert q.NUM_QUERIES == 300 and cfg.INPUT.CROP.ENABLED
