"""Official QueryInst (mmdet) checkpoints -> solq_d2: key mapping, architecture checks, errors,
loading through SolqD2Checkpointer and the convert-queryinst-to-d2 tool.

The official key list and shapes come from the parity fixture (every key of the released R50
model); tensors are zero-size views expanded to the official shapes, so files stay tiny. Loading
real values is covered by tests/modeling/test_queryinst_parity.py.
"""

import importlib.util

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import solq_d2
from solq_d2.checkpoint import SolqD2Checkpointer
from solq_d2.checkpoint.convert_queryinst import convert, matches, mmdet_to_d2_key

from ..conftest import ROOT, load_fixture

CONFIG = ROOT / "configs" / "QueryInst" / "queryinst_R_50_FPN_ms_3x.yaml"


@pytest.fixture(scope="module")
def official_shapes():
    """{official key: (shape, dtype)} of the released R50-FPN 100-query model, in official order."""
    fx = load_fixture("queryinst_r50_parity.pt")
    shapes = {k: (tuple(e["shape"]), torch.float32) for k, e in fx["weights_packed2bit"].items()}
    shapes.update({k: (tuple(v.shape), torch.float32) for k, v in fx["weights_fp16"].items()})
    shapes.update({k: (tuple(v.shape), v.dtype) for k, v in fx["weights_int"].items()})
    return {k: shapes[k] for k in fx["state_dict_keys"]}


def fake_state_dict(shapes, **resize):
    """Zero tensors of the official shapes (stride-0 views: no memory); ``resize`` maps a key
    substring to a new first dimension."""
    sd = {}
    for k, (shape, dtype) in shapes.items():
        for part, n in resize.items():
            if part in k:
                shape = (n,) + shape[1:]
        sd[k] = torch.zeros((), dtype=dtype).expand(shape)
    return sd


@pytest.fixture(scope="module")
def model():
    cfg = get_cfg()
    solq_d2.add_solq_d2_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    return build_model(cfg)


def test_matches(official_shapes):
    sd = fake_state_dict(official_shapes)
    assert matches({"state_dict": sd, "meta": {"mmdet_version": "2.12.0"}})
    assert matches(sd)  # a bare state dict
    box_only = {k: v for k, v in sd.items() if "mask_head" not in k}  # mmdet Sparse R-CNN
    assert matches({"state_dict": box_only})
    assert not matches({"model": sd})  # solq_d2 / Detectron2 format
    assert not matches({"state_dict": {"backbone.conv1.weight": sd["backbone.conv1.weight"]}})
    solq_like = {"transformer.level_embed": torch.zeros(4, 256), "backbone.0.body.conv1.weight": 0}
    assert not matches({"model": solq_like}) and not matches(solq_like)
    assert not matches([sd]) and not matches({}) and not matches({"state_dict": None})


@pytest.mark.parametrize(
    "official,ours",
    [  # QUERYINST.md §9
        ("backbone.conv1.weight", "backbone.bottom_up.stem.conv1.weight"),
        ("backbone.bn1.running_var", "backbone.bottom_up.stem.conv1.norm.running_var"),
        ("backbone.layer1.0.conv3.weight", "backbone.bottom_up.res2.0.conv3.weight"),
        ("backbone.layer3.5.bn2.bias", "backbone.bottom_up.res4.5.conv2.norm.bias"),
        ("backbone.layer4.0.downsample.0.weight", "backbone.bottom_up.res5.0.shortcut.weight"),
        ("backbone.layer2.0.downsample.1.weight", "backbone.bottom_up.res3.0.shortcut.norm.weight"),
        ("neck.lateral_convs.0.conv.weight", "backbone.fpn_lateral2.weight"),
        ("neck.fpn_convs.3.conv.bias", "backbone.fpn_output5.bias"),
        ("rpn_head.init_proposal_bboxes.weight", "init_proposal_boxes.weight"),
        ("rpn_head.init_proposal_features.weight", "init_proposal_features.weight"),
        (
            "roi_head.bbox_head.0.attention.attn.in_proj_weight",
            "head.head_series.0.self_attn.in_proj_weight",
        ),
        (
            "roi_head.bbox_head.1.attention.attn.out_proj.bias",
            "head.head_series.1.self_attn.out_proj.bias",
        ),
        ("roi_head.bbox_head.2.attention_norm.weight", "head.head_series.2.norm1.weight"),
        (
            "roi_head.bbox_head.3.instance_interactive_conv.dynamic_layer.weight",
            "head.head_series.3.inst_interact.dynamic_layer.weight",
        ),
        (
            "roi_head.bbox_head.4.instance_interactive_conv.norm_in.bias",
            "head.head_series.4.inst_interact.norm1.bias",
        ),
        (
            "roi_head.bbox_head.5.instance_interactive_conv.norm_out.weight",
            "head.head_series.5.inst_interact.norm2.weight",
        ),
        (
            "roi_head.bbox_head.0.instance_interactive_conv.fc_layer.weight",
            "head.head_series.0.inst_interact.out_layer.weight",
        ),
        (
            "roi_head.bbox_head.0.instance_interactive_conv.fc_norm.bias",
            "head.head_series.0.inst_interact.norm3.bias",
        ),
        (
            "roi_head.bbox_head.0.instance_interactive_conv_norm.weight",
            "head.head_series.0.norm2.weight",
        ),
        ("roi_head.bbox_head.1.ffn.layers.0.0.weight", "head.head_series.1.linear1.weight"),
        ("roi_head.bbox_head.1.ffn.layers.1.bias", "head.head_series.1.linear2.bias"),
        ("roi_head.bbox_head.1.ffn_norm.weight", "head.head_series.1.norm3.weight"),
        ("roi_head.bbox_head.2.cls_fcs.1.bias", "head.head_series.2.cls_module.1.bias"),
        ("roi_head.bbox_head.2.reg_fcs.6.weight", "head.head_series.2.reg_module.6.weight"),
        ("roi_head.bbox_head.5.fc_cls.bias", "head.head_series.5.class_logits.bias"),
        ("roi_head.bbox_head.5.fc_reg.weight", "head.head_series.5.bboxes_delta.weight"),
        (
            "roi_head.mask_head.0.instance_interactive_conv.dynamic_layer.bias",
            "head.mask_heads.0.dynamic_conv.dynamic_layer.bias",
        ),
        (
            "roi_head.mask_head.1.instance_interactive_conv.norm_in.weight",
            "head.mask_heads.1.dynamic_conv.norm1.weight",
        ),
        (
            "roi_head.mask_head.1.instance_interactive_conv.norm_out.bias",
            "head.mask_heads.1.dynamic_conv.norm2.bias",
        ),
        ("roi_head.mask_head.2.convs.0.conv.weight", "head.mask_heads.2.mask_fcn1.weight"),
        (
            "roi_head.mask_head.2.convs.3.bn.num_batches_tracked",
            "head.mask_heads.2.mask_fcn4.norm.num_batches_tracked",
        ),
        ("roi_head.mask_head.3.upsample.weight", "head.mask_heads.3.deconv.weight"),
        ("roi_head.mask_head.4.conv_logits.bias", "head.mask_heads.4.predictor.bias"),
        ("roi_head.mask_head.4.conv_logits.unknown", None),
        ("neck.fpn_convs.0.conv.extra", None),
    ],
)
def test_key_mapping(official, ours):
    assert mmdet_to_d2_key(official) == ours


def test_conversion_covers_the_model_exactly(official_shapes, model):
    sd = fake_state_dict(official_shapes)
    expected = model.state_dict()
    for result in (convert({"state_dict": sd, "meta": {}}, model), convert(sd)):
        converted = result["model"]
        assert set(converted) == set(expected) - {"pixel_mean", "pixel_std"}
        assert all(converted[k].shape == expected[k].shape for k in converted)
        # FrozenBN backbone: its 53 num_batches_tracked buffers are dropped; the mask-head BN
        # buffers are kept
        assert len(result["dropped"]) == 53
        assert all(k.startswith("backbone.") and "num_batches" in k for k in result["dropped"])
        assert len(result["renames"]) == len(sd) - 53 == 751
        assert {old for old, _ in result["renames"]} | set(result["dropped"]) == set(sd)


def test_architecture_mismatch_is_reported_before_loading(official_shapes, model, tmp_path):
    sd = fake_state_dict(official_shapes, init_proposal=300, fc_cls=4)
    with pytest.raises(ValueError) as e:
        convert({"state_dict": sd}, model)
    assert "NUM_QUERIES: checkpoint has 300, model has 100" in str(e.value)
    assert "NUM_CLASSES: checkpoint has 4, model has 80" in str(e.value)

    path = tmp_path / "official.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    before = model.head.head_series[0].class_logits.weight.clone()
    with pytest.raises(ValueError, match="NUM_QUERIES"):
        SolqD2Checkpointer(model).load(str(path))
    assert torch.equal(model.head.head_series[0].class_logits.weight, before)


def test_box_only_checkpoint_into_a_mask_model(official_shapes, model):
    sd = {k: v for k, v in fake_state_dict(official_shapes).items() if "mask_head" not in k}
    with pytest.raises(ValueError, match="MASK_ON.*checkpoint has 0, model has 6"):
        convert({"state_dict": sd}, model)


def test_unknown_keys_are_listed(official_shapes):
    sd = fake_state_dict(official_shapes)
    sd["roi_head.bbox_head.0.extra_layer.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="roi_head.bbox_head.0.extra_layer.weight"):
        convert({"state_dict": sd})
    with pytest.raises(ValueError, match="not an official QueryInst checkpoint"):
        convert({"model": sd})


def _tool():
    spec = importlib.util.spec_from_file_location(
        "convert_queryinst_tool", ROOT / "tools" / "convert-queryinst-to-d2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_tool(official_shapes, tmp_path, capsys):
    tool = _tool()
    source, output = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save({"state_dict": fake_state_dict(official_shapes), "meta": {}}, source)
    assert tool.main(["--source", str(source), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "rpn_head.init_proposal_bboxes.weight -> init_proposal_boxes.weight" in printed
    assert "backbone.bn1.num_batches_tracked -> (dropped" in printed
    out = torch.load(output, weights_only=True)
    assert out["matching_heuristics"] is False and out["__author__"].startswith("solq_d2")
    assert len(out["model"]) == 751 and "head.mask_heads.5.predictor.weight" in out["model"]
    # a converted file is not taken for an official one again
    assert not matches(out)

    bad = tmp_path / "not_official.pth"
    torch.save({"model": out["model"]}, bad)
    assert tool.main(["--source", str(bad), "--output", str(tmp_path / "x.pth")]) == 1
    assert "not an official QueryInst checkpoint" in capsys.readouterr().err


def test_convert_tool_checks_the_config(official_shapes, tmp_path, capsys):
    tool = _tool()
    source = tmp_path / "official.pth"
    torch.save({"state_dict": fake_state_dict(official_shapes), "meta": {}}, source)
    args = ["--source", str(source), "--output", str(tmp_path / "c.pth"), "--quiet"]
    args += ["--config-file", str(CONFIG), "MODEL.QUERYINST.NUM_CLASSES", "4"]
    assert tool.main(args) == 1
    assert "NUM_CLASSES: checkpoint has 80, model has 4" in capsys.readouterr().err
    assert not (tmp_path / "c.pth").exists()
