// CPU kernels of soit_dyn_attn.
//
// Work unit: one (instance, row) task. A row is processed in blocks of kPB pixels held in
// structure-of-arrays form, so the 3*M*K projections of the queries (and, in backward, the
// gradients of the projection weights and of the queries) are small dense loops the compiler
// vectorises; sampling and its backward run per pixel through the helpers shared with CUDA.
//
// Backward is deterministic for any thread count: instances are ordered by image, the tasks are
// cut into a fixed number of chunks (independent of the thread count), each chunk accumulates
// into private grad_fmask buffers (one per image it touches) and private per-instance parameter
// partials (in double), and both are reduced in chunk order at the end. Nothing per pixel is
// stored: the forward pass of a pixel is recomputed right before its backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "soit_dyn_attn/soit_dyn_attn.h"
#include "soit_dyn_attn/soit_dyn_attn_cpu.h"
#include "soit_dyn_attn/soit_dyn_attn_math.h"

namespace solq_d2 {
namespace soit {

namespace {

constexpr int64_t kChunks = 16;  // backward chunks (fixed: results do not depend on threads)

// SOLQ_D2_SOIT_CPU=scalar selects the portable kernels on a CPU with AVX-512 (tests, debugging);
// read at every call so that tests can switch it.
bool use_avx512() {
  const char* e = std::getenv("SOLQ_D2_SOIT_CPU");
  const bool forced_scalar = e != nullptr && std::strcmp(e, "scalar") == 0;
  return !forced_scalar && avx512_usable();
}

// Queries, projections, attention softmax and sample positions of the pixels [j0, j0 + np) of
// the task's row, in structure-of-arrays form (column p of each array is pixel j0 + p; columns
// p >= np hold zero queries).
template <typename T, class G>
struct Block {
  T q[G::kMaxC][kPB];
  T lin[3 * G::kMaxMK][kPB];  // rows [0, 2MK): offsets (dx, dy); [2MK, 3MK): attention weights
  T xs[G::kMaxMK][kPB];
  T ys[G::kMaxMK][kPB];

  void compute(const G& g, const RowTask<T>& t, int j0, int np) {
    const int C = g.C;
    for (int p = 0; p < kPB; ++p) {
      if (p < np) {
        const T* f = t.Fb + (static_cast<int64_t>(t.i) * t.W + j0 + p) * C;
        for (int c = 0; c < C; ++c) q[c][p] = f[c];
      } else {
        for (int c = 0; c < C; ++c) q[c][p] = 0;
      }
    }
    if (t.pex != nullptr) {
      const int nf = C / 2;
      for (int p = 0; p < np; ++p) {
        const int j = j0 + p;
        const T* py = j < t.wv ? t.pey_valid : t.pey_pad;
        const T* px = t.pex + (t.row_valid ? imin(j, t.wv - 1) : t.W) * nf;
        for (int c = 0; c < nf; ++c) {
          q[c][p] += py[c];
          q[nf + c][p] += px[c];
        }
      }
    }
    for (int r = 0; r < 3 * g.MK; ++r) {
      const T* w = t.theta + ofs_lin_weight(g, r);
      const T bias = t.theta[ofs_lin_bias(g, r)];
      T acc[kPB];
      for (int p = 0; p < kPB; ++p) acc[p] = 0;
      for (int c = 0; c < C; ++c) {
        const T wc = w[c];
        for (int p = 0; p < kPB; ++p) acc[p] = fma_acc(acc[p], wc, q[c][p]);
      }
      for (int p = 0; p < kPB; ++p) lin[r][p] = acc[p] + bias;
    }
    for (int m = 0; m < g.M; ++m) {
      for (int p = 0; p < np; ++p) softmax_k(&lin[2 * g.MK + m * g.K][p], g.K, kPB);
    }
    T refx[kPB];
    for (int p = 0; p < kPB; ++p) refx[p] = ref_point(t.ax, j0 + p);
    for (int r = 0; r < g.MK; ++r) {
      for (int p = 0; p < kPB; ++p) {
        xs[r][p] = pixel_coord(t.ax, refx[p], lin[2 * r][p]);
        ys[r][p] = pixel_coord(t.ay, t.refy, lin[2 * r + 1][p]);
      }
    }
  }
};

template <typename T, class G>
void forward_row(const G& g, const RowTask<T>& t, T* out_row) {
  Block<T, G> blk;
  const T* w_out = t.theta + ofs_w_out(g);
  const T b_out = t.theta[ofs_b_out(g)];
  for (int j0 = 0; j0 < t.W; j0 += kPB) {
    const int np = imin(kPB, t.W - j0);
    blk.compute(g, t, j0, np);
    for (int p = 0; p < np; ++p) {
      T s[G::kMaxC];
      sample_pixel(
          g, t.Fb, t.hv, t.wv, t.W, &blk.lin[2 * g.MK][p], &blk.xs[0][p], &blk.ys[0][p], kPB, s);
      T acc = 0;
      for (int c = 0; c < g.C; ++c) acc = fma_acc(acc, w_out[c], s[c] > T(0) ? s[c] : T(0));
      out_row[j0 + p] = acc + b_out;
    }
  }
}

// Accumulates the row's value and content gradients into gF (H, W, C) and its parameter
// gradients into dtheta (D).
template <typename T, class G>
void backward_row(const G& g, const RowTask<T>& t, const T* grad_row, T* gF, T* dtheta) {
  Block<T, G> blk;
  T dlin[3 * G::kMaxMK][kPB];
  T dq[G::kMaxC][kPB];
  const int C = g.C;
  auto scatter = [gF, C](const Corners<T>& cr, int q, int c, T v) {
    gF[static_cast<int64_t>(cr.idx[q]) * C + c] += v;
  };
  for (int j0 = 0; j0 < t.W; j0 += kPB) {
    const int np = imin(kPB, t.W - j0);
    bool any = false;
    for (int p = 0; p < np; ++p) any = any || grad_row[j0 + p] != T(0);
    if (!any) continue;  // every gradient of these pixels is proportional to their logit's
    blk.compute(g, t, j0, np);
    for (int p = 0; p < kPB; ++p) {
      const T gl = p < np ? grad_row[j0 + p] : T(0);
      if (gl == T(0)) {
        for (int r = 0; r < 3 * g.MK; ++r) dlin[r][p] = 0;
        continue;
      }
      T s[G::kMaxC];
      const T* a = &blk.lin[2 * g.MK][p];
      sample_pixel(g, t.Fb, t.hv, t.wv, t.W, a, &blk.xs[0][p], &blk.ys[0][p], kPB, s);
      backward_pixel(
          g, t.theta, t.Fb, t.hv, t.wv, t.W, a, &blk.xs[0][p], &blk.ys[0][p], kPB, s, gl,
          &dlin[0][p], dtheta + ofs_w_out(g), scatter);
      dtheta[ofs_b_out(g)] += gl;
    }
    // query gradient (content path; the positional encoding has no parameters)
    for (int c = 0; c < C; ++c) {
      for (int p = 0; p < kPB; ++p) dq[c][p] = 0;
    }
    for (int r = 0; r < 3 * g.MK; ++r) {
      const T* w = t.theta + ofs_lin_weight(g, r);
      for (int c = 0; c < C; ++c) {
        const T wc = w[c];
        for (int p = 0; p < kPB; ++p) dq[c][p] += wc * dlin[r][p];
      }
    }
    for (int p = 0; p < np; ++p) {
      T* gq = gF + (static_cast<int64_t>(t.i) * t.W + j0 + p) * C;
      for (int c = 0; c < C; ++c) gq[c] += dq[c][p];
    }
    // projection weights and biases: sums over the block's pixels of outer products
    for (int r = 0; r < 3 * g.MK; ++r) {
      T* dw = dtheta + ofs_lin_weight(g, r);
      for (int c = 0; c < C; ++c) {
        T acc = 0;
        for (int p = 0; p < kPB; ++p) acc += dlin[r][p] * blk.q[c][p];
        dw[c] += acc;
      }
      T acc = 0;
      for (int p = 0; p < kPB; ++p) acc += dlin[r][p];
      dtheta[ofs_lin_bias(g, r)] += acc;
    }
  }
}

template <typename T>
Inputs<T> make_inputs(const Problem& p) {
  Inputs<T> in;
  in.F = p.fmask.data_ptr<T>();
  in.valid = p.valid.data_ptr<int64_t>();
  in.params = p.params.data_ptr<T>();
  in.img = p.img.data_ptr<int64_t>();
  in.pe_y = p.pos_embed ? p.pe_y.data_ptr<T>() : nullptr;
  in.pe_x = p.pos_embed ? p.pe_x.data_ptr<T>() : nullptr;
  in.H = p.H;
  in.W = p.W;
  in.C = p.C;
  in.D = p.D;
  return in;
}

template <typename T>
void forward_impl(const Problem& p, at::Tensor& out) {
  const Inputs<T> in = make_inputs<T>(p);
  T* o = out.data_ptr<T>();
  const int64_t H = p.H, W = p.W;
  const bool simd = use_avx512();
  dispatch_geometry(static_cast<int>(p.C), static_cast<int>(p.M), static_cast<int>(p.K),
                    [&](auto g) {
    const int64_t grain = std::max<int64_t>(1, 512 / W);
    at::parallel_for(0, p.T * H, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t n = t / H;
        const int i = static_cast<int>(t % H);
        if constexpr (std::is_same<T, float>::value) {
          if (simd) {
            forward_row_avx512(g.C, g.M, g.K, make_task(in, n, i), o + t * W);
            continue;
          }
        }
        forward_row(g, make_task(in, n, i), o + t * W);
      }
    });
  });
}

template <typename T>
void backward_impl(const Problem& p, const at::Tensor& grad, at::Tensor& gF, at::Tensor& gP) {
  const Inputs<T> in = make_inputs<T>(p);
  const T* gl = grad.data_ptr<T>();
  const int64_t B = p.B, H = p.H, W = p.W, C = p.C, D = p.D, T_ = p.T;
  const int64_t HWC = H * W * C;
  const bool simd = use_avx512();

  // instances ordered by image (stable), so that a chunk touches few images
  std::vector<int64_t> order(T_);
  for (int64_t n = 0; n < T_; ++n) order[n] = n;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return in.img[a] < in.img[b]; });

  const int64_t ntask = T_ * H;
  const int64_t nchunks = std::min(kChunks, ntask);
  std::vector<int64_t> t0(nchunks + 1), s0(nchunks), s1(nchunks), pofs(nchunks + 1, 0);
  std::vector<int64_t> slot(nchunks * B, -1);
  int64_t nslots = 0;
  for (int64_t c = 0; c <= nchunks; ++c) t0[c] = c * ntask / nchunks;
  for (int64_t c = 0; c < nchunks; ++c) {
    s0[c] = t0[c] / H;
    s1[c] = (t0[c + 1] - 1) / H;
    pofs[c + 1] = pofs[c] + (s1[c] - s0[c] + 1);
    for (int64_t s = s0[c]; s <= s1[c]; ++s) {
      int64_t& sl = slot[c * B + in.img[order[s]]];
      if (sl < 0) sl = nslots++;
    }
  }
  at::Tensor bufs = at::zeros({nslots, HWC}, p.fmask.options());
  at::Tensor parts = at::zeros({pofs[nchunks], D}, p.fmask.options().dtype(at::kDouble));
  T* bp = bufs.data_ptr<T>();
  double* pp = parts.data_ptr<double>();

  dispatch_geometry(static_cast<int>(C), static_cast<int>(p.M), static_cast<int>(p.K),
                    [&](auto g) {
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<T> dtheta(D);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t t = t0[c]; t < t0[c + 1]; ++t) {
          const int64_t s = t / H;
          const int64_t n = order[s];
          const int i = static_cast<int>(t % H);
          T* gbuf = bp + slot[c * B + in.img[n]] * HWC;
          std::fill(dtheta.begin(), dtheta.end(), T(0));
          const T* grow = gl + (n * H + i) * W;
          bool done = false;
          if constexpr (std::is_same<T, float>::value) {
            if (simd) {
              backward_row_avx512(g.C, g.M, g.K, make_task(in, n, i), grow, gbuf, dtheta.data());
              done = true;
            }
          }
          if (!done) backward_row(g, make_task(in, n, i), grow, gbuf, dtheta.data());
          double* part = pp + (pofs[c] + s - s0[c]) * D;
          for (int64_t d = 0; d < D; ++d) part[d] += static_cast<double>(dtheta[d]);
        }
      }
    });
  });

  // grad_fmask[b] = sum of image b's chunk buffers, in chunk order
  T* gf = gF.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    std::vector<const T*> srcs;
    for (int64_t c = 0; c < nchunks; ++c) {
      if (slot[c * B + b] >= 0) srcs.push_back(bp + slot[c * B + b] * HWC);
    }
    T* dst = gf + b * HWC;
    at::parallel_for(0, HWC, 16384, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        T acc = 0;
        for (const T* src : srcs) acc += src[e];
        dst[e] = acc;
      }
    });
  }
  // grad_params[n] = sum of its partials, in chunk order
  T* gp = gP.data_ptr<T>();
  for (int64_t s = 0; s < T_; ++s) {
    std::vector<double> acc(D, 0.0);
    for (int64_t c = 0; c < nchunks; ++c) {
      if (s < s0[c] || s > s1[c]) continue;
      const double* part = pp + (pofs[c] + s - s0[c]) * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += part[d];
    }
    T* dst = gp + order[s] * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[d]);
  }
}

}  // namespace

at::Tensor forward_cpu(const Problem& p) {
  at::Tensor out = at::empty({p.T, p.H, p.W}, p.fmask.options());
  if (p.T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(p.fmask.scalar_type(), "soit_dyn_attn_forward_cpu", [&] {
    forward_impl<scalar_t>(p, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const Problem& p, const at::Tensor& grad) {
  at::Tensor gF = at::zeros_like(p.fmask);
  at::Tensor gP = at::zeros_like(p.params);
  if (p.T == 0) return {gF, gP};
  AT_DISPATCH_FLOATING_TYPES(p.fmask.scalar_type(), "soit_dyn_attn_backward_cpu", [&] {
    backward_impl<scalar_t>(p, grad, gF, gP);
  });
  return {gF, gP};
}

}  // namespace soit
}  // namespace solq_d2
