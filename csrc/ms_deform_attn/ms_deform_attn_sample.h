// Per-sample arithmetic of multi-scale deformable attention, shared by the CPU and CUDA kernels.
//
// Everything that decides *which* pixels a sampling location touches and *with which weights*
// lives here, in inline __host__ __device__ functions, so that the CPU tests exercise exactly the
// arithmetic the GPU runs. Convention (identical to grid_sample with mode="bilinear",
// padding_mode="zeros", align_corners=False, and to Deformable DETR's op):
//
//   pixel coordinates   w = x * W - 0.5,  h = y * H - 0.5     (x, y normalised, pixel centres at
//                                                              ((j + 0.5) / W, (i + 0.5) / H))
//   corners             (h0, w0) = floor(h, w), (h0 + 1, w0 + 1)
//   weights             (1 - lh)(1 - lw), (1 - lh) lw, lh (1 - lw), lh lw,  lh = h - h0, lw = w - w0
//
// Each corner outside the map is zero (weight 0 and index -1, so callers never read it). A
// location with h < -1, h >= H, w < -1 or w >= W, or a NaN coordinate, touches nothing; the
// comparisons are made before any float -> int conversion, so huge or non-finite inputs are safe.
// At h == -1 exactly the value is 0 but its derivative is the right derivative (the in-range
// corner's), as grid_sample computes it.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SOLQ_D2_HD __host__ __device__ __forceinline__
#define SOLQ_D2_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define SOLQ_D2_HD inline __attribute__((always_inline))
#define SOLQ_D2_UNROLL _Pragma("GCC unroll 4")
#else
#define SOLQ_D2_HD inline
#define SOLQ_D2_UNROLL
#endif

namespace solq_d2 {
namespace msda {

// Corner order used everywhere: 0 = (h0, w0), 1 = (h0, w0 + 1), 2 = (h0 + 1, w0),
// 3 = (h0 + 1, w0 + 1).
constexpr int kCorners = 4;

SOLQ_D2_HD float floor_value(float v) {
#ifdef __CUDA_ARCH__
  return floorf(v);
#else
  return std::floor(v);
#endif
}

SOLQ_D2_HD double floor_value(double v) {
#ifdef __CUDA_ARCH__
  return ::floor(v);
#else
  return std::floor(v);
#endif
}

// Bilinear corners of the normalised location (x, y) on an H x W map (H * W < 2^31), with the
// derivatives of the weights.
//
// Outputs idx[k] = h_k * W + w_k (row-major index inside the level) or -1 when corner k lies
// outside the map, w[k] its bilinear weight, and the derivatives of w[k] with respect to the
// *normalised* coordinates: dwdx[k] = d w[k] / dx = W * d w[k] / d(pixel w) and
// dwdy[k] = d w[k] / dy = H * d w[k] / d(pixel h); w, dwdx and dwdy are 0 for corners outside the
// map. Returns false when the location touches no pixel (idx and the weights are then -1 and 0).
template <typename T>
SOLQ_D2_HD bool bilinear_corners_grad(
    T x,
    T y,
    int32_t H,
    int32_t W,
    int32_t idx[kCorners],
    T w[kCorners],
    T dwdx[kCorners],
    T dwdy[kCorners]) {
  const T h = y * static_cast<T>(H) - static_cast<T>(0.5);
  const T ww = x * static_cast<T>(W) - static_cast<T>(0.5);
  if (!(h >= static_cast<T>(-1) && ww >= static_cast<T>(-1) && h < static_cast<T>(H) &&
        ww < static_cast<T>(W))) {
SOLQ_D2_UNROLL
    for (int k = 0; k < kCorners; ++k) {
      idx[k] = -1;
      w[k] = dwdx[k] = dwdy[k] = static_cast<T>(0);
    }
    return false;
  }
  const T hf = floor_value(h);
  const T wf = floor_value(ww);
  const int32_t h0 = static_cast<int32_t>(hf);
  const int32_t w0 = static_cast<int32_t>(wf);
  const T lh = h - hf, lw = ww - wf;
  const T hh = static_cast<T>(1) - lh, hw = static_cast<T>(1) - lw;
  const T sx = static_cast<T>(W), sy = static_cast<T>(H);
  const bool valid[kCorners] = {
      h0 >= 0 && w0 >= 0, h0 >= 0 && w0 + 1 < W, h0 + 1 < H && w0 >= 0, h0 + 1 < H && w0 + 1 < W};
  const int32_t base = h0 * W + w0;
  const int32_t offs[kCorners] = {0, 1, W, W + 1};
  const T wk[kCorners] = {hh * hw, hh * lw, lh * hw, lh * lw};
  const T dx[kCorners] = {-hh * sx, hh * sx, -lh * sx, lh * sx};
  const T dy[kCorners] = {-hw * sy, -lw * sy, hw * sy, lw * sy};
SOLQ_D2_UNROLL
  for (int k = 0; k < kCorners; ++k) {
    idx[k] = valid[k] ? base + offs[k] : -1;
    w[k] = valid[k] ? wk[k] : static_cast<T>(0);
    dwdx[k] = valid[k] ? dx[k] : static_cast<T>(0);
    dwdy[k] = valid[k] ? dy[k] : static_cast<T>(0);
  }
  return true;
}

// Bilinear corners and weights only (the forward pass); the unused derivatives are dead code.
template <typename T>
SOLQ_D2_HD bool bilinear_corners(T x, T y, int32_t H, int32_t W, int32_t idx[kCorners], T w[kCorners]) {
  T dwdx[kCorners], dwdy[kCorners];
  return bilinear_corners_grad(x, y, H, W, idx, w, dwdx, dwdy);
}

// Whether level geometry read on the device is usable without out-of-bounds reads (the host
// validates it too, except while a CUDA graph is being captured).
SOLQ_D2_HD bool level_is_safe(int64_t H, int64_t W, int64_t start, int64_t S) {
  return H > 0 && W > 0 && H * W <= INT32_MAX && start >= 0 && start <= S - H * W;
}

}  // namespace msda
}  // namespace solq_d2
