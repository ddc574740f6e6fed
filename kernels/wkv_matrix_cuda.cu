// The RWKV-5/6/7 matrix-state recurrences on NVIDIA GPUs, state in and out: the same math, layout
// and signature as kernels/wkv_matrix_cpu.cpp (references: rwkv_playground/wkv.py,
// wkv5_reference and wkv7_reference).
//
// r, k, v, kk, a: [B, T, H, N] in fp32 / fp16 / bf16; w: [B, T, H, N] float32 (the decay factor,
// kept in fp32: it is raised to many powers); u: [H, N] float32; state: [B, H, N, N] float32
// (v5/v6 S[key j][value i], v7 S[value i][key j]); y: [B, T, H, N] in the inputs' dtype.
//
// One block per (batch, head), one thread per value channel i, N threads: each thread keeps the N
// state entries that produce its output (v5/v6: column i, v7: row i) in registers for the whole
// sequence (N is a template parameter, so the array is unrolled into registers: the nvcc check
// fails on any spill). Every thread reads the step's r, k, w (, kk, a) vectors: the same addresses
// across the block, one broadcast load each. No shared memory and no barriers: every thread is
// independent, so the tests' CPU emulation (tests/cuda_emulation/) runs them one after another.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_dtype.h"
#include "cuda_launch.h"

namespace {

using rwkv_cuda::from_f;
using rwkv_cuda::to_f;

// y_t = r_t^T (diag(u) k_t v_t^T + S);  S <- k_t v_t^T + diag(w_t) S
template <int N, typename scalar_t>
__global__ void __launch_bounds__(N) wkv5_kernel(int T, int H, const scalar_t* __restrict__ r,
                                                 const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                                 const float* __restrict__ w, const float* __restrict__ u,
                                                 scalar_t* __restrict__ y, float* __restrict__ state) {
  const int bh = blockIdx.x, i = threadIdx.x;
  if (i >= N) return;
  const int b = bh / H, h = bh % H;
  float* S = state + (int64_t)bh * N * N;
  float s[N];
#pragma unroll
  for (int j = 0; j < N; ++j) s[j] = S[j * N + i];
  for (int t = 0; t < T; ++t) {
    const int64_t base = (((int64_t)b * T + t) * H + h) * N;
    const float vi = to_f(v[base + i]);
    float out = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float kj = to_f(k[base + j]);
      const float kv = kj * vi;
      out += to_f(r[base + j]) * (u[h * N + j] * kj * vi + s[j]);
      s[j] = kv + w[base + j] * s[j];
    }
    y[base + i] = from_f<scalar_t>(out);
  }
#pragma unroll
  for (int j = 0; j < N; ++j) S[j * N + i] = s[j];
}

// S <- S diag(w_t) - (S kk_t)(kk_t * a_t)^T + v_t k_t^T;  y_t = S r_t
template <int N, typename scalar_t>
__global__ void __launch_bounds__(N) wkv7_kernel(int T, int H, const scalar_t* __restrict__ r,
                                                 const float* __restrict__ w, const scalar_t* __restrict__ k,
                                                 const scalar_t* __restrict__ v, const scalar_t* __restrict__ kk,
                                                 const scalar_t* __restrict__ a, scalar_t* __restrict__ y,
                                                 float* __restrict__ state) {
  const int bh = blockIdx.x, i = threadIdx.x;
  if (i >= N) return;
  const int b = bh / H, h = bh % H;
  float* S = state + (int64_t)bh * N * N + (int64_t)i * N;
  float s[N];
#pragma unroll
  for (int j = 0; j < N; ++j) s[j] = S[j];
  for (int t = 0; t < T; ++t) {
    const int64_t base = (((int64_t)b * T + t) * H + h) * N;
    float removed = 0.f;  // (S kk)_i with the old S
#pragma unroll
    for (int j = 0; j < N; ++j) removed += s[j] * to_f(kk[base + j]);
    const float vi = to_f(v[base + i]);
    float out = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      s[j] = s[j] * w[base + j] - removed * (to_f(kk[base + j]) * to_f(a[base + j])) + vi * to_f(k[base + j]);
      out += s[j] * to_f(r[base + j]);
    }
    y[base + i] = from_f<scalar_t>(out);
  }
#pragma unroll
  for (int j = 0; j < N; ++j) S[j] = s[j];
}

template <typename scalar_t>
cudaError_t launch_wkv5(int N, int B, int T, int H, const void* r, const void* k, const void* v, const float* w,
                        const float* u, void* y, float* state, cudaStream_t stream) {
  const auto* R = static_cast<const scalar_t*>(r);
  const auto* K = static_cast<const scalar_t*>(k);
  const auto* V = static_cast<const scalar_t*>(v);
  auto* Y = static_cast<scalar_t*>(y);
  const unsigned blocks = static_cast<unsigned>(B) * H;
  switch (N) {
    case 16: return rwkv_cuda::launch(wkv5_kernel<16, scalar_t>, blocks, 16, stream, T, H, R, K, V, w, u, Y, state);
    case 32: return rwkv_cuda::launch(wkv5_kernel<32, scalar_t>, blocks, 32, stream, T, H, R, K, V, w, u, Y, state);
    case 64: return rwkv_cuda::launch(wkv5_kernel<64, scalar_t>, blocks, 64, stream, T, H, R, K, V, w, u, Y, state);
    default: return cudaErrorInvalidValue;
  }
}

template <typename scalar_t>
cudaError_t launch_wkv7(int N, int B, int T, int H, const void* r, const float* w, const void* k, const void* v,
                        const void* kk, const void* a, void* y, float* state, cudaStream_t stream) {
  const auto* R = static_cast<const scalar_t*>(r);
  const auto* K = static_cast<const scalar_t*>(k);
  const auto* V = static_cast<const scalar_t*>(v);
  const auto* KK = static_cast<const scalar_t*>(kk);
  const auto* A = static_cast<const scalar_t*>(a);
  auto* Y = static_cast<scalar_t*>(y);
  const unsigned blocks = static_cast<unsigned>(B) * H;
  switch (N) {
    case 16: return rwkv_cuda::launch(wkv7_kernel<16, scalar_t>, blocks, 16, stream, T, H, R, w, K, V, KK, A, Y, state);
    case 32: return rwkv_cuda::launch(wkv7_kernel<32, scalar_t>, blocks, 32, stream, T, H, R, w, K, V, KK, A, Y, state);
    case 64: return rwkv_cuda::launch(wkv7_kernel<64, scalar_t>, blocks, 64, stream, T, H, R, w, K, V, KK, A, Y, state);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// Host entry points (kernels/wkv_cuda.cpp binds them). dtype: 0 = float32, 1 = float16, 2 = bfloat16.
// Head sizes 16, 32 and 64 (every released model uses 64); another N is cudaErrorInvalidValue.
// An empty grid (B * H == 0) launches nothing.
cudaError_t cuda_wkv5_forward(int dtype, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                              const float* w, const float* u, void* y, float* state, cudaStream_t stream) {
  if ((long long)B * H == 0) return cudaSuccess;
  if (dtype == 0) return launch_wkv5<float>(N, B, T, H, r, k, v, w, u, y, state, stream);
  if (dtype == 1) return launch_wkv5<__half>(N, B, T, H, r, k, v, w, u, y, state, stream);
  return launch_wkv5<__nv_bfloat16>(N, B, T, H, r, k, v, w, u, y, state, stream);
}

cudaError_t cuda_wkv7_forward(int dtype, int B, int T, int H, int N, const void* r, const float* w, const void* k,
                              const void* v, const void* kk, const void* a, void* y, float* state,
                              cudaStream_t stream) {
  if ((long long)B * H == 0) return cudaSuccess;
  if (dtype == 0) return launch_wkv7<float>(N, B, T, H, r, w, k, v, kk, a, y, state, stream);
  if (dtype == 1) return launch_wkv7<__half>(N, B, T, H, r, w, k, v, kk, a, y, state, stream);
  return launch_wkv7<__nv_bfloat16>(N, B, T, H, r, w, k, v, kk, a, y, state, stream);
}
