// Stand-in for c10/cuda/CUDAGuard.h in the tests' CPU emulation of the CUDA binding: the
// "device" is the CPU, there is nothing to switch.
#pragma once
#include <c10/core/Device.h>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
