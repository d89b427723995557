// CUDA kernels of multi-scale deformable attention (forward and backward).
//
// Thread mapping (forward and backward): a group of G lanes (G = next power of two >= D, at most
// 32) serves one work item (b, q, m, channel block); lane i of the group handles channels
// i, i + G, ..., i + (CPL - 1) * G of the block (CPL channels per lane, a template parameter), so
// for D = 32 one warp reads one 128-byte row per corner, and small heads (D = 2, 8, ...) pack
// 32 / G heads into a warp instead of leaving lanes idle. Heads with more than 8 * 32 channels
// are split into several channel blocks.
//
// Every lane computes the corners and weights of each sample itself with the shared
// __host__ __device__ functions of ms_deform_attn_sample.h (the CPU kernel runs the same code);
// the location and weight loads of a group hit one address and are broadcast.
//
// Backward: grad_value is accumulated with atomicAdd (lanes of a group hit distinct channels,
// hence distinct addresses) into a float32 buffer for float16/bfloat16 values. The per-sample
// channel sums for grad_attn and grad_loc are reduced inside the lane group with __shfl_xor_sync
// over the full warp (loop bounds are uniform per warp, idle lanes contribute zeros), then written
// by the group's first lane: no shared memory, no __syncthreads. The atomics make the backward
// non-deterministic; it raises under torch.use_deterministic_algorithms(True).
//
// Indices: 64-bit for every global offset; 32-bit only inside one level (H * W < 2^31, checked).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sample.h"

namespace solq_d2 {
namespace msda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

struct Geometry {
  int64_t B, S, M, D, Q;
  int L, P;
  int G;             // lanes per work item (power of two <= 32)
  int64_t blocks_c;  // channel blocks per head (each G * CPL channels)
  int64_t items;     // B * Q * M * blocks_c
  int64_t threads;   // items * G rounded up to a multiple of the warp size
};

template <int CPL>
Geometry make_geometry(const Problem& p) {
  Geometry g{};
  g.B = p.B, g.S = p.S, g.M = p.M, g.D = p.D, g.Q = p.Q;
  g.L = static_cast<int>(p.L), g.P = static_cast<int>(p.P);
  g.G = 1;
  while (g.G < p.D && g.G < kWarpSize) g.G <<= 1;
  const int64_t per_block = static_cast<int64_t>(g.G) * CPL;
  g.blocks_c = (p.D + per_block - 1) / per_block;
  g.items = p.B * p.Q * p.M * g.blocks_c;
  g.threads = (g.items * g.G + kWarpSize - 1) / kWarpSize * kWarpSize;
  return g;
}

// Channels per lane: the smallest of 1, 2, 4, 8 that covers D with 32-lane groups.
int channels_per_lane(int64_t D) {
  if (D <= 32) return 1;
  if (D <= 64) return 2;
  if (D <= 128) return 4;
  return 8;
}

int num_blocks(int64_t threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (threads + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, sms * 32)));
}

// Work item of thread t: (row = (b * Q + q) * M + m, channel block), and its lane in the group.
struct Item {
  int64_t row, b, cblock;
  int lane;
  bool active;
};

__device__ __forceinline__ Item item_of(const Geometry& g, int64_t t) {
  Item it;
  const int64_t item = t / g.G;
  it.lane = static_cast<int>(t % g.G);
  it.active = item < g.items;
  const int64_t safe = it.active ? item : 0;
  it.cblock = safe % g.blocks_c;
  it.row = safe / g.blocks_c;
  it.b = it.row / (g.Q * g.M);
  return it;
}

template <typename scalar_t, typename acc_t, int CPL>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const acc_t* __restrict__ loc,
    const acc_t* __restrict__ attn,
    scalar_t* __restrict__ out,
    const Geometry g) {
  const int64_t MD = g.M * g.D;
  const int LP = g.L * g.P;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < g.threads;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Item it = item_of(g, t);
    if (!it.active) continue;  // no collective operations in the forward
    const int64_t m = it.row % g.M;
    const int64_t c_base = it.cblock * g.G * CPL + it.lane;
    const scalar_t* v = value + it.b * g.S * MD + m * g.D + c_base;
    const acc_t* lr = loc + it.row * LP * 2;
    const acc_t* ar = attn + it.row * LP;
    acc_t acc[CPL];
#pragma unroll
    for (int j = 0; j < CPL; ++j) acc[j] = acc_t(0);
    for (int l = 0; l < g.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
      if (!level_is_safe(H, W, start, g.S)) continue;
      for (int p = 0; p < g.P; ++p) {
        const int s = l * g.P + p;
        int32_t idx[kCorners];
        acc_t w[kCorners];
        if (!bilinear_corners(lr[2 * s], lr[2 * s + 1], static_cast<int32_t>(H),
                              static_cast<int32_t>(W), idx, w)) {
          continue;
        }
        const acc_t a = ar[s];
#pragma unroll
        for (int k = 0; k < kCorners; ++k) {
          if (idx[k] < 0) continue;
          const scalar_t* vr = v + (start + idx[k]) * MD;
          const acc_t wk = w[k] * a;
#pragma unroll
          for (int j = 0; j < CPL; ++j) {
            if (c_base + j * g.G < g.D) acc[j] += wk * static_cast<acc_t>(vr[j * g.G]);
          }
        }
      }
    }
    scalar_t* o = out + it.row * g.D + c_base;
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      if (c_base + j * g.G < g.D) o[j * g.G] = static_cast<scalar_t>(acc[j]);
    }
  }
}

// Sum over the G lanes of a group (G a power of two <= 32); every lane of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int G) {
  for (int offset = G / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t, int CPL>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const acc_t* __restrict__ loc,
    const acc_t* __restrict__ attn,
    const acc_t* __restrict__ grad_out,
    acc_t* __restrict__ grad_value,  // (B, S, M, D), zero-initialised
    acc_t* __restrict__ grad_loc,    // zero-initialised
    acc_t* __restrict__ grad_attn,   // zero-initialised
    const Geometry g) {
  const int64_t MD = g.M * g.D;
  const int LP = g.L * g.P;
  const bool split = g.blocks_c > 1;  // several groups contribute to one sample's sums
  // g.threads is a multiple of 32 and the stride too: every lane of a warp runs the same
  // iterations, so the shuffles below always see the full warp.
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < g.threads;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Item it = item_of(g, t);
    const int64_t m = it.row % g.M;
    const int64_t c_base = it.cblock * g.G * CPL + it.lane;
    const int64_t v_off = it.b * g.S * MD + m * g.D + c_base;
    const scalar_t* v = value + v_off;
    acc_t* gv = grad_value + v_off;
    const acc_t* lr = loc + it.row * LP * 2;
    const acc_t* ar = attn + it.row * LP;
    bool has[CPL];
    acc_t go[CPL];
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      has[j] = it.active && c_base + j * g.G < g.D;
      go[j] = has[j] ? grad_out[it.row * g.D + c_base + j * g.G] : acc_t(0);
    }
    for (int l = 0; l < g.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
      if (!level_is_safe(H, W, start, g.S)) continue;  // uniform: every lane reads the same level
      for (int p = 0; p < g.P; ++p) {
        const int s = l * g.P + p;
        int32_t idx[kCorners];
        acc_t w[kCorners], dwdx[kCorners], dwdy[kCorners];
        const acc_t x = it.active ? lr[2 * s] : acc_t(-2);  // idle lanes: a location off the map
        const acc_t y = it.active ? lr[2 * s + 1] : acc_t(-2);
        const acc_t a = it.active ? ar[s] : acc_t(0);
        acc_t sa = 0, sx = 0, sy = 0;
        if (bilinear_corners_grad(x, y, static_cast<int32_t>(H), static_cast<int32_t>(W), idx, w,
                                  dwdx, dwdy)) {
#pragma unroll
          for (int k = 0; k < kCorners; ++k) {
            if (idx[k] < 0) continue;
            const int64_t off = (start + idx[k]) * MD;
            const acc_t gw = a * w[k];
#pragma unroll
            for (int j = 0; j < CPL; ++j) {
              if (!has[j]) continue;
              const acc_t val = static_cast<acc_t>(v[off + j * g.G]);
              sa += go[j] * w[k] * val;
              sx += go[j] * dwdx[k] * val;
              sy += go[j] * dwdy[k] * val;
              atomicAdd(gv + off + j * g.G, gw * go[j]);
            }
          }
        }
        sa = group_sum(sa, g.G);
        sx = group_sum(sx, g.G);
        sy = group_sum(sy, g.G);
        if (it.active && it.lane == 0) {
          if (split) {
            atomicAdd(grad_attn + it.row * LP + s, sa);
            atomicAdd(grad_loc + (it.row * LP + s) * 2, a * sx);
            atomicAdd(grad_loc + (it.row * LP + s) * 2 + 1, a * sy);
          } else {
            grad_attn[it.row * LP + s] = sa;
            grad_loc[(it.row * LP + s) * 2] = a * sx;
            grad_loc[(it.row * LP + s) * 2 + 1] = a * sy;
          }
        }
      }
    }
  }
}

template <int CPL, typename scalar_t, typename acc_t>
void launch_forward(const Problem& p, at::Tensor& out) {
  const Geometry g = make_geometry<CPL>(p);
  if (g.items == 0) return;
  forward_kernel<scalar_t, acc_t, CPL>
      <<<num_blocks(g.threads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          p.value.data_ptr<scalar_t>(),
          p.spatial_shapes.data_ptr<int64_t>(),
          p.level_start_index.data_ptr<int64_t>(),
          p.loc.data_ptr<acc_t>(),
          p.attn.data_ptr<acc_t>(),
          out.data_ptr<scalar_t>(),
          g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int CPL, typename scalar_t, typename acc_t>
void launch_backward(
    const Problem& p,
    const at::Tensor& grad_out,
    at::Tensor& grad_value,
    at::Tensor& grad_loc,
    at::Tensor& grad_attn) {
  const Geometry g = make_geometry<CPL>(p);
  if (g.items == 0) return;
  backward_kernel<scalar_t, acc_t, CPL>
      <<<num_blocks(g.threads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          p.value.data_ptr<scalar_t>(),
          p.spatial_shapes.data_ptr<int64_t>(),
          p.level_start_index.data_ptr<int64_t>(),
          p.loc.data_ptr<acc_t>(),
          p.attn.data_ptr<acc_t>(),
          grad_out.data_ptr<acc_t>(),
          grad_value.data_ptr<acc_t>(),
          grad_loc.data_ptr<acc_t>(),
          grad_attn.data_ptr<acc_t>(),
          g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Problem prepare_cuda(
    const char* op,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight) {
  TORCH_CHECK(value.is_cuda(), op, ": expected CUDA tensors, got ", value.device());
  // Reading the level tables on the host syncs with the device; skip it while a CUDA graph is
  // captured (the kernels then guard every level themselves, see level_is_safe).
  const bool capturing =
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  return prepare(
      op, value, spatial_shapes, level_start_index, sampling_loc, attn_weight, !capturing);
}

at::Tensor forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    int64_t /*im2col_step*/) {
  constexpr const char* op = "ms_deform_attn_forward";
  const c10::cuda::OptionalCUDAGuard guard(value.device());
  const Problem p =
      prepare_cuda(op, value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  at::Tensor out = at::empty({p.B, p.Q, p.M * p.D}, p.value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.value.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    switch (channels_per_lane(p.D)) {
      case 1:
        return launch_forward<1, scalar_t, acc_t>(p, out);
      case 2:
        return launch_forward<2, scalar_t, acc_t>(p, out);
      case 4:
        return launch_forward<4, scalar_t, acc_t>(p, out);
      default:
        return launch_forward<8, scalar_t, acc_t>(p, out);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    const at::Tensor& grad_output,
    int64_t /*im2col_step*/) {
  constexpr const char* op = "ms_deform_attn_backward";
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward (CUDA, atomicAdd)");
  const c10::cuda::OptionalCUDAGuard guard(value.device());
  const Problem p =
      prepare_cuda(op, value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  const at::Tensor g = prepare_grad_output(op, p, grad_output);
  const at::ScalarType mt = math_type(p.value.scalar_type());
  at::Tensor grad_value = at::zeros(p.value.sizes(), p.value.options().dtype(mt));
  at::Tensor grad_loc = at::zeros(p.loc.sizes(), p.loc.options());
  at::Tensor grad_attn = at::zeros(p.attn.sizes(), p.attn.options());
  if (p.B * p.Q * p.M * p.D * p.L * p.P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.value.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      switch (channels_per_lane(p.D)) {
        case 1:
          return launch_backward<1, scalar_t, acc_t>(p, g, grad_value, grad_loc, grad_attn);
        case 2:
          return launch_backward<2, scalar_t, acc_t>(p, g, grad_value, grad_loc, grad_attn);
        case 4:
          return launch_backward<4, scalar_t, acc_t>(p, g, grad_value, grad_loc, grad_attn);
        default:
          return launch_backward<8, scalar_t, acc_t>(p, g, grad_value, grad_loc, grad_attn);
      }
    });
  }
  if (mt != p.value.scalar_type()) grad_value = grad_value.to(p.value.scalar_type());
  return {
      grad_value,
      grad_loc.to(sampling_loc.scalar_type()),
      grad_attn.to(attn_weight.scalar_type())};
}

}  // namespace
}  // namespace msda
}  // namespace solq_d2

TORCH_LIBRARY_IMPL(solq_d2, CUDA, m) {
  m.impl("ms_deform_attn_forward", &solq_d2::msda::forward_cuda);
  m.impl("ms_deform_attn_backward", &solq_d2::msda::backward_cuda);
}
