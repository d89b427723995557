// Internal interface between the CPU driver (soit_dyn_attn_cpu.cpp) and its row kernels: the
// portable scalar ones (any dtype) and the AVX-512 ones (float32, soit_dyn_attn_cpu_avx512.cpp).
// Deliberately free of torch headers: the AVX-512 translation unit includes only this file, the
// shared math header and <immintrin.h>.
#pragma once

#include <cstdint>

#include "soit_dyn_attn/soit_dyn_attn_math.h"

namespace solq_d2 {
namespace soit {

constexpr int kPB = 16;  // pixels per structure-of-arrays block (one AVX-512 vector of floats)

template <typename T>
struct Inputs {
  const T* F;            // (B, H, W, C)
  const int64_t* valid;  // (B, 2)
  const T* params;       // (T, D)
  const int64_t* img;    // (T,)
  const T* pe_y;         // (T, H + 1, C/2) or nullptr
  const T* pe_x;         // (T, W + 1, C/2) or nullptr
  int64_t H, W, C, D;
};

// Everything an (instance n, row i) task needs.
template <typename T>
struct RowTask {
  const T* theta;
  const T* Fb;  // the image's features (H, W, C)
  int i, hv, wv, H, W;
  Axis<T> ax, ay;
  T refy;
  const T* pey_valid;  // y-PE of this row in valid columns, (C/2), or nullptr without PE
  const T* pey_pad;    // y-PE in padded columns
  const T* pex;        // x-PE table of the instance, (W + 1, C/2); entry W for padded rows
  bool row_valid;      // i < hv
};

template <typename T>
inline RowTask<T> make_task(const Inputs<T>& in, int64_t n, int i) {
  RowTask<T> t;
  const int64_t b = in.img[n];
  t.theta = in.params + n * in.D;
  t.Fb = in.F + b * in.H * in.W * in.C;
  t.i = i;
  t.H = static_cast<int>(in.H);
  t.W = static_cast<int>(in.W);
  t.hv = static_cast<int>(in.valid[2 * b]);
  t.wv = static_cast<int>(in.valid[2 * b + 1]);
  t.ax = make_axis<T>(t.W, t.wv);
  t.ay = make_axis<T>(t.H, t.hv);
  t.refy = ref_point(t.ay, i);
  t.row_valid = i < t.hv;
  if (in.pe_y != nullptr) {
    const int64_t nf = in.C / 2;
    const T* py = in.pe_y + n * (in.H + 1) * nf;
    t.pey_valid = py + imin(i, t.hv - 1) * nf;
    t.pey_pad = py + in.H * nf;
    t.pex = in.pe_x + n * (in.W + 1) * nf;
  } else {
    t.pey_valid = t.pey_pad = t.pex = nullptr;
  }
  return t;
}

// AVX-512 row kernels (float32). `avx512_usable()` says whether this CPU runs them and they were
// compiled in; the others must only be called when it is true.
bool avx512_usable();
// logits of the task's row -> out_row (W)
void forward_row_avx512(int C, int M, int K, const RowTask<float>& t, float* out_row);
// accumulates the row's gradients: value and content gradients into gF (H, W, C) of the image,
// parameter gradients into dtheta (D)
void backward_row_avx512(
    int C, int M, int K, const RowTask<float>& t, const float* grad_row, float* gF, float* dtheta);

}  // namespace soit
}  // namespace solq_d2
