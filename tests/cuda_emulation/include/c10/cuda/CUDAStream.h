// Stand-in for c10/cuda/CUDAStream.h in the tests' CPU emulation: kernels run on the host at once.
#pragma once
#include <cuda_runtime.h>

namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
