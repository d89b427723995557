// Per-pixel and per-sample arithmetic of SOIT's instance-aware deformable attention, shared by the
// CPU and CUDA kernels (inline __host__ __device__), so that the CPU tests exercise exactly the
// arithmetic the GPU runs.
//
// For instance n (image b) with parameters theta (layout below) and pixel p = (i, j):
//   q      = F[b, i, j, :] + RelPE_n(i, j)                          (C,)  raw features
//   delta  = W_off q + b_off                                        (M*K, 2) pixels, (dx, dy)
//   a      = softmax over k of (W_att q + b_att)                     (M, K)
//   s_m    = sum_k a_mk * bilinear(V_b[..., head m channels], sample position of (m, k))
//   logit  = W_out . relu(concat_m s_m) + b_out
// V_b is F[b] with the pixels outside the valid region (rows >= h_v or cols >= w_v) set to 0.
//
// theta layout (D = (C+1)(3*M*K+1), 441 for C=8, M=4, K=4; the authors' order):
//   [0, 2MKC)       W_off, row (m*K + k)*2 + {0: x, 1: y}, C columns
//   [.., +2MK)      b_off
//   [.., +MKC)      W_att, row m*K + k
//   [.., +MK)       b_att
//   [.., +C)        W_out
//   [D-1]           b_out
//
// Sample positions follow the authors' fp arithmetic exactly (it matters at the 1e-5 level):
// mmdet's reference point ref = ((j + 0.5) / (vr * W)) * vr with vr = w_v / W, the normalised
// location loc = ref + dx / W, and grid_sample's unnormalisation of g = 2 loc - 1 (fused
// multiply-add): x = fma(g + 1, W / 2, -0.5). In exact arithmetic x = j + dx.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SOIT_HD __host__ __device__ __forceinline__
#define SOIT_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define SOIT_HD inline __attribute__((always_inline))
#define SOIT_UNROLL _Pragma("GCC unroll 4")
#else
#define SOIT_HD inline
#define SOIT_UNROLL
#endif

namespace solq_d2 {
namespace soit {

// ------------------------------------------------------------------------------------------------
// Geometry: compile-time for the geometries in SOIT's paper, run-time (bounded) for the others.

template <int C_, int M_, int K_>
struct FixedGeom {
  static_assert(C_ % M_ == 0, "channels must be divisible by heads");
  static constexpr int C = C_, M = M_, K = K_, MK = M_ * K_, CH = C_ / M_;
  static constexpr int kMaxC = C_, kMaxMK = M_ * K_;
};

struct DynGeom {
  static constexpr int kMaxC = 32, kMaxMK = 64;
  int C, M, K, MK, CH;
};

// Calls f(geometry) with a compile-time geometry for the configurations of SOIT's ablations
// (C = 8 with 1/2/4/8 heads, C = 4/16 with 4 heads; K = 4) and DynGeom otherwise. Host only.
template <class F>
inline void dispatch_geometry(int C, int M, int K, F&& f) {
  if (K == 4 && C == 8 && M == 4) return f(FixedGeom<8, 4, 4>{});
  if (K == 4 && C == 8 && M == 8) return f(FixedGeom<8, 8, 4>{});
  if (K == 4 && C == 8 && M == 2) return f(FixedGeom<8, 2, 4>{});
  if (K == 4 && C == 8 && M == 1) return f(FixedGeom<8, 1, 4>{});
  if (K == 4 && C == 4 && M == 4) return f(FixedGeom<4, 4, 4>{});
  if (K == 4 && C == 16 && M == 4) return f(FixedGeom<16, 4, 4>{});
  DynGeom g;
  g.C = C;
  g.M = M;
  g.K = K;
  g.MK = M * K;
  g.CH = C / M;
  return f(g);
}

template <class G>
SOIT_HD int param_dim(const G& g) {
  return (g.C + 1) * (3 * g.MK + 1);
}
template <class G>
SOIT_HD int ofs_b_off(const G& g) {
  return 2 * g.MK * g.C;
}
template <class G>
SOIT_HD int ofs_w_att(const G& g) {
  return 2 * g.MK * g.C + 2 * g.MK;
}
template <class G>
SOIT_HD int ofs_b_att(const G& g) {
  return 3 * g.MK * g.C + 2 * g.MK;
}
template <class G>
SOIT_HD int ofs_w_out(const G& g) {
  return 3 * g.MK * g.C + 3 * g.MK;
}
template <class G>
SOIT_HD int ofs_b_out(const G& g) {
  return 3 * g.MK * g.C + 3 * g.MK + g.C;
}
// The 3*M*K rows of the two query projections: rows [0, 2MK) are W_off, rows [2MK, 3MK) W_att.
template <class G>
SOIT_HD int ofs_lin_weight(const G& g, int r) {
  return r < 2 * g.MK ? r * g.C : ofs_w_att(g) + (r - 2 * g.MK) * g.C;
}
template <class G>
SOIT_HD int ofs_lin_bias(const G& g, int r) {
  return r < 2 * g.MK ? ofs_b_off(g) + r : ofs_b_att(g) + (r - 2 * g.MK);
}

SOIT_HD int imin(int a, int b) {
  return a < b ? a : b;
}

SOIT_HD float exp_(float v) {
#ifdef __CUDA_ARCH__
  return expf(v);
#else
  return std::exp(v);
#endif
}
SOIT_HD double exp_(double v) {
#ifdef __CUDA_ARCH__
  return ::exp(v);
#else
  return std::exp(v);
#endif
}

// ------------------------------------------------------------------------------------------------
// Sample positions (the authors' arithmetic, see the file comment).

// fma(a, b, -0.5) rounded once, as grid_sample's vectorised unnormalisation computes it.
SOIT_HD float fma_minus_half(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, -0.5f);
#else
  // a * b is exact in double (24 + 24 bits); one rounding to double then to float.
  return static_cast<float>(static_cast<double>(a) * static_cast<double>(b) - 0.5);
#endif
}
SOIT_HD double fma_minus_half(double a, double b) {
#ifdef __CUDA_ARCH__
  return __fma_rn(a, b, -0.5);
#else
  return std::fma(a, b, -0.5);
#endif
}

// One step acc + w * q of a dot product, rounded once: the authors' projections run through
// fp32 GEMM kernels that accumulate with FMA from 0 and add the bias last, and the sample
// positions inherit that rounding (see the file comment).
SOIT_HD float fma_acc(float acc, float w, float q) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(w, q, acc);
#else
  // w * q is exact in double; one rounding to double then to float (portable, no FMA unit needed)
  return static_cast<float>(
      static_cast<double>(acc) + static_cast<double>(w) * static_cast<double>(q));
#endif
}
SOIT_HD double fma_acc(double acc, double w, double q) {
#ifdef __CUDA_ARCH__
  return __fma_rn(w, q, acc);
#else
  return acc + w * q;
#endif
}

// Normalisation constants of one axis (size S of the map, v valid pixels).
template <typename T>
struct Axis {
  T size;     // S
  T half;     // S / 2
  T vr;       // valid ratio v / S
  T vr_size;  // vr * S
};

template <typename T>
SOIT_HD Axis<T> make_axis(int size, int valid) {
  Axis<T> a;
  a.size = static_cast<T>(size);
  a.half = a.size / static_cast<T>(2);
  a.vr = static_cast<T>(valid) / a.size;
  a.vr_size = a.vr * a.size;
  return a;
}

// Products that must be rounded on their own: compilers contract a * b + c into one fused
// multiply-add by default (GCC and nvcc alike), which would skip the rounding the authors' code
// has between the reference point and the location.
SOIT_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);  // never contracted
#else
  float r = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(r));  // opaque to the optimiser: no contraction with a later addition
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(r));
#else
  volatile float v = r;
  r = v;
#endif
  return r;
#endif
}
SOIT_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  double r = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(r));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(r));
#else
  volatile double v = r;
  r = v;
#endif
  return r;
#endif
}

// mmdet's reference point of pixel index j along this axis.
template <typename T>
SOIT_HD T ref_point(const Axis<T>& a, int j) {
  return mul_rn((static_cast<T>(j) + static_cast<T>(0.5)) / a.vr_size, a.vr);
}

// Pixel coordinate (pixel-centre convention) of reference `ref` moved by `off` pixels.
template <typename T>
SOIT_HD T pixel_coord(const Axis<T>& a, T ref, T off) {
  const T loc = ref + off / a.size;
  const T g1 = (static_cast<T>(2) * loc - static_cast<T>(1)) + static_cast<T>(1);
  return fma_minus_half(g1, a.half);
}

// ------------------------------------------------------------------------------------------------
// Bilinear sampling with zero padding outside the valid region [0, hv) x [0, wv).

template <typename T>
struct Corners {
  int32_t x0, y0;  // corner q sits at (y0 + (q >> 1), x0 + (q & 1))
  int32_t idx[4];  // flat pixel index y * W + x of corners (y0,x0), (y0,x1), (y1,x0), (y1,x1)
  bool ok[4];      // corner inside the valid region (the others read 0 and receive no gradient)
  T w[4];          // bilinear weights
  T lx, ly, hx, hy;  // x - x0, y - y0, x1 - x, y1 - y
};

// Returns false when the sample touches no valid pixel. Comparisons come before any float -> int
// conversion, so NaN or huge coordinates are safe (they touch nothing). As grid_sample, a
// coordinate of exactly -1 has value 0 but the derivative of its in-range corner.
template <typename T>
SOIT_HD bool bilinear_corners(T x, T y, int hv, int wv, int W, Corners<T>& c) {
  if (!(x >= static_cast<T>(-1) && y >= static_cast<T>(-1) && x < static_cast<T>(wv) &&
        y < static_cast<T>(hv))) {
    return false;
  }
  int x0 = static_cast<int>(x);  // truncation; x > -2 so this is safe
  x0 -= (x < static_cast<T>(x0)) ? 1 : 0;  // floor
  int y0 = static_cast<int>(y);
  y0 -= (y < static_cast<T>(y0)) ? 1 : 0;
  const int x1 = x0 + 1, y1 = y0 + 1;
  c.x0 = x0;
  c.y0 = y0;
  c.hx = static_cast<T>(x1) - x;
  c.lx = x - static_cast<T>(x0);
  c.hy = static_cast<T>(y1) - y;
  c.ly = y - static_cast<T>(y0);
  c.w[0] = c.hx * c.hy;
  c.w[1] = c.lx * c.hy;
  c.w[2] = c.hx * c.ly;
  c.w[3] = c.lx * c.ly;
  const bool x0ok = x0 >= 0, x1ok = x1 < wv, y0ok = y0 >= 0, y1ok = y1 < hv;
  c.ok[0] = y0ok && x0ok;
  c.ok[1] = y0ok && x1ok;
  c.ok[2] = y1ok && x0ok;
  c.ok[3] = y1ok && x1ok;
  c.idx[0] = y0 * W + x0;
  c.idx[1] = y0 * W + x1;
  c.idx[2] = y1 * W + x0;
  c.idx[3] = y1 * W + x1;
  return true;
}

// ------------------------------------------------------------------------------------------------
// Per-pixel pieces.

// In-place softmax of K logits spaced `stride` apart (max-subtracted, as PyTorch computes it).
template <typename T>
SOIT_HD void softmax_k(T* l, int K, int stride) {
  T mx = l[0];
  SOIT_UNROLL
  for (int k = 1; k < K; ++k) mx = l[k * stride] > mx ? l[k * stride] : mx;
  T sum = 0;
  SOIT_UNROLL
  for (int k = 0; k < K; ++k) {
    const T e = exp_(l[k * stride] - mx);
    l[k * stride] = e;
    sum += e;
  }
  const T inv = static_cast<T>(1) / sum;  // as PyTorch's softmax: e * (1 / sum)
  SOIT_UNROLL
  for (int k = 0; k < K; ++k) l[k * stride] = l[k * stride] * inv;
}

// s[C] = sum over (m, k) of a[m*K+k] * bilinear(Vb, (x, y)[m*K+k]) on head m's channels.
// Vb: (H, W, C) features of the image (channels last); a, x, y are read with stride `st`.
template <typename T, class G>
SOIT_HD void sample_pixel(
    const G& g,
    const T* __restrict__ Vb,
    int hv,
    int wv,
    int W,
    const T* a,
    const T* xs,
    const T* ys,
    int st,
    T* s) {
  SOIT_UNROLL
  for (int c = 0; c < g.C; ++c) s[c] = 0;
  SOIT_UNROLL
  for (int m = 0; m < g.M; ++m) {
    SOIT_UNROLL
    for (int k = 0; k < g.K; ++k) {
      const int r = (m * g.K + k) * st;
      Corners<T> cr;
      if (!bilinear_corners(xs[r], ys[r], hv, wv, W, cr)) continue;
      const T am = a[r];
      SOIT_UNROLL
      for (int ch = 0; ch < g.CH; ++ch) {
        const int c = m * g.CH + ch;
        T v = 0;
SOIT_UNROLL
        for (int q = 0; q < 4; ++q) {
          if (cr.ok[q]) v += cr.w[q] * Vb[static_cast<int64_t>(cr.idx[q]) * g.C + c];
        }
        s[c] += am * v;
      }
    }
  }
}

// Backward of one pixel through sampling, attention softmax and the output layer.
//
// Inputs: s (C,) from sample_pixel, the upstream gradient gl of the logit, theta, and the same
// a/x/y as sample_pixel. Outputs: d_lin[r * st] for the 3*M*K projection rows (offsets dx, dy, then
// attention logits), the gradient of W_out (dw_out[c] += gl * relu(s_c)); the value gradients are
// passed to scatter(corners, q, channel, value) for corner q of `corners` (inside the valid region).
template <typename T, class G, class Scatter>
SOIT_HD void backward_pixel(
    const G& g,
    const T* __restrict__ theta,
    const T* __restrict__ Vb,
    int hv,
    int wv,
    int W,
    const T* a,
    const T* xs,
    const T* ys,
    int st,
    const T* s,
    T gl,
    T* d_lin,
    T* dw_out,
    Scatter&& scatter) {
  T d_o[G::kMaxC];
  const T* w_out = theta + ofs_w_out(g);
  SOIT_UNROLL
  for (int c = 0; c < g.C; ++c) {
    const T o = s[c] > static_cast<T>(0) ? s[c] : static_cast<T>(0);
    dw_out[c] += gl * o;
    d_o[c] = s[c] > static_cast<T>(0) ? gl * w_out[c] : static_cast<T>(0);
  }
  SOIT_UNROLL
  for (int m = 0; m < g.M; ++m) {
    T da_sum = 0;
    SOIT_UNROLL
    for (int k = 0; k < g.K; ++k) {
      const int mk = m * g.K + k;
      const int r = mk * st;
      T da = 0, dx = 0, dy = 0;
      Corners<T> cr;
      if (bilinear_corners(xs[r], ys[r], hv, wv, W, cr)) {
        const T am = a[r];
        SOIT_UNROLL
        for (int ch = 0; ch < g.CH; ++ch) {
          const int c = m * g.CH + ch;
          const T go = d_o[c];
          T v[4];
SOIT_UNROLL
          for (int q = 0; q < 4; ++q) {
            v[q] = cr.ok[q] ? Vb[static_cast<int64_t>(cr.idx[q]) * g.C + c] : static_cast<T>(0);
          }
          const T val = cr.w[0] * v[0] + cr.w[1] * v[1] + cr.w[2] * v[2] + cr.w[3] * v[3];
          da += go * val;
          // d val / dx and d val / dy (the derivative of the sample position w.r.t. the offset
          // is 1 in exact arithmetic)
          dx += go * (cr.hy * (v[1] - v[0]) + cr.ly * (v[3] - v[2]));
          dy += go * (cr.hx * (v[2] - v[0]) + cr.lx * (v[3] - v[1]));
          const T gv = am * go;
SOIT_UNROLL
          for (int q = 0; q < 4; ++q) {
            if (cr.ok[q]) scatter(cr, q, c, cr.w[q] * gv);
          }
        }
        dx *= am;
        dy *= am;
      }
      d_lin[(2 * mk) * st] = dx;
      d_lin[(2 * mk + 1) * st] = dy;
      d_lin[(2 * g.MK + mk) * st] = da;  // d a_mk for now; softmax backward below
      da_sum += a[r] * da;
    }
    SOIT_UNROLL
    for (int k = 0; k < g.K; ++k) {
      const int mk = m * g.K + k;
      T& d = d_lin[(2 * g.MK + mk) * st];
      d = a[mk * st] * (d - da_sum);
    }
  }
}

}  // namespace soit
}  // namespace solq_d2
