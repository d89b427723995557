"""SOIT end to end on CPU: a short training run on shapes images (one of them empty) lowers the
loss, inference returns masks at the requested size, the variants train, the configs build."""

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def tiny_cfg(**overrides):
    """configs/SOIT/soit_shapes.yaml shrunk further (CI-sized)."""
    from detectron2.config import get_cfg

    from solq_d2 import add_solq_d2_config

    cfg = get_cfg()
    add_solq_d2_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs/SOIT/soit_shapes.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.DEFORMABLE_TRANSFORMER.HIDDEN_DIM",
            32,
            "MODEL.DEFORMABLE_TRANSFORMER.NHEADS",
            4,
            "MODEL.DEFORMABLE_TRANSFORMER.ENC_LAYERS",
            1,
            "MODEL.DEFORMABLE_TRANSFORMER.DEC_LAYERS",
            2,
            "MODEL.DEFORMABLE_TRANSFORMER.DIM_FEEDFORWARD",
            64,
            "MODEL.SOIT.NUM_QUERIES",
            20,
            "MODEL.SOIT.MASK_ENCODER.DIM_FEEDFORWARD",
            64,
            "TEST.DETECTIONS_PER_IMAGE",
            10,
        ]
    )
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def shapes_batch():
    """Two shapes images (the dataset's own renderer): one with objects, one without."""
    from detectron2.data.detection_utils import annotations_to_instances
    from detectron2.structures import BoxMode

    from solq_d2.data.shapes import ShapesSpec, render_shapes_image

    batch = []
    for spec, index in (
        (ShapesSpec(num_images=4, seed=5, min_side=64, max_side=80, max_objects=4), 1),
        (ShapesSpec(num_images=4, seed=6, min_side=64, max_side=80, empty_prob=1.0), 0),
    ):
        image, objects = render_shapes_image(spec, index)
        h, w = image.shape[:2]
        annos = [
            dict(o, bbox_mode=BoxMode.XYWH_ABS, category_id=o["category_id"] - 1) for o in objects
        ]
        batch.append(
            {
                "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "instances": annotations_to_instances(annos, (h, w), mask_format="bitmask"),
                "height": 2 * h,  # requested output size != input size
                "width": 2 * w,
            }
        )
    assert len(batch[0]["instances"]) >= 2 and len(batch[1]["instances"]) == 0
    return batch


def _train(cfg, batch, iters, lr=1e-3):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    for _ in range(iters):
        losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        history.append(total.item())
    return model, losses, history


def test_short_training_on_shapes_lowers_the_loss_and_predicts_masks():
    batch = shapes_batch()
    model, losses, history = _train(tiny_cfg(), batch, iters=20)
    expected = {"loss_ce", "loss_bbox", "loss_giou", "loss_dice", "loss_bce"}
    assert expected | {f"{k}_0" for k in expected} | {
        "loss_ce_enc",
        "loss_bbox_enc",
        "loss_giou_enc",
    } == set(losses)
    first, last = np.mean(history[:5]), np.mean(history[-5:])
    assert last < 0.8 * first, history

    model.eval()
    with torch.no_grad():
        results = model([{k: v for k, v in x.items() if k != "instances"} for x in batch])
    for x, r in zip(batch, results):
        inst = r["instances"]
        assert inst.image_size == (x["height"], x["width"])
        assert len(inst) == 10
        assert inst.pred_masks.shape == (10, x["height"], x["width"])
        assert inst.pred_masks.dtype == torch.bool
        assert (inst.scores[:-1] >= inst.scores[1:]).all()
        assert inst.pred_classes.max() < 4
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= x["width"]).all()


@pytest.mark.parametrize(
    "overrides",
    [
        # the authors' padding behaviour (the shapes config enables the fixes)
        {
            "MODEL.SOIT.MASK_LOSS_VALID_ONLY": False,
            "MODEL.SOIT.MASK_CROP_PADDING": False,
            "MODEL.SOIT.SIZE_DIVISIBILITY": 1,
        },
        # learned queries instead of two-stage proposals; last-layer mask loss only
        {"MODEL.DEFORMABLE_TRANSFORMER.TWO_STAGE": False, "MODEL.SOIT.MASK_LOSS_LAYERS": 1},
        # mask-aware matching, absolute PE, 2 dynamic heads x 2 points
        {
            "MODEL.SOIT.COST_DICE": 2.0,
            "MODEL.SOIT.COST_MASK": 2.0,
            "MODEL.SOIT.MATCHER_NUM_POINTS": 64,
            "MODEL.SOIT.DYN_POS_EMBED": "abs",
            "MODEL.SOIT.DYN_HEADS": 2,
            "MODEL.SOIT.DYN_POINTS": 2,
        },
    ],
)
def test_variants_train_and_infer(overrides):
    batch = shapes_batch()
    model, losses, _ = _train(tiny_cfg(**overrides), batch, iters=1)
    if overrides.get("MODEL.SOIT.MASK_LOSS_LAYERS") == 1:
        assert "loss_dice" in losses and "loss_dice_0" not in losses and "loss_ce_enc" not in losses
    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"]}])[0]["instances"]
    assert out.pred_masks.shape[1:] == batch[0]["image"].shape[1:]


@pytest.mark.parametrize(
    "name", ["Base-SOIT.yaml", "soit_R_50_50ep.yaml", "soit_R_101_50ep.yaml", "soit_shapes.yaml"]
)
def test_configs_build(name):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from solq_d2 import add_solq_d2_config

    cfg = get_cfg()
    add_solq_d2_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs/SOIT" / name))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert model.mask_head.param_dim == 441
    assert model.num_queries == cfg.MODEL.SOIT.NUM_QUERIES
    assert model.transformer.two_stage_num_proposals == cfg.MODEL.SOIT.NUM_QUERIES


def test_config_errors_are_clear():
    from detectron2.modeling import build_model

    with pytest.raises(ValueError, match="DYN_HEADS"):
        build_model(tiny_cfg(**{"MODEL.SOIT.DYN_HEADS": 3}))
    with pytest.raises(ValueError, match="stride 8"):
        build_model(
            tiny_cfg(
                **{
                    "MODEL.DEFORMABLE_TRANSFORMER.IN_FEATURES": ["res4", "res5"],
                    "MODEL.DEFORMABLE_TRANSFORMER.NUM_FEATURE_LEVELS": 3,
                }
            )
        )
    model = build_model(tiny_cfg()).train()
    batch = shapes_batch()
    batch[0]["instances"].remove("gt_masks")
    with pytest.raises(ValueError, match="gt_masks"):
        model(batch)


_FALLBACK_SCRIPT = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("t", sys.argv[1])
t = importlib.util.module_from_spec(spec)
spec.loader.exec_module(t)
from detectron2.modeling import build_model
from solq_d2.layers import _ext
assert not _ext.available(), "the extension should be hidden"
torch.manual_seed(0)
model = build_model(t.tiny_cfg()).eval()
model.load_state_dict(torch.load(sys.argv[2], weights_only=True))
batch = [{"image": x["image"]} for x in t.shapes_batch()]
with torch.no_grad():
    out = model.forward_outputs(model.preprocess_image(batch))
torch.save({"logits": out["pred_logits"], "params": out["pred_params"],
            "fmask": out["mask_features"], "tokens": out["enc_topk_indices"]}, sys.argv[3])
"""


def test_pure_pytorch_fallback_gives_the_same_outputs(tmp_path):
    """Without solq_d2._C (SOLQ_D2_DISABLE_EXT=1) the model runs on the PyTorch implementations
    of both ops and produces the same outputs."""
    import os
    import subprocess
    import sys

    from detectron2.modeling import build_model

    from .test_soit_fixture import query_alignment  # (this module is also run as a script)

    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    script = tmp_path / "fallback.py"
    script.write_text(_FALLBACK_SCRIPT)
    env = dict(os.environ, SOLQ_D2_DISABLE_EXT="1")
    subprocess.run(
        [
            sys.executable,
            str(script),
            __file__,
            str(tmp_path / "weights.pth"),
            str(tmp_path / "out.pt"),
        ],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    batch = [{"image": x["image"]} for x in shapes_batch()]
    with torch.no_grad():
        ours = model.forward_outputs(model.preprocess_image(batch))
    torch.testing.assert_close(ours["mask_features"], theirs["fmask"], rtol=1e-4, atol=1e-4)
    for b in range(len(batch)):  # same proposals; their order may differ at near-ties
        p = query_alignment(ours["enc_topk_indices"][b], theirs["tokens"][b])
        torch.testing.assert_close(
            ours["pred_logits"][b][p], theirs["logits"][b], rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(
            ours["pred_params"][b][p], theirs["params"][b], rtol=1e-4, atol=1e-4
        )


def test_narrow_resnet_backbone():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    cfg = tiny_cfg()
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res3": (64, 8),
        "res4": (128, 16),
        "res5": (256, 32),
    }
    out = backbone(torch.randn(1, 3, 64, 96))
    assert out["res5"].shape == (1, 256, 2, 3)
    r18 = build_backbone(
        tiny_cfg(
            **{
                "MODEL.BACKBONE.NAME": "build_resnet_backbone",
                "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
                "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
            }
        ),
        ShapeSpec(channels=3),
    )
    n = sum(p.numel() for p in backbone.parameters())
    assert n < sum(p.numel() for p in r18.parameters()) / 3
    with pytest.raises(ValueError, match="DEPTH 18 or 34"):
        build_backbone(tiny_cfg(**{"MODEL.RESNETS.DEPTH": 50}), ShapeSpec(channels=3))
