"""SOIT's dynamic mask head glue: the stand-alone dynamic-head sub-fixture (opera's
DynamicDeformableAttention + RelSinePositionalEncoding), aligned upsampling, geometry, checks."""

import pytest
import torch

from solq_d2.modeling.soit.dynamic_head import SOITDynamicMaskHead, aligned_bilinear, valid_sizes

from .test_soit_fixture import FIXTURE
from ..conftest import load_fixture

SUB = dict(atol=1e-5, rtol=0)  # fixture README: the dynamic-head sub-fixture


@pytest.fixture(scope="module")
def dyn():
    return load_fixture(FIXTURE)["dynamic_head"]


def _all_instances(dyn):
    params = torch.cat(list(dyn["params"]))
    centers = torch.cat(list(dyn["centers_cxcy"]))
    img_idx = torch.cat([torch.full((len(p),), b) for b, p in enumerate(dyn["params"])])
    return params, centers, img_idx


def test_param_dim_formula():
    assert SOITDynamicMaskHead().param_dim == 441  # paper and opera
    assert SOITDynamicMaskHead(num_heads=8).param_dim == 873  # paper's M_d = 8 variant
    assert SOITDynamicMaskHead(mask_channels=16, num_heads=4, num_points=2).param_dim == 17 * 25


def test_subfixture_all_images_in_one_call(dyn):
    """Both images' instances in one call reproduce opera's per-instance training path (padded
    pixels included: opera's queries there are the un-zeroed features plus the PE)."""
    head = SOITDynamicMaskHead()
    fmask = dyn["F_mask"].permute(0, 2, 3, 1).contiguous()
    assert torch.equal(valid_sizes(dyn["padding_mask"]), dyn["valid_hw"])
    params, centers, img_idx = _all_instances(dyn)
    logits = head(fmask, dyn["valid_hw"], params, img_idx, centers)
    expected = torch.cat(list(dyn["logits_s8_forward"]))
    torch.testing.assert_close(logits, expected, **SUB)
    torch.testing.assert_close(logits, torch.cat(list(dyn["logits_s8_forward_test"])), **SUB)
    up = head.upsample(logits)
    torch.testing.assert_close(up, torch.cat(list(dyn["logits_s2_aligned_bilinear"])), **SUB)


def test_aligned_bilinear_is_aligned():
    x = torch.randn(2, 3, 5, 7)
    y = aligned_bilinear(x, 4)
    assert y.shape == (2, 3, 20, 28)
    # output pixel 4i + 2 sits on input pixel i (both pixel centres at 8i + 4 input pixels)
    torch.testing.assert_close(y[:, :, 2::4, 2::4], x)
    # halfway between two input pixels: their mean; the borders replicate
    torch.testing.assert_close(y[:, :, 4, 2::4], (x[:, :, 0] + x[:, :, 1]) / 2)
    torch.testing.assert_close(y[:, :, 0, 2::4], x[:, :, 0])
    torch.testing.assert_close(y[:, :, -1, 2::4], x[:, :, -1])
    assert torch.equal(aligned_bilinear(x, 1), x)
    assert aligned_bilinear(x[:0], 4).shape == (0, 3, 20, 28)
    with pytest.raises(ValueError, match="integer factor"):
        aligned_bilinear(x, 2.5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        aligned_bilinear(x[0], 4)


def test_pos_embed_modes(dyn):
    fmask = dyn["F_mask"].permute(0, 2, 3, 1).contiguous()
    params, centers, img_idx = _all_instances(dyn)
    rel = SOITDynamicMaskHead(pos_embed="rel")
    absolute = SOITDynamicMaskHead(pos_embed="abs")
    none = SOITDynamicMaskHead(pos_embed="none")
    a = absolute(fmask, dyn["valid_hw"], params, img_idx, centers)
    torch.testing.assert_close(
        a, rel(fmask, dyn["valid_hw"], params, img_idx, torch.zeros_like(centers))
    )
    n = none(fmask, dyn["valid_hw"], params, img_idx, centers)
    assert (n - a).abs().max() > 1e-2 and (
        n - rel(fmask, dyn["valid_hw"], params, img_idx, centers)
    ).abs().max() > 1e-2


def test_gradients_reach_params_and_features_not_centres(dyn):
    head = SOITDynamicMaskHead()
    fmask = dyn["F_mask"].permute(0, 2, 3, 1).contiguous().requires_grad_()
    params, centers, img_idx = _all_instances(dyn)
    params = params.clone().requires_grad_()
    centers = centers.clone().requires_grad_()
    head.upsample(head(fmask, dyn["valid_hw"], params, img_idx, centers)).sigmoid().sum().backward()
    assert params.grad is not None and params.grad.abs().sum() > 0
    assert fmask.grad is not None and fmask.grad.abs().sum() > 0
    assert centers.grad is None or centers.grad.abs().sum() == 0
    # every part of every instance's parameter vector is used (441 = weights and biases)
    assert (params.grad.abs().sum(0) > 0).all()


def test_no_instances():
    head = SOITDynamicMaskHead()
    fmask = torch.randn(2, 6, 7, 8)
    out = head(
        fmask,
        torch.tensor([[6, 7], [5, 5]]),
        torch.zeros(0, 441),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 2),
    )
    assert out.shape == (0, 6, 7)
    assert head.upsample(out).shape == (0, 24, 28)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="divisible by DYN_HEADS"):
        SOITDynamicMaskHead(mask_channels=8, num_heads=3)
    with pytest.raises(ValueError, match="DYN_POS_EMBED"):
        SOITDynamicMaskHead(pos_embed="sine")
    with pytest.raises(ValueError, match="MASK_UPSAMPLE"):
        SOITDynamicMaskHead(upsample=0)
    head = SOITDynamicMaskHead()
    fmask = torch.randn(1, 6, 7, 8)
    hw = torch.tensor([[6, 7]])
    with pytest.raises(ValueError, match=r"\(T, 441\)"):
        head(fmask, hw, torch.zeros(2, 440), torch.zeros(2, dtype=torch.long), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\(B, H, W, 8\)"):
        head(
            fmask.permute(0, 3, 1, 2),
            hw,
            torch.zeros(2, 441),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2, 2),
        )
