// Every CUDA kernel launch of the project goes through launch(): one place that refuses an empty
// grid (an invalid configuration on a real GPU) and returns the launch's error. The tests' CPU
// emulation (tests/cuda_emulation/cuda_shim.h) replaces it with a launcher that runs every block
// and thread on the host.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace rwkv_cuda {

constexpr int kThreads = 128;  // threads per block

inline unsigned blocks_for(long long n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

#ifndef RWKV_CUDA_EMULATION
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), unsigned blocks, unsigned threads, cudaStream_t stream,
                   Args&&... args) {
  if (blocks == 0 || threads == 0) return cudaErrorInvalidConfiguration;
  kernel<<<blocks, threads, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}
#endif

}  // namespace rwkv_cuda
