"""Multi-scale deformable attention: PyTorch reference, compiled CPU and CUDA kernels, the module.

Tiers: (a) the reference against a naive per-sample loop written from the formula; (b) the compiled
kernel against the reference (float64 tight, float32 no less accurate than the reference), float64
gradcheck, awkward shapes and locations, bad inputs, low precision, determinism, every CPU
instruction-set variant, torch.library/compile/export integration, the fallback; (c) CUDA against
CPU (skipped only where there is no CUDA device).
"""
import importlib
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

from solq_d2.layers import MSDeformAttn, _ext, ms_deform_attn, ms_deform_attn_pytorch

try:
    from conftest import requires_cuda
except ImportError:  # conftest not importable as a module under this import mode
    requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = Path(__file__).resolve().parents[2]
msda_module = importlib.import_module("solq_d2.layers.ms_deform_attn")
FWD = torch.ops.solq_d2.ms_deform_attn_forward
BWD = torch.ops.solq_d2.ms_deform_attn_backward


def level_starts(shapes: torch.Tensor) -> torch.Tensor:
    areas = shapes[:, 0] * shapes[:, 1]
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def make_inputs(B, shapes, M, D, Q, P, dtype=torch.float64, spread=0.25, seed=0):
    """Random inputs; locations uniform in [-spread, 1 + spread] (some samples off the map)."""
    g = torch.Generator().manual_seed(seed)
    sh = torch.tensor(shapes, dtype=torch.long)
    S, L = int((sh[:, 0] * sh[:, 1]).sum()), len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64).to(dtype)
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread
    attn = torch.rand(B, Q, M, L, P, generator=g, dtype=torch.float64)
    return value, sh, level_starts(sh), loc.to(dtype), attn.to(dtype)


def naive_msda(value, shapes, loc, attn):
    """One sample at a time, straight from the definition (float64, Python loops)."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    out = torch.zeros(B, Q, M, D, dtype=torch.float64)
    starts = level_starts(shapes).tolist()
    for b, q, m, lvl, p in torch.cartesian_prod(*map(torch.arange, (B, Q, M, L, P))).tolist():
        H, W = shapes[lvl].tolist()
        x = loc[b, q, m, lvl, p, 0].item() * W - 0.5
        y = loc[b, q, m, lvl, p, 1].item() * H - 0.5
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        for yy in (math.floor(y), math.floor(y) + 1):
            for xx in (math.floor(x), math.floor(x) + 1):
                if 0 <= yy < H and 0 <= xx < W:
                    w = (1 - abs(y - yy)) * (1 - abs(x - xx)) * attn[b, q, m, lvl, p].item()
                    out[b, q, m] += w * value[b, starts[lvl] + yy * W + xx, m].double()
    return out.view(B, Q, M * D)


def border_locations(shapes, B, Q, M, P, dtype=torch.float64):
    """Locations on the edges of the support, on the map border, on pixel centres and outside."""
    L = len(shapes)
    loc = torch.empty(B, Q, M, L, P, 2, dtype=dtype)
    for lvl, (H, W) in enumerate(shapes):
        xs = torch.tensor([0.0, 1.0, -0.5 / W, 1 + 0.5 / W, 0.5 / W, 1.5 / W, -0.3, 1.2, 0.37])
        ys = torch.tensor([1.0, 0.0, 1.5 / H, -0.5 / H, -0.5 / H, 0.5 / H, 0.61, 1 + 0.5 / H, 1.1])
        k = torch.arange(Q * M * P * B) % len(xs)
        loc[:, :, :, lvl, :, 0] = xs[k].view(B, Q, M, P).to(dtype)
        loc[:, :, :, lvl, :, 1] = ys[(k * 5 + lvl) % len(ys)].view(B, Q, M, P).to(dtype)
    return loc


def run_both(inputs, impls=("compiled", "pytorch")):
    """Output and gradients of every impl, for the same inputs and output gradient."""
    value, sh, st, loc, attn = inputs
    results = []
    grad_out = None
    for impl in impls:
        v, l, a = (t.detach().clone().requires_grad_() for t in (value, loc, attn))
        out = ms_deform_attn(v, sh, st, l, a, impl=impl)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        out.backward(grad_out)
        results.append((out.detach(), v.grad, l.grad, a.grad))
    return results


CASES = {
    "base": dict(B=2, shapes=[(6, 4), (3, 2)], M=2, D=8, Q=5, P=3),
    "odd_D5": dict(B=2, shapes=[(5, 7), (2, 3)], M=3, D=5, Q=4, P=2),
    "odd_D71": dict(B=1, shapes=[(4, 5), (2, 2)], M=2, D=71, Q=3, P=2),
    "D48_solq": dict(B=1, shapes=[(4, 6), (2, 3), (1, 2)], M=2, D=48, Q=4, P=4),
    "Q1": dict(B=2, shapes=[(3, 4), (2, 2)], M=2, D=16, Q=1, P=4),
    "B3": dict(B=3, shapes=[(4, 4), (2, 2)], M=2, D=32, Q=6, P=2),
    "one_pixel_levels": dict(B=2, shapes=[(1, 1), (1, 1), (2, 1), (1, 3)], M=2, D=4, Q=5, P=3),
    "many_points": dict(B=1, shapes=[(5, 5), (3, 3), (2, 2)], M=2, D=20, Q=3, P=13),
    "one_head_chunked_backward": dict(B=1, shapes=[(9, 11), (3, 4)], M=1, D=32, Q=300, P=2),
}


def test_extension_provides_kernels():
    assert _ext.has_op("ms_deform_attn_forward") and _ext.has_op("ms_deform_attn_backward"), (
        f"solq_d2._C lacks the ms_deform_attn kernels: {_ext.reason()}"
    )
    assert _ext.op_report()["ms_deform_attn"]["cpu"].startswith("compiled")
    isa = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability())
    assert torch.ops.solq_d2.ms_deform_attn_cpu_isa() == (isa or "baseline")


@pytest.mark.parametrize("spread", [0.25, 0.0])
def test_reference_matches_naive_loop(spread):
    value, sh, st, loc, attn = make_inputs(2, [(4, 5), (2, 3), (1, 1)], 2, 3, 4, 2, spread=spread)
    expected = naive_msda(value, sh, loc, attn)
    torch.testing.assert_close(
        ms_deform_attn_pytorch(value, sh, st, loc, attn), expected, rtol=0, atol=1e-12
    )
    torch.testing.assert_close(FWD(value, sh, st, loc, attn, 64), expected, rtol=0, atol=1e-12)


def test_border_locations_match_naive_and_reference():
    shapes = [(4, 5), (1, 1), (3, 2)]
    value, sh, st, _, attn = make_inputs(2, shapes, 2, 6, 7, 3)
    loc = border_locations(shapes, 2, 7, 2, 3)
    expected = naive_msda(value, sh, loc, attn)
    compiled, reference = run_both((value, sh, st, loc, attn))
    torch.testing.assert_close(compiled[0], expected, rtol=0, atol=1e-12)
    for got, ref in zip(compiled, reference):  # gradients: grid_sample's convention at the kinks
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_non_finite_and_huge_locations_contribute_nothing():
    value, sh, st, loc, attn = make_inputs(2, [(4, 5), (2, 3)], 2, 16, 6, 3)
    bad = torch.zeros_like(attn, dtype=torch.bool)
    bad[:, ::2, :, 0, 1] = True
    special = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -1e30, 3e9], dtype=loc.dtype)
    loc_bad = loc.clone()
    loc_bad[bad] = special[torch.arange(int(bad.sum())) % len(special)].unsqueeze(-1).expand(-1, 2)
    out = FWD(value, sh, st, loc_bad, attn, 64)
    torch.testing.assert_close(out, FWD(value, sh, st, loc, attn.masked_fill(bad, 0), 64))
    g = torch.randn_like(out)
    gv, gl, ga = BWD(value, sh, st, loc_bad, attn, g, 64)
    gv0, _, _ = BWD(value, sh, st, loc, attn.masked_fill(bad, 0), g, 64)
    torch.testing.assert_close(gv, gv0)
    assert (gl[bad] == 0).all() and (ga[bad] == 0).all() and gl.isfinite().all()


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_float64(case):
    compiled, reference = run_both(make_inputs(**CASES[case]))
    for name, got, ref in zip(("out", "value", "loc", "attn"), compiled, reference):
        torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_backward_chunking_over_threads(threads):
    """Query chunks with private grad_value buffers (fewer (b, m) pairs than threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compiled, reference = run_both(make_inputs(**CASES["one_head_chunked_backward"]))
    finally:
        torch.set_num_threads(old)
    for got, ref in zip(compiled, reference):
        torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)


def test_kernel_float32_at_least_as_accurate_as_reference():
    """float32 errors against the float64 result: the kernel's are within 2x the reference's."""
    inputs64 = make_inputs(2, [(20, 24), (10, 12), (5, 6), (3, 3)], 8, 32, 40, 4, spread=0.05)
    truth = run_both(inputs64, impls=("pytorch",))[0]
    inputs32 = [t.float() if t.is_floating_point() else t for t in inputs64]
    compiled, reference = run_both(inputs32)
    for name, t, c, r in zip(("out", "value", "loc", "attn"), truth, compiled, reference):
        err_c = (c.double() - t).abs().max().item()
        err_r = (r.double() - t).abs().max().item()
        scale = t.abs().max().item()
        assert err_c <= 2 * err_r + 1e-6 * scale, (name, err_c, err_r, scale)
        assert c.dtype == torch.float32


def test_gradcheck_float64_cpu():
    value, sh, st, loc, attn = make_inputs(2, [(3, 4), (2, 2), (1, 1)], 2, 3, 3, 2)
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert gradcheck(lambda v, l, a: FWD(v, sh, st, l, a, 64), inputs, eps=1e-6, atol=1e-7)


def test_noncontiguous_inputs_and_int32_tables():
    value, sh, st, loc, attn = make_inputs(**CASES["base"])
    expected = FWD(value, sh, st, loc, attn, 64)
    g = torch.randn_like(expected)
    expected_grads = BWD(value, sh, st, loc, attn, g, 64)
    v_nc = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    loc_nc = torch.cat([loc, loc], dim=-1)[..., 2:]
    attn_nc = attn.transpose(1, 2).contiguous().transpose(1, 2)
    sh_nc = torch.stack([sh[:, 0], sh[:, 1]], 0).int().t()
    st_nc = torch.stack([st, st], 1).int()[:, 0]
    g_nc = torch.stack([g, g], -1)[..., 1]
    assert not any(t.is_contiguous() for t in (v_nc, loc_nc, attn_nc, sh_nc, st_nc, g_nc))
    torch.testing.assert_close(FWD(v_nc, sh_nc, st_nc, loc_nc, attn_nc, 64), expected)
    for got, ref in zip(BWD(v_nc, sh_nc, st_nc, loc_nc, attn_nc, g_nc, 64), expected_grads):
        torch.testing.assert_close(got, ref)


def test_im2col_step_is_ignored_for_any_batch():
    value, sh, st, loc, attn = make_inputs(**CASES["B3"])
    out = FWD(value, sh, st, loc, attn, 64)
    for step in (1, 2, 64, 100):  # Deformable DETR asserted B % step == 0
        torch.testing.assert_close(FWD(value, sh, st, loc, attn, step), out, rtol=0, atol=0)
        torch.testing.assert_close(ms_deform_attn(value, sh, st, loc, attn, step), out)


@pytest.mark.parametrize("B,Q", [(0, 4), (2, 0)])
def test_empty_batch_or_queries(B, Q):
    value, sh, st, loc, attn = make_inputs(max(B, 1), [(3, 3)], 2, 4, max(Q, 1), 2)
    value, loc, attn = value[:B], loc[:B, :Q], attn[:B, :Q]
    out = FWD(value, sh, st, loc, attn, 64)
    assert out.shape == (B, Q, 8)
    gv, gl, ga = BWD(value, sh, st, loc, attn, torch.zeros_like(out), 64)
    assert gv.shape == value.shape and gl.shape == loc.shape and ga.shape == attn.shape
    assert (gv == 0).all()


def _bad(name):
    """Inputs for `name`, mutated into an invalid call; returns the 5 op arguments."""
    value, sh, st, loc, attn = make_inputs(**CASES["base"])
    if name == "tokens":
        value = value[:, :-1]
    elif name == "start_index":
        st = st.clone()
        st[1] += 1
    elif name == "negative_shape":
        sh = sh.clone()
        sh[0] = torch.tensor([-6, -4])
    elif name == "levels":
        sh, st = sh[:1], st[:1]
    elif name == "value_dims":
        value = value[0]
    elif name == "loc_last_dim":
        loc = loc[..., :1]
    elif name == "attn_shape":
        attn = attn[:, :, :, :, :-1]
    elif name == "batch":
        loc, attn = loc[:1], attn[:1]
    elif name == "heads":
        value = value[:, :, :1]
    elif name == "int_value":
        value = value.long()
    elif name == "float_shapes":
        sh = sh.double()
    elif name == "shapes_dims":
        sh = sh.flatten()
    return value, sh, st, loc, attn


BAD_INPUTS = {
    "tokens": "value has 29 tokens .* spatial_shapes sum to 30",
    "start_index": r"level_start_index\[1\] = 25 but the levels before it hold 24",
    "negative_shape": r"spatial_shapes\[0\] = \(-6, -4\) must be positive",
    "levels": "L = 2 levels .* spatial_shapes has 1",
    "value_dims": r"value must have shape \(B, S, M, D\)",
    "loc_last_dim": r"sampling_loc must have shape \(B, Q, M, L, P, 2\)",
    "attn_shape": "attn_weight .* must have shape",
    "batch": "does not match value",
    "heads": "does not match value",
    "int_value": "value must be float64, float32, float16 or bfloat16",
    "float_shapes": "spatial_shapes must be an integer tensor",
    "shapes_dims": r"spatial_shapes must have shape \(L, 2\)",
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(name):
    args = _bad(name)
    with pytest.raises(RuntimeError, match=BAD_INPUTS[name]):
        FWD(*args, 64)
    value, sh, st, loc, attn = args
    g = torch.zeros(loc.shape[0], loc.shape[1], value.shape[-2] * value.shape[-1])
    with pytest.raises(RuntimeError, match=BAD_INPUTS[name]):
        BWD(value, sh, st, loc, attn, g.to(torch.float64), 64)


def test_bad_grad_output_raises():
    value, sh, st, loc, attn = make_inputs(**CASES["base"])
    g = torch.zeros(2, 5, 15, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \(B, Q, M \* D\)"):
        BWD(value, sh, st, loc, attn, g, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loc_dtype", ["same", "float32"])
def test_low_precision_inputs_accumulate_in_float32(dtype, loc_dtype):
    value, sh, st, loc, attn = make_inputs(2, [(6, 7), (3, 4)], 2, 40, 6, 3, dtype=dtype)
    if loc_dtype == "float32":
        loc, attn = loc.float(), attn.float()
    compiled, reference = run_both((value, sh, st, loc, attn))
    exact = run_both([t.float() if t.is_floating_point() else t for t in (value, sh, st, loc, attn)])
    for (c, r), e, inp in zip(zip(compiled, reference), exact[0], (value, value, loc, attn)):
        assert c.dtype == r.dtype == inp.dtype
        # float32 math on the same rounded inputs: only the final rounding differs
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(c.float(), e, rtol=eps, atol=eps * e.abs().max().item())
        torch.testing.assert_close(r.float(), e, rtol=eps, atol=eps * e.abs().max().item())


def test_cpu_backward_is_deterministic_across_runs_and_threads():
    value, sh, st, loc, attn = make_inputs(2, [(12, 13), (6, 7)], 4, 32, 300, 4, spread=0.02)
    value, loc, attn = value.float(), loc.float(), attn.float()
    g = torch.randn(2, 300, 128)
    first = BWD(value, sh, st, loc, attn, g, 64)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, old):  # B * M = 8 >= threads: the same partition every time
            torch.set_num_threads(threads)
            for got, ref in zip(BWD(value, sh, st, loc, attn, g, 64), first):
                assert torch.equal(got, ref)
    finally:
        torch.set_num_threads(old)


_ISA_SCRIPT = """
import importlib.util, sys, torch
torch.ops.load_library(sys.argv[1])  # the raw kernels, without importing solq_d2 (fast start)
spec = importlib.util.spec_from_file_location("ref", sys.argv[2])
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
for kw, dtype in {cases!r}:
    g = torch.Generator().manual_seed(0)
    sh = torch.tensor(kw["shapes"])
    areas = sh[:, 0] * sh[:, 1]
    st = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    B, M, D, Q, P, L = kw["B"], kw["M"], kw["D"], kw["Q"], kw["P"], len(kw["shapes"])
    dt = getattr(torch, dtype)
    v = torch.randn(B, int(areas.sum()), M, D, generator=g).to(dt).requires_grad_()
    loc = (torch.rand(B, Q, M, L, P, 2, generator=g) * 1.4 - 0.2).to(dt).requires_grad_()
    a = torch.rand(B, Q, M, L, P, generator=g).to(dt).requires_grad_()
    out = ref.ms_deform_attn_pytorch(v, sh, st, loc, a)
    gout = torch.randn(out.shape, generator=g).to(dt)
    expected = [out] + list(torch.autograd.grad(out, (v, loc, a), gout))
    got = [torch.ops.solq_d2.ms_deform_attn_forward(v, sh, st, loc, a, 64)]
    got += torch.ops.solq_d2.ms_deform_attn_backward(v, sh, st, loc, a, gout, 64)
    tol = dict(float64=1e-11, float32=2e-4, bfloat16=5e-2)[dtype]
    for c, r in zip(got, expected):
        torch.testing.assert_close(c.double(), r.double(), rtol=tol, atol=tol)
print(torch.ops.solq_d2.ms_deform_attn_cpu_isa(), "ok")
"""


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_cpu_instruction_set_variants(isa):
    """The baseline and AVX2 builds of the inner loops (the other tests run the best one)."""
    has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    expected = "avx2" if isa == "avx2" and has_avx2 else "baseline"
    cases = [(CASES[c], dt) for c in ("odd_D71", "D48_solq", "many_points") for dt in ("float64", "float32")]
    cases.append((CASES["base"], "bfloat16"))
    ext = _ext.build_info()["file"]
    ref = ROOT / "solq_d2" / "layers" / "ms_deform_attn_pytorch.py"
    r = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT.format(cases=cases), ext, str(ref)],
        cwd=ROOT,
        env={**os.environ, "ATEN_CPU_CAPABILITY": isa},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{expected} ok", r.stdout


def test_dispatch_impl_argument():
    inputs = make_inputs(**CASES["base"])
    ref = ms_deform_attn_pytorch(*inputs)
    torch.testing.assert_close(ms_deform_attn(*inputs, impl="pytorch"), ref, rtol=0, atol=0)
    torch.testing.assert_close(ms_deform_attn(*inputs, impl="compiled"), ref)
    torch.testing.assert_close(ms_deform_attn(*inputs), ref)
    with pytest.raises(ValueError, match="impl must be one of"):
        ms_deform_attn(*inputs, impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        MSDeformAttn(32, 2, 4, 2, impl="fast")


def test_opcheck_schema_fake_and_autograd_registration():
    for dtype in (torch.float64, torch.float32):
        value, sh, st, loc, attn = make_inputs(**CASES["base"], dtype=dtype)
        torch.library.opcheck(FWD, (value, sh, st, loc, attn, 64))
        g = torch.randn(2, 5, 16, dtype=dtype)
        torch.library.opcheck(BWD, (value, sh, st, loc, attn, g, 64))


def test_torch_compile_sees_one_op_without_graph_breaks():
    value, sh, st, loc, attn = make_inputs(**CASES["base"])
    counts = {}

    def backend(gm, example_inputs):
        counts["ops"] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        return gm.forward

    f = torch.compile(lambda v, l, a: ms_deform_attn(v, sh, st, l, a), backend=backend, fullgraph=True)
    eager = run_both((value, sh, st, loc, attn), impls=("compiled",))[0]
    v, l, a = (t.clone().requires_grad_() for t in (value, loc, attn))
    out = f(v, l, a)
    assert counts["ops"] == [torch.ops.solq_d2.ms_deform_attn_forward]  # one op, nothing else
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
    for got, ref in zip((out, v.grad, l.grad, a.grad), eager):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _module_inputs(B=2, Q=6, C=32, shapes=((6, 5), (3, 3)), dtype=torch.float64, ref_dim=2):
    g = torch.Generator().manual_seed(3)
    sh = torch.tensor(shapes)
    S = int((sh[:, 0] * sh[:, 1]).sum())
    query = torch.randn(B, Q, C, generator=g, dtype=dtype)
    ref = torch.rand(B, Q, len(shapes), ref_dim, generator=g, dtype=dtype) * 0.5 + 0.25
    src = torch.randn(B, S, C, generator=g, dtype=dtype)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[1, -4:] = True
    return query, ref, src, sh, level_starts(sh), mask


def test_torch_export_keeps_the_custom_op():
    module = MSDeformAttn(32, 2, 4, 2).double().eval()
    args = _module_inputs()
    exported = torch.export.export(module, args)
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.solq_d2.ms_deform_attn_forward.default in targets
    torch.testing.assert_close(exported.module()(*args), module(*args), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning")
def test_jit_trace_uses_the_reference_path():
    module = MSDeformAttn(32, 2, 4, 2).double().eval()
    args = _module_inputs()
    with torch.no_grad():
        traced = torch.jit.trace(module, args, check_trace=False)
    assert "solq_d2::ms_deform_attn" not in str(traced.inlined_graph)
    assert "grid_sampler" in str(traced.inlined_graph)
    torch.testing.assert_close(traced(*args), module(*args))


def test_module_standard_init():
    m = MSDeformAttn(d_model=64, n_levels=3, n_heads=8, n_points=4)
    assert (m.sampling_offsets.weight == 0).all() and (m.attention_weights.weight == 0).all()
    assert (m.attention_weights.bias == 0).all() and (m.output_proj.bias == 0).all()
    bias = m.sampling_offsets.bias.view(8, 3, 4, 2)
    head_dirs = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32
    )
    expected = head_dirs.view(8, 1, 1, 2) * torch.arange(1, 5).view(1, 1, 4, 1)
    torch.testing.assert_close(bias, expected.expand(8, 3, 4, 2), rtol=0, atol=1e-5)  # fp32 trig
    bound = math.sqrt(6 / (64 + 64))
    assert 0 < m.value_proj.weight.abs().max() <= bound


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_compiled_and_pytorch_paths_agree(ref_dim):
    torch.manual_seed(0)
    fast = MSDeformAttn(32, 2, 4, 3).double()
    with torch.no_grad():  # non-trivial offsets and attention
        fast.sampling_offsets.weight.normal_(0, 0.2)
        fast.attention_weights.weight.normal_(0, 0.2)
    slow = MSDeformAttn(32, 2, 4, 3, impl="pytorch").double()
    slow.load_state_dict(fast.state_dict())
    args = _module_inputs(ref_dim=ref_dim)
    outs = []
    for m in (fast, slow):
        query = args[0].clone().requires_grad_()
        src = args[2].clone().requires_grad_()
        out = m(query, args[1], src, *args[3:])
        out.sum().backward()
        outs.append((out, query.grad, src.grad, m.sampling_offsets.weight.grad))
    for got, ref in zip(*outs):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert "impl='pytorch'" in repr(slow)


def test_fallback_when_extension_is_hidden():
    code = textwrap.dedent(
        """
        import logging, torch
        logging.basicConfig(level=logging.WARNING)
        from solq_d2.layers import MSDeformAttn, ms_deform_attn, ms_deform_attn_pytorch
        sh = torch.tensor([[4, 5], [2, 3]]); st = torch.tensor([0, 20])
        v = torch.randn(2, 26, 2, 3, dtype=torch.float16)
        loc = torch.rand(2, 7, 2, 2, 3, 2); a = torch.rand(2, 7, 2, 2, 3)
        out = ms_deform_attn(v, sh, st, loc, a)
        assert out.dtype == torch.float16
        assert torch.equal(out, ms_deform_attn_pytorch(v, sh, st, loc, a))
        m = MSDeformAttn(6, 2, 2, 3)
        m(torch.randn(2, 7, 6), torch.rand(2, 7, 2, 2), torch.randn(2, 26, 6), sh, st).sum().backward()
        try:
            ms_deform_attn(v, sh, st, loc, a, impl="compiled")
        except RuntimeError as e:
            print("compiled raised:", e)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "SOLQ_D2_DISABLE_EXT": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "compiled raised: ms_deform_attn(impl='compiled') is unavailable" in r.stdout
    assert "SOLQ_D2_DISABLE_EXT" in r.stdout
    warnings = [ln for ln in r.stderr.splitlines() if "ms_deform_attn uses its pure-PyTorch" in ln]
    assert len(warnings) == 1, r.stderr


# ------------------------------------------------------------------------------------------------
# CUDA (skipped only where no CUDA device is present)


def _cuda(inputs, dtype=None):
    return [
        t.to("cuda", dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
        for t in inputs
    ]


CUDA_CASES = dict(
    CASES,
    D2=dict(B=2, shapes=[(5, 6), (2, 3)], M=4, D=2, Q=9, P=4),
    D256=dict(B=1, shapes=[(6, 7)], M=1, D=256, Q=20, P=4),
    D300_split=dict(B=2, shapes=[(4, 5), (2, 2)], M=1, D=300, Q=5, P=2),
)


@requires_cuda
@pytest.mark.parametrize("case", list(CUDA_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(case, dtype):
    inputs = make_inputs(**CUDA_CASES[case], dtype=dtype)
    cpu = run_both(inputs, impls=("compiled",))[0]
    gpu = run_both(_cuda(inputs), impls=("compiled",))[0]
    tol = 1e-11 if dtype == torch.float64 else 1e-4
    for got, ref in zip(gpu, cpu):
        assert got.is_cuda and got.dtype == ref.dtype
        torch.testing.assert_close(got.cpu(), ref, rtol=tol, atol=tol * max(1, ref.abs().max()))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype):
    inputs = make_inputs(2, [(6, 7), (3, 4)], 2, 40, 6, 3, dtype=dtype)
    cpu = run_both(inputs, impls=("compiled",))[0]
    gpu = run_both(_cuda(inputs), impls=("compiled",))[0]
    eps = torch.finfo(dtype).eps
    for got, ref in zip(gpu, cpu):
        assert got.dtype == ref.dtype
        torch.testing.assert_close(
            got.cpu().float(), ref.float(), rtol=2 * eps, atol=2 * eps * ref.abs().max().item()
        )


@requires_cuda
def test_cuda_gradcheck_and_border_locations():
    shapes = [(3, 4), (1, 1), (2, 2)]
    value, sh, st, loc, attn = _cuda(make_inputs(2, shapes, 2, 3, 3, 2))
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert gradcheck(lambda v, l, a: FWD(v, sh, st, l, a, 64), inputs, eps=1e-6, atol=1e-7)
    border = border_locations(shapes, 2, 3, 2, 2).cuda()
    gpu = run_both((value.detach(), sh, st, border, attn.detach()), impls=("compiled",))[0]
    cpu = run_both([t.detach().cpu() for t in (value, sh, st, border, attn)], impls=("compiled",))
    for got, ref in zip(gpu, cpu[0]):
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-11, atol=1e-11)


@requires_cuda
def test_cuda_tables_on_cpu_bad_inputs_and_determinism_flag():
    value, sh, st, loc, attn = make_inputs(**CASES["base"])
    expected = FWD(value, sh, st, loc, attn, 64)
    v, l, a = _cuda((value, loc, attn))
    torch.testing.assert_close(FWD(v, sh, st, l, a, 64).cpu(), expected)  # tables on the CPU
    with pytest.raises(RuntimeError, match="level_start_index"):
        FWD(v, sh.cuda(), st.cuda() + 1, l, a, 64)
    with pytest.raises(RuntimeError, match="same device"):
        FWD(v, sh, st, l.cpu(), a, 64)
    g = torch.ones(2, 5, 16, dtype=torch.float64, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward"):
            BWD(v, sh, st, l, a, g, 64)
    finally:
        torch.use_deterministic_algorithms(False)


@requires_cuda
def test_cuda_graph_capture():
    inputs = _cuda(make_inputs(**CASES["B3"]), dtype=torch.float32)
    value, sh, st, loc, attn = inputs
    g = torch.randn(3, 6, 64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        FWD(value, sh, st, loc, attn, 64)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = FWD(value, sh, st, loc, attn, 64)
        grads = BWD(value, sh, st, loc, attn, g, 64)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, FWD(value, sh, st, loc, attn, 64))
    for got, ref in zip(grads, BWD(value, sh, st, loc, attn, g, 64)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
