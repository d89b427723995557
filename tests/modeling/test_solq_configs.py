"""configs/SOLQ/*.yaml load and build; the released-model recipe has the official values."""

from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from solq_d2.config import add_solq_d2_config
from solq_d2.engine.optimizer import build_optimizer

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "SOLQ").glob("*.yaml"))


def _cfg(path, *opts):
    cfg = get_cfg()
    add_solq_d2_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def test_all_configs_are_tested():
    assert {p.name for p in CONFIGS} == {
        "Base-SOLQ.yaml",
        "solq_R_50_50ep.yaml",
        "solq_R_101_50ep.yaml",
        "solq_R_50_d256_50ep.yaml",
        "solq_shapes.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds(path):
    cfg = _cfg(path)
    model = build_model(cfg)
    t, s = cfg.MODEL.DEFORMABLE_TRANSFORMER, cfg.MODEL.SOLQ
    assert type(model).__name__ == "SOLQ" and cfg.MODEL.META_ARCHITECTURE == "SOLQ"
    assert model.transformer.d_model == t.HIDDEN_DIM
    assert model.num_queries == s.NUM_QUERIES and model.two_stage == t.TWO_STAGE
    if not t.TWO_STAGE:
        assert model.query_embed.weight.shape == (s.NUM_QUERIES, 2 * t.HIDDEN_DIM)
    assert model.class_embed[0].out_features == s.NUM_CLASSES
    assert cfg.INPUT.FORMAT == "RGB" and s.SIZE_DIVISIBILITY == 0
    assert not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS


def test_released_r50_recipe():
    cfg = _cfg(ROOT / "configs" / "SOLQ" / "solq_R_50_50ep.yaml", "MODEL.WEIGHTS", "")
    t, s, sol = cfg.MODEL.DEFORMABLE_TRANSFORMER, cfg.MODEL.SOLQ, cfg.SOLVER
    assert (t.HIDDEN_DIM, t.NHEADS, t.ENC_LAYERS, t.DEC_LAYERS, t.DIM_FEEDFORWARD) == (
        384, 8, 6, 6, 1024,
    )  # fmt: skip
    assert t.WITH_BOX_REFINE and not t.TWO_STAGE and t.NUM_FEATURE_LEVELS == 4
    assert (s.NUM_QUERIES, s.NUM_CLASSES, s.COCO_ID_LABELS, s.N_KEEP, s.GT_MASK_LEN) == (
        300, 91, True, 256, 128,
    )  # fmt: skip
    assert (s.VECTOR_HIDDEN_DIM, s.VECTOR_LOSS_COEF, s.MASK_DECODE_THRESHOLD) == (
        1024,
        3.0,
        "minmax",
    )
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False and cfg.MODEL.RESNETS.NORM == "FrozenBN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2
    # 50 epochs of 3696 iterations at batch 32, LR x0.1 after epoch 40
    assert (
        sol.IMS_PER_BATCH == 32 and sol.MAX_ITER == 50 * 3696 and tuple(sol.STEPS) == (40 * 3696,)
    )
    assert sol.OPTIMIZER == "ADAMW" and sol.BASE_LR == 2e-4 and sol.WEIGHT_DECAY == 1e-4
    assert sol.BACKBONE_MULTIPLIER == 0.1 and sol.LINEAR_PROJ_MULTIPLIER == 0.1
    assert sol.CLIP_GRADIENTS.ENABLED and sol.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert sol.CLIP_GRADIENTS.CLIP_VALUE == 0.1 and sol.WARMUP_ITERS == 0
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
    assert cfg.INPUT.MAX_SIZE_TRAIN == 1333 and cfg.INPUT.MIN_SIZE_TEST == 800
    assert cfg.INPUT.CROP.ENABLED and tuple(cfg.INPUT.CROP.SIZE) == (384, 600)
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 100
    d256 = _cfg(ROOT / "configs" / "SOLQ" / "solq_R_50_d256_50ep.yaml")
    assert d256.MODEL.DEFORMABLE_TRANSFORMER.HIDDEN_DIM == 256
    assert _cfg(ROOT / "configs" / "SOLQ" / "solq_R_101_50ep.yaml").MODEL.RESNETS.DEPTH == 101


def test_official_parameter_count_and_lr_groups():
    """d 384 R50 SOLQ has the official 53,971,260 trainable parameters (SOLQ.md 1.4); the
    optimizer gives backbone and offset/reference projections 0.1 x the base LR."""
    cfg = _cfg(ROOT / "configs" / "SOLQ" / "solq_R_50_50ep.yaml", "MODEL.WEIGHTS", "")
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 53_971_260
    opt = build_optimizer(cfg, model)
    lr_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            lr_of[names[id(p)]] = group["lr"]
    assert lr_of["backbone.res3.0.conv1.weight"] == pytest.approx(2e-5)
    assert lr_of["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"] == pytest.approx(
        2e-5
    )
    assert lr_of["transformer.reference_points.weight"] == pytest.approx(2e-5)
    assert lr_of["transformer.decoder.layers.5.cross_attn.value_proj.weight"] == pytest.approx(2e-4)
    assert lr_of["vector_embed.layers.0.weight"] == pytest.approx(2e-4)
    assert isinstance(opt, torch.optim.AdamW)


def test_shapes_config():
    cfg = _cfg(ROOT / "configs" / "SOLQ" / "solq_shapes.yaml")
    assert cfg.MODEL.SOLQ.NUM_CLASSES == 4 and cfg.MODEL.WEIGHTS == ""
    assert tuple(cfg.DATASETS.TRAIN) == ("shapes_train",) and tuple(cfg.DATASETS.TEST) == (
        "shapes_val",
    )
