"""QueryInst trains on the synthetic shapes data on CPU (the loss decreases, with an image without
objects in a batch) and its predictions go through Detectron2's COCO evaluation."""

import copy

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

import solq_d2
from solq_d2.data import ShapesSpec, build_dataset_mapper, register_shapes
from solq_d2.engine import Trainer

from ..conftest import ROOT


def small_cfg(dataset: str):
    """queryinst_shapes.yaml at a smaller width and image size, 2 stages."""
    cfg = get_cfg()
    solq_d2.add_solq_d2_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / "QueryInst" / "queryinst_shapes.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.FPN.OUT_CHANNELS", 64, "MODEL.QUERYINST.HIDDEN_DIM", 64,
            "MODEL.QUERYINST.DIM_FEEDFORWARD", 128, "MODEL.QUERYINST.DYNAMIC_DIM", 16,
            "MODEL.QUERYINST.NUM_STAGES", 2, "MODEL.QUERYINST.STAGE_LOSS_WEIGHTS", [1.0, 1.0],
            "MODEL.QUERYINST.MASK_CONV_DIM", 32, "MODEL.QUERYINST.NUM_QUERIES", 10,
            "MODEL.QUERYINST.TEST_TOPK", 20,
            "INPUT.MIN_SIZE_TRAIN", (96,), "INPUT.MAX_SIZE_TRAIN", 128, "INPUT.CROP.ENABLED", False,
            "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128, "INPUT.RANDOM_FLIP", "none",
            "DATASETS.TRAIN", (dataset,), "DATASETS.TEST", (dataset,),
            "DATALOADER.NUM_WORKERS", 0,
        ]
    )  # fmt: skip
    return cfg


@pytest.fixture
def one_thread():
    """The tiny model runs faster on one thread (no OpenMP synchronisation, which on an
    oversubscribed machine costs more than the work itself)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory):
    name = "queryinst_test_shapes"
    spec = ShapesSpec(num_images=6, seed=7, min_side=96, max_side=128, max_objects=3)
    register_shapes(name, tmp_path_factory.mktemp("shapes") / "split", spec)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_short_training_decreases_the_loss(shapes_split, one_thread):
    torch.manual_seed(0)
    np.random.seed(0)
    cfg = small_cfg(shapes_split)
    model = build_model(cfg)
    mapper = build_dataset_mapper(cfg, is_train=True)
    dicts = [d for d in DatasetCatalog.get(shapes_split) if d["annotations"]][:3]
    empty = copy.deepcopy(dicts[0])
    empty["annotations"] = []
    batches = [[mapper(d) for d in pair] for pair in ([dicts[0], empty], dicts[1:3])]
    assert len(batches[0][1]["instances"]) == 0 and len(batches[0][0]["instances"]) > 0

    def total_loss():
        with torch.no_grad():
            return sum(sum(model(b).values()).item() for b in batches)

    model.train()
    before = total_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    for step in range(30):
        losses = model(batches[step % 2])
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    after = total_loss()
    assert after < 0.6 * before, (before, after)


def test_coco_evaluation_of_predictions(shapes_split, tmp_path, one_thread):
    cfg = small_cfg(shapes_split)
    cfg.OUTPUT_DIR = str(tmp_path)
    model = build_model(cfg)
    model.eval()
    results = Trainer.test(cfg, model)  # one dataset: its results directly
    assert set(results) >= {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75"} <= set(results[task])
        assert all(np.isfinite(v) or np.isnan(v) for v in results[task].values())
