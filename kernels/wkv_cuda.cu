// RWKV-4 WKV operator on NVIDIA GPUs: inference forward with state in/out, and the training
// forward/backward from an empty state. The step math is kernels/wkv_step.h, shared with the CPU
// kernels; the reference is rwkv_playground.wkv.wkv_reference.
//
// One thread per (batch, channel) walks T sequentially; neighbouring threads hold neighbouring
// channels, so every load and store of k, v, y is coalesced. There is no Tmax: T is a runtime
// loop bound, the state lives in registers, and the training backward's per-step buffer is
// allocated by the caller at the size of the input.
//
// Verified without a GPU (see README, "CUDA: what is verified where"): the tests compile this file
// as host C++ with a shim for the thread indices and the launch (tests/cuda_emulation/) and run
// every block and thread against the reference; CI compiles it with nvcc for sm_80 and sm_90.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_dtype.h"
#include "cuda_launch.h"
#include "wkv_step.h"

namespace {

using rwkv_cuda::from_f;
using rwkv_cuda::to_f;

template <typename scalar_t>
__global__ void wkv_forward_kernel(int B, int T, int C, const float* __restrict__ w,
                                   const float* __restrict__ u, const scalar_t* __restrict__ k,
                                   const scalar_t* __restrict__ v, scalar_t* __restrict__ y,
                                   float* __restrict__ aa, float* __restrict__ bb,
                                   float* __restrict__ pp) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * C) return;
  const int b = idx / C, c = idx % C;
  const float wc = w[c], uc = u[c];
  float a = aa[idx], bsum = bb[idx], p = pp[idx];
  const int64_t base = (int64_t)b * T * C + c;
  // Loads do not depend on the recurrence: fetch one step ahead to hide memory latency.
  float k_next = T > 0 ? to_f(k[base]) : 0.f, v_next = T > 0 ? to_f(v[base]) : 0.f;
  for (int t = 0; t < T; ++t) {
    const float kk = k_next, vv = v_next;
    if (t + 1 < T) {
      k_next = to_f(k[base + (int64_t)(t + 1) * C]);
      v_next = to_f(v[base + (int64_t)(t + 1) * C]);
    }
    y[base + (int64_t)t * C] = from_f<scalar_t>(rwkv::wkv_step<false, float>(a, bsum, p, wc, uc, kk, vv, nullptr));
  }
  aa[idx] = a;
  bb[idx] = bsum;
  pp[idx] = p;
}

// Training forward from an empty state; also writes log D_t for the backward.
__global__ void wkv_train_forward_kernel(int B, int T, int C, const float* __restrict__ w,
                                         const float* __restrict__ u, const float* __restrict__ k,
                                         const float* __restrict__ v, float* __restrict__ y,
                                         float* __restrict__ log_d) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * C) return;
  const int b = idx / C, c = idx % C;
  const float wc = w[c], uc = u[c];
  float a = 0.f, bsum = 0.f, p = -1e30f;
  const int64_t base = (int64_t)b * T * C + c;
  for (int t = 0; t < T; ++t) {
    const int64_t off = base + (int64_t)t * C;
    y[off] = rwkv::wkv_step<true, float>(a, bsum, p, wc, uc, k[off], v[off], log_d + off);
  }
}

// Backward from t = T-1 down to 0 (the sums: kernels/wkv_step.h).
__global__ void wkv_train_backward_kernel(int B, int T, int C, const float* __restrict__ w,
                                          const float* __restrict__ u, const float* __restrict__ k,
                                          const float* __restrict__ v, const float* __restrict__ y,
                                          const float* __restrict__ log_d, const float* __restrict__ gy,
                                          float* __restrict__ gw_part, float* __restrict__ gu_part,
                                          float* __restrict__ gk, float* __restrict__ gv) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * C) return;
  const int b = idx / C, c = idx % C;
  const float wc = w[c], uc = u[c];
  rwkv::BackwardSums<float> sums;
  const int64_t base = (int64_t)b * T * C + c;
  for (int t = T - 1; t >= 0; --t) {
    const int64_t off = base + (int64_t)t * C;
    rwkv::wkv_backward_step(sums, wc, uc, k[off], v[off], y[off], gy[off], log_d[off], gk[off], gv[off]);
  }
  gw_part[idx] = sums.gw;
  gu_part[idx] = sums.gu;
}

}  // namespace

// Host entry points (kernels/wkv_cuda.cpp binds them). Zero-sized inputs launch nothing: an empty
// grid is an invalid configuration. dtype: 0 = float32, 1 = float16, 2 = bfloat16.
cudaError_t cuda_wkv_forward(int dtype, int B, int T, int C, const float* w, const float* u, const void* k,
                             const void* v, void* y, float* aa, float* bb, float* pp, cudaStream_t stream) {
  using rwkv_cuda::blocks_for;
  using rwkv_cuda::kThreads;
  using rwkv_cuda::launch;
  const long long n = (long long)B * C;
  if (n == 0) return cudaSuccess;
  if (dtype == 0)
    return launch(wkv_forward_kernel<float>, blocks_for(n), kThreads, stream, B, T, C, w, u, (const float*)k,
                  (const float*)v, (float*)y, aa, bb, pp);
  if (dtype == 1)
    return launch(wkv_forward_kernel<__half>, blocks_for(n), kThreads, stream, B, T, C, w, u, (const __half*)k,
                  (const __half*)v, (__half*)y, aa, bb, pp);
  return launch(wkv_forward_kernel<__nv_bfloat16>, blocks_for(n), kThreads, stream, B, T, C, w, u,
                (const __nv_bfloat16*)k, (const __nv_bfloat16*)v, (__nv_bfloat16*)y, aa, bb, pp);
}

cudaError_t cuda_wkv_train_forward(int B, int T, int C, const float* w, const float* u, const float* k,
                                   const float* v, float* y, float* log_d, cudaStream_t stream) {
  const long long n = (long long)B * C;
  if (n == 0) return cudaSuccess;
  return rwkv_cuda::launch(wkv_train_forward_kernel, rwkv_cuda::blocks_for(n), rwkv_cuda::kThreads, stream, B, T, C,
                           w, u, k, v, y, log_d);
}

cudaError_t cuda_wkv_train_backward(int B, int T, int C, const float* w, const float* u, const float* k,
                                    const float* v, const float* y, const float* log_d, const float* gy,
                                    float* gw_part, float* gu_part, float* gk, float* gv, cudaStream_t stream) {
  const long long n = (long long)B * C;
  if (n == 0) return cudaSuccess;
  return rwkv_cuda::launch(wkv_train_backward_kernel, rwkv_cuda::blocks_for(n), rwkv_cuda::kThreads, stream, B, T,
                           C, w, u, k, v, y, log_d, gy, gw_part, gu_part, gk, gv);
}
