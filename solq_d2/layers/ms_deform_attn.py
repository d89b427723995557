"""Multi-scale deformable attention: the functional op (compiled kernel or PyTorch) and the module.

The compiled kernels (``solq_d2._C``, CPU and CUDA) are the PyTorch operators
``torch.ops.solq_d2.ms_deform_attn_forward`` / ``ms_deform_attn_backward``. This module gives
them a fake (meta) implementation and registers their autograd formula with ``torch.library``,
so ``torch.compile`` and ``torch.export`` see one operator and autograd differentiates it with
respect to ``value``, ``sampling_locations`` and ``attention_weights``.

Which implementation runs (``impl``):

* ``"auto"`` (default): the compiled kernel for CPU tensors, and for CUDA tensors when the
  extension was built with CUDA; otherwise the PyTorch reference, with one logged warning that
  says why. The reference is also used while tracing/scripting with TorchScript or exporting to
  ONNX with the TorchScript exporter (they cannot represent the custom operator).
* ``"pytorch"``: always :func:`ms_deform_attn_pytorch` (export, debugging).
* ``"compiled"``: always the compiled kernel; raises ``RuntimeError`` if it cannot serve the call.

Models pick it with ``MSDeformAttn(..., impl=...)`` (``MODEL.MSDA.IMPL`` in configs); setting the
environment variable ``SOLQ_D2_DISABLE_EXT=1`` hides the extension altogether.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _ext
from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "MSDeformAttn", "IMPLS"]

IMPLS = ("auto", "compiled", "pytorch")

_FWD, _BWD = "ms_deform_attn_forward", "ms_deform_attn_backward"
_ext.register_op("ms_deform_attn", _FWD, _BWD)


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"solq_d2::{_FWD}", dispatch_key)
    except RuntimeError:  # op not registered
        return False


def _register_op_metadata() -> bool:
    """Fake implementations and autograd for the compiled operators; False if they are absent."""
    if not (_ext.has_op(_FWD) and _ext.has_op(_BWD)):
        return False

    @torch.library.register_fake(f"solq_d2::{_FWD}")
    def _forward_fake(
        value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step=64
    ):
        torch._check(value.dim() == 4, lambda: f"value must be (B, S, M, D), got {value.shape}")
        torch._check(
            sampling_loc.dim() == 6,
            lambda: f"sampling_loc must be (B, Q, M, L, P, 2), got {sampling_loc.shape}",
        )
        B, _, M, D = value.shape
        return value.new_empty((B, sampling_loc.shape[1], M * D))

    @torch.library.register_fake(f"solq_d2::{_BWD}")
    def _backward_fake(
        value,
        spatial_shapes,
        level_start_index,
        sampling_loc,
        attn_weight,
        grad_output,
        im2col_step=64,
    ):
        fmt = torch.contiguous_format
        return (
            torch.empty_like(value, memory_format=fmt),
            torch.empty_like(sampling_loc, memory_format=fmt),
            torch.empty_like(attn_weight, memory_format=fmt),
        )

    def _setup_context(ctx, inputs, output):
        value, spatial_shapes, level_start_index, sampling_loc, attn_weight = inputs[:5]
        ctx.im2col_step = inputs[5] if len(inputs) > 5 else 64
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_loc, attn_weight = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = torch.ops.solq_d2.ms_deform_attn_backward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_loc,
            attn_weight,
            grad_output,
            ctx.im2col_step,
        )
        return grad_value, None, None, grad_loc, grad_attn, None

    torch.library.register_autograd(f"solq_d2::{_FWD}", _backward, setup_context=_setup_context)
    return True


_COMPILED = _register_op_metadata()
_COMPILED_CUDA = _COMPILED and _has_kernel("CUDA")


def _compiled_unavailable(device: torch.device) -> str:
    """Why the compiled kernel cannot serve tensors on ``device`` ('' when it can)."""
    if not _COMPILED:
        return _ext.reason() or f"torch.ops.solq_d2.{_FWD} is not registered"
    if device.type in ("cpu", "meta"):
        return ""
    if device.type == "cuda":
        return "" if _COMPILED_CUDA else "solq_d2._C was built without CUDA kernels"
    return f"solq_d2._C has no kernel for {device.type} tensors"


def _exporting() -> bool:
    """TorchScript tracing/scripting or TorchScript-based ONNX export: use the reference."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    return torch.onnx.is_in_onnx_export()


def ms_deform_attn(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    im2col_step: int = 64,
    impl: str = "auto",
):
    """Multi-scale deformable attention (Deformable DETR's operator).

    Bilinear sampling with zeros outside each map and ``align_corners=False``, weighted and
    summed over levels and points; differentiable in ``value``, ``sampling_locations`` and
    ``attention_weights``.

    Args:
        value: (B, S, M, D) float64/float32/float16/bfloat16; S = sum_l H_l * W_l tokens, level-
            major, row-major within a level.
        spatial_shapes: (L, 2) integer (H_l, W_l).
        level_start_index: (L,) integer, exclusive cumulative sum of H_l * W_l.
        sampling_locations: (B, Q, M, L, P, 2) normalised (x, y); pixel (i, j) of level l has its
            centre at ((j + 0.5) / W_l, (i + 0.5) / H_l).
        attention_weights: (B, Q, M, L, P).
        im2col_step: accepted for compatibility with Deformable DETR and ignored.
        impl: "auto", "compiled" or "pytorch" (see the module docstring).

    Returns:
        (B, Q, M * D) in value's dtype. Locations and weights are used in float32 (float64 for
        float64 values) and accumulation is done in that precision.
    """
    if impl not in IMPLS:
        raise ValueError(f"ms_deform_attn: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "pytorch" and not _exporting():
        why = _compiled_unavailable(value.device)
        if not why:
            return torch.ops.solq_d2.ms_deform_attn_forward(
                value,
                spatial_shapes,
                level_start_index,
                sampling_locations,
                attention_weights,
                im2col_step,
            )
        if impl == "compiled":
            raise RuntimeError(f"ms_deform_attn(impl='compiled') is unavailable: {why}")
        _ext.warn_fallback("ms_deform_attn", why)
    return ms_deform_attn_pytorch(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR), standard initialisation.

    Offsets start on a grid of directions (head m along angle 2*pi*m/M, point k at distance
    k + 1), attention logits at zero, value/output projections Xavier-uniform.

    Args:
        d_model: channels of queries and values.
        n_levels: feature levels L.
        n_heads: attention heads M (d_model must be divisible by it).
        n_points: sampling points P per head and level.
        impl: "auto", "compiled" or "pytorch" (see :func:`ms_deform_attn`); "pytorch" forces the
            reference path (export, debugging).
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, impl="auto"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if impl not in IMPLS:
            raise ValueError(f"MSDeformAttn: impl must be one of {IMPLS}, got {impl!r}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
            f"n_points={self.n_points}, impl={self.impl!r}"
        )

    def forward(
        self,
        query,
        reference_points,
        input_flatten,
        input_spatial_shapes,
        input_level_start_index,
        input_padding_mask=None,
    ):
        """
        Args:
            query: (B, Q, C).
            reference_points: (B, Q, L, 2) normalised (x, y), or (B, Q, L, 4) boxes (cx, cy, w, h).
            input_flatten: (B, S, C) values of all levels.
            input_spatial_shapes: (L, 2) int64 (H, W).
            input_level_start_index: (L,) int64.
            input_padding_mask: (B, S) bool, True for padding (zeroed in the values).

        Returns:
            (B, Q, C)
        """
        B, Q, _ = query.shape
        _, S, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(B, S, M, self.d_model // M)
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        weights = F.softmax(self.attention_weights(query).view(B, Q, M, L * P), -1)
        weights = weights.view(B, Q, M, L, P)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}"
            )
        out = ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, locations, weights, impl=self.impl
        )
        return self.output_proj(out)
