"""SOIT's instance-aware deformable attention as one fused op (compiled kernels or PyTorch).

:func:`soit_dyn_attn` evaluates the per-instance dynamic deformable-attention layer of SOIT for
all instances of all images (and all decoder layers) in one call. The compiled kernels
(``torch.ops.solq_d2.soit_dyn_attn_{forward,backward}``: C++ with an AVX-512 path, and CUDA)
store nothing per pixel: backward recomputes the forward pass. Without the extension, or for
devices/geometries it was not built for, the pure-PyTorch implementation
(:func:`soit_dyn_attn_pytorch`) runs instead and a warning says why.
"""
from typing import Optional

import torch

from . import _ext
from .soit_dyn_attn_pytorch import soit_dyn_attn_pytorch, soit_dyn_param_dim

__all__ = ["soit_dyn_attn"]

_FWD = "soit_dyn_attn_forward"
_BWD = "soit_dyn_attn_backward"
_ext.register_op("soit_dyn_attn", _FWD, _BWD)

# Run-time geometry limits of the compiled kernels (csrc/soit_dyn_attn/soit_dyn_attn_math.h).
_MAX_C, _MAX_MK = 32, 64
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _compiled() -> bool:
    return _ext.has_op(_FWD) and _ext.has_op(_BWD)


def _register_compiled_op() -> None:
    """Fake (meta) implementations and autograd for the C++ operators."""
    fwd = f"solq_d2::{_FWD}"

    def _math_dtype(*ts):
        return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32

    @torch.library.register_fake(fwd)
    def _forward_fake(
        fmask, valid_hw, params, img_idx, centers, num_heads=4, num_points=4, pos_embed=True
    ):
        dtype = _math_dtype(fmask, params, centers)
        return fmask.new_empty((params.shape[0], fmask.shape[1], fmask.shape[2]), dtype=dtype)

    @torch.library.register_fake(f"solq_d2::{_BWD}")
    def _backward_fake(
        grad_logits, fmask, valid_hw, params, img_idx, centers, num_heads=4, num_points=4,
        pos_embed=True,
    ):
        return torch.empty_like(fmask), torch.empty_like(params)

    def _setup_context(ctx, inputs, output):
        fmask, valid_hw, params, img_idx, centers, num_heads, num_points, pos_embed = inputs
        ctx.save_for_backward(fmask, valid_hw, params, img_idx, centers)
        ctx.geometry = (num_heads, num_points, pos_embed)

    def _backward(ctx, grad_logits):
        fmask, valid_hw, params, img_idx, centers = ctx.saved_tensors
        grad_fmask, grad_params = torch.ops.solq_d2.soit_dyn_attn_backward(
            grad_logits, fmask, valid_hw, params, img_idx, centers, *ctx.geometry
        )
        need = ctx.needs_input_grad
        # centres get no gradient: SOIT detaches them (the relative PE is not differentiated)
        return (
            grad_fmask if need[0] else None,
            None,
            grad_params if need[2] else None,
            None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd(fwd, _backward, setup_context=_setup_context)


if _compiled():
    _register_compiled_op()


def _check(fmask, valid_hw, params, img_idx, centers, num_heads, num_points, pos_embed):
    """Clear errors for the mistakes a caller can make (shapes, geometry, dtypes, devices)."""
    if fmask.dim() != 4:
        raise ValueError(f"soit_dyn_attn: fmask must be (B, H, W, C), got {tuple(fmask.shape)}")
    B, H, W, C = fmask.shape
    if min(B, H, W, C) < 1:
        raise ValueError(f"soit_dyn_attn: fmask must be non-empty, got {tuple(fmask.shape)}")
    if num_heads < 1 or num_points < 1:
        raise ValueError(
            f"soit_dyn_attn: num_heads and num_points must be >= 1, got {num_heads}, {num_points}"
        )
    if C % num_heads != 0:
        raise ValueError(
            f"soit_dyn_attn: mask channels C={C} must be divisible by num_heads={num_heads}"
        )
    if pos_embed and C % 4 != 0:
        raise ValueError(
            f"soit_dyn_attn: the relative PE needs C % 4 == 0 (C/2 features per axis), got C={C}"
        )
    D = soit_dyn_param_dim(C, num_heads, num_points)
    if params.dim() != 2 or params.shape[1] != D:
        raise ValueError(
            f"soit_dyn_attn: params must be (T, {D}) for C={C}, num_heads={num_heads}, "
            f"num_points={num_points} (D = (C+1)(3*M*K+1)), got {tuple(params.shape)}"
        )
    T = params.shape[0]
    if tuple(valid_hw.shape) != (B, 2):
        raise ValueError(f"soit_dyn_attn: valid_hw must be ({B}, 2), got {tuple(valid_hw.shape)}")
    if tuple(img_idx.shape) != (T,):
        raise ValueError(f"soit_dyn_attn: img_idx must be ({T},), got {tuple(img_idx.shape)}")
    if tuple(centers.shape) != (T, 2):
        raise ValueError(f"soit_dyn_attn: centers must be ({T}, 2), got {tuple(centers.shape)}")
    for name, t in (("fmask", fmask), ("params", params), ("centers", centers)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"soit_dyn_attn: {name} must be floating point, got {t.dtype}")
    for name, t in (("valid_hw", valid_hw), ("img_idx", img_idx)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"soit_dyn_attn: {name} must be an integer tensor, got {t.dtype}")
    for name, t in (("params", params), ("centers", centers)):
        if t.device != fmask.device:
            raise ValueError(
                f"soit_dyn_attn: {name} is on {t.device} but fmask on {fmask.device}"
            )
    if fmask.device.type == "cpu" and not torch.compiler.is_compiling():
        # cheap on the CPU; CUDA kernels guard these on the device instead of synchronising
        hv, wv = valid_hw[:, 0], valid_hw[:, 1]
        if bool(((hv < 1) | (hv > H) | (wv < 1) | (wv > W)).any()):
            raise ValueError(
                f"soit_dyn_attn: valid_hw must lie in [1, {H}] x [1, {W}], got {valid_hw.tolist()}"
            )
        if T > 0 and bool(((img_idx < 0) | (img_idx >= B)).any()):
            raise ValueError(
                f"soit_dyn_attn: img_idx must lie in [0, {B}), got values "
                f"{int(img_idx.min())}..{int(img_idx.max())}"
            )


def _compiled_unusable(fmask, C, M, K) -> Optional[str]:
    """Why the compiled kernels cannot serve this call (None when they can)."""
    if not _compiled():
        return _ext.reason() or "torch.ops.solq_d2.soit_dyn_attn_{forward,backward} not registered"
    if fmask.device.type == "cuda" and not _ext.build_info().get("cuda"):
        return "solq_d2._C was built without CUDA"
    if fmask.device.type not in ("cpu", "cuda"):
        return f"no compiled kernel for {fmask.device.type} tensors"
    if C > _MAX_C or M * K > _MAX_MK:
        return f"the compiled kernels support C <= {_MAX_C} and M*K <= {_MAX_MK}"
    return None


def soit_dyn_attn(
    fmask: torch.Tensor,
    valid_hw: torch.Tensor,
    params: torch.Tensor,
    img_idx: torch.Tensor,
    centers: torch.Tensor,
    num_heads: int = 4,
    num_points: int = 4,
    pos_embed: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """Mask logits of T instances from their generated deformable-attention parameters.

    For instance n of image b = img_idx[n] and pixel p of the stride-8 map: the query is
    ``fmask[b, p] + RelPE(p - centers[n])``; its W_off/b_off give M·K sampling offsets (pixels),
    its W_att/b_att attention weights (softmax over the K points of each head); head m
    bilinearly samples channels [m·C/M, (m+1)·C/M) of fmask with pixels outside the valid region
    of image b read as 0; the ReLU of the concatenated heads goes through W_out/b_out. This is
    SOIT's dynamic mask head as the authors' code computes it (including its fp32 arithmetic
    for the sampling positions); see docs/ops/soit_dyn_attn.md.

    Args:
        fmask: (B, H, W, C) mask features, channels last. Padded pixels need not be zero: the
            queries read them as they are (as the authors' code does), the values as 0.
        valid_hw: (B, 2) integer valid rows and columns of each image on this map (1..H, 1..W).
        params: (T, D) parameters, D = (C+1)(3·M·K+1); T may mix images and decoder layers.
            Layout: W_off (2·M·K, C) with row (m·K+k)·2+{x, y}, b_off, W_att (M·K, C), b_att,
            W_out (C,), b_out.
        img_idx: (T,) integer image of each instance.
        centers: (T, 2) (cx, cy) of each instance's box normalised by the unpadded image size:
            the centre of the relative PE. No gradient flows to them.
        num_heads: M.
        num_points: K.
        pos_embed: add the relative sine positional encoding to the queries (the authors'
            default). For an absolute PE pass zero centres.
        impl: "auto" (compiled when available, else PyTorch with a warning), "compiled" (raise
            if the compiled kernel cannot run), or "pytorch" (force the reference).

    Returns:
        (T, H, W) logits; float64 if an input is float64, else float32 (float16/bfloat16 inputs
        are computed in float32). Differentiable w.r.t. fmask and params.
    """
    if impl not in ("auto", "compiled", "pytorch"):
        raise ValueError(
            f"soit_dyn_attn: impl must be 'auto', 'compiled' or 'pytorch', got {impl!r}"
        )
    _check(fmask, valid_hw, params, img_idx, centers, num_heads, num_points, pos_embed)
    valid_hw = valid_hw.to(device=fmask.device, dtype=torch.int64)
    img_idx = img_idx.to(device=fmask.device, dtype=torch.int64)
    centers = centers.detach()
    if impl != "pytorch":
        why = _compiled_unusable(fmask, fmask.shape[-1], num_heads, num_points)
        if why is None:
            return torch.ops.solq_d2.soit_dyn_attn_forward(
                fmask, valid_hw, params, img_idx, centers, num_heads, num_points, pos_embed
            )
        if impl == "compiled":
            raise RuntimeError(f"soit_dyn_attn: the compiled kernel cannot run: {why}")
        _ext.warn_fallback("soit_dyn_attn", why)
    dtype = torch.float32
    if torch.float64 in (fmask.dtype, params.dtype, centers.dtype):
        dtype = torch.float64
    return soit_dyn_attn_pytorch(
        fmask.to(dtype),
        valid_hw,
        params.to(dtype),
        img_idx,
        centers.to(dtype),
        num_heads=num_heads,
        num_points=num_points,
        pos_embed=pos_embed,
    )
