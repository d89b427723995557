// CUDA version that solq_d2._C was compiled against (reported by collect_env).
#include <cuda_runtime_api.h>

#include <string>

namespace solq_d2 {
std::string cuda_version() {
  int v = CUDART_VERSION;
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}
}  // namespace solq_d2
