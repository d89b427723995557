"""Official SOIT (opera, mmdet format) checkpoints -> solq_d2: detection, renaming, strict
loading through SolqD2Checkpointer, configuration checks and the CLI tool."""

import importlib.util
from pathlib import Path

import pytest
import torch

from solq_d2.checkpoint import convert_soit

from ..conftest import load_fixture

ROOT = Path(__file__).resolve().parents[2]
NUM_KEYS = 679  # opera SOIT R50 state dict (fixture README)
NUM_ALIASES = 30  # bbox_head.seg_branches.{1..5}.* share seg_branches.0
NUM_BN_COUNTERS = 53  # num_batches_tracked of the mmdet ResNet-50


def _cfg(**overrides):
    from detectron2.config import get_cfg

    from solq_d2 import add_solq_d2_config

    cfg = get_cfg()
    add_solq_d2_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs/SOIT/Base-SOIT.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, last, v)
    return cfg


def _model(**overrides):
    from detectron2.modeling import build_model

    return build_model(_cfg(**overrides)).eval()


@pytest.fixture(scope="module")
def opera_state_dict():
    """A random state dict with the official opera key names, order, shapes and aliases."""
    fx = load_fixture("soit_r50_parity.pt")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key in fx["state_dict_keys"]:
        src = fx["state_dict_aliases"].get(key, key)
        if src in sd:
            sd[key] = sd[src]
        elif src in fx["weights_int"]:
            sd[key] = torch.tensor(0)
        else:
            entry = fx["weights_packed2bit"].get(src)
            shape = tuple(entry["shape"]) if entry else tuple(fx["weights_fp16"][src].shape)
            sd[key] = torch.randn(shape, generator=g)
    assert len(sd) == NUM_KEYS
    return sd


@pytest.fixture(scope="module")
def model():
    return _model()


def test_matches_only_soit_checkpoints(opera_state_dict):
    assert convert_soit.matches({"state_dict": opera_state_dict, "meta": {}})
    assert convert_soit.matches(opera_state_dict)  # a bare state dict too
    assert convert_soit.matches(
        {"state_dict": {f"module.{k}": v for k, v in opera_state_dict.items()}}
    )
    assert not convert_soit.matches({"model": {"transformer.level_embed": torch.zeros(4, 256)}})
    queryinst_like = {"state_dict": {"roi_head.mask_head.0.conv.weight": torch.zeros(1)}}
    assert not convert_soit.matches(queryinst_like)
    assert not convert_soit.matches([1, 2])
    with pytest.raises(ValueError, match="not an official SOIT"):
        convert_soit.convert(queryinst_like)


def test_every_key_is_renamed_or_deliberately_dropped(opera_state_dict, model):
    result = convert_soit.convert({"state_dict": opera_state_dict, "meta": {}}, model=model)
    renames, dropped = dict(result["renames"]), result["dropped"]
    assert len(dropped) == NUM_ALIASES + NUM_BN_COUNTERS
    assert len(renames) + len(dropped) == NUM_KEYS
    assert len(set(renames.values())) == len(renames)  # one-to-one
    expected = set(model.state_dict()) - {"pixel_mean", "pixel_std"}
    assert set(result["model"]) == expected
    for old, new in renames.items():
        assert result["model"][new] is opera_state_dict[old]
    # a few renames spelled out (mmdet ResNet / ChannelMapper / mmcv layers -> ours)
    assert renames["backbone.layer1.0.bn3.running_var"] == "backbone.res2.0.conv3.norm.running_var"
    assert renames["backbone.layer4.2.conv2.weight"] == "backbone.res5.2.conv2.weight"
    assert renames["backbone.layer3.0.downsample.1.bias"] == "backbone.res4.0.shortcut.norm.bias"
    assert renames["neck.extra_convs.0.gn.weight"] == "input_proj.3.1.weight"
    assert (
        renames["bbox_head.transformer.decoder.layers.3.norms.0.weight"]
        == "transformer.decoder.layers.3.norm2.weight"
    )
    assert (
        renames["bbox_head.transformer.decoder.layers.3.attentions.0.attn.in_proj_weight"]
        == "transformer.decoder.layers.3.self_attn.in_proj_weight"
    )
    assert (
        renames["bbox_head.transformer.seg_encoder.layers.0.ffns.0.layers.1.bias"]
        == "mask_encoder.layers.0.linear2.bias"
    )
    assert renames["bbox_head.reg_branches.6.4.weight"] == "head.bbox_embed.6.layers.2.weight"
    assert renames["bbox_head.seg_branches.0.2.bias"] == "head.param_embed.layers.1.bias"
    assert "bbox_head.seg_branches.3.4.weight" in dropped


def test_checkpointer_loads_opera_file_strictly(opera_state_dict, model, tmp_path):
    from solq_d2.checkpoint import SolqD2Checkpointer

    path = tmp_path / "soit_r50_opera.pth"
    torch.save({"state_dict": opera_state_dict, "meta": {"epoch": 50}}, path)
    SolqD2Checkpointer(model).load(str(path))
    sd = model.state_dict()
    for old, new in convert_soit.convert(opera_state_dict)["renames"]:
        assert torch.equal(sd[new], opera_state_dict[old].to(sd[new].dtype)), new


def test_configuration_mismatch_is_reported_before_loading(opera_state_dict):
    small = _model(**{"MODEL.SOIT.NUM_CLASSES": 4, "MODEL.SOIT.DYN_HEADS": 2})
    with pytest.raises(ValueError) as e:
        convert_soit.convert(opera_state_dict, model=small)
    assert "MODEL.SOIT.NUM_CLASSES" in str(e.value) and "checkpoint 80, model 4" in str(e.value)
    assert "mask parameters D" in str(e.value) and "checkpoint 441, model 225" in str(e.value)
    r101 = _model(**{"MODEL.RESNETS.DEPTH": 101})
    with pytest.raises(ValueError, match=r"res4 blocks.*checkpoint 6, model 23"):
        convert_soit.convert(opera_state_dict, model=r101)


def test_bad_checkpoints_raise_clear_errors(opera_state_dict):
    sd = dict(opera_state_dict)
    sd["bbox_head.seg_branches.2.0.weight"] = sd["bbox_head.seg_branches.2.0.weight"] + 1
    with pytest.raises(ValueError, match="separate ones"):
        convert_soit.convert(sd)
    sd = dict(opera_state_dict, **{"bbox_head.some_new_branch.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no solq_d2 name.*some_new_branch"):
        convert_soit.convert(sd)


def _tool():
    spec = importlib.util.spec_from_file_location(
        "convert_soit_tool", ROOT / "tools/convert-soit-to-d2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_tool(opera_state_dict, tmp_path, capsys):
    tool = _tool()
    src, out = tmp_path / "opera.pth", tmp_path / "converted.pth"
    torch.save({"state_dict": opera_state_dict, "meta": {}}, src)
    cfg = str(ROOT / "configs/SOIT/Base-SOIT.yaml")
    assert tool.main(["--source", str(src), "--output", str(out), "--config-file", cfg]) == 0
    printed = capsys.readouterr().out
    assert "bbox_head.cls_branches.6.bias -> head.class_embed.6.bias" in printed
    assert "bbox_head.seg_branches.5.4.weight -> (dropped)" in printed
    converted = torch.load(out, map_location="cpu", weights_only=True)
    assert converted["matching_heuristics"] is False
    expected = convert_soit.convert(opera_state_dict)["model"]
    assert sorted(converted["model"]) == sorted(expected)
    assert all(torch.equal(converted["model"][k], v) for k, v in expected.items())
    # a config the checkpoint does not fit: non-zero exit, nothing written
    bad = tmp_path / "bad.pth"
    assert (
        tool.main(
            [
                "--source",
                str(src),
                "--output",
                str(bad),
                "--config-file",
                cfg,
                "MODEL.SOIT.NUM_CLASSES",
                "4",
            ]
        )
        == 1
    )
    assert "MODEL.SOIT.NUM_CLASSES" in capsys.readouterr().err and not bad.exists()
    not_soit = tmp_path / "other.pth"
    torch.save({"model": {"a": torch.zeros(1)}}, not_soit)
    assert tool.main(["--source", str(not_soit), "--output", str(bad)]) == 1
