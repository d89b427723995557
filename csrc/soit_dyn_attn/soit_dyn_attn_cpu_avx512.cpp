// AVX-512 row kernels of soit_dyn_attn (float32): 16 pixels per vector.
//
// Same arithmetic as the portable kernels (soit_dyn_attn_math.h), with the vector unit doing per
// lane what the scalar helpers do per pixel: FMA-chained projections (bitwise the rounding of the
// authors' GEMMs), the authors' sample-position arithmetic, masked gathers for the bilinear
// corners (masked-off lanes never touch memory, so out-of-range and NaN positions are safe).
// The value-gradient scatter stays scalar (lanes of one vector may hit the same pixel) and runs
// in a fixed order, so the backward pass stays deterministic.
//
// This translation unit includes no torch header: only its own functions carry the AVX-512
// target attribute, and they run only after a CPU check (avx512_usable), so the library stays
// loadable on any x86-64 CPU.
#include "soit_dyn_attn/soit_dyn_attn_cpu.h"

#include <cstdint>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SOIT_HAVE_AVX512 1
#include <immintrin.h>
#if !defined(__clang__)
// GCC 12's AVX-512 intrinsics (_mm512_min_ps, _mm512_roundscale_ps, ...) start from
// _mm512_undefined_*() and trip these warnings at every use; they are false positives.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#else
#define SOIT_HAVE_AVX512 0
#endif

namespace solq_d2 {
namespace soit {

#if SOIT_HAVE_AVX512

#define SOIT_TGT __attribute__((target("avx512f")))
#define SOIT_VI static inline __attribute__((target("avx512f"), always_inline))

namespace {

using V = __m512;
using VI = __m512i;
using Mask = __mmask16;

SOIT_VI V vset(float x) {
  return _mm512_set1_ps(x);
}
SOIT_VI V vzero() {
  return _mm512_setzero_ps();
}
SOIT_VI VI iset(int x) {
  return _mm512_set1_epi32(x);
}

// exp(x) = 2^n exp(r), r = x - n ln2, with Cephes' single-precision polynomial (max relative
// error ~2e-7). NaN propagates (the clamps return their second operand for NaN).
SOIT_VI V vexp(V x) {
  x = _mm512_min_ps(vset(88.3762626647949f), x);
  x = _mm512_max_ps(vset(-88.3762626647949f), x);
  const V n = _mm512_roundscale_ps(
      _mm512_mul_ps(x, vset(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V r = _mm512_fnmadd_ps(n, vset(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, vset(-2.12194440e-4f), r);
  const V z = _mm512_mul_ps(r, r);
  V p = vset(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, vset(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, vset(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, vset(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, vset(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, vset(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, z, _mm512_add_ps(r, vset(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// pixel_coord() of soit_dyn_attn_math.h, per lane.
SOIT_VI V vcoord(const Axis<float>& a, V ref, V off) {
  const V loc = _mm512_add_ps(ref, _mm512_div_ps(off, vset(a.size)));
  const V g1 = _mm512_add_ps(_mm512_sub_ps(_mm512_mul_ps(vset(2.0f), loc), vset(1.0f)), vset(1.0f));
  return _mm512_fmadd_ps(g1, vset(a.half), vset(-0.5f));
}

// bilinear_corners() of soit_dyn_attn_math.h, per lane.
struct VCorners {
  Mask k[4];  // corner inside the valid region (and the sample in range)
  VI i00;     // element index of corner (y0, x0), channel 0 of the head
  V w[4];
  V lx, ly, hx, hy;
};

SOIT_VI Mask vcorners(V x, V y, const RowTask<float>& t, int C, int ch0, VCorners& c) {
  const V m1 = vset(-1.0f);
  const Mask in = _mm512_cmp_ps_mask(x, m1, _CMP_GE_OQ) & _mm512_cmp_ps_mask(y, m1, _CMP_GE_OQ) &
      _mm512_cmp_ps_mask(x, vset(static_cast<float>(t.wv)), _CMP_LT_OQ) &
      _mm512_cmp_ps_mask(y, vset(static_cast<float>(t.hv)), _CMP_LT_OQ);
  if (in == 0) return 0;
  x = _mm512_maskz_mov_ps(in, x);
  y = _mm512_maskz_mov_ps(in, y);
  const V x0f = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const V y0f = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  c.hx = _mm512_sub_ps(_mm512_add_ps(x0f, vset(1.0f)), x);
  c.lx = _mm512_sub_ps(x, x0f);
  c.hy = _mm512_sub_ps(_mm512_add_ps(y0f, vset(1.0f)), y);
  c.ly = _mm512_sub_ps(y, y0f);
  c.w[0] = _mm512_mul_ps(c.hx, c.hy);
  c.w[1] = _mm512_mul_ps(c.lx, c.hy);
  c.w[2] = _mm512_mul_ps(c.hx, c.ly);
  c.w[3] = _mm512_mul_ps(c.lx, c.ly);
  const VI x0 = _mm512_cvttps_epi32(x0f), y0 = _mm512_cvttps_epi32(y0f);
  const VI one = iset(1);
  const Mask mx0 = _mm512_mask_cmpge_epi32_mask(in, x0, _mm512_setzero_si512());
  const Mask mx1 = _mm512_mask_cmplt_epi32_mask(in, _mm512_add_epi32(x0, one), iset(t.wv));
  const Mask my0 = _mm512_cmpge_epi32_mask(y0, _mm512_setzero_si512());
  const Mask my1 = _mm512_cmplt_epi32_mask(_mm512_add_epi32(y0, one), iset(t.hv));
  c.k[0] = mx0 & my0;
  c.k[1] = mx1 & my0;
  c.k[2] = mx0 & my1;
  c.k[3] = mx1 & my1;
  c.i00 = _mm512_add_epi32(
      _mm512_mullo_epi32(_mm512_add_epi32(_mm512_mullo_epi32(y0, iset(t.W)), x0), iset(C)),
      iset(ch0));
  return in;
}

// The four corners' values of channel `ch` (element offset from the head's first channel).
SOIT_VI void gather_corners(const RowTask<float>& t, const VCorners& cr, int C, int ch, V* v) {
  const VI i0 = _mm512_add_epi32(cr.i00, iset(ch));
  const VI i1 = _mm512_add_epi32(i0, iset(C));
  const VI dy = iset(t.W * C);
  v[0] = _mm512_mask_i32gather_ps(vzero(), cr.k[0], i0, t.Fb, 4);
  v[1] = _mm512_mask_i32gather_ps(vzero(), cr.k[1], i1, t.Fb, 4);
  v[2] = _mm512_mask_i32gather_ps(vzero(), cr.k[2], _mm512_add_epi32(i0, dy), t.Fb, 4);
  v[3] = _mm512_mask_i32gather_ps(vzero(), cr.k[3], _mm512_add_epi32(i1, dy), t.Fb, 4);
}

// Channels `ch` and `ch + 1` (adjacent floats) of 16 lanes at element index idx: two 8-lane
// 64-bit gathers, de-interleaved (half the gathered elements of two 32-bit gathers).
SOIT_VI void gather_pair(const float* base, Mask k, VI idx, V& c0, V& c1) {
  const __m512d zero = _mm512_setzero_pd();
  const __m512d lo = _mm512_mask_i32gather_pd(
      zero, static_cast<__mmask8>(k & 0xFFu), _mm512_castsi512_si256(idx), base, 4);
  const __m512d hi = _mm512_mask_i32gather_pd(
      zero, static_cast<__mmask8>(k >> 8), _mm512_extracti64x4_epi64(idx, 1), base, 4);
  const VI even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const VI odd = _mm512_add_epi32(even, iset(1));
  c0 = _mm512_permutex2var_ps(_mm512_castpd_ps(lo), even, _mm512_castpd_ps(hi));
  c1 = _mm512_permutex2var_ps(_mm512_castpd_ps(lo), odd, _mm512_castpd_ps(hi));
}

// The four corners' values of channels `ch` (va) and `ch + 1` (vb).
SOIT_VI void gather_corners_pair(
    const RowTask<float>& t, const VCorners& cr, int C, int ch, V* va, V* vb) {
  const VI i0 = _mm512_add_epi32(cr.i00, iset(ch));
  const VI i1 = _mm512_add_epi32(i0, iset(C));
  const VI dy = iset(t.W * C);
  gather_pair(t.Fb, cr.k[0], i0, va[0], vb[0]);
  gather_pair(t.Fb, cr.k[1], i1, va[1], vb[1]);
  gather_pair(t.Fb, cr.k[2], _mm512_add_epi32(i0, dy), va[2], vb[2]);
  gather_pair(t.Fb, cr.k[3], _mm512_add_epi32(i1, dy), va[3], vb[3]);
}

SOIT_VI V interp(const VCorners& cr, const V* v) {
  V r = _mm512_mul_ps(cr.w[0], v[0]);
  r = _mm512_fmadd_ps(cr.w[1], v[1], r);
  r = _mm512_fmadd_ps(cr.w[2], v[2], r);
  return _mm512_fmadd_ps(cr.w[3], v[3], r);
}

template <class G>
struct VBlock {
  Mask live;  // lanes j0 + p < W
  VI jv;      // column of each lane
  V q[G::kMaxC];
  V lin[3 * G::kMaxMK];  // offsets (dx, dy), then the softmaxed attention weights
  V xs[G::kMaxMK];
  V ys[G::kMaxMK];
};

template <class G>
SOIT_TGT void project(const G& g, const RowTask<float>& t, int j0, VBlock<G>& b) {
  const int C = g.C;
  const int np = imin(kPB, t.W - j0);
  b.live = static_cast<Mask>((1u << np) - 1u);
  const VI lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  b.jv = _mm512_add_epi32(lane, iset(j0));
  const float* row = t.Fb + (static_cast<int64_t>(t.i) * t.W + j0) * C;
  const VI pix = _mm512_mullo_epi32(lane, iset(C));
  for (int c = 0; c < C; ++c) {
    b.q[c] = _mm512_mask_i32gather_ps(vzero(), b.live, _mm512_add_epi32(pix, iset(c)), row, 4);
  }
  if (t.pex != nullptr) {
    const int nf = C / 2;
    const Mask colv = _mm512_cmplt_epi32_mask(b.jv, iset(t.wv));
    for (int c = 0; c < nf; ++c) {
      b.q[c] = _mm512_add_ps(
          b.q[c], _mm512_mask_blend_ps(colv, vset(t.pey_pad[c]), vset(t.pey_valid[c])));
    }
    if (t.row_valid) {
      const VI px = _mm512_mullo_epi32(_mm512_min_epi32(b.jv, iset(t.wv - 1)), iset(nf));
      for (int c = 0; c < nf; ++c) {
        b.q[nf + c] = _mm512_add_ps(
            b.q[nf + c],
            _mm512_mask_i32gather_ps(vzero(), b.live, _mm512_add_epi32(px, iset(c)), t.pex, 4));
      }
    } else {
      for (int c = 0; c < nf; ++c) {
        b.q[nf + c] = _mm512_add_ps(b.q[nf + c], vset(t.pex[t.W * nf + c]));
      }
    }
  }
  for (int r = 0; r < 3 * g.MK; ++r) {
    const float* w = t.theta + ofs_lin_weight(g, r);
    V acc = vzero();
    for (int c = 0; c < C; ++c) acc = _mm512_fmadd_ps(vset(w[c]), b.q[c], acc);
    b.lin[r] = _mm512_add_ps(acc, vset(t.theta[ofs_lin_bias(g, r)]));
  }
  for (int m = 0; m < g.M; ++m) {
    V* l = b.lin + 2 * g.MK + m * g.K;
    V mx = l[0];
    for (int k = 1; k < g.K; ++k) mx = _mm512_max_ps(mx, l[k]);
    V sum = vzero();
    for (int k = 0; k < g.K; ++k) {
      l[k] = vexp(_mm512_sub_ps(l[k], mx));
      sum = _mm512_add_ps(sum, l[k]);
    }
    const V inv = _mm512_div_ps(vset(1.0f), sum);  // as PyTorch's softmax: e * (1 / sum)
    for (int k = 0; k < g.K; ++k) l[k] = _mm512_mul_ps(l[k], inv);
  }
  // mul_round: a separately rounded product, never contracted with the addition in vcoord
  const V refx = _mm512_mul_round_ps(
      _mm512_div_ps(_mm512_add_ps(_mm512_cvtepi32_ps(b.jv), vset(0.5f)), vset(t.ax.vr_size)),
      vset(t.ax.vr), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V refy = vset(t.refy);
  for (int r = 0; r < g.MK; ++r) {
    b.xs[r] = vcoord(t.ax, refx, b.lin[2 * r]);
    b.ys[r] = vcoord(t.ay, refy, b.lin[2 * r + 1]);
  }
}

// s[c] for the block's pixels (sample_pixel() per lane).
template <class G>
SOIT_TGT void sample(const G& g, const RowTask<float>& t, const VBlock<G>& b, V* s) {
  const int C = g.C;
  for (int c = 0; c < C; ++c) s[c] = vzero();
  for (int m = 0; m < g.M; ++m) {
    for (int k = 0; k < g.K; ++k) {
      const int r = m * g.K + k;
      VCorners cr;
      if (vcorners(b.xs[r], b.ys[r], t, C, m * g.CH, cr) == 0) continue;
      const V a = b.lin[2 * g.MK + r];
      V* sm = s + m * g.CH;
      int ch = 0;
      for (; ch + 1 < g.CH; ch += 2) {
        V va[4], vb[4];
        gather_corners_pair(t, cr, C, ch, va, vb);
        sm[ch] = _mm512_fmadd_ps(a, interp(cr, va), sm[ch]);
        sm[ch + 1] = _mm512_fmadd_ps(a, interp(cr, vb), sm[ch + 1]);
      }
      for (; ch < g.CH; ++ch) {
        V v[4];
        gather_corners(t, cr, C, ch, v);
        sm[ch] = _mm512_fmadd_ps(a, interp(cr, v), sm[ch]);
      }
    }
  }
}

template <class G>
SOIT_TGT void forward_row_v(const G& g, const RowTask<float>& t, float* out_row) {
  VBlock<G> b;
  V s[G::kMaxC];
  const float* w_out = t.theta + ofs_w_out(g);
  const V b_out = vset(t.theta[ofs_b_out(g)]);
  for (int j0 = 0; j0 < t.W; j0 += kPB) {
    project(g, t, j0, b);
    sample(g, t, b, s);
    V acc = vzero();
    for (int c = 0; c < g.C; ++c) {
      const V o = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s[c], vzero(), _CMP_GT_OQ), s[c]);
      acc = _mm512_fmadd_ps(vset(w_out[c]), o, acc);
    }
    _mm512_mask_storeu_ps(out_row + j0, b.live, _mm512_add_ps(acc, b_out));
  }
}

SOIT_VI void acc_add(float* acc, int d, V v) {
  _mm512_storeu_ps(acc + d * kPB, _mm512_add_ps(_mm512_loadu_ps(acc + d * kPB), v));
}

// gF[idx[lane]] += val[lane] for the lanes of k, in lane order.
SOIT_VI void scatter_add(float* gF, Mask k, VI idx, V val) {
  alignas(64) int32_t ii[16];
  alignas(64) float vv[16];
  _mm512_store_si512(reinterpret_cast<void*>(ii), idx);
  _mm512_store_ps(vv, val);
  unsigned bits = k;
  while (bits != 0u) {
    const int l = __builtin_ctz(bits);
    gF[ii[l]] += vv[l];
    bits &= bits - 1u;
  }
}

// Backward of one channel of one sample (backward_pixel() per lane): accumulates d a (da) and
// the position gradients (dx, dy, before the factor a), scatters the value gradients.
SOIT_VI void channel_backward(
    float* gF, const RowTask<float>& t, const VCorners& cr, int C, int ch, const V* v, V go, V a,
    V& da, V& dx, V& dy) {
  da = _mm512_fmadd_ps(go, interp(cr, v), da);
  // d val / dx and d val / dy
  const V gx = _mm512_fmadd_ps(
      cr.hy, _mm512_sub_ps(v[1], v[0]), _mm512_mul_ps(cr.ly, _mm512_sub_ps(v[3], v[2])));
  const V gy = _mm512_fmadd_ps(
      cr.hx, _mm512_sub_ps(v[2], v[0]), _mm512_mul_ps(cr.lx, _mm512_sub_ps(v[3], v[1])));
  dx = _mm512_fmadd_ps(go, gx, dx);
  dy = _mm512_fmadd_ps(go, gy, dy);
  const V gv = _mm512_mul_ps(a, go);
  const VI i0 = _mm512_add_epi32(cr.i00, iset(ch));
  const VI i1 = _mm512_add_epi32(i0, iset(C));
  const VI dyi = iset(t.W * C);
  scatter_add(gF, cr.k[0], i0, _mm512_mul_ps(cr.w[0], gv));
  scatter_add(gF, cr.k[1], i1, _mm512_mul_ps(cr.w[1], gv));
  scatter_add(gF, cr.k[2], _mm512_add_epi32(i0, dyi), _mm512_mul_ps(cr.w[2], gv));
  scatter_add(gF, cr.k[3], _mm512_add_epi32(i1, dyi), _mm512_mul_ps(cr.w[3], gv));
}

template <class G>
SOIT_TGT void backward_row_v(
    const G& g, const RowTask<float>& t, const float* grad_row, float* gF, float* dtheta) {
  const int C = g.C, WC = t.W * C, MK = g.MK, D = param_dim(g);
  // per-row vector accumulators of the parameter gradients (lane sums taken at the end)
  thread_local std::vector<float> acc_store;
  acc_store.assign(static_cast<size_t>(D) * kPB, 0.0f);
  float* acc = acc_store.data();
  const float* w_out = t.theta + ofs_w_out(g);
  VBlock<G> b;
  V s[G::kMaxC], d_o[G::kMaxC];
  V dlin[3 * G::kMaxMK];
  for (int j0 = 0; j0 < t.W; j0 += kPB) {
    const int np = imin(kPB, t.W - j0);
    const Mask live = static_cast<Mask>((1u << np) - 1u);
    const V gl = _mm512_maskz_loadu_ps(live, grad_row + j0);
    if (_mm512_cmp_ps_mask(gl, vzero(), _CMP_NEQ_UQ) == 0) continue;  // all gradients are 0
    project(g, t, j0, b);
    sample(g, t, b, s);
    for (int c = 0; c < C; ++c) {
      const Mask pos = _mm512_cmp_ps_mask(s[c], vzero(), _CMP_GT_OQ);
      acc_add(acc, ofs_w_out(g) + c, _mm512_mul_ps(gl, _mm512_maskz_mov_ps(pos, s[c])));
      d_o[c] = _mm512_maskz_mul_ps(pos, gl, vset(w_out[c]));
    }
    acc_add(acc, ofs_b_out(g), gl);
    for (int m = 0; m < g.M; ++m) {
      V da_sum = vzero();
      for (int k = 0; k < g.K; ++k) {
        const int r = m * g.K + k;
        const V a = b.lin[2 * MK + r];
        V da = vzero(), dx = vzero(), dy = vzero();
        VCorners cr;
        if (vcorners(b.xs[r], b.ys[r], t, C, m * g.CH, cr) != 0) {
          const V* go = d_o + m * g.CH;
          int ch = 0;
          for (; ch + 1 < g.CH; ch += 2) {
            V va[4], vb[4];
            gather_corners_pair(t, cr, C, ch, va, vb);
            channel_backward(gF, t, cr, C, ch, va, go[ch], a, da, dx, dy);
            channel_backward(gF, t, cr, C, ch + 1, vb, go[ch + 1], a, da, dx, dy);
          }
          for (; ch < g.CH; ++ch) {
            V v[4];
            gather_corners(t, cr, C, ch, v);
            channel_backward(gF, t, cr, C, ch, v, go[ch], a, da, dx, dy);
          }
        }
        dlin[2 * r] = _mm512_mul_ps(a, dx);
        dlin[2 * r + 1] = _mm512_mul_ps(a, dy);
        dlin[2 * MK + r] = da;
        da_sum = _mm512_fmadd_ps(a, da, da_sum);
      }
      for (int k = 0; k < g.K; ++k) {
        const int r = 2 * MK + m * g.K + k;
        dlin[r] = _mm512_mul_ps(b.lin[r], _mm512_sub_ps(dlin[r], da_sum));
      }
    }
    // content path: dq = W_lin^T dlin, added to the block's own pixels (distinct lanes)
    const VI pix = _mm512_add_epi32(
        _mm512_mullo_epi32(b.jv, iset(C)), iset(static_cast<int>(t.i) * WC));
    for (int c = 0; c < C; ++c) {
      V dq = vzero();
      for (int r = 0; r < 3 * MK; ++r) {
        dq = _mm512_fmadd_ps(vset(t.theta[ofs_lin_weight(g, r) + c]), dlin[r], dq);
      }
      const VI ic = _mm512_add_epi32(pix, iset(c));
      const V cur = _mm512_mask_i32gather_ps(vzero(), live, ic, gF, 4);
      _mm512_mask_i32scatter_ps(gF, live, ic, _mm512_add_ps(cur, dq), 4);
    }
    // projection weights and biases
    for (int r = 0; r < 3 * MK; ++r) {
      const int wo = ofs_lin_weight(g, r);
      for (int c = 0; c < C; ++c) acc_add(acc, wo + c, _mm512_mul_ps(dlin[r], b.q[c]));
      acc_add(acc, ofs_lin_bias(g, r), dlin[r]);
    }
  }
  for (int d = 0; d < D; ++d) dtheta[d] += _mm512_reduce_add_ps(_mm512_loadu_ps(acc + d * kPB));
}

}  // namespace

bool avx512_usable() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return ok;
}

void forward_row_avx512(int C, int M, int K, const RowTask<float>& t, float* out_row) {
  dispatch_geometry(C, M, K, [&](auto g) { forward_row_v(g, t, out_row); });
}

void backward_row_avx512(
    int C, int M, int K, const RowTask<float>& t, const float* grad_row, float* gF, float* dtheta) {
  dispatch_geometry(C, M, K, [&](auto g) { backward_row_v(g, t, grad_row, gF, dtheta); });
}

#else  // !SOIT_HAVE_AVX512

bool avx512_usable() {
  return false;
}
void forward_row_avx512(int, int, int, const RowTask<float>&, float*) {}
void backward_row_avx512(int, int, int, const RowTask<float>&, const float*, float*, float*) {}

#endif

}  // namespace soit
}  // namespace solq_d2
