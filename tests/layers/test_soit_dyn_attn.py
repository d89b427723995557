"""SOIT's fused instance-aware deformable attention: parity with the authors' code (fixture),
compiled kernels vs the PyTorch reference (values and gradients), gradcheck, awkward shapes,
determinism, bad inputs and the fallback path."""
import math
import os
import subprocess
import sys

import pytest
import torch

from solq_d2.layers import _ext
from solq_d2.layers.soit_dyn_attn import soit_dyn_attn
from solq_d2.layers.soit_dyn_attn_pytorch import (
    soit_dyn_attn_pytorch,
    soit_dyn_param_dim,
    soit_dyn_split_params,
    soit_rel_pos_embed,
)
from ..conftest import ROOT, load_fixture, requires_cuda

# The compiled tests never skip: `make test` builds the extension first, and a missing kernel
# fails them (impl="compiled" raises, naming the reason).
# the CPU kernel paths: AVX-512 when the CPU has it (the default), and the portable one, which
# also runs the arithmetic the CUDA kernels share
CPU_PATHS = ["default", "scalar"]
SUB = dict(atol=1e-5, rtol=0)  # fixtures/README.md: the dynamic-head sub-fixture tolerance


@pytest.fixture
def cpu_path(request, monkeypatch):
    if request.param == "scalar":
        monkeypatch.setenv("SOLQ_D2_SOIT_CPU", "scalar")
    else:
        monkeypatch.delenv("SOLQ_D2_SOIT_CPU", raising=False)
    return request.param


def _fixture_inputs():
    dyn = load_fixture("soit_r50_parity.pt")["dynamic_head"]
    fmask = dyn["F_mask"].permute(0, 2, 3, 1).contiguous()
    params = torch.cat(list(dyn["params"]))
    centers = torch.cat(list(dyn["centers_cxcy"]))
    img_idx = torch.cat([torch.full((len(p),), b) for b, p in enumerate(dyn["params"])])
    return dyn, fmask, dyn["valid_hw"], params, img_idx, centers


def _problem(B=2, H=7, W=9, C=8, M=4, K=4, T=5, valid=None, off_scale=1.5, seed=0,
             dtype=torch.float64):
    """Random inputs with offsets of a few pixels, some samples leaving the map, padding."""
    g = torch.Generator().manual_seed(seed)
    D = soit_dyn_param_dim(C, M, K)
    fmask = torch.randn(B, H, W, C, generator=g, dtype=dtype)
    params = torch.randn(T, D, generator=g, dtype=dtype) * 0.5
    parts = soit_dyn_split_params(params, C, M, K)
    parts["b_off"].mul_(off_scale * 2)  # |offsets| up to ~2*off_scale*2 px: some out of range
    if valid is None:
        valid = [(H, W)] + [(max(1, H - 2 - b), max(1, W - 3 + b)) for b in range(1, B)]
    valid_hw = torch.tensor(valid, dtype=torch.int64)
    img_idx = torch.arange(T) % B
    centers = torch.rand(T, 2, generator=g, dtype=dtype)
    return fmask, valid_hw, params, img_idx, centers


# ------------------------------------------------------------------------------------------------
# Parity with the authors' code


def test_reference_matches_fixture():
    dyn, fmask, valid_hw, params, img_idx, centers = _fixture_inputs()
    out = soit_dyn_attn_pytorch(fmask, valid_hw, params, img_idx, centers)
    torch.testing.assert_close(out, torch.cat(list(dyn["logits_s8_forward"])), **SUB)
    torch.testing.assert_close(out, torch.cat(list(dyn["logits_s8_forward_test"])), **SUB)


def test_rel_pos_embed_matches_fixture():
    dyn, fmask, valid_hw, params, img_idx, centers = _fixture_inputs()
    pe = soit_rel_pos_embed(valid_hw, centers, img_idx, fmask.shape[1], fmask.shape[2])
    ref = torch.cat(list(dyn["rel_pos_embed"])).permute(0, 2, 3, 1)
    torch.testing.assert_close(pe, ref, atol=1e-6, rtol=0)
    # the padding convention is exercised: image 1 is padded (valid 23 x 30 of 29 x 37)
    assert valid_hw[1].tolist() == [23, 30]


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
def test_compiled_matches_fixture(cpu_path):
    dyn, fmask, valid_hw, params, img_idx, centers = _fixture_inputs()
    out = soit_dyn_attn(fmask, valid_hw, params, img_idx, centers, impl="compiled")
    torch.testing.assert_close(out, torch.cat(list(dyn["logits_s8_forward"])), **SUB)
    torch.testing.assert_close(out, torch.cat(list(dyn["logits_s8_forward_test"])), **SUB)
    # per image on its own (batch of one, no padding around image 0)
    for b in range(2):
        sel = img_idx == b
        one = soit_dyn_attn(
            fmask[b : b + 1], valid_hw[b : b + 1], params[sel], img_idx[sel] * 0, centers[sel],
            impl="compiled",
        )
        torch.testing.assert_close(one, dyn["logits_s8_forward"][b], **SUB)


def test_fixture_is_sensitive_to_layout_mistakes():
    """The sub-fixture would catch a swapped (dx, dy) or a missing padding mask."""
    dyn, fmask, valid_hw, params, img_idx, centers = _fixture_inputs()
    ref = torch.cat(list(dyn["logits_s8_forward"]))
    swapped = params.clone()
    swapped[:, 0:256] = params[:, 0:256].view(-1, 16, 2, 8).flip(2).reshape(-1, 256)
    swapped[:, 256:288] = params[:, 256:288].view(-1, 16, 2).flip(2).reshape(-1, 32)
    out = soit_dyn_attn_pytorch(fmask, valid_hw, swapped, img_idx, centers)
    assert (out - ref).abs().max() > 1.0
    full = torch.tensor([[29, 37], [29, 37]])
    out = soit_dyn_attn_pytorch(fmask, full, params, img_idx, centers)
    assert (out - ref).abs().max() > 1.0


# ------------------------------------------------------------------------------------------------
# Compiled kernels vs the reference


def _values_and_grads(fn, fmask, valid_hw, params, img_idx, centers, M=4, K=4, pos_embed=True,
                      w=None):
    """Logits, and the gradients of sum(logits * w) (w random by default) w.r.t. fmask, params."""
    fmask = fmask.clone().requires_grad_(True)
    params = params.clone().requires_grad_(True)
    out = fn(fmask, valid_hw, params, img_idx, centers, num_heads=M, num_points=K,
             pos_embed=pos_embed)
    if w is None:
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    gf, gp = torch.autograd.grad((out * w).sum(), (fmask, params))
    return out.detach(), gf, gp


def _compiled(*args, **kw):
    return soit_dyn_attn(*args, impl="compiled", **kw)


GEOMETRIES = [(8, 4, 4, True), (8, 8, 4, True), (8, 1, 4, False), (16, 4, 4, True), (4, 2, 3, True)]


@pytest.mark.parametrize("C,M,K,pos_embed", GEOMETRIES)
def test_compiled_vs_reference_fp64(C, M, K, pos_embed):
    """Values and gradients agree to rounding in float64, fixed and run-time geometries."""
    prob = _problem(B=3, H=6, W=19, C=C, M=M, K=K, T=7)
    ref = _values_and_grads(soit_dyn_attn_pytorch, *prob, M=M, K=K, pos_embed=pos_embed)
    got = _values_and_grads(_compiled, *prob, M=M, K=K, pos_embed=pos_embed)
    for r, g in zip(ref, got):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-11)
    assert ref[1].abs().max() > 0 and ref[2].abs().max() > 0


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("C,M,K,pos_embed", GEOMETRIES[::2])
def test_compiled_vs_reference_fp32(cpu_path, C, M, K, pos_embed):
    """float32 at a realistic size, both CPU paths (the AVX-512 one is float32 only)."""
    prob = _problem(B=2, H=24, W=37, C=C, M=M, K=K, T=12, dtype=torch.float32, seed=3)
    ref = _values_and_grads(soit_dyn_attn_pytorch, *prob, M=M, K=K, pos_embed=pos_embed)
    got = _values_and_grads(_compiled, *prob, M=M, K=K, pos_embed=pos_embed)
    torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=1e-5)
    for r, g in zip(ref[1:], got[1:]):  # gradients: sums over many pixels
        torch.testing.assert_close(g, r, atol=2e-4 * r.abs().max().item(), rtol=1e-4)


def test_gradcheck_fixed_geometry():
    """float64 gradcheck of the compiled op (C=8, M=4, K=4), padding and out-of-range samples."""
    fmask, valid_hw, params, img_idx, centers = _problem(B=2, H=4, W=5, T=2, off_scale=2.0)
    assert valid_hw[1].tolist() != [4, 5]
    fmask.requires_grad_(True)
    params.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda f, p: _compiled(f, valid_hw, p, img_idx, centers), (fmask, params),
        eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True,
    )


def test_gradcheck_runtime_geometry():
    """Full float64 gradcheck on a small run-time geometry (C=4, M=2, K=2)."""
    fmask, valid_hw, params, img_idx, centers = _problem(
        B=2, H=4, W=6, C=4, M=2, K=2, T=3, off_scale=2.0, seed=5
    )
    # some samples certainly out of the map
    parts = soit_dyn_split_params(params, 4, 2, 2)
    parts["b_off"][0, :2] = torch.tensor([7.3, -6.1], dtype=torch.float64)
    fmask.requires_grad_(True)
    params.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda f, p: _compiled(f, valid_hw, p, img_idx, centers, num_heads=2, num_points=2),
        (fmask, params), eps=1e-6, atol=1e-5, rtol=1e-4,
    )


def test_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the custom op."""
    fmask, valid_hw, params, img_idx, centers = _problem(B=2, H=3, W=4, T=3, dtype=torch.float32)
    fmask.requires_grad_(True)
    params.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.solq_d2.soit_dyn_attn_forward.default,
        (fmask, valid_hw, params, img_idx, centers, 4, 4, True),
    )


# ------------------------------------------------------------------------------------------------
# Awkward shapes and semantics


@pytest.mark.parametrize("impl", ["compiled", "pytorch"])
def test_empty_instances(impl):
    fmask, valid_hw, params, img_idx, centers = _problem(T=0, dtype=torch.float32)
    fmask.requires_grad_(True)
    params.requires_grad_(True)
    out = soit_dyn_attn(fmask, valid_hw, params, img_idx, centers, impl=impl)
    assert out.shape == (0, 7, 9)
    out.sum().backward()
    assert fmask.grad.shape == fmask.shape and not fmask.grad.any()
    assert params.grad.shape == (0, 441)


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
def test_one_image_vs_several(cpu_path):
    """Instances of a batch equal the same instances evaluated image by image."""
    fmask, valid_hw, params, img_idx, centers = _problem(
        B=3, H=8, W=21, T=9, dtype=torch.float32, seed=7
    )
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))  # images interleaved
    params, img_idx, centers = params[perm], img_idx[perm], centers[perm]
    joint = _values_and_grads(_compiled, fmask, valid_hw, params, img_idx, centers)
    for b in range(3):
        sel = img_idx == b
        w = torch.randn(joint[0].shape, generator=torch.Generator().manual_seed(1))[sel]
        one = _values_and_grads(
            _compiled, fmask[b : b + 1], valid_hw[b : b + 1], params[sel], img_idx[sel] * 0,
            centers[sel], w=w,
        )
        assert torch.equal(one[0], joint[0][sel])  # per-pixel work: bitwise
        torch.testing.assert_close(one[1][0], joint[1][b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one[2], joint[2][sel], atol=1e-5, rtol=1e-5)


def test_padding_semantics():
    """Values outside the valid region read 0; queries read the raw features there."""
    fmask, valid_hw, params, img_idx, centers = _problem(B=1, H=6, W=8, T=2, valid=[(4, 5)])
    out = _compiled(fmask, valid_hw, params, img_idx, centers)
    poked = fmask.clone()
    poked[0, 4:, :, :] += 100.0  # padded rows
    poked[0, :, 5:, :] -= 50.0  # padded columns
    out2 = _compiled(poked, valid_hw, params, img_idx, centers)
    # valid pixels: their queries and every value they can read are unchanged
    torch.testing.assert_close(out2[:, :4, :5], out[:, :4, :5], atol=1e-12, rtol=0)
    # padded pixels: their queries changed
    assert (out2[:, 4:] - out[:, 4:]).abs().max() > 1e-3
    # the gradient reaches padded pixels only through their queries (content path)
    f = fmask.clone().requires_grad_(True)
    g_pad = torch.zeros(2, 6, 8, dtype=torch.float64)
    g_pad[:, :4, :5] = 1.0  # loss on valid pixels only
    (_compiled(f, valid_hw, params, img_idx, centers) * g_pad).sum().backward()
    assert not f.grad[0, 4:].any() and not f.grad[0, :, 5:].any()


def test_non_contiguous_features():
    """fmask as the NCHW -> NHWC view a model may pass: same values, gradient of its shape."""
    fmask, valid_hw, params, img_idx, centers = _problem(dtype=torch.float32, seed=9)
    nchw = fmask.permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    view = nchw.permute(0, 2, 3, 1)
    assert not view.is_contiguous()
    out = _compiled(view, valid_hw, params, img_idx, centers)
    assert torch.equal(out, _compiled(fmask, valid_hw, params, img_idx, centers))
    out.sum().backward()
    assert nchw.grad.shape == nchw.shape and nchw.grad.abs().sum() > 0


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
def test_offsets_far_out_or_nan_are_safe(cpu_path):
    """Huge, infinite or NaN offsets sample nothing (logit = b_out): no out-of-range read."""
    fmask, valid_hw, params, img_idx, centers = _problem(T=4, dtype=torch.float32)
    parts = soit_dyn_split_params(params)
    parts["w_off"].zero_()
    parts["b_off"][0].fill_(3e38)
    parts["b_off"][1].fill_(-1e30)
    parts["b_off"][2].fill_(float("inf"))
    parts["b_off"][3].fill_(float("nan"))
    params.requires_grad_(True)
    out = _compiled(fmask, valid_hw, params, img_idx, centers)
    b_out = params.detach()[:, 440]
    torch.testing.assert_close(out, b_out[:, None, None].expand(4, 7, 9))
    out.sum().backward()
    assert torch.isfinite(params.grad).all()


def test_low_precision_inputs_compute_in_fp32():
    fmask, valid_hw, params, img_idx, centers = _problem(dtype=torch.float32, seed=2)
    ref = _compiled(fmask.half().float(), valid_hw, params.half().float(), img_idx, centers)
    for dt in (torch.float16, torch.bfloat16):
        f = fmask.to(dt).requires_grad_(True)
        p = params.to(dt).requires_grad_(True)
        out = _compiled(f, valid_hw, p, img_idx, centers)
        assert out.dtype == torch.float32
        if dt == torch.float16:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        out.sum().backward()
        assert f.grad.dtype == dt and p.grad.dtype == dt


# ------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
def test_backward_deterministic_across_runs_and_threads(cpu_path):
    prob = _problem(B=2, H=16, W=23, T=10, dtype=torch.float32, seed=11)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 2, 3):
            torch.set_num_threads(n)
            runs.append(_values_and_grads(_compiled, *prob))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Bad inputs


def _bad_cases():
    f, v, p, i, c = _problem(B=2, H=5, W=6, T=3, dtype=torch.float32)
    return [
        ("params must be", (f, v, p[:, :-1], i, c), {}),
        ("divisible by num_heads", (f, v, p, i, c), dict(num_heads=3)),
        ("params must be", (f, v, p, i, c), dict(num_points=3)),
        ("must be \\(B, H, W, C\\)", (f[0], v, p, i, c), {}),
        ("valid_hw must", (f, v[:1], p, i, c), {}),
        ("valid_hw must lie", (f, torch.tensor([[5, 6], [0, 6]]), p, i, c), {}),
        ("valid_hw must lie", (f, torch.tensor([[5, 6], [6, 6]]), p, i, c), {}),
        ("img_idx must lie", (f, v, p, torch.tensor([0, 2, 1]), c), {}),
        ("img_idx must lie", (f, v, p, torch.tensor([0, -1, 1]), c), {}),
        ("img_idx must be", (f, v, p, i[:2], c), {}),
        ("centers must be", (f, v, p, i, c[:, :1]), {}),
        ("floating point", (f.long(), v, p, i, c), {}),
        ("integer tensor", (f, v.float(), p, i, c), {}),
        ("C % 4", (f[..., :6], v, p[:, : soit_dyn_param_dim(6, 2, 4)], i, c), dict(num_heads=2)),
        ("params is on meta", (f, v, p.to("meta"), i, c), {}),
        ("centers is on meta", (f, v, p, i, c.to("meta")), {}),
    ]


@pytest.mark.parametrize("impl", ["auto", "pytorch"])
def test_bad_inputs_raise(impl):
    for msg, args, kw in _bad_cases():
        with pytest.raises((ValueError, TypeError), match=msg):
            soit_dyn_attn(*args, impl=impl, **kw)
    with pytest.raises(ValueError, match="impl must be"):
        soit_dyn_attn(*_bad_cases()[0][1], impl="cuda")


def test_bad_inputs_raise_in_the_compiled_op():
    """The C++ op checks its inputs too (TORCH_CHECK), for callers of torch.ops directly."""
    op = torch.ops.solq_d2.soit_dyn_attn_forward
    for msg, args, kw in _bad_cases():
        if msg in ("integer tensor",) or "meta" in msg:
            continue
        M, K = kw.get("num_heads", 4), kw.get("num_points", 4)
        with pytest.raises(RuntimeError):
            op(*args, M, K, True)
    f, v, p, i, c = _problem(B=2, H=5, W=6, T=3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="grad_logits must have shape"):
        torch.ops.solq_d2.soit_dyn_attn_backward(torch.zeros(3, 5, 5), f, v, p, i, c, 4, 4, True)
    with pytest.raises(RuntimeError, match="C <= 32"):
        C = 40
        op(torch.zeros(1, 2, 2, C), v[:1], torch.zeros(1, soit_dyn_param_dim(C, 4, 4)),
           torch.zeros(1, dtype=torch.long), torch.zeros(1, 2), 4, 4, True)


def test_unsupported_geometry_falls_back(caplog):
    C = 40  # beyond the compiled kernels' run-time bounds (C <= 32)
    fmask, valid_hw, params, img_idx, centers = _problem(C=C, M=4, K=4, T=2, dtype=torch.float32)
    _ext._warned.clear()
    with caplog.at_level("WARNING", logger="solq_d2.layers._ext"):
        out = soit_dyn_attn(fmask, valid_hw, params, img_idx, centers)
    assert "soit_dyn_attn uses its pure-PyTorch" in caplog.text and "C <= 32" in caplog.text
    ref = soit_dyn_attn_pytorch(fmask, valid_hw, params, img_idx, centers)
    torch.testing.assert_close(out, ref)
    with pytest.raises(RuntimeError, match="cannot run"):
        soit_dyn_attn(fmask, valid_hw, params, img_idx, centers, impl="compiled")


def test_fallback_without_extension():
    """With the extension hidden, the op runs the PyTorch path, warns once, and matches."""
    code = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from solq_d2.layers import soit_dyn_attn, soit_dyn_attn_pytorch\n"
        "from solq_d2.layers import _ext\n"
        "assert not _ext.available()\n"
        "f = torch.randn(2, 5, 6, 8); v = torch.tensor([[5, 6], [3, 4]])\n"
        "p = torch.randn(3, 441) * 0.3; i = torch.tensor([0, 1, 1]); c = torch.rand(3, 2)\n"
        "p.requires_grad_(True)\n"
        "out = soit_dyn_attn(f, v, p, i, c); out.sum().backward()\n"
        "assert torch.equal(out, soit_dyn_attn_pytorch(f, v, p, i, c))\n"
        "assert p.grad.abs().sum() > 0\n"
        "soit_dyn_attn(f, v, p, i, c)\n"
        "try:\n"
        "    soit_dyn_attn(f, v, p, i, c, impl='compiled')\n"
        "    raise SystemExit('no error')\n"
        "except RuntimeError as e:\n"
        "    assert 'cannot run' in str(e)\n"
        "print('OK')\n"
    )
    env = dict(os.environ, SOLQ_D2_DISABLE_EXT="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("OK")
    # one warning, naming the op and why
    warned = [l for l in res.stderr.splitlines() if "soit_dyn_attn uses its pure-PyTorch" in l]
    assert len(warned) == 1 and "SOLQ_D2_DISABLE_EXT" in warned[0]


# ------------------------------------------------------------------------------------------------
# CUDA (runs where a GPU is present)


@requires_cuda
@pytest.mark.gpu
def test_cuda_matches_cpu():
    prob = _problem(B=3, H=11, W=29, T=8, dtype=torch.float64, seed=4)
    cpu = _values_and_grads(_compiled, *prob)
    cuda = _values_and_grads(_compiled, *[t.cuda() for t in prob])
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b.cpu(), a, atol=1e-10, rtol=1e-10)
    dyn, fmask, valid_hw, params, img_idx, centers = _fixture_inputs()
    out = _compiled(*[t.cuda() for t in (fmask, valid_hw, params, img_idx, centers)])
    torch.testing.assert_close(out.cpu(), torch.cat(list(dyn["logits_s8_forward"])), **SUB)


@requires_cuda
@pytest.mark.gpu
def test_cuda_backward_alerts_under_deterministic_mode():
    prob = [t.cuda() for t in _problem(dtype=torch.float32)]
    prob[2].requires_grad_(True)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="deterministic"):
            _compiled(*prob).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


def test_compiled_op_is_registered():
    assert _ext.has_op("soit_dyn_attn_forward") and _ext.has_op("soit_dyn_attn_backward"), (
        _ext.reason() or "solq_d2._C lacks soit_dyn_attn; rebuild it (make setup)"
    )
    assert _ext.op_report()["soit_dyn_attn"]["cpu"].startswith("compiled")


def test_param_dim_formula():
    assert soit_dyn_param_dim(8, 4, 4) == 441
    assert soit_dyn_param_dim(8, 8, 4) == 873
    assert [soit_dyn_param_dim(8, m, 4) for m in (1, 2, 4, 8)] == [117, 225, 441, 873]
    assert [soit_dyn_param_dim(c, 4, 4) for c in (4, 8, 16)] == [245, 441, 833]
    assert math.prod(soit_dyn_split_params(torch.zeros(2, 441))["w_off"].shape) == 2 * 256
