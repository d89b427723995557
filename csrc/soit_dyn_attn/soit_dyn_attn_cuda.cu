// CUDA kernels of soit_dyn_attn (KERNELS.md §6.2).
//
// One block per (instance, 16 x 8 pixel tile), one thread per pixel; the grid is flattened to
// T * tiles blocks. The instance's parameter vector sits in shared memory (every thread reads
// the same word: broadcasts). Each thread runs the per-pixel arithmetic of
// soit_dyn_attn_math.h (the same helpers as the CPU kernels) entirely in registers.
//
// Backward recomputes the forward pass of its pixel and then
//  * accumulates the value gradients into a shared-memory tile of grad_fmask covering the
//    block's pixels plus a 4-pixel halo (shared atomics), with samples beyond the halo going
//    straight to global atomics; the tile is then flushed with one global atomicAdd per non-zero
//    element. The content (query) gradient of the block's own pixels goes to the tile too.
//  * reduces the parameter gradients over the block without atomics: each thread stages its
//    projection gradients, query and output-layer terms in shared memory (reusing the tile's
//    space), then the threads compute the D block sums as short dot products over the block's
//    pixels and write them to a (T, tiles, D) buffer, which a second kernel sums over tiles in
//    a fixed order. Parameter gradients are therefore deterministic; grad_fmask (global float
//    atomics) is not, and the op raises under torch.use_deterministic_algorithms(True).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "soit_dyn_attn/soit_dyn_attn.h"
#include "soit_dyn_attn/soit_dyn_attn_math.h"

namespace solq_d2 {
namespace soit {

namespace {

constexpr int kTX = 16, kTY = 8, kThreads = kTX * kTY;
constexpr int kHalo = 4;  // sampling offsets are a few pixels: most corners land in the halo
constexpr int kTileW = kTX + 2 * kHalo, kTileH = kTY + 2 * kHalo;
constexpr int kStage = kThreads + 1;  // staging row stride (odd: no shared-memory bank conflicts)

template <typename T>
struct Args {
  const T* __restrict__ F;            // (B, H, W, C)
  const int64_t* __restrict__ valid;  // (B, 2)
  const T* __restrict__ params;       // (T, D)
  const int64_t* __restrict__ img;    // (T,)
  const T* __restrict__ pe_y;         // (T, H + 1, C/2) or nullptr
  const T* __restrict__ pe_x;         // (T, W + 1, C/2) or nullptr
  int B, H, W, C, D, tiles_x, n_tiles;
};

// This block's instance and tile, and this thread's pixel.
struct Pixel {
  int64_t n;
  int tile, ty0, tx0;  // tile index and its first row / column
  int b, hv, wv, i, j;
  bool inside;  // the pixel lies on the map
};

// Returns false (for the whole block) when the instance's image index is out of range.
template <typename T>
__device__ __forceinline__ bool locate(const Args<T>& a, Pixel& px) {
  const int64_t bid = blockIdx.x;
  px.n = bid / a.n_tiles;
  px.tile = static_cast<int>(bid - px.n * a.n_tiles);
  px.ty0 = (px.tile / a.tiles_x) * kTY;
  px.tx0 = (px.tile % a.tiles_x) * kTX;
  px.i = px.ty0 + static_cast<int>(threadIdx.y);
  px.j = px.tx0 + static_cast<int>(threadIdx.x);
  px.inside = px.i < a.H && px.j < a.W;
  const int64_t b = a.img[px.n];
  CUDA_KERNEL_ASSERT(b >= 0 && b < a.B && "soit_dyn_attn: img_idx out of range");
  if (b < 0 || b >= a.B) return false;
  px.b = static_cast<int>(b);
  const int64_t hv = a.valid[2 * b], wv = a.valid[2 * b + 1];
  CUDA_KERNEL_ASSERT(hv >= 1 && hv <= a.H && wv >= 1 && wv <= a.W &&
                     "soit_dyn_attn: valid_hw out of range");
  px.hv = static_cast<int>(hv < 1 ? 1 : (hv > a.H ? a.H : hv));
  px.wv = static_cast<int>(wv < 1 ? 1 : (wv > a.W ? a.W : wv));
  return true;
}

// Query (features + RelPE), the 3*M*K projections, the attention softmax and the sample
// positions of one pixel (the CPU kernels do the same per element).
template <typename T, class G>
__device__ __forceinline__ void project_pixel(
    const G& g, const Args<T>& a, const Pixel& px, const T* th, T* q, T* lin, T* xs, T* ys) {
  const int C = g.C;
  const T* f = a.F + ((static_cast<int64_t>(px.b) * a.H + px.i) * a.W + px.j) * C;
  SOIT_UNROLL
  for (int c = 0; c < C; ++c) q[c] = f[c];
  if (a.pe_y != nullptr) {
    const int nf = C / 2;
    const int iy = px.j < px.wv ? imin(px.i, px.hv - 1) : a.H;
    const int jx = px.i < px.hv ? imin(px.j, px.wv - 1) : a.W;
    const T* py = a.pe_y + (px.n * (a.H + 1) + iy) * nf;
    const T* pxx = a.pe_x + (px.n * (a.W + 1) + jx) * nf;
    SOIT_UNROLL
    for (int c = 0; c < nf; ++c) {
      q[c] += py[c];
      q[nf + c] += pxx[c];
    }
  }
  SOIT_UNROLL
  for (int r = 0; r < 3 * g.MK; ++r) {
    const T* w = th + ofs_lin_weight(g, r);
    T acc = 0;
    SOIT_UNROLL
    for (int c = 0; c < C; ++c) acc = fma_acc(acc, w[c], q[c]);
    lin[r] = acc + th[ofs_lin_bias(g, r)];
  }
  SOIT_UNROLL
  for (int m = 0; m < g.M; ++m) softmax_k(lin + 2 * g.MK + m * g.K, g.K, 1);
  const Axis<T> ax = make_axis<T>(a.W, px.wv), ay = make_axis<T>(a.H, px.hv);
  const T refx = ref_point(ax, px.j), refy = ref_point(ay, px.i);
  SOIT_UNROLL
  for (int r = 0; r < g.MK; ++r) {
    xs[r] = pixel_coord(ax, refx, lin[2 * r]);
    ys[r] = pixel_coord(ay, refy, lin[2 * r + 1]);
  }
}

template <typename T>
__device__ __forceinline__ void load_theta(const Args<T>& a, int64_t n, T* th) {
  const int tid = threadIdx.y * kTX + threadIdx.x;
  const T* src = a.params + n * a.D;
  for (int d = tid; d < a.D; d += kThreads) th[d] = src[d];
}

template <typename T, class G>
__global__ void __launch_bounds__(kThreads) forward_kernel(G g, Args<T> a, T* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* th = reinterpret_cast<T*>(smem_raw);
  Pixel px;
  if (!locate(a, px)) return;
  load_theta(a, px.n, th);
  __syncthreads();
  if (!px.inside) return;
  T q[G::kMaxC], lin[3 * G::kMaxMK], xs[G::kMaxMK], ys[G::kMaxMK], s[G::kMaxC];
  project_pixel(g, a, px, th, q, lin, xs, ys);
  const T* Fb = a.F + static_cast<int64_t>(px.b) * a.H * a.W * g.C;
  sample_pixel(g, Fb, px.hv, px.wv, a.W, lin + 2 * g.MK, xs, ys, 1, s);
  T acc = 0;
  SOIT_UNROLL
  for (int c = 0; c < g.C; ++c) {
    acc = fma_acc(acc, th[ofs_w_out(g) + c], s[c] > T(0) ? s[c] : T(0));
  }
  out[(px.n * a.H + px.i) * a.W + px.j] = acc + th[ofs_b_out(g)];
}

// Value/content gradient sink: the block's shared tile (with halo) or global memory beyond it.
template <typename T>
struct TileScatter {
  T* tile;  // (kTileH, kTileW, C), origin (ti0, tj0)
  T* gFb;   // the image's grad_fmask (H, W, C)
  int ti0, tj0, W, C;

  __device__ __forceinline__ void add(int y, int x, int c, T v) const {
    const int ty = y - ti0, tx = x - tj0;
    if (ty >= 0 && ty < kTileH && tx >= 0 && tx < kTileW) {
      atomicAdd(tile + (ty * kTileW + tx) * C + c, v);
    } else {
      atomicAdd(gFb + (static_cast<int64_t>(y) * W + x) * C + c, v);
    }
  }
  __device__ __forceinline__ void operator()(const Corners<T>& cr, int q, int c, T v) const {
    add(cr.y0 + (q >> 1), cr.x0 + (q & 1), c, v);
  }
};

// Sum over the block's pixels of the parameter gradient d (staging rows: [0, 3MK) projection
// gradients, [3MK, 3MK+C) queries, [3MK+C, 3MK+2C) output-layer terms, 3MK+2C the logit grads).
template <typename T, class G>
__device__ __forceinline__ T block_param_grad(const G& g, const T* S, int d) {
  const int C = g.C, MK = g.MK;
  int r = -1, c = -1;  // row pair (r, c): sum of S[r] * S[3MK + c]; c < 0: sum of S[r]
  if (d < ofs_b_off(g)) {
    r = d / C;
    c = d % C;
  } else if (d < ofs_w_att(g)) {
    r = d - ofs_b_off(g);
  } else if (d < ofs_b_att(g)) {
    r = 2 * MK + (d - ofs_w_att(g)) / C;
    c = (d - ofs_w_att(g)) % C;
  } else if (d < ofs_w_out(g)) {
    r = 2 * MK + (d - ofs_b_att(g));
  } else if (d < ofs_b_out(g)) {
    r = 3 * MK + C + (d - ofs_w_out(g));
  } else {
    r = 3 * MK + 2 * C;
  }
  const T* a = S + r * kStage;
  T acc = 0;
  if (c < 0) {
    for (int t = 0; t < kThreads; ++t) acc += a[t];
  } else {
    const T* b = S + (3 * MK + c) * kStage;
    for (int t = 0; t < kThreads; ++t) acc += a[t] * b[t];
  }
  return acc;
}

template <typename T, class G>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    G g, Args<T> a, const T* __restrict__ grad, T* __restrict__ gF, T* __restrict__ partial,
    int d_pad) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* th = reinterpret_cast<T*>(smem_raw);
  T* work = th + d_pad;  // grad_fmask tile, later the staging area
  const int C = g.C, MK = g.MK;
  const int tid = threadIdx.y * kTX + threadIdx.x;
  Pixel px;
  if (!locate(a, px)) return;
  load_theta(a, px.n, th);
  for (int e = tid; e < kTileH * kTileW * C; e += kThreads) work[e] = 0;
  const T gl = px.inside ? grad[(px.n * a.H + px.i) * a.W + px.j] : T(0);
  if (__syncthreads_or(gl != T(0)) == 0) return;  // partial stays 0 (zero-initialised)

  T q[G::kMaxC], dlin[3 * G::kMaxMK], dwo[G::kMaxC];
  SOIT_UNROLL
  for (int c = 0; c < C; ++c) q[c] = dwo[c] = 0;
  SOIT_UNROLL
  for (int r = 0; r < 3 * MK; ++r) dlin[r] = 0;
  T* gFb = gF + static_cast<int64_t>(px.b) * a.H * a.W * C;
  const TileScatter<T> sink{work, gFb, px.ty0 - kHalo, px.tx0 - kHalo, a.W, C};
  if (gl != T(0)) {
    T lin[3 * G::kMaxMK], xs[G::kMaxMK], ys[G::kMaxMK], s[G::kMaxC];
    project_pixel(g, a, px, th, q, lin, xs, ys);
    const T* Fb = a.F + static_cast<int64_t>(px.b) * a.H * a.W * C;
    sample_pixel(g, Fb, px.hv, px.wv, a.W, lin + 2 * MK, xs, ys, 1, s);
    backward_pixel(
        g, th, Fb, px.hv, px.wv, a.W, lin + 2 * MK, xs, ys, 1, s, gl, dlin, dwo, sink);
    SOIT_UNROLL
    for (int c = 0; c < C; ++c) {  // content path: dq = W_lin^T dlin
      T dq = 0;
      SOIT_UNROLL
      for (int r = 0; r < 3 * MK; ++r) dq = fma_acc(dq, th[ofs_lin_weight(g, r) + c], dlin[r]);
      sink.add(px.i, px.j, c, dq);
    }
  }
  __syncthreads();
  for (int e = tid; e < kTileH * kTileW * C; e += kThreads) {
    const T v = work[e];
    const int y = px.ty0 - kHalo + e / (kTileW * C);
    const int x = px.tx0 - kHalo + (e / C) % kTileW;
    if (v != T(0) && y >= 0 && y < a.H && x >= 0 && x < a.W) {
      atomicAdd(gFb + (static_cast<int64_t>(y) * a.W + x) * C + e % C, v);
    }
  }
  __syncthreads();
  T* S = work;
  SOIT_UNROLL
  for (int r = 0; r < 3 * MK; ++r) S[r * kStage + tid] = dlin[r];
  SOIT_UNROLL
  for (int c = 0; c < C; ++c) {
    S[(3 * MK + c) * kStage + tid] = q[c];
    S[(3 * MK + C + c) * kStage + tid] = dwo[c];
  }
  S[(3 * MK + 2 * C) * kStage + tid] = gl;
  __syncthreads();
  T* part = partial + (px.n * a.n_tiles + px.tile) * a.D;
  for (int d = tid; d < a.D; d += kThreads) part[d] = block_param_grad(g, S, d);
}

// grad_params[n, d] = sum over tiles (in order) of partial[n, tile, d].
template <typename T>
__global__ void reduce_tiles_kernel(
    const T* __restrict__ partial, T* __restrict__ out, int64_t total, int n_tiles, int D) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t n = e / D;
  const int d = static_cast<int>(e - n * D);
  const T* p = partial + n * n_tiles * D + d;
  T acc = 0;
  for (int t = 0; t < n_tiles; ++t) acc += p[static_cast<int64_t>(t) * D];
  out[e] = acc;
}

template <typename T>
Args<T> make_args(const Problem& p) {
  Args<T> a;
  a.F = p.fmask.data_ptr<T>();
  a.valid = p.valid.data_ptr<int64_t>();
  a.params = p.params.data_ptr<T>();
  a.img = p.img.data_ptr<int64_t>();
  a.pe_y = p.pos_embed ? p.pe_y.data_ptr<T>() : nullptr;
  a.pe_x = p.pos_embed ? p.pe_x.data_ptr<T>() : nullptr;
  a.B = static_cast<int>(p.B);
  a.H = static_cast<int>(p.H);
  a.W = static_cast<int>(p.W);
  a.C = static_cast<int>(p.C);
  a.D = static_cast<int>(p.D);
  a.tiles_x = static_cast<int>((p.W + kTX - 1) / kTX);
  a.n_tiles = a.tiles_x * static_cast<int>((p.H + kTY - 1) / kTY);
  return a;
}

// Allows `bytes` of dynamic shared memory for `kernel` (opting in above the 48 KiB default).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, const char* what) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(
      bytes <= prop->sharedMemPerBlockOptin,
      what, ": this geometry needs ", bytes, " bytes of shared memory per block, the GPU offers ",
      prop->sharedMemPerBlockOptin, "; use impl='pytorch' or float32");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

dim3 grid_for(const Problem& p, const char* what) {
  const int64_t tiles = ((p.W + kTX - 1) / kTX) * ((p.H + kTY - 1) / kTY);
  const int64_t blocks = p.T * tiles;
  TORCH_CHECK(
      blocks <= std::numeric_limits<int32_t>::max(),
      what, ": T * tiles = ", blocks, " blocks exceed the grid limit");
  return dim3(static_cast<unsigned>(blocks));
}

}  // namespace

at::Tensor forward_cuda(const Problem& p) {
  const c10::cuda::CUDAGuard guard(p.fmask.device());
  at::Tensor out = at::empty({p.T, p.H, p.W}, p.fmask.options());
  if (p.T == 0) return out;
  const dim3 grid = grid_for(p, "soit_dyn_attn_forward");
  const dim3 block(kTX, kTY);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.fmask.scalar_type(), "soit_dyn_attn_forward_cuda", [&] {
    const Args<scalar_t> a = make_args<scalar_t>(p);
    dispatch_geometry(static_cast<int>(p.C), static_cast<int>(p.M), static_cast<int>(p.K),
                      [&](auto g) {
      auto kernel = forward_kernel<scalar_t, decltype(g)>;
      const size_t smem = static_cast<size_t>(p.D) * sizeof(scalar_t);
      allow_smem(kernel, smem, "soit_dyn_attn_forward");
      kernel<<<grid, block, smem, stream>>>(g, a, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const Problem& p, const at::Tensor& grad) {
  const c10::cuda::CUDAGuard guard(p.fmask.device());
  at::globalContext().alertNotDeterministic("soit_dyn_attn_backward_cuda (grad of fmask)");
  at::Tensor gF = at::zeros_like(p.fmask);
  at::Tensor gP = at::zeros_like(p.params);
  if (p.T == 0) return {gF, gP};
  const dim3 grid = grid_for(p, "soit_dyn_attn_backward");
  const dim3 block(kTX, kTY);
  const int64_t tiles = static_cast<int64_t>(grid.x) / p.T;
  at::Tensor partial = at::zeros({p.T, tiles, p.D}, p.params.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.fmask.scalar_type(), "soit_dyn_attn_backward_cuda", [&] {
    const Args<scalar_t> a = make_args<scalar_t>(p);
    dispatch_geometry(static_cast<int>(p.C), static_cast<int>(p.M), static_cast<int>(p.K),
                      [&](auto g) {
      auto kernel = backward_kernel<scalar_t, decltype(g)>;
      const int d_pad = static_cast<int>((p.D + 1) / 2 * 2);  // keeps `work` 16-byte aligned
      const size_t work = std::max<size_t>(
          static_cast<size_t>(kTileH) * kTileW * p.C,
          static_cast<size_t>(3 * p.M * p.K + 2 * p.C + 1) * kStage);
      const size_t smem = (static_cast<size_t>(d_pad) + work) * sizeof(scalar_t);
      allow_smem(kernel, smem, "soit_dyn_attn_backward");
      kernel<<<grid, block, smem, stream>>>(
          g, a, grad.data_ptr<scalar_t>(), gF.data_ptr<scalar_t>(),
          partial.data_ptr<scalar_t>(), d_pad);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int64_t total = p.T * p.D;
    const int threads = 256;
    reduce_tiles_kernel<scalar_t><<<static_cast<unsigned>((total + threads - 1) / threads),
                                    threads, 0, stream>>>(
        partial.data_ptr<scalar_t>(), gP.data_ptr<scalar_t>(), total, static_cast<int>(tiles),
        static_cast<int>(p.D));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gF, gP};
}

namespace {

at::Tensor forward_cuda_op(
    const at::Tensor& fmask,
    const at::Tensor& valid_hw,
    const at::Tensor& params,
    const at::Tensor& img_idx,
    const at::Tensor& centers,
    int64_t num_heads,
    int64_t num_points,
    bool pos_embed) {
  // value checks of valid_hw / img_idx happen on the device (no host synchronisation)
  const Problem p = prepare(
      "soit_dyn_attn_forward", fmask, valid_hw, params, img_idx, centers, num_heads, num_points,
      pos_embed, false);
  return forward_cuda(p);
}

std::tuple<at::Tensor, at::Tensor> backward_cuda_op(
    const at::Tensor& grad_logits,
    const at::Tensor& fmask,
    const at::Tensor& valid_hw,
    const at::Tensor& params,
    const at::Tensor& img_idx,
    const at::Tensor& centers,
    int64_t num_heads,
    int64_t num_points,
    bool pos_embed) {
  const char* op = "soit_dyn_attn_backward";
  const Problem p = prepare(
      op, fmask, valid_hw, params, img_idx, centers, num_heads, num_points, pos_embed, false);
  const at::Tensor g = prepare_grad(op, p, grad_logits);
  auto [gf, gp] = backward_cuda(p, g);
  return cast_grads(p, gf, gp);
}

}  // namespace

}  // namespace soit
}  // namespace solq_d2

TORCH_LIBRARY_IMPL(solq_d2, CUDA, m) {
  m.impl("soit_dyn_attn_forward", &solq_d2::soit::forward_cuda_op);
  m.impl("soit_dyn_attn_backward", &solq_d2::soit::backward_cuda_op);
}
