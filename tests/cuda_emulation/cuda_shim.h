// CUDA kernels as host C++, for the tests: the thread and block indices, nvcc's implicit math
// header, and a launch() that runs every block and every thread of a grid on the host, one after
// another, under the GPU's launch rules (an empty grid or more than 1024 threads a block is an
// invalid configuration). Included before kernels/wkv_cuda.cu (see wkv_cuda_emulated.cpp).
//
// What this can show: indexing, bounds guards, every output written, inputs untouched, state
// carried, dtype conversions, block order not mattering (blocks run in any order), the host
// entry points' launch configuration. What it cannot: warp-level behaviour, shared memory and
// __syncthreads (these kernels use neither), the device's expf / logf rounding, coalescing, timing.
#pragma once

#ifndef RWKV_CUDA_EMULATION
#define RWKV_CUDA_EMULATION 1
#endif

#include <cuda_runtime.h>
#include <math.h>  // expf, logf, fabsf...: nvcc includes the math functions implicitly

#include <algorithm>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

namespace cuda_emulation {

inline thread_local uint3 thread_index;
inline thread_local uint3 block_index;
inline thread_local dim3 block_dim;
inline thread_local dim3 grid_dim;

// 0: blocks in order, 1: reversed, 2: shuffled (seeded by `shuffle_seed`)
inline int block_order = 0;
inline unsigned shuffle_seed = 0;
inline unsigned long long launches = 0;     // launches that ran
inline unsigned long long threads_run = 0;  // threads that ran, over all launches

}  // namespace cuda_emulation

// a register budget for nvcc; nothing on the host
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

#define threadIdx (::cuda_emulation::thread_index)
#define blockIdx (::cuda_emulation::block_index)
#define blockDim (::cuda_emulation::block_dim)
#define gridDim (::cuda_emulation::grid_dim)

namespace rwkv_cuda {

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), unsigned blocks, unsigned threads, cudaStream_t, Args&&... args) {
  if (blocks == 0 || threads == 0 || threads > 1024) return cudaErrorInvalidConfiguration;
  std::vector<unsigned> order(blocks);
  std::iota(order.begin(), order.end(), 0u);
  if (cuda_emulation::block_order == 1) std::reverse(order.begin(), order.end());
  if (cuda_emulation::block_order == 2) std::shuffle(order.begin(), order.end(), std::mt19937(cuda_emulation::shuffle_seed));
  cuda_emulation::grid_dim = dim3(blocks);
  cuda_emulation::block_dim = dim3(threads);
  for (unsigned b : order) {
    cuda_emulation::block_index = make_uint3(b, 0, 0);
    for (unsigned t = 0; t < threads; ++t) {
      cuda_emulation::thread_index = make_uint3(t, 0, 0);
      kernel(args...);
    }
  }
  ++cuda_emulation::launches;
  cuda_emulation::threads_run += static_cast<unsigned long long>(blocks) * threads;
  return cudaSuccess;
}

}  // namespace rwkv_cuda
