"""Custom COCO datasets from YAML (DATASETS.COCO_INSTANCES) and the class-count check."""

import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader

from solq_d2.data import (
    ShapesSpec,
    build_dataset_mapper,
    check_num_classes,
    register_datasets_from_cfg,
    register_shapes,
)


@pytest.fixture
def custom_coco(tmp_path, coco_tools):
    """A 3-class COCO dataset with 4 images (one without annotations)."""
    t = coco_tools
    img = t.solid_image(
        80, 120, [((10, 10, 50, 40), (255, 0, 0)), ((60, 30, 110, 70), (0, 0, 255))]
    )
    annos = [t.rect_annotation(10, 10, 50, 40, 1), t.rect_annotation(60, 30, 110, 70, 3)]
    return t.write_coco(
        tmp_path / "custom", [(img, annos), (img, annos[:1]), (img, []), (img, annos[1:])]
    )


def _yaml_cfg(data_cfg, tmp_path, text):
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    data_cfg.merge_from_file(str(path))
    return data_cfg


def test_custom_dataset_from_yaml_trains_end_to_end(tmp_path, data_cfg, custom_coco, dataset_names):
    json_file, image_root = custom_coco
    name = dataset_names("mine")
    cfg = _yaml_cfg(
        data_cfg,
        tmp_path,
        f"""
MODEL:
  META_ARCHITECTURE: "SOIT"
DATASETS:
  COCO_INSTANCES: [["{name}", "{json_file}", "{image_root}"]]
  TRAIN: ("{name}",)
  TEST: ("{name}",)
DATALOADER:
  FILTER_EMPTY_ANNOTATIONS: False
  NUM_WORKERS: 0
SOLVER:
  IMS_PER_BATCH: 2
""",
    )
    assert register_datasets_from_cfg(cfg) == [name]
    assert register_datasets_from_cfg(cfg) == [name]  # idempotent
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "coco" and meta.json_file == json_file
    assert check_num_classes(cfg, cfg.DATASETS.TRAIN, 3) == ["a", "b", "c"]
    assert len(DatasetCatalog.get(name)) == 4
    loader = build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, True))
    seen = 0
    for batch in loader:
        assert len(batch) == 2
        for d in batch:
            assert (
                d["image"].dtype == torch.uint8
                and d["image"].shape[1:] == d["instances"].image_size
            )
            assert set(d["instances"].gt_classes.tolist()) <= {0, 2}  # contiguous ids of 1 and 3
        seen += 1
        if seen == 3:
            break


def test_class_count_mismatch_is_a_clear_error(tmp_path, data_cfg, custom_coco, dataset_names):
    json_file, image_root = custom_coco
    name = dataset_names("mine")
    data_cfg.DATASETS.COCO_INSTANCES = [[name, json_file, image_root]]
    register_datasets_from_cfg(data_cfg)
    loads, load = [], DatasetCatalog[name]
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: loads.append(1) or load())
    for arch, key in [
        ("SOIT", "MODEL.SOIT.NUM_CLASSES"),
        ("QueryInst", "MODEL.QUERYINST.NUM_CLASSES"),
    ]:
        data_cfg.MODEL.META_ARCHITECTURE = arch
        classes = "\\['a', 'b', 'c'\\]"
        with pytest.raises(
            ValueError,
            match=f"{key} is 80 but dataset\\(s\\) '{name}' have 3 classes {classes}: set {key} 3",
        ):
            check_num_classes(data_cfg, [name], 80)
    # The metadata came from the json's categories alone: the dataset was never loaded.
    assert loads == []
    assert MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}


def test_solq_may_index_classes_by_dataset_category_id(
    tmp_path, data_cfg, coco_tools, dataset_names
):
    img = coco_tools.solid_image(40, 40, [])
    json_file, root = coco_tools.write_coco(
        tmp_path, [(img, [])], categories=("x", "y", "z"), category_ids=[1, 3, 7]
    )
    name = dataset_names("sparse_ids")
    data_cfg.DATASETS.COCO_INSTANCES = [[name, json_file, root]]
    register_datasets_from_cfg(data_cfg)
    data_cfg.MODEL.META_ARCHITECTURE = "SOLQ"
    assert check_num_classes(data_cfg, [name], 3) == ["x", "y", "z"]
    assert check_num_classes(data_cfg, [name], 8) == ["x", "y", "z"]  # like COCO's 91
    with pytest.raises(
        ValueError, match="MODEL.SOLQ.NUM_CLASSES is 5 .* 3 \\(or 8, max category id \\+ 1\\)"
    ):
        check_num_classes(data_cfg, [name], 5)
    data_cfg.MODEL.META_ARCHITECTURE = "SOIT"
    with pytest.raises(ValueError, match="MODEL.SOIT.NUM_CLASSES is 8"):
        check_num_classes(data_cfg, [name], 8)


def test_datasets_with_different_classes_are_rejected(
    tmp_path, data_cfg, coco_tools, dataset_names
):
    img = coco_tools.solid_image(40, 40, [])
    a = coco_tools.write_coco(tmp_path / "a", [(img, [])], categories=("cat", "dog"))
    b = coco_tools.write_coco(tmp_path / "b", [(img, [])], categories=("dog", "cat"))
    na, nb = dataset_names(), dataset_names()
    data_cfg.DATASETS.COCO_INSTANCES = [[na, *a], [nb, *b]]
    register_datasets_from_cfg(data_cfg)
    with pytest.raises(ValueError, match="different classes"):
        check_num_classes(data_cfg, [na, nb], 2)
    with pytest.raises(KeyError, match="'nope' is not registered"):
        check_num_classes(data_cfg, ["nope"], 2)


def test_bad_entries_are_clear_errors(tmp_path, data_cfg, custom_coco, dataset_names):
    json_file, image_root = custom_coco
    name = dataset_names()
    for entry, error, pattern in [
        ([name, json_file], ValueError, "\\[name, json_file, image_root\\]"),
        ([name, json_file, 3], ValueError, "three non-empty strings"),
        ([name, str(tmp_path / "missing.json"), image_root], FileNotFoundError, "missing.json"),
        ([name, json_file, str(tmp_path / "nodir")], NotADirectoryError, "nodir"),
    ]:
        data_cfg.DATASETS.COCO_INSTANCES = [entry]
        with pytest.raises(error, match=pattern):
            register_datasets_from_cfg(data_cfg)
    data_cfg.DATASETS.COCO_INSTANCES = [[name, json_file, image_root]]
    register_datasets_from_cfg(data_cfg)
    other = str(tmp_path / "other.json")
    with open(other, "w") as f:
        json.dump({"images": [], "annotations": [], "categories": []}, f)
    data_cfg.DATASETS.COCO_INSTANCES = [[name, other, image_root]]
    with pytest.raises(ValueError, match="already registered"):
        register_datasets_from_cfg(data_cfg)
    data_cfg.DATASETS.COCO_INSTANCES = [["shapes_train", json_file, image_root]]
    with pytest.raises(ValueError, match="already registered"):
        register_datasets_from_cfg(data_cfg)


def test_generated_datasets_named_in_the_config_are_prepared(tmp_path, data_cfg, dataset_names):
    """The evaluator reads the json when it is built: the trainer's registration step makes the
    files of a lazily generated dataset exist."""
    name = dataset_names("shapes_tiny")
    register_shapes(
        name, tmp_path / "tiny", ShapesSpec(num_images=3, seed=1, min_side=64, max_side=96)
    )
    assert not (tmp_path / "tiny").exists()
    assert check_num_classes(data_cfg, [name], 4) == ["circle", "triangle", "rectangle", "ring"]
    assert not (tmp_path / "tiny").exists()  # metadata needs no generation
    data_cfg.DATASETS.TEST = (name,)
    register_datasets_from_cfg(data_cfg)
    assert (tmp_path / "tiny" / "annotations.json").is_file()
    assert len(list((tmp_path / "tiny" / "images").iterdir())) == 3
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == [1, 2, 3]
    assert np.all([d["height"] <= 96 for d in dicts])
