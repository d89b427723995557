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

// floor(v) as an integer, for |v| < 2^31 (callers guarantee it). Truncation plus a correction
// rather than floor(): compilers vectorise it, and it is exact for every such float or double.
template <typename T>
SOLQ_D2_HD int32_t floor_to_int(T v) {
  const int32_t i = static_cast<int32_t>(v);
  return i - static_cast<int32_t>(v < static_cast<T>(i));
}

// v clamped to [-1, size]; NaN gives -1. Comparisons and selects only (vectorisable).
template <typename T>
SOLQ_D2_HD T clamp_coordinate(T v, T size) {
  const T lo = v > static_cast<T>(-1) ? v : static_cast<T>(-1);
  return lo < size ? lo : size;
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
  // Branch-free (the CPU kernel vectorises a loop of these over samples): `in` is false for
  // locations off the support and for NaN, whose corners are then all invalid; the coordinates
  // are clamped to [-1, H] x [-1, W] (NaN -> -1) before the float -> int conversion, which is
  // therefore always defined and needs no branch.
  const bool in = (h >= static_cast<T>(-1)) & (ww >= static_cast<T>(-1)) &
      (h < static_cast<T>(H)) & (ww < static_cast<T>(W));
  const T hc = clamp_coordinate(h, static_cast<T>(H));
  const T wc = clamp_coordinate(ww, static_cast<T>(W));
  const int32_t h0 = floor_to_int(hc);  // in [-1, H - 1]
  const int32_t w0 = floor_to_int(wc);  // in [-1, W - 1]
  const T lh = hc - static_cast<T>(h0), lw = wc - static_cast<T>(w0);
  const T hh = static_cast<T>(1) - lh, hw = static_cast<T>(1) - lw;
  const T sx = static_cast<T>(W), sy = static_cast<T>(H);
  const bool top = in & (h0 >= 0), bottom = in & (h0 + 1 < H);
  const bool left = w0 >= 0, right = w0 + 1 < W;
  const bool valid[kCorners] = {
      static_cast<bool>(top & left), static_cast<bool>(top & right),
      static_cast<bool>(bottom & left), static_cast<bool>(bottom & right)};
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
  return in;
}

// Bilinear corners and weights only (the forward pass); the unused derivatives are dead code.
template <typename T>
SOLQ_D2_HD bool bilinear_corners(
    T x,
    T y,
    int32_t H,
    int32_t W,
    int32_t idx[kCorners],
    T w[kCorners]) {
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
