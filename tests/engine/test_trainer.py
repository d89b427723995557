"""Trainer pieces: class-count check, evaluator choice, optimizer state in checkpoints."""

import types

import pytest
import torch

import detectron2

import engine_toy
from solq_d2.engine import Trainer, check_model_num_classes, model_num_classes
from solq_d2.evaluation import build_coco_evaluator, fast_coco_eval_available


@pytest.fixture
def tiny(tmp_path):
    name = f"engine_trainer_{tmp_path.name}"
    engine_toy.register_tiny_coco(name, tmp_path / "ds")
    return name


@pytest.mark.parametrize(
    "arch, key", [("SOLQ", "SOLQ"), ("SOIT", "SOIT"), ("QueryInst", "QUERYINST")]
)
def test_class_count_is_checked_before_building(tiny, tmp_path, arch, key):
    cfg = engine_toy.make_cfg(tiny, output_dir=str(tmp_path / "out"))
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL[key].NUM_CLASSES = 5  # the dataset has 2 (ids 1, 2)
    assert model_num_classes(cfg) == 5
    with pytest.raises(ValueError, match=f"MODEL.{key}.NUM_CLASSES is 5 .* 2 classes"):
        Trainer(cfg)  # fails fast: no model is built
    cfg.MODEL[key].NUM_CLASSES = 2
    check_model_num_classes(cfg, cfg.DATASETS.TRAIN)


def test_other_meta_architectures_are_not_checked(tiny):
    cfg = engine_toy.make_cfg(tiny)
    assert model_num_classes(cfg) is None
    check_model_num_classes(cfg, cfg.DATASETS.TRAIN)


def test_coco_evaluator_fast_path_only_when_built(tiny, tmp_path, monkeypatch):
    cfg = engine_toy.make_cfg(tiny, tiny, str(tmp_path / "out"))
    # the placeholder _C of the PyPI detectron2 raises on unknown attributes: no fast path
    monkeypatch.setattr(detectron2, "_C", types.ModuleType("detectron2._C"), raising=False)
    assert not fast_coco_eval_available()
    evaluator = Trainer.build_evaluator(cfg, tiny)
    assert evaluator._use_fast_impl is False and set(evaluator._tasks) == {"bbox", "segm"}

    built = types.ModuleType("detectron2._C")
    built.COCOevalAccumulate = object()
    monkeypatch.setattr(detectron2, "_C", built)
    assert fast_coco_eval_available()
    assert build_coco_evaluator(cfg, tiny)._use_fast_impl is True

    cfg.TEST.EVAL_TASKS = ["bbox", "keypoints"]
    with pytest.raises(ValueError, match="TEST.EVAL_TASKS"):
        build_coco_evaluator(cfg, tiny)


def test_checkpoint_holds_optimizer_and_resume_restores_it(tiny, tmp_path):
    cfg = engine_toy.make_cfg(tiny, output_dir=str(tmp_path / "out"))
    cfg.SOLVER.MAX_ITER = 2
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = trainer.optimizer.state_dict()["state"]

    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    state = resumed.optimizer.state_dict()["state"]
    assert state.keys() == saved.keys() and len(state) > 0
    for k in saved:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[k][field], saved[k][field], rtol=0, atol=0)
