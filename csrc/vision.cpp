// Python module solq_d2._C: build information, and the `solq_d2` operator namespace.
// Each op registers its schema with TORCH_LIBRARY_FRAGMENT(solq_d2, m) in its own directory
// (csrc/<op>/) and its CPU/CUDA kernels with TORCH_LIBRARY_IMPL, so ops are visible to
// torch.compile / torch.export as torch.ops.solq_d2.<name>.
#include <torch/extension.h>

#include <string>

namespace solq_d2 {

#ifdef WITH_CUDA
std::string cuda_version();  // csrc/cuda_version.cu
#endif

static std::string compiler_version() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "GCC " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
      std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

static bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

static std::string cuda_archs() {
#ifdef SOLQ_D2_CUDA_ARCHS
  return SOLQ_D2_CUDA_ARCHS;
#else
  return "";
#endif
}

static std::string cuda_version_or_empty() {
#ifdef WITH_CUDA
  return cuda_version();
#else
  return "";
#endif
}

}  // namespace solq_d2

TORCH_LIBRARY(solq_d2, m) {}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("get_compiler_version", &solq_d2::compiler_version, "compiler that built solq_d2._C");
  m.def("has_cuda", &solq_d2::has_cuda, "whether CUDA kernels were compiled in");
  m.def("get_cuda_version", &solq_d2::cuda_version_or_empty, "CUDA runtime version compiled against");
  m.def("get_cuda_archs", &solq_d2::cuda_archs, "GPU architectures compiled for, ';'-separated");
}
