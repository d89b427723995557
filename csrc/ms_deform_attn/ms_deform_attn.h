// Multi-scale deformable attention (Deformable DETR's operator): input validation shared by the
// CPU and CUDA kernels, and the kernel entry points.
//
//   value              (B, S, M, D)        float64 | float32 | float16 | bfloat16
//   spatial_shapes     (L, 2)              integer (H_l, W_l); on value's device or on the CPU
//   level_start_index  (L,)                integer, exclusive cumulative sum of H_l * W_l
//   sampling_loc       (B, Q, M, L, P, 2)  floating, normalised (x, y)
//   attn_weight        (B, Q, M, L, P)     floating
//   -> output          (B, Q, M * D)       value's dtype
//
// Locations and weights are read in the op's math type (float64 for float64 values, float32
// otherwise) and all accumulation happens in that type. `im2col_step` is accepted for
// compatibility with Deformable DETR's signature and ignored (there is no batch chunking).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace solq_d2 {
namespace msda {

// Validated inputs: contiguous, in the kernels' dtypes, on value's device.
struct Problem {
  at::Tensor value;              // (B, S, M, D), value's dtype
  at::Tensor spatial_shapes;     // (L, 2) int64
  at::Tensor level_start_index;  // (L,) int64
  at::Tensor loc;                // (B, Q, M, L, P, 2), math type
  at::Tensor attn;               // (B, Q, M, L, P), math type
  int64_t B, S, M, D, Q, L, P;
};

// float64 for float64 values, float32 for float32/float16/bfloat16 values.
at::ScalarType math_type(at::ScalarType value_type);

// Checks shapes, dtypes and devices (TORCH_CHECK with messages prefixed by `op`) and returns the
// inputs in kernel form. With `check_levels`, also reads spatial_shapes and level_start_index
// (a host copy when they live on a GPU) and checks them against value's token count; the CUDA
// path skips that only while a CUDA graph is being captured, where its kernels guard every level
// on the device instead.
Problem prepare(
    const char* op,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    bool check_levels);

// grad_output (B, Q, M * D), any floating dtype -> contiguous, in the math type.
at::Tensor prepare_grad_output(const char* op, const Problem& p, const at::Tensor& grad_output);

at::Tensor forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    int64_t im2col_step);

// Returns (grad_value, grad_sampling_loc, grad_attn_weight) in the dtypes of those inputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    const at::Tensor& grad_output,
    int64_t im2col_step);

}  // namespace msda
}  // namespace solq_d2
