// Schema of the soit_dyn_attn operators, input validation and the relative-PE tables (shared by
// the CPU and CUDA kernels), and the CPU registration.
#include "soit_dyn_attn/soit_dyn_attn.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "soit_dyn_attn/soit_dyn_attn_math.h"

namespace solq_d2 {
namespace soit {

namespace {

// The authors' RelSinePositionalEncoding: temperature, scale 2*pi and the eps of the normaliser.
constexpr double kTemperature = 10000.0;
constexpr double kScale = 2.0 * M_PI;
constexpr double kEps = 1e-6;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool is_index_dtype(at::ScalarType t) {
  return at::isIntegralType(t, /*includeBool=*/false);
}

// One half (y or x) of the RelPE table: rows [0, S) hold the positions min(s+1, v)/(v+eps) of
// valid lines, row S the padded-line position 0; -> (T, S + 1, nf) in centre's dtype.
at::Tensor pe_half(
    const at::Tensor& valid_len,  // (B,) math dtype
    const at::Tensor& centre,     // (T,) math dtype
    const at::Tensor& img,        // (T,) int64
    int64_t S,
    int64_t nf) {
  const auto opts = centre.options();
  const at::Tensor v = valid_len.unsqueeze(1);                         // (B, 1)
  at::Tensor pos = at::minimum(at::arange(1, S + 1, opts).unsqueeze(0), v) / (v + kEps);
  pos = at::cat({pos, at::zeros({pos.size(0), 1}, opts)}, 1);          // (B, S + 1)
  const at::Tensor d = (pos.index_select(0, img) - centre.unsqueeze(1)) * kScale;  // (T, S + 1)
  // frequencies temperature ** (2 * (k // 2) / nf), as the authors compute them
  const at::Tensor k = at::arange(nf, opts);
  const at::Tensor freq = at::pow(kTemperature, 2 * at::floor_divide(k, 2) / nf);
  const at::Tensor a = d.unsqueeze(-1) / freq;                           // (T, S + 1, nf)
  return at::stack({a.slice(-1, 0, nf, 2).sin(), a.slice(-1, 1, nf, 2).cos()}, -1)
      .flatten(-2)
      .contiguous();
}

}  // namespace

bool fixed_geometry(int64_t C, int64_t M, int64_t K) {
  bool fixed = false;
  dispatch_geometry(static_cast<int>(C), static_cast<int>(M), static_cast<int>(K), [&](auto g) {
    fixed = !std::is_same<decltype(g), DynGeom>::value;
  });
  return fixed;
}

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
    bool check_values) {
  TORCH_CHECK(
      fmask.dim() == 4, op, ": fmask must have shape (B, H, W, C) (channels last), got ",
      fmask.sizes());
  TORCH_CHECK(
      params.dim() == 2, op, ": params must have shape (T, D), got ", params.sizes());
  TORCH_CHECK(
      valid_hw.dim() == 2 && valid_hw.size(1) == 2,
      op, ": valid_hw must have shape (B, 2), got ", valid_hw.sizes());
  TORCH_CHECK(img_idx.dim() == 1, op, ": img_idx must have shape (T,), got ", img_idx.sizes());
  TORCH_CHECK(
      centers.dim() == 2 && centers.size(1) == 2,
      op, ": centers must have shape (T, 2), got ", centers.sizes());
  TORCH_CHECK(
      is_float_dtype(fmask.scalar_type()) && is_float_dtype(params.scalar_type()) &&
          is_float_dtype(centers.scalar_type()),
      op, ": fmask, params and centers must be floating point (float64/32/16 or bfloat16), got ",
      fmask.scalar_type(), ", ", params.scalar_type(), ", ", centers.scalar_type());
  TORCH_CHECK(
      is_index_dtype(valid_hw.scalar_type()) && is_index_dtype(img_idx.scalar_type()),
      op, ": valid_hw and img_idx must be integer tensors, got ", valid_hw.scalar_type(), ", ",
      img_idx.scalar_type());
  const at::Device dev = fmask.device();
  for (const at::Tensor* t : {&valid_hw, &params, &img_idx, &centers}) {
    TORCH_CHECK(
        t->device() == dev, op, ": all inputs must be on fmask's device (", dev, "), got one on ",
        t->device());
  }

  Problem p;
  p.B = fmask.size(0);
  p.H = fmask.size(1);
  p.W = fmask.size(2);
  p.C = fmask.size(3);
  p.T = params.size(0);
  p.D = params.size(1);
  p.M = num_heads;
  p.K = num_points;
  p.pos_embed = pos_embed;
  p.fmask_dtype = fmask.scalar_type();
  p.params_dtype = params.scalar_type();

  TORCH_CHECK(
      p.B >= 1 && p.H >= 1 && p.W >= 1 && p.C >= 1,
      op, ": fmask must be non-empty (B, H, W, C >= 1), got ", fmask.sizes());
  TORCH_CHECK(
      p.H <= std::numeric_limits<int32_t>::max() / p.W / p.C,
      op, ": H * W * C = ", p.H * p.W * p.C, " must stay below 2^31");
  TORCH_CHECK(
      valid_hw.size(0) == p.B,
      op, ": valid_hw has ", valid_hw.size(0), " rows but fmask has B = ", p.B, " images");
  TORCH_CHECK(
      img_idx.size(0) == p.T && centers.size(0) == p.T,
      op, ": params has T = ", p.T, " rows but img_idx has ", img_idx.size(0), " and centers ",
      centers.size(0));
  TORCH_CHECK(
      num_heads >= 1 && num_points >= 1,
      op, ": num_heads and num_points must be >= 1, got ", num_heads, ", ", num_points);
  TORCH_CHECK(
      p.C % num_heads == 0,
      op, ": mask channels C = ", p.C, " must be divisible by num_heads = ", num_heads);
  TORCH_CHECK(
      !pos_embed || p.C % 4 == 0,
      op, ": the relative positional encoding needs C % 4 == 0 (C/2 sine/cosine features per "
      "axis), got C = ", p.C);
  const int64_t D = (p.C + 1) * (3 * num_heads * num_points + 1);
  TORCH_CHECK(
      p.D == D,
      op, ": params has D = ", p.D, " columns but C = ", p.C, " channels, M = ", num_heads,
      " heads and K = ", num_points, " points need D = (C+1)(3*M*K+1) = ", D);
  TORCH_CHECK(
      fixed_geometry(p.C, p.M, p.K) ||
          (p.C <= DynGeom::kMaxC && p.M * p.K <= DynGeom::kMaxMK),
      op, ": the compiled kernels support C <= ", DynGeom::kMaxC, " and M*K <= ",
      DynGeom::kMaxMK, " (got C = ", p.C, ", M*K = ", p.M * p.K,
      "); use the PyTorch implementation (impl='pytorch')");

  const bool dbl = p.fmask_dtype == at::kDouble || p.params_dtype == at::kDouble ||
      centers.scalar_type() == at::kDouble;
  const at::ScalarType mt = dbl ? at::kDouble : at::kFloat;
  p.fmask = fmask.to(mt).contiguous();
  p.params = params.to(mt).contiguous();
  p.valid = valid_hw.to(at::kLong).contiguous();
  p.img = img_idx.to(at::kLong).contiguous();

  if (check_values) {
    const at::Tensor v = p.valid.cpu();
    const int64_t* vp = v.data_ptr<int64_t>();
    for (int64_t b = 0; b < p.B; ++b) {
      TORCH_CHECK(
          vp[2 * b] >= 1 && vp[2 * b] <= p.H && vp[2 * b + 1] >= 1 && vp[2 * b + 1] <= p.W,
          op, ": valid_hw[", b, "] = (", vp[2 * b], ", ", vp[2 * b + 1],
          ") must lie in [1, H] x [1, W] = [1, ", p.H, "] x [1, ", p.W, "]");
    }
    if (p.T > 0) {
      const at::Tensor i = p.img.cpu();
      const int64_t* ip = i.data_ptr<int64_t>();
      for (int64_t n = 0; n < p.T; ++n) {
        TORCH_CHECK(
            ip[n] >= 0 && ip[n] < p.B,
            op, ": img_idx[", n, "] = ", ip[n], " is not an image index in [0, ", p.B, ")");
      }
    }
  }

  if (pos_embed && p.T > 0) {
    const at::Tensor c = centers.detach().to(mt);
    const at::Tensor vf = p.valid.to(mt);
    // an out-of-range image index must not fault here either (the kernels guard it)
    const at::Tensor img = p.img.clamp(0, p.B - 1);
    p.pe_y = pe_half(vf.select(1, 0), c.select(1, 1), img, p.H, p.C / 2);
    p.pe_x = pe_half(vf.select(1, 1), c.select(1, 0), img, p.W, p.C / 2);
  }
  return p;
}

at::Tensor prepare_grad(const char* op, const Problem& p, const at::Tensor& grad_logits) {
  TORCH_CHECK(
      grad_logits.dim() == 3 && grad_logits.size(0) == p.T && grad_logits.size(1) == p.H &&
          grad_logits.size(2) == p.W,
      op, ": grad_logits must have shape (T, H, W) = (", p.T, ", ", p.H, ", ", p.W, "), got ",
      grad_logits.sizes());
  TORCH_CHECK(
      is_float_dtype(grad_logits.scalar_type()),
      op, ": grad_logits must be floating point, got ", grad_logits.scalar_type());
  TORCH_CHECK(
      grad_logits.device() == p.fmask.device(),
      op, ": grad_logits is on ", grad_logits.device(), " but fmask on ", p.fmask.device());
  return grad_logits.to(p.fmask.scalar_type()).contiguous();
}

std::tuple<at::Tensor, at::Tensor> cast_grads(const Problem& p, at::Tensor gf, at::Tensor gp) {
  return {gf.to(p.fmask_dtype), gp.to(p.params_dtype)};
}

namespace {

constexpr const char* kFwd = "soit_dyn_attn_forward";
constexpr const char* kBwd = "soit_dyn_attn_backward";

at::Tensor forward_cpu_op(
    const at::Tensor& fmask,
    const at::Tensor& valid_hw,
    const at::Tensor& params,
    const at::Tensor& img_idx,
    const at::Tensor& centers,
    int64_t num_heads,
    int64_t num_points,
    bool pos_embed) {
  const Problem p = prepare(
      kFwd, fmask, valid_hw, params, img_idx, centers, num_heads, num_points, pos_embed, true);
  return forward_cpu(p);
}

std::tuple<at::Tensor, at::Tensor> backward_cpu_op(
    const at::Tensor& grad_logits,
    const at::Tensor& fmask,
    const at::Tensor& valid_hw,
    const at::Tensor& params,
    const at::Tensor& img_idx,
    const at::Tensor& centers,
    int64_t num_heads,
    int64_t num_points,
    bool pos_embed) {
  const Problem p = prepare(
      kBwd, fmask, valid_hw, params, img_idx, centers, num_heads, num_points, pos_embed, true);
  const at::Tensor g = prepare_grad(kBwd, p, grad_logits);
  auto [gf, gp] = backward_cpu(p, g);
  return cast_grads(p, gf, gp);
}

}  // namespace

}  // namespace soit
}  // namespace solq_d2

TORCH_LIBRARY_FRAGMENT(solq_d2, m) {
  m.def(
      "soit_dyn_attn_forward(Tensor fmask, Tensor valid_hw, Tensor params, Tensor img_idx, "
      "Tensor centers, int num_heads=4, int num_points=4, bool pos_embed=True) -> Tensor");
  m.def(
      "soit_dyn_attn_backward(Tensor grad_logits, Tensor fmask, Tensor valid_hw, Tensor params, "
      "Tensor img_idx, Tensor centers, int num_heads=4, int num_points=4, bool pos_embed=True) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(solq_d2, CPU, m) {
  m.impl("soit_dyn_attn_forward", &solq_d2::soit::forward_cpu_op);
  m.impl("soit_dyn_attn_backward", &solq_d2::soit::backward_cpu_op);
}
