// Schema of the ms_deform_attn operators and the input validation shared by CPU and CUDA.
#include "ms_deform_attn.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace solq_d2 {
namespace msda {

at::ScalarType math_type(at::ScalarType value_type) {
  return value_type == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

bool is_value_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool is_index_dtype(at::ScalarType t) {
  return at::isIntegralType(t, /*includeBool=*/false);
}

// Reads spatial_shapes / level_start_index on the host and checks them against S.
void check_level_contents(
    const char* op,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    int64_t S) {
  const at::Tensor shapes = spatial_shapes.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU, at::kLong).contiguous();
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t L = shapes.size(0);
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = sh[2 * l], W = sh[2 * l + 1];
    TORCH_CHECK(
        H > 0 && W > 0,
        op, ": spatial_shapes[", l, "] = (", H, ", ", W, ") must be positive (H, W)");
    TORCH_CHECK(
        H <= std::numeric_limits<int32_t>::max() / W,
        op, ": level ", l, " has ", H, " x ", W, " pixels; at most 2^31 - 1 per level are supported");
    TORCH_CHECK(
        st[l] == total,
        op, ": level_start_index[", l, "] = ", st[l], " but the levels before it hold ", total,
        " tokens (level_start_index must be the exclusive cumulative sum of H * W over "
        "spatial_shapes)");
    total += H * W;
  }
  TORCH_CHECK(
      total == S,
      op, ": value has ", S, " tokens (dim 1) but spatial_shapes sum to ", total,
      " (sum of H * W over levels)");
}

}  // namespace

Problem prepare(
    const char* op,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    bool check_levels) {
  TORCH_CHECK(
      value.dim() == 4, op, ": value must have shape (B, S, M, D), got ", value.sizes());
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
      op, ": spatial_shapes must have shape (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(
      level_start_index.dim() == 1,
      op, ": level_start_index must have shape (L,), got ", level_start_index.sizes());
  TORCH_CHECK(
      sampling_loc.dim() == 6 && sampling_loc.size(5) == 2,
      op, ": sampling_loc must have shape (B, Q, M, L, P, 2), got ", sampling_loc.sizes());
  TORCH_CHECK(
      attn_weight.dim() == 5,
      op, ": attn_weight must have shape (B, Q, M, L, P), got ", attn_weight.sizes());

  TORCH_CHECK(
      is_value_dtype(value.scalar_type()),
      op, ": value must be float64, float32, float16 or bfloat16, got ", value.scalar_type());
  TORCH_CHECK(
      at::isFloatingType(sampling_loc.scalar_type()),
      op, ": sampling_loc must be a floating-point tensor, got ", sampling_loc.scalar_type());
  TORCH_CHECK(
      at::isFloatingType(attn_weight.scalar_type()),
      op, ": attn_weight must be a floating-point tensor, got ", attn_weight.scalar_type());
  TORCH_CHECK(
      is_index_dtype(spatial_shapes.scalar_type()),
      op, ": spatial_shapes must be an integer tensor, got ", spatial_shapes.scalar_type());
  TORCH_CHECK(
      is_index_dtype(level_start_index.scalar_type()),
      op, ": level_start_index must be an integer tensor, got ", level_start_index.scalar_type());

  const at::Device device = value.device();
  TORCH_CHECK(
      sampling_loc.device() == device && attn_weight.device() == device,
      op, ": value, sampling_loc and attn_weight must be on the same device, got ", device, ", ",
      sampling_loc.device(), " and ", attn_weight.device());
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index}) {
    TORCH_CHECK(
        t->device() == device || t->device().is_cpu(),
        op, ": spatial_shapes and level_start_index must be on value's device (", device,
        ") or on the CPU, got ", t->device());
  }

  const int64_t B = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Q = sampling_loc.size(1), L = sampling_loc.size(3), P = sampling_loc.size(4);
  TORCH_CHECK(
      sampling_loc.size(0) == B && sampling_loc.size(2) == M,
      op, ": sampling_loc ", sampling_loc.sizes(), " does not match value ", value.sizes(),
      " (expected (B, Q, M, L, P, 2) with B = ", B, ", M = ", M, ")");
  TORCH_CHECK(
      attn_weight.sizes() == sampling_loc.sizes().slice(0, 5),
      op, ": attn_weight ", attn_weight.sizes(), " must have shape (B, Q, M, L, P) = ",
      sampling_loc.sizes().slice(0, 5), " to match sampling_loc");
  TORCH_CHECK(
      spatial_shapes.size(0) == L && level_start_index.size(0) == L,
      op, ": sampling_loc has L = ", L, " levels (dim 3) but spatial_shapes has ",
      spatial_shapes.size(0), " and level_start_index has ", level_start_index.size(0));

  if (check_levels) {
    check_level_contents(op, spatial_shapes, level_start_index, S);
  }

  const at::ScalarType mt = math_type(value.scalar_type());
  const auto index_opts = at::TensorOptions().device(device).dtype(at::kLong);
  return Problem{
      value.contiguous(),
      spatial_shapes.to(index_opts).contiguous(),
      level_start_index.to(index_opts).contiguous(),
      sampling_loc.to(mt).contiguous(),
      attn_weight.to(mt).contiguous(),
      B, S, M, D, Q, L, P};
}

at::Tensor prepare_grad_output(const char* op, const Problem& p, const at::Tensor& grad_output) {
  TORCH_CHECK(
      grad_output.dim() == 3 && grad_output.size(0) == p.B && grad_output.size(1) == p.Q &&
          grad_output.size(2) == p.M * p.D,
      op, ": grad_output must have shape (B, Q, M * D) = (", p.B, ", ", p.Q, ", ", p.M * p.D,
      "), got ", grad_output.sizes());
  TORCH_CHECK(
      at::isFloatingType(grad_output.scalar_type()),
      op, ": grad_output must be a floating-point tensor, got ", grad_output.scalar_type());
  TORCH_CHECK(
      grad_output.device() == p.value.device(),
      op, ": grad_output must be on value's device (", p.value.device(), "), got ",
      grad_output.device());
  return grad_output.to(math_type(p.value.scalar_type())).contiguous();
}

}  // namespace msda
}  // namespace solq_d2

TORCH_LIBRARY_FRAGMENT(solq_d2, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_loc, Tensor attn_weight, int im2col_step=64) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_loc, Tensor attn_weight, Tensor grad_output, int im2col_step=64) "
      "-> (Tensor, Tensor, Tensor)");
}
