"""Official SOLQ checkpoint conversion: names, aliases, configuration checks, 91 -> 80, CLI."""

import argparse
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from solq_d2.checkpoint import convert_solq
from solq_d2.checkpoint.convert_solq import COCO_CATEGORY_IDS, convert, matches

from ..conftest import ROOT, load_fixture
from ..modeling.test_solq_common import (
    solq_r50_parity_cfg,
    solq_tiny_cfg,
    to_official_names,
)


@pytest.fixture(scope="module")
def fx():
    return load_fixture("solq_r50_parity.pt")


@pytest.fixture(scope="module")
def r50_model():
    return build_model(solq_r50_parity_cfg(num_queries=50))


def _official(fx):
    return {"model": fx["state_dict"], "args": argparse.Namespace(**fx["config"]["args"])}


def test_fixture_converts_to_every_model_key(fx, r50_model):
    result = convert(_official(fx), r50_model)
    ours = r50_model.state_dict()
    assert set(result["model"]) == set(ours)
    for k, v in result["model"].items():
        assert tuple(v.shape) == tuple(ours[k].shape), k
    renames = dict(result["renames"])
    assert len(fx["state_dict"]) == 633 and len(result["model"]) == 633 - 66
    assert len(result["dropped"]) == 66  # 36 decoder box-head aliases + 30 vector-MLP aliases
    assert len(renames) == 265 + 6  # backbone + vector_embed.0.*
    assert renames["backbone.0.body.conv1.weight"] == "backbone.stem.conv1.weight"
    assert renames["backbone.0.body.bn1.running_var"] == "backbone.stem.conv1.norm.running_var"
    assert renames["backbone.0.body.layer1.0.bn2.weight"] == "backbone.res2.0.conv2.norm.weight"
    assert (
        renames["backbone.0.body.layer4.0.downsample.0.weight"] == "backbone.res5.0.shortcut.weight"
    )
    assert (
        renames["backbone.0.body.layer3.0.downsample.1.bias"]
        == "backbone.res4.0.shortcut.norm.bias"
    )
    assert renames["vector_embed.0.layers.2.bias"] == "vector_embed.layers.2.bias"
    assert "transformer.decoder.bbox_embed.3.layers.1.weight" in result["dropped"]
    assert "vector_embed.5.layers.0.weight" in result["dropped"]
    # unchanged names keep the very same tensors
    assert result["model"]["query_embed.weight"] is fx["state_dict"]["query_embed.weight"]


def test_matches():
    fx = load_fixture("solq_r50_parity.pt")
    assert matches(_official(fx)) and matches(fx["state_dict"])
    ours = {
        "model": {
            "backbone.stem.conv1.weight": torch.zeros(1),
            "vector_embed.layers.0.weight": torch.zeros(1),
        }
    }
    assert not matches(ours)
    assert not matches({"state_dict": {"bbox_head.transformer.level_embeds": torch.zeros(1)}})
    assert not matches({"model": None}) and not matches({})


def test_configuration_mismatch_is_a_clear_error(fx, tmp_path):
    """A d 256 / 300-query config and the d 384 / 50-query file: clear error, nothing loaded,
    also through the checkpointer a user calls (MODEL.WEIGHTS)."""
    from solq_d2.checkpoint import SolqD2Checkpointer

    cfg = solq_r50_parity_cfg(num_queries=300)
    cfg.MODEL.DEFORMABLE_TRANSFORMER.HIDDEN_DIM = 256
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "solq_official.pth"
    torch.save(_official(fx), path)
    with pytest.raises(ValueError) as e:
        SolqD2Checkpointer(model).load(str(path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    msg = str(e.value)
    assert (
        "hidden_dim: checkpoint 384 vs model 256 (MODEL.DEFORMABLE_TRANSFORMER.HIDDEN_DIM)" in msg
    )
    assert "num_queries: checkpoint 50 vs model 300 (MODEL.SOLQ.NUM_QUERIES)" in msg
    with pytest.raises(ValueError, match="META_ARCHITECTURE"):
        convert(_official(fx), torch.nn.Linear(2, 2))


def test_differing_alias_is_rejected(fx):
    sd = dict(fx["state_dict"])
    key = "transformer.decoder.bbox_embed.2.layers.0.bias"
    sd[key] = sd[key].float() + 1
    with pytest.raises(ValueError, match="should equal"):
        convert({"model": sd})


def test_91_to_80_classes(fx):
    cfg = solq_r50_parity_cfg(num_queries=50)
    cfg.MODEL.SOLQ.NUM_CLASSES = 80
    model = build_model(cfg)
    result = convert(_official(fx), model)
    rows = torch.tensor(COCO_CATEGORY_IDS)
    w = result["model"]["class_embed.3.weight"]
    assert w.shape == (80, 384)
    assert torch.equal(w, fx["state_dict"]["class_embed.3.weight"][rows])
    assert torch.equal(
        result["model"]["class_embed.3.bias"], fx["state_dict"]["class_embed.3.bias"][rows]
    )


@pytest.mark.parametrize(
    "refine,two_stage", [(True, False), (False, False), (True, True), (False, True)]
)
def test_roundtrip_layouts(refine, two_stage):
    """Official layouts with and without box refinement / two-stage convert back exactly."""
    cfg = solq_tiny_cfg()
    cfg.MODEL.DEFORMABLE_TRANSFORMER.WITH_BOX_REFINE = refine
    cfg.MODEL.DEFORMABLE_TRANSFORMER.TWO_STAGE = two_stage
    model = build_model(cfg)
    official = to_official_names(model)
    cfg_ck = convert_solq.checkpoint_config({"model": official})
    assert cfg_ck["with_box_refine"] == refine and cfg_ck["two_stage"] == two_stage
    result = convert({"model": official}, model)
    ours = model.state_dict()
    assert set(result["model"]) == set(ours)
    for k in ours:
        assert torch.equal(result["model"][k], ours[k]), k


def test_cli_prints_renames_and_writes_loadable_file(tmp_path):
    model = build_model(solq_tiny_cfg())
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    args = argparse.Namespace(
        hidden_dim=32, nheads=4, enc_n_points=4, dec_n_points=4, with_box_refine=True
    )
    torch.save({"model": to_official_names(model), "args": args, "epoch": 1}, src)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert-solq-to-d2.py"),
            "--source",
            str(src),
            "--output",
            str(dst),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "backbone.0.body.conv1.weight -> backbone.stem.conv1.weight" in proc.stdout
    assert "transformer.decoder.bbox_embed.1.layers.2.bias -> (dropped)" in proc.stdout
    loaded = torch.load(dst, weights_only=True)
    assert loaded["matching_heuristics"] is False
    state = model.state_dict()
    assert set(loaded["model"]) == set(state)
    assert all(torch.equal(loaded["model"][k], state[k]) for k in state)
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert-solq-to-d2.py"),
            "--source",
            str(dst),
            "--output",
            str(tmp_path / "x.pth"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 1 and "not an official SOLQ checkpoint" in bad.stderr


def test_coco_ids_are_detectron2s_contiguous_order():
    from detectron2.data.datasets.builtin_meta import _get_coco_instances_meta

    from solq_d2.modeling.solq import coco_id_to_contiguous_table

    meta = _get_coco_instances_meta()["thing_dataset_id_to_contiguous_id"]
    assert {cid: i for i, cid in enumerate(COCO_CATEGORY_IDS)} == meta
    table = coco_id_to_contiguous_table(91)
    assert all(table[cid] == i for cid, i in meta.items())
    assert (table >= 0).sum() == 80 and table[0] == -1 and table[12] == -1
