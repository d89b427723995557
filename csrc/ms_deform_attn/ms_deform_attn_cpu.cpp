// CPU kernels of multi-scale deformable attention (forward and deterministic backward).
//
// Forward: at::parallel_for over (batch, query). For each (b, q, head) the corners of all L * P
// samples are computed once (ms_deform_attn_sample.h) into a compact list of taps
// (row offset, weight) that skips pixels outside the map; the taps are then accumulated over
// the head's D channels in blocks of 64 bytes of accumulator that stay in registers.
//
// Backward: tasks own (b, head) pairs, optionally split into fixed query chunks when there are
// fewer pairs than threads. A task scatters into grad_value[b, :, head, :] with plain adds (chunks
// other than the first into private buffers, summed in chunk order afterwards) and writes
// grad_loc / grad_attn of its (b, q, head) rows: no atomics, and the result is bitwise
// reproducible for a given thread count (and across thread counts <= B * M).
//
// The inner loops are compiled three times (x86-64 baseline, AVX2+FMA, AVX-512) and chosen at
// run time from at::get_cpu_capability(), so ATEN_CPU_CAPABILITY=default|avx2 also selects them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <string>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sample.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define SOLQ_D2_X86_DISPATCH 1
#define SOLQ_D2_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SOLQ_D2_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#endif

#if !defined(__GNUC__)
#error "the ms_deform_attn CPU kernel needs GCC or Clang (vector extensions)"
#endif
// Vectors are only passed between always-inline functions, so no ABI boundary is crossed.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__GNUC__)
#define SOLQ_D2_INLINE inline __attribute__((always_inline))
#define SOLQ_D2_RESTRICT __restrict__
#else
#define SOLQ_D2_INLINE inline
#define SOLQ_D2_RESTRICT
#endif

namespace solq_d2 {
namespace msda {
namespace {

template <typename scalar_t, typename acc_t>
struct Args {
  const scalar_t* value;   // (B, S, M, D)
  const acc_t* loc;        // (B, Q, M, L, P, 2)
  const acc_t* attn;       // (B, Q, M, L, P)
  const acc_t* grad_out;   // (B, Q, M, D), backward only
  scalar_t* out;           // (B, Q, M, D), forward only
  acc_t* grad_value;       // (B, S, M, D), backward only
  acc_t* grad_value_part;  // (B, M, n_chunks - 1, S, D), backward only
  acc_t* grad_loc;         // like loc, backward only
  acc_t* grad_attn;        // like attn, backward only
  const int32_t* sample_H;      // (L * P,) height of each sample's level
  const int32_t* sample_W;      // (L * P,) width
  const int64_t* sample_start;  // (L * P,) first token of the level
  int64_t B, S, M, D, Q, L, P;
  int64_t n_chunks;        // query chunks per (b, m) in the backward
};

// ---------------------------------------------------------------------------------------------
// 64-byte vectors of the math type (GCC/Clang vector extensions: one zmm register under AVX-512,
// two ymm under AVX2, four xmm on the x86-64 baseline).

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename acc_t>
using vec_t = typename Vec<acc_t>::type;
template <typename acc_t>
constexpr int kLanes = 64 / static_cast<int>(sizeof(acc_t));

// kLanes<acc_t> consecutive elements of p, converted to the math type.
template <typename acc_t, typename scalar_t>
SOLQ_D2_INLINE vec_t<acc_t> load_vec(const scalar_t* p) {
  vec_t<acc_t> v;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    typedef uint16_t u16x16 __attribute__((vector_size(32)));
    typedef uint32_t u32x16 __attribute__((vector_size(64)));
    u16x16 raw;
    std::memcpy(&raw, p, sizeof(raw));
    const u32x16 bits = __builtin_convertvector(raw, u32x16) << 16;  // bfloat16 = top half of fp32
    std::memcpy(&v, &bits, sizeof(v));
#if defined(__FLT16_MANT_DIG__)
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    typedef _Float16 f16x16 __attribute__((vector_size(32)));
    f16x16 raw;
    std::memcpy(&raw, p, sizeof(raw));
    v = __builtin_convertvector(raw, vec_t<acc_t>);
#endif
  } else {
    for (int j = 0; j < kLanes<acc_t>; ++j) v[j] = static_cast<acc_t>(p[j]);
  }
  return v;
}

template <typename acc_t, typename scalar_t>
SOLQ_D2_INLINE void store_vec(scalar_t* p, const vec_t<acc_t>& v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int j = 0; j < kLanes<acc_t>; ++j) p[j] = static_cast<scalar_t>(v[j]);
  }
}

// Sum of the N values at x by halving (a fixed tree: log2(N) vector adds, not N serial ones).
template <typename acc_t, int N>
SOLQ_D2_INLINE acc_t tree_sum(const acc_t* x) {
  if constexpr (N == 1) {
    return x[0];
  } else {
    typedef acc_t half_t __attribute__((vector_size(N / 2 * sizeof(acc_t))));
    half_t lo, hi;
    std::memcpy(&lo, x, sizeof(lo));
    std::memcpy(&hi, x + N / 2, sizeof(hi));
    const half_t sum = lo + hi;
    acc_t next[N / 2];
    std::memcpy(next, &sum, sizeof(sum));
    return tree_sum<acc_t, N / 2>(next);
  }
}

template <typename acc_t>
SOLQ_D2_INLINE acc_t hsum(const vec_t<acc_t>& v) {
  acc_t lanes[kLanes<acc_t>];
  std::memcpy(lanes, &v, sizeof(v));
  return tree_sum<acc_t, kLanes<acc_t>>(lanes);
}

// ---------------------------------------------------------------------------------------------
// Forward

constexpr int kMaxSamples = 32;  // samples whose corners are gathered between two flushes

// dst[c] = init[c] (or 0) + sum_{s < ns, k < 4} wt[s][k] * row[s][k][c], c in [0, D).
// Each corner k has its own accumulators, so the FMA chains are independent.
template <typename scalar_t, typename acc_t, typename dst_t>
SOLQ_D2_INLINE void accumulate_samples(
    const scalar_t* const (*row)[kCorners],
    const acc_t (*wt)[kCorners],
    int ns,
    int64_t D,
    const acc_t* init,
    dst_t* dst) {
  constexpr int N = kLanes<acc_t>;
  using V = vec_t<acc_t>;
  int64_t c0 = 0;
  for (; c0 + 2 * N <= D; c0 += 2 * N) {  // two vectors x four corners = 8 chains
    V a0[kCorners] = {}, a1[kCorners] = {};
    for (int s = 0; s < ns; ++s) {
      for (int k = 0; k < kCorners; ++k) {
        const scalar_t* p = row[s][k] + c0;
        a0[k] += wt[s][k] * load_vec<acc_t>(p);
        a1[k] += wt[s][k] * load_vec<acc_t>(p + N);
      }
    }
    V r0 = (a0[0] + a0[1]) + (a0[2] + a0[3]), r1 = (a1[0] + a1[1]) + (a1[2] + a1[3]);
    if (init) {
      r0 += load_vec<acc_t>(init + c0);
      r1 += load_vec<acc_t>(init + c0 + N);
    }
    store_vec<acc_t>(dst + c0, r0);
    store_vec<acc_t>(dst + c0 + N, r1);
  }
  if (c0 + N <= D) {
    V a0[kCorners] = {};
    for (int s = 0; s < ns; ++s) {
      for (int k = 0; k < kCorners; ++k) a0[k] += wt[s][k] * load_vec<acc_t>(row[s][k] + c0);
    }
    V r0 = (a0[0] + a0[1]) + (a0[2] + a0[3]);
    if (init) r0 += load_vec<acc_t>(init + c0);
    store_vec<acc_t>(dst + c0, r0);
    c0 += N;
  }
  for (; c0 < D; ++c0) {  // the last D % N channels
    acc_t a = init ? init[c0] : acc_t(0);
    for (int s = 0; s < ns; ++s) {
      for (int k = 0; k < kCorners; ++k) a += wt[s][k] * static_cast<acc_t>(row[s][k][c0]);
    }
    dst[c0] = static_cast<dst_t>(a);
  }
}

template <typename scalar_t, typename acc_t>
SOLQ_D2_INLINE void forward_range(const Args<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const int64_t MD = a.M * a.D, LP = a.L * a.P;
  int32_t idx[kMaxSamples][kCorners];
  acc_t w[kMaxSamples][kCorners];
  const scalar_t* row[kMaxSamples][kCorners];
  acc_t wt[kMaxSamples][kCorners];
  // Corners outside the map read this row (with weight 0): no branch per corner.
  const std::vector<scalar_t> zero_row(a.D, scalar_t(0));
  const scalar_t* zero = zero_row.data();
  std::vector<acc_t> partial;  // only when a head has more than kMaxSamples samples
  if (LP > kMaxSamples) partial.resize(a.D);
  for (int64_t bq = begin; bq < end; ++bq) {
    const scalar_t* vb = a.value + (bq / a.Q) * a.S * MD;
    for (int64_t m = 0; m < a.M; ++m) {
      const int64_t r = bq * a.M + m;
      const scalar_t* v = vb + m * a.D;
      for (int64_t s0 = 0; s0 < LP; s0 += kMaxSamples) {
        const int n = static_cast<int>(std::min<int64_t>(kMaxSamples, LP - s0));
        const acc_t* loc = a.loc + (r * LP + s0) * 2;
        const acc_t* attn = a.attn + r * LP + s0;
        const int32_t* sH = a.sample_H + s0;
        const int32_t* sW = a.sample_W + s0;
        const int64_t* start = a.sample_start + s0;
        for (int s = 0; s < n; ++s) {  // branch-free: vectorised over samples
          bilinear_corners(loc[2 * s], loc[2 * s + 1], sH[s], sW[s], idx[s], w[s]);
        }
        for (int s = 0; s < n; ++s) {
          for (int k = 0; k < kCorners; ++k) {
            row[s][k] = idx[s][k] >= 0 ? v + (start[s] + idx[s][k]) * MD : zero;
            wt[s][k] = w[s][k] * attn[s];
          }
        }
        const acc_t* init = s0 == 0 ? nullptr : partial.data();
        if (s0 + n == LP) {
          accumulate_samples(row, wt, n, a.D, init, a.out + r * a.D);
        } else {
          accumulate_samples(row, wt, n, a.D, init, partial.data());
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// One sample of one (b, q, m): scatters attn * w_k * g into the 4 corner rows of grad_value and
// returns sum_c g_c * (sum_k w_k v_k), sum_c g_c * (sum_k dwdx_k v_k), same for y.
template <typename scalar_t, typename acc_t>
SOLQ_D2_INLINE void backward_sample(
    const scalar_t* const* vr,
    acc_t* const* gr,
    const acc_t w[kCorners],
    const acc_t dwdx[kCorners],
    const acc_t dwdy[kCorners],
    acc_t aw,
    const acc_t* g,
    int64_t D,
    acc_t& sum_a,
    acc_t& sum_x,
    acc_t& sum_y) {
  constexpr int N = kLanes<acc_t>;
  using V = vec_t<acc_t>;
  V sa = {}, sx = {}, sy = {};
  acc_t gw[kCorners];
  for (int k = 0; k < kCorners; ++k) gw[k] = aw * w[k];
  int64_t c0 = 0;
  for (; c0 + N <= D; c0 += N) {
    const V gl = load_vec<acc_t>(g + c0);
    V vk[kCorners];
    for (int k = 0; k < kCorners; ++k) vk[k] = load_vec<acc_t>(vr[k] + c0);
    sa += gl * ((w[0] * vk[0] + w[1] * vk[1]) + (w[2] * vk[2] + w[3] * vk[3]));
    sx += gl * ((dwdx[0] * vk[0] + dwdx[1] * vk[1]) + (dwdx[2] * vk[2] + dwdx[3] * vk[3]));
    sy += gl * ((dwdy[0] * vk[0] + dwdy[1] * vk[1]) + (dwdy[2] * vk[2] + dwdy[3] * vk[3]));
    for (int k = 0; k < kCorners; ++k) {
      store_vec<acc_t>(gr[k] + c0, load_vec<acc_t>(gr[k] + c0) + gw[k] * gl);
    }
  }
  acc_t ra = hsum<acc_t>(sa), rx = hsum<acc_t>(sx), ry = hsum<acc_t>(sy);
  for (; c0 < D; ++c0) {  // the last D % N channels
    acc_t v4[kCorners];
    for (int k = 0; k < kCorners; ++k) v4[k] = static_cast<acc_t>(vr[k][c0]);
    const acc_t gc = g[c0];
    ra += gc * (w[0] * v4[0] + w[1] * v4[1] + w[2] * v4[2] + w[3] * v4[3]);
    rx += gc * (dwdx[0] * v4[0] + dwdx[1] * v4[1] + dwdx[2] * v4[2] + dwdx[3] * v4[3]);
    ry += gc * (dwdy[0] * v4[0] + dwdy[1] * v4[1] + dwdy[2] * v4[2] + dwdy[3] * v4[3]);
    for (int k = 0; k < kCorners; ++k) gr[k][c0] += gw[k] * gc;
  }
  sum_a = ra;
  sum_x = rx;
  sum_y = ry;
}

// Task t = (b, m, chunk): queries [chunk * Q / n_chunks, (chunk + 1) * Q / n_chunks) of head m.
//
// The task works on dense copies of its head's value rows and gradient rows (`vbuf`, `gbuf`,
// S x D each): in (B, S, M, D) the rows of one head are M * D elements apart (1 KiB for
// M * D = 256), which maps them onto a fraction of the cache sets and makes the scattered
// read-modify-writes of the backward miss far more often.
template <typename scalar_t, typename acc_t>
SOLQ_D2_INLINE void backward_task(
    const Args<scalar_t, acc_t>& a,
    int64_t t,
    const scalar_t* zero_row,
    acc_t* sink_rows,
    scalar_t* vbuf,
    acc_t* gbuf) {
  const int64_t chunk = t % a.n_chunks, bm = t / a.n_chunks;
  const int64_t b = bm / a.M, m = bm % a.M;
  const int64_t q0 = chunk * a.Q / a.n_chunks, q1 = (chunk + 1) * a.Q / a.n_chunks;
  const int64_t MD = a.M * a.D, LP = a.L * a.P, D = a.D;
  const scalar_t* value_bm = a.value + b * a.S * MD + m * D;
  for (int64_t s = 0; s < a.S; ++s) std::memcpy(vbuf + s * D, value_bm + s * MD, D * sizeof(scalar_t));
  const scalar_t* v = vbuf;
  // chunk 0 accumulates in gbuf and then owns grad_value[b, :, m, :]; the other chunks write
  // their private (dense) slices of grad_value_part
  acc_t* gv = chunk == 0 ? gbuf : a.grad_value_part + (bm * (a.n_chunks - 1) + chunk - 1) * a.S * D;
  if (chunk == 0) std::fill(gbuf, gbuf + a.S * D, acc_t(0));
  acc_t* sink[kCorners];
  for (int k = 0; k < kCorners; ++k) sink[k] = sink_rows + k * D;
  int32_t idx[kMaxSamples][kCorners];
  acc_t w[kMaxSamples][kCorners], dwdx[kMaxSamples][kCorners], dwdy[kMaxSamples][kCorners];
  bool touches[kMaxSamples];
  const scalar_t* vr[kMaxSamples][kCorners];
  acc_t* gr[kMaxSamples][kCorners];
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t r = (b * a.Q + q) * a.M + m;
    const acc_t* g = a.grad_out + r * a.D;
    for (int64_t s0 = 0; s0 < LP; s0 += kMaxSamples) {
      const int n = static_cast<int>(std::min<int64_t>(kMaxSamples, LP - s0));
      const acc_t* loc = a.loc + (r * LP + s0) * 2;
      const acc_t* attn = a.attn + r * LP + s0;
      acc_t* gloc = a.grad_loc + (r * LP + s0) * 2;
      acc_t* gattn = a.grad_attn + r * LP + s0;
      const int32_t* sH = a.sample_H + s0;
      const int32_t* sW = a.sample_W + s0;
      const int64_t* start = a.sample_start + s0;
      for (int s = 0; s < n; ++s) {  // branch-free: vectorised over samples
        touches[s] = bilinear_corners_grad(
            loc[2 * s], loc[2 * s + 1], sH[s], sW[s], idx[s], w[s], dwdx[s], dwdy[s]);
      }
      for (int s = 0; s < n; ++s) {  // corners outside the map read zeros and write a sink
        for (int k = 0; k < kCorners; ++k) {
          const bool in = idx[s][k] >= 0;
          vr[s][k] = in ? v + (start[s] + idx[s][k]) * D : zero_row;
          gr[s][k] = in ? gv + (start[s] + idx[s][k]) * D : sink[k];
        }
      }
      for (int s = 0; s < n; ++s) {
        if (!touches[s]) {
          gloc[2 * s] = gloc[2 * s + 1] = gattn[s] = acc_t(0);
          continue;
        }
        acc_t sa, sx, sy;
        backward_sample(vr[s], gr[s], w[s], dwdx[s], dwdy[s], attn[s], g, D, sa, sx, sy);
        gattn[s] = sa;
        gloc[2 * s] = attn[s] * sx;
        gloc[2 * s + 1] = attn[s] * sy;
      }
    }
  }
  if (chunk == 0) {
    acc_t* grad_bm = a.grad_value + b * a.S * MD + m * D;
    for (int64_t s = 0; s < a.S; ++s) std::memcpy(grad_bm + s * MD, gbuf + s * D, D * sizeof(acc_t));
  }
}

template <typename scalar_t, typename acc_t>
SOLQ_D2_INLINE void backward_range(const Args<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const std::vector<scalar_t> zero_row(a.D, scalar_t(0));
  std::vector<acc_t> sink_rows(kCorners * a.D, acc_t(0));
  std::vector<scalar_t> vbuf(a.S * a.D);
  std::vector<acc_t> gbuf(a.S * a.D);
  for (int64_t t = begin; t < end; ++t) {
    backward_task(a, t, zero_row.data(), sink_rows.data(), vbuf.data(), gbuf.data());
  }
}

// ---------------------------------------------------------------------------------------------
// Instruction-set variants and their selection

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa cpu_isa() {
  static const Isa isa = [] {
#ifdef SOLQ_D2_X86_DISPATCH
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq");
    if (cap == "AVX512" && avx512) return Isa::kAvx512;
    if ((cap == "AVX512" || cap == "AVX2") && avx2) return Isa::kAvx2;
#endif
    return Isa::kBaseline;
  }();
  return isa;
}

template <typename scalar_t, typename acc_t>
void forward_baseline(const Args<scalar_t, acc_t>& a, int64_t b, int64_t e) {
  forward_range(a, b, e);
}
template <typename scalar_t, typename acc_t>
void backward_baseline(const Args<scalar_t, acc_t>& a, int64_t b, int64_t e) {
  backward_range(a, b, e);
}
#ifdef SOLQ_D2_X86_DISPATCH
template <typename scalar_t, typename acc_t>
SOLQ_D2_TARGET_AVX2 void forward_avx2(const Args<scalar_t, acc_t>& a, int64_t b, int64_t e) {
  forward_range(a, b, e);
}
template <typename scalar_t, typename acc_t>
SOLQ_D2_TARGET_AVX2 void backward_avx2(const Args<scalar_t, acc_t>& a, int64_t b, int64_t e) {
  backward_range(a, b, e);
}
template <typename scalar_t, typename acc_t>
SOLQ_D2_TARGET_AVX512 void forward_avx512(const Args<scalar_t, acc_t>& a, int64_t b, int64_t e) {
  forward_range(a, b, e);
}
template <typename scalar_t, typename acc_t>
SOLQ_D2_TARGET_AVX512 void backward_avx512(const Args<scalar_t, acc_t>& a, int64_t b, int64_t e) {
  backward_range(a, b, e);
}
#endif

template <typename scalar_t, typename acc_t>
void run_forward(const Args<scalar_t, acc_t>& a, int64_t b, int64_t e) {
  switch (cpu_isa()) {
#ifdef SOLQ_D2_X86_DISPATCH
    case Isa::kAvx512:
      return forward_avx512(a, b, e);
    case Isa::kAvx2:
      return forward_avx2(a, b, e);
#endif
    default:
      return forward_baseline(a, b, e);
  }
}

template <typename scalar_t, typename acc_t>
void run_backward(const Args<scalar_t, acc_t>& a, int64_t b, int64_t e) {
  switch (cpu_isa()) {
#ifdef SOLQ_D2_X86_DISPATCH
    case Isa::kAvx512:
      return backward_avx512(a, b, e);
    case Isa::kAvx2:
      return backward_avx2(a, b, e);
#endif
    default:
      return backward_baseline(a, b, e);
  }
}

const char* isa_name() {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

// Level geometry of each sample s = l * P + p.
struct Levels {
  std::vector<int32_t> H, W;
  std::vector<int64_t> start;

  explicit Levels(const Problem& p) : H(p.L * p.P), W(p.L * p.P), start(p.L * p.P) {
    const int64_t* sh = p.spatial_shapes.data_ptr<int64_t>();
    const int64_t* st = p.level_start_index.data_ptr<int64_t>();
    for (int64_t s = 0; s < p.L * p.P; ++s) {
      const int64_t l = s / p.P;
      H[s] = static_cast<int32_t>(sh[2 * l]);
      W[s] = static_cast<int32_t>(sh[2 * l + 1]);
      start[s] = st[l];
    }
  }

  template <typename Args>
  void fill(Args& a) const {
    a.sample_H = H.data();
    a.sample_W = W.data();
    a.sample_start = start.data();
  }
};

void check_cpu(const char* op, const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), op, ": expected CPU tensors, got ", value.device());
}

}  // namespace

at::Tensor forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    int64_t /*im2col_step*/) {
  constexpr const char* op = "ms_deform_attn_forward";
  check_cpu(op, value);
  const Problem p =
      prepare(op, value, spatial_shapes, level_start_index, sampling_loc, attn_weight, true);
  at::Tensor out = at::empty({p.B, p.Q, p.M * p.D}, p.value.options());
  if (out.numel() == 0) return out;
  const Levels levels(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.value.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Args<scalar_t, acc_t> a{};
    a.value = p.value.data_ptr<scalar_t>();
    a.loc = p.loc.data_ptr<acc_t>();
    a.attn = p.attn.data_ptr<acc_t>();
    a.out = out.data_ptr<scalar_t>();
    levels.fill(a);
    a.B = p.B, a.S = p.S, a.M = p.M, a.D = p.D, a.Q = p.Q, a.L = p.L, a.P = p.P;
    // ~M * L * P * D multiply-adds per query: aim at >= ~32k per task
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.M * p.L * p.P * p.D));
    at::parallel_for(0, p.B * p.Q, grain, [&](int64_t b, int64_t e) { run_forward(a, b, e); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    const at::Tensor& grad_output,
    int64_t /*im2col_step*/) {
  constexpr const char* op = "ms_deform_attn_backward";
  check_cpu(op, value);
  const Problem p =
      prepare(op, value, spatial_shapes, level_start_index, sampling_loc, attn_weight, true);
  const at::Tensor g = prepare_grad_output(op, p, grad_output);
  const at::ScalarType mt = math_type(p.value.scalar_type());
  const bool low_precision = mt != p.value.scalar_type();
  // grad_value accumulates in the math type (a float32 buffer for float16/bfloat16 values)
  // every (b, m) slice is written by the task of its first query chunk (or zeroed below)
  at::Tensor grad_value = at::empty(p.value.sizes(), p.value.options().dtype(mt));
  at::Tensor grad_loc = at::empty(p.loc.sizes(), p.loc.options());
  at::Tensor grad_attn = at::empty(p.attn.sizes(), p.attn.options());

  const int64_t pairs = p.B * p.M;
  if (pairs > 0 && p.Q > 0 && p.D > 0 && p.L * p.P > 0) {
    // Fixed query chunks only when there are fewer (b, m) pairs than threads.
    const int64_t threads = at::get_num_threads();
    int64_t n_chunks = pairs >= threads ? 1 : (threads + pairs - 1) / pairs;
    n_chunks = std::max<int64_t>(1, std::min<int64_t>(n_chunks, p.Q / 64));
    at::Tensor part;
    if (n_chunks > 1) part = at::zeros({pairs, n_chunks - 1, p.S, p.D}, grad_value.options());
    const Levels levels(p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.value.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      Args<scalar_t, acc_t> a{};
      a.value = p.value.data_ptr<scalar_t>();
      a.loc = p.loc.data_ptr<acc_t>();
      a.attn = p.attn.data_ptr<acc_t>();
      a.grad_out = g.data_ptr<acc_t>();
      a.grad_value = grad_value.data_ptr<acc_t>();
      a.grad_value_part = n_chunks > 1 ? part.data_ptr<acc_t>() : nullptr;
      a.grad_loc = grad_loc.data_ptr<acc_t>();
      a.grad_attn = grad_attn.data_ptr<acc_t>();
      levels.fill(a);
      a.B = p.B, a.S = p.S, a.M = p.M, a.D = p.D, a.Q = p.Q, a.L = p.L, a.P = p.P;
      a.n_chunks = n_chunks;
      at::parallel_for(0, pairs * n_chunks, 1, [&](int64_t b, int64_t e) { run_backward(a, b, e); });
    });
    if (n_chunks > 1) {  // fixed-order reduction of the private chunks
      at::Tensor gv = grad_value.view({p.B, p.S, p.M, p.D}).permute({0, 2, 1, 3});
      gv.add_(part.view({p.B, p.M, n_chunks - 1, p.S, p.D}).sum(2));
    }
  } else {
    grad_value.zero_();
    grad_loc.zero_();
    grad_attn.zero_();
  }
  if (low_precision) grad_value = grad_value.to(p.value.scalar_type());
  return {
      grad_value,
      grad_loc.to(sampling_loc.scalar_type()),
      grad_attn.to(attn_weight.scalar_type())};
}

}  // namespace msda
}  // namespace solq_d2

// Which instruction-set variant the CPU kernels run ("avx512", "avx2" or "baseline").
TORCH_LIBRARY_FRAGMENT(solq_d2, m) {
  m.def("ms_deform_attn_cpu_isa() -> str", [] { return std::string(solq_d2::msda::isa_name()); });
}

TORCH_LIBRARY_IMPL(solq_d2, CPU, m) {
  m.impl("ms_deform_attn_forward", &solq_d2::msda::forward_cpu);
  m.impl("ms_deform_attn_backward", &solq_d2::msda::backward_cpu);
}
