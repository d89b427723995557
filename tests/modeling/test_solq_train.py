"""SOLQ end to end on CPU with a tiny model: training decreases the loss (with an empty image in
the batch), images of different sizes, more GT than queries, polygon masks, COCO-id labels,
two-stage, inference outputs."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from .test_solq_common import solq_tiny_cfg


def _image_and_instances(h, w, boxes, classes, seed):
    """An image with filled rectangles (class-dependent colour) and their instances."""
    g = torch.Generator().manual_seed(seed)
    img = (torch.rand(3, h, w, generator=g) * 60).to(torch.uint8)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, ((x0, y0, x1, y1), c) in enumerate(zip(boxes, classes)):
        masks[i, y0:y1, x0:x1] = True
        img[:, y0:y1, x0:x1] = torch.tensor([200, 40 + 50 * c, 250 - 50 * c], dtype=torch.uint8)[
            :, None, None
        ]
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    inst.gt_masks = BitMasks(masks)
    return {"image": img, "instances": inst, "height": h, "width": w}


def _batch():
    return [
        _image_and_instances(64, 80, [(5, 6, 30, 40), (40, 10, 75, 30)], [0, 2], 0),
        _image_and_instances(72, 64, [], [], 1),  # no instance
        _image_and_instances(56, 72, [(10, 20, 50, 50)], [1], 2),
    ]


def test_training_decreases_loss_with_an_empty_image():
    torch.manual_seed(0)
    model = build_model(solq_tiny_cfg())
    model.train()
    batch = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    with EventStorage(0) as storage:
        for _ in range(20):
            losses = model(batch)
            loss = sum(losses.values())
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())
            storage.step()
        assert "class_error" in storage.latest()  # logged, not optimised
    assert set(losses) >= {"loss_ce", "loss_bbox", "loss_giou", "loss_vector", "loss_vector_0"}
    assert "class_error" not in losses
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.7 * first, history


def test_inference_on_images_of_different_sizes():
    model = build_model(solq_tiny_cfg()).eval()
    batch = _batch()
    batch[0]["height"], batch[0]["width"] = 128, 160  # requested output 2x the input
    with torch.no_grad():
        results = model(batch)
    assert len(results) == 3
    for r, x in zip(results, batch):
        inst = r["instances"]
        assert inst.image_size == (x["height"], x["width"])
        assert len(inst) == 10 * 5 and inst.pred_masks.dtype == torch.bool  # Q x K < 100
        assert inst.pred_masks.shape[1:] == (x["height"], x["width"])
        assert torch.all(inst.scores[:-1] >= inst.scores[1:])
        assert inst.pred_classes.min() >= 0 and inst.pred_classes.max() < 5


def test_more_ground_truth_than_queries_and_polygons():
    model = build_model(solq_tiny_cfg(NUM_QUERIES=4))
    model.train()
    boxes = [(2 + 6 * i, 3 + 4 * i, 12 + 6 * i, 15 + 4 * i) for i in range(7)]
    x = _image_and_instances(96, 96, boxes, [i % 5 for i in range(7)], 3)
    polys = [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes]
    y = _image_and_instances(96, 96, boxes[:2], [0, 1], 4)
    y["instances"].gt_masks = PolygonMasks([[list(map(float, p[0]))] for p in polys[:2]])
    targets = model.prepare_targets([y])
    assert targets[0]["masks"].shape == (2, 96, 96) and targets[0]["masks"].dtype == torch.bool
    losses = model([x, y])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    images, mask = model.preprocess_image([x])
    outputs, _ = model.forward_network(images.tensor, mask)
    indices = model.criterion.matcher(outputs, model.prepare_targets([x]))
    assert len(indices[0][0]) == 4  # every query matched, 3 GT left unmatched


def test_coco_id_labels_and_fixed_threshold():
    cfg = solq_tiny_cfg(NUM_CLASSES=91, COCO_ID_LABELS=True, MASK_DECODE_THRESHOLD="fixed")
    model = build_model(cfg)
    batch = _batch()
    targets = model.prepare_targets(batch)
    assert targets[0]["labels"].tolist() == [1, 3]  # contiguous 0, 2 -> COCO ids 1, 3
    model.eval()
    with torch.no_grad():
        inst = model(batch[:1])[0]["instances"]
    assert inst.pred_classes.min() >= 0 and inst.pred_classes.max() < 80
    assert 0 < len(inst) <= 100
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        build_model(solq_tiny_cfg(COCO_ID_LABELS=True))


def test_two_stage_and_no_box_refine():
    cfg = solq_tiny_cfg()
    cfg.MODEL.DEFORMABLE_TRANSFORMER.TWO_STAGE = True
    model = build_model(cfg)
    assert not hasattr(model, "query_embed") and len(model.class_embed) == 3
    losses = model(_batch())
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
    assert "loss_vector_enc" not in losses
    sum(losses.values()).backward()
    cfg = solq_tiny_cfg()
    cfg.MODEL.DEFORMABLE_TRANSFORMER.WITH_BOX_REFINE = False
    model = build_model(cfg)
    assert len(model.class_embed) == 1 and len(model.bbox_embed) == 1
    sum(model(_batch()).values()).backward()


def test_official_head_initialisation():
    model = build_model(solq_tiny_cfg())
    assert torch.allclose(model.class_embed[1].bias, torch.full((5,), -4.59512), atol=1e-5)
    assert torch.equal(model.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert torch.equal(model.bbox_embed[1].layers[-1].bias, torch.zeros(4))
    vec_bias = model.vector_embed.layers[-1].bias
    assert vec_bias[:2].eq(0).all() and vec_bias[2:].eq(-2).all()
    assert model.vector_embed.layers[-1].weight.eq(0).all()
