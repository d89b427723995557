// SOIT's fused instance-aware deformable attention: input validation shared by the CPU and CUDA
// kernels, and the kernel entry points. The arithmetic is documented in soit_dyn_attn_math.h.
//
//   fmask      (B, H, W, C)  float64 | float32 | float16 | bfloat16, channels last: the raw mask
//                            features (queries read them as they are; as values, the pixels
//                            outside each image's valid region count as 0)
//   valid_hw   (B, 2)        integer valid rows and columns of each image, 1 <= h_v <= H,
//                            1 <= w_v <= W
//   params     (T, D)        floating, D = (C+1)(3*M*K+1), one row per instance (any mix of
//                            images and decoder layers)
//   img_idx    (T,)          integer image of each instance, in [0, B)
//   centers    (T, 2)        floating (cx, cy) of each instance's box, normalised by the unpadded
//                            image size (the RelPE centre); no gradient
//   num_heads M, num_points K, pos_embed (add the relative sine PE to the queries)
//   -> logits  (T, H, W)     float64 for float64 inputs, float32 otherwise
//
// Backward returns (grad_fmask, grad_params) in the dtypes of fmask and params; it recomputes the
// forward pass per pixel and stores no per-pixel intermediates. The CPU backward is deterministic
// (bitwise, for any thread count); the CUDA backward accumulates grad_fmask with atomics and
// raises under torch.use_deterministic_algorithms(True).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace solq_d2 {
namespace soit {

// Validated inputs in kernel form: contiguous, math dtype, int64 indices, on fmask's device.
struct Problem {
  at::Tensor fmask;   // (B, H, W, C)
  at::Tensor valid;   // (B, 2) int64
  at::Tensor params;  // (T, D)
  at::Tensor img;     // (T,) int64
  at::Tensor pe_y;    // (T, H + 1, C/2): y half of the RelPE per row; row H is the padded-column
                      // entry (position 0). Undefined without pos_embed.
  at::Tensor pe_x;    // (T, W + 1, C/2): x half per column; column W is the padded-row entry.
  int64_t B, H, W, C, T, D, M, K;
  bool pos_embed;
  at::ScalarType fmask_dtype, params_dtype;  // dtypes of the user's tensors (for the gradients)
};

// Checks shapes, dtypes, devices and geometry (TORCH_CHECK, messages prefixed by `op`), builds the
// RelPE tables, and returns the inputs in kernel form. With `check_values`, also checks the
// contents of valid_hw and img_idx (the CUDA path guards them on the device instead, to avoid a
// host synchronisation).
Problem prepare(
    const char* op,
    const at::Tensor& fmask,
    const at::Tensor& valid_hw,
    const at::Tensor& params,
    const at::Tensor& img_idx,
    const at::Tensor& centers,
    int64_t num_heads,
    int64_t num_points,
    bool pos_embed,
    bool check_values);

// grad_logits (T, H, W), any floating dtype -> contiguous, in the math dtype.
at::Tensor prepare_grad(const char* op, const Problem& p, const at::Tensor& grad_logits);

// The gradients in the user's dtypes.
std::tuple<at::Tensor, at::Tensor> cast_grads(const Problem& p, at::Tensor gf, at::Tensor gp);

// Whether the kernels are compiled for this geometry at compile time (else the bounded run-time
// geometry serves it: C <= 32, M*K <= 64).
bool fixed_geometry(int64_t C, int64_t M, int64_t K);

at::Tensor forward_cpu(const Problem& p);
std::tuple<at::Tensor, at::Tensor> backward_cpu(const Problem& p, const at::Tensor& grad);

#ifdef WITH_CUDA
at::Tensor forward_cuda(const Problem& p);
std::tuple<at::Tensor, at::Tensor> backward_cuda(const Problem& p, const at::Tensor& grad);
#endif

}  // namespace soit
}  // namespace solq_d2
