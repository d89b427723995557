"""Optimizer builder: LR multipliers by parameter name, weight-decay groups, gradient clipping."""

import math

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg

import solq_d2
from solq_d2.engine import build_optimizer


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.sampling_offsets = nn.Linear(4, 4)
        self.value_proj = nn.Linear(4, 4)


class _Net(nn.Module):
    """Has one parameter of each kind the groups distinguish."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.backbone.add_module("reference_points", nn.Linear(4, 2, bias=False))
        self.attn = _Attention()
        self.norm = nn.LayerNorm(4)
        self.level_embed = nn.Parameter(torch.zeros(2, 4))
        self.query_embed = nn.Embedding(3, 4)
        self.bbox_embed = nn.Linear(4, 4)  # an MLP named "*_embed" is not an embedding
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.shared_a = nn.Linear(4, 1, bias=False)
        self.shared_b = self.shared_a


def _cfg(**solver):
    cfg = get_cfg()
    solq_d2.add_solq_d2_config(cfg)
    s = cfg.SOLVER
    s.BASE_LR = 1e-3
    s.WEIGHT_DECAY = 1e-4
    s.WEIGHT_DECAY_NORM = 1e-5
    s.WEIGHT_DECAY_EMBED = 2e-5
    s.BACKBONE_MULTIPLIER = 0.1
    s.LINEAR_PROJ_MULTIPLIER = 0.5
    for k, v in solver.items():
        setattr(s, k, v)
    return cfg


def _hyper_by_name(model, optimizer):
    by_param = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert p not in by_param, "a parameter is in two groups"
            by_param[p] = (group["lr"], group["weight_decay"])
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: hp for p, hp in by_param.items()}


def test_interface_defaults():
    cfg = get_cfg()
    solq_d2.add_solq_d2_config(cfg)
    assert cfg.SOLVER.OPTIMIZER == "ADAMW"
    assert list(cfg.SOLVER.LINEAR_PROJ_NAMES) == ["sampling_offsets", "reference_points"]
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == 1.0 and cfg.SOLVER.LINEAR_PROJ_MULTIPLIER == 1.0
    assert list(cfg.TEST.EVAL_TASKS) == ["bbox", "segm"]


def test_lr_multipliers_and_weight_decay_groups():
    model = _Net()
    opt = build_optimizer(_cfg(), model)
    assert isinstance(opt, torch.optim.AdamW)
    got = _hyper_by_name(model, opt)
    lr, wd, wd_norm, wd_embed = 1e-3, 1e-4, 1e-5, 2e-5
    expected = {
        "backbone.0.weight": (lr * 0.1, wd),
        "backbone.0.bias": (lr * 0.1, wd),
        "backbone.1.weight": (lr * 0.1, wd_norm),
        "backbone.1.bias": (lr * 0.1, wd_norm),
        # backbone and linear-projection name: both multipliers
        "backbone.reference_points.weight": (lr * 0.1 * 0.5, wd),
        "attn.sampling_offsets.weight": (lr * 0.5, wd),
        "attn.sampling_offsets.bias": (lr * 0.5, wd),
        "attn.value_proj.weight": (lr, wd),
        "attn.value_proj.bias": (lr, wd),
        "norm.weight": (lr, wd_norm),
        "norm.bias": (lr, wd_norm),
        "level_embed": (lr, wd_embed),
        "query_embed.weight": (lr, wd_embed),
        "bbox_embed.weight": (lr, wd),
        "bbox_embed.bias": (lr, wd),
        "shared_a.weight": (lr, wd),  # shared with shared_b: listed once
    }
    assert set(got) == set(expected)  # frozen parameters are left out
    for name, (e_lr, e_wd) in expected.items():
        assert got[name][0] == pytest.approx(e_lr), name
        assert got[name][1] == pytest.approx(e_wd), name
    # groups with equal hyper-parameters are merged
    hypers = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
    assert len(hypers) == len(set(hypers)) == 7


def test_bias_keys_and_custom_linear_proj_names():
    model = _Net()
    cfg = _cfg(BIAS_LR_FACTOR=2.0, WEIGHT_DECAY_BIAS=0.0, LINEAR_PROJ_NAMES=["value_proj"])
    got = _hyper_by_name(model, build_optimizer(cfg, model))
    assert got["attn.value_proj.weight"] == pytest.approx((1e-3 * 0.5, 1e-4))
    assert got["attn.value_proj.bias"] == pytest.approx((1e-3 * 0.5 * 2.0, 0.0))
    assert got["attn.sampling_offsets.weight"] == pytest.approx((1e-3, 1e-4))
    assert got["norm.bias"] == pytest.approx((2e-3, 1e-5))  # norm decay wins over bias decay


def test_sgd_and_adamw_hyperparameters():
    model = _Net()
    sgd = build_optimizer(_cfg(OPTIMIZER="SGD", MOMENTUM=0.8, NESTEROV=True), model)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] is True
    adamw = build_optimizer(_cfg(OPTIMIZER="adamw", ADAMW_BETAS=(0.8, 0.95)), model)
    assert adamw.defaults["betas"] == (0.8, 0.95)


@pytest.mark.parametrize(
    "solver, message",
    [
        ({"OPTIMIZER": "LAMB"}, "Unknown SOLVER.OPTIMIZER 'LAMB'"),
        ({"ADAMW_BETAS": (0.9,)}, "ADAMW_BETAS must have 2 values"),
    ],
)
def test_config_mistakes_are_clear(solver, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(_cfg(**solver), _Net())


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(_cfg(), model)


# ----------------------------------------------------------------------------- clipping
def _two_param_model():
    """Two parameters in different LR groups (the clip must span groups)."""
    model = nn.Module()
    model.backbone = nn.Linear(2, 1, bias=False)
    model.head = nn.Linear(2, 1, bias=False)
    return model


def _clip_cfg(clip_type, value, norm_type=2.0, optimizer="SGD"):
    cfg = _cfg(OPTIMIZER=optimizer, BASE_LR=0.0, MOMENTUM=0.0)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = value
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = norm_type
    return cfg


def _step_with_grads(cfg, g_backbone, g_head):
    model = _two_param_model()
    opt = build_optimizer(cfg, model)
    model.backbone.weight.grad = torch.tensor([g_backbone])
    model.head.weight.grad = torch.tensor([g_head])
    opt.step()
    return model.backbone.weight.grad[0], model.head.weight.grad[0]


def test_full_model_clipping_clips_the_total_norm():
    # total L2 norm is 5 -> scaled by 1/5 as a whole (direction kept); per-parameter "norm"
    # clipping would leave a total norm of sqrt(2)
    gb, gh = _step_with_grads(_clip_cfg("full_model", 1.0), [3.0, 0.0], [0.0, 4.0])
    torch.testing.assert_close(gb, torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(gh, torch.tensor([0.0, 0.8]))
    assert math.sqrt(gb.pow(2).sum() + gh.pow(2).sum()) == pytest.approx(1.0, rel=1e-5)

    gb, gh = _step_with_grads(_clip_cfg("norm", 1.0), [3.0, 0.0], [0.0, 4.0])
    torch.testing.assert_close(gb, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(gh, torch.tensor([0.0, 1.0]))


def test_full_model_clipping_below_threshold_and_other_norms():
    gb, gh = _step_with_grads(_clip_cfg("full_model", 10.0), [3.0, 0.0], [0.0, 4.0])
    torch.testing.assert_close(gb, torch.tensor([3.0, 0.0]))  # untouched
    torch.testing.assert_close(gh, torch.tensor([0.0, 4.0]))
    gb, gh = _step_with_grads(
        _clip_cfg("full_model", 2.0, norm_type=float("inf")), [3.0, 1.0], [0.0, 4.0]
    )
    torch.testing.assert_close(gb, torch.tensor([1.5, 0.5]))  # max |g| = 4 -> 2
    torch.testing.assert_close(gh, torch.tensor([0.0, 2.0]))


def test_full_model_clipping_with_adamw_updates_like_clipped_gradients():
    torch.manual_seed(0)
    cfg = _clip_cfg("full_model", 0.1, optimizer="ADAMW")
    cfg.SOLVER.BASE_LR = 1e-2
    model = _two_param_model()
    ref = _two_param_model()
    ref.load_state_dict(model.state_dict())
    opt = build_optimizer(cfg, model)
    assert type(opt).__name__ == "AdamWWithFullModelGradientClip"
    assert isinstance(opt, torch.optim.AdamW)
    ref_opt = torch.optim.AdamW(
        [{"params": [ref.backbone.weight], "lr": 1e-3}, {"params": [ref.head.weight], "lr": 1e-2}],
        weight_decay=1e-4,
    )
    for _ in range(3):
        for m in (model, ref):
            m.zero_grad()
            (m.backbone(torch.ones(1, 2)) * 5 + m.head(torch.ones(1, 2)) * 7).sum().backward()
        total = torch.cat(
            [ref.backbone.weight.grad.flatten(), ref.head.weight.grad.flatten()]
        ).norm()
        for p in (ref.backbone.weight, ref.head.weight):
            p.grad.mul_(0.1 / (total + 1e-6))
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(model.backbone.weight, ref.backbone.weight)
    torch.testing.assert_close(model.head.weight, ref.head.weight)


def test_value_clipping_is_detectron2s():
    gb, gh = _step_with_grads(_clip_cfg("value", 0.5), [3.0, -0.2], [0.0, -4.0])
    torch.testing.assert_close(gb, torch.tensor([0.5, -0.2]))
    torch.testing.assert_close(gh, torch.tensor([0.0, -0.5]))


@pytest.mark.parametrize(
    "clip_type, value, message",
    [("fullmodel", 1.0, "Unknown SOLVER.CLIP_GRADIENTS.CLIP_TYPE"), ("full_model", 0.0, "> 0")],
)
def test_clip_config_mistakes(clip_type, value, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(_clip_cfg(clip_type, value), _two_param_model())
