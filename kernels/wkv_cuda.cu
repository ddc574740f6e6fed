// RWKV-4 WKV operator on NVIDIA GPUs: inference forward with state in/out, and the training
// forward/backward from an empty state. Same math as wkv.wkv_reference and kernels/wkv_cpu.cpp.
//
// One thread per (batch, channel) walks T sequentially; neighbouring threads hold neighbouring
// channels, so every load and store of k, v, y is coalesced. There is no Tmax: T is a runtime
// loop bound, the state lives in registers, and the training backward's per-step buffer is
// allocated by the caller at the size of the input.
//
// Only exponents <= 0 are exponentiated (running-maximum trick): no overflow for any finite w, k.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One WKV step of one channel: the output for the current token, then the state update (a, b, p).
// log_d (training only) receives log D_t, the log of the output's denominator.
__device__ __forceinline__ float wkv_step(float& a, float& b, float& p, const float w, const float u,
                                          const float kk, const float vv, float* log_d) {
  const float ww = u + kk;
  const float d = p - ww;
  const float ed = expf(-fabsf(d));
  const float e1 = d > 0.f ? 1.f : ed, e2 = d > 0.f ? ed : 1.f;
  const float den = e1 * b + e2;
  const float y = (e1 * a + e2 * vv) / den;
  if (log_d) *log_d = (d > 0.f ? p : ww) + logf(den);
  const float ws = p + w;
  const float d2 = ws - kk;
  const float ed2 = expf(-fabsf(d2));
  const float f1 = d2 > 0.f ? 1.f : ed2, f2 = d2 > 0.f ? ed2 : 1.f;
  a = f1 * a + f2 * vv;
  b = f1 * b + f2;
  p = d2 > 0.f ? ws : kk;
  return y;
}

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
    y[base + (int64_t)t * C] = from_f<scalar_t>(wkv_step(a, bsum, p, wc, uc, kk, vv, nullptr));
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
    y[off] = wkv_step(a, bsum, p, wc, uc, k[off], v[off], log_d ? log_d + off : nullptr);
  }
}

// Backward from t = T-1 down to 0; see kernels/wkv_cpu.cpp for the derivation of S, H, SQ, HQ.
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
  float s = 0.f, h = 0.f, sq = 0.f, hq = 0.f, gp = -1e30f, gwa = 0.f, gua = 0.f;
  const int64_t base = (int64_t)b * T * C + c;
  for (int t = T - 1; t >= 0; --t) {
    const int64_t off = base + (int64_t)t * C;
    const float kk = k[off], vv = v[off], yy = y[off], g = gy[off], ld = log_d[off];
    const float direct = g * expf(fminf(uc + kk - ld, 0.f));
    const float ek = expf(fminf(kk + gp, 0.f));
    gv[off] = direct + ek * s;
    gk[off] = direct * (vv - yy) + ek * (vv * s - h);
    gua += direct * (vv - yy);
    gwa += ek * (vv * sq - hq);
    const float old_exp = gp + wc, new_exp = -ld;
    const float dd = old_exp - new_exp;
    const float edd = expf(-fabsf(dd));
    const float f_old = dd > 0.f ? 1.f : edd, f_new = dd > 0.f ? edd : 1.f;
    sq = f_old * (s + sq);
    hq = f_old * (h + hq);
    s = f_old * s + f_new * g;
    h = f_old * h + f_new * g * yy;
    gp = dd > 0.f ? old_exp : new_exp;
  }
  gw_part[idx] = gwa;
  gu_part[idx] = gua;
}

constexpr int kThreads = 128;
inline int blocks_for(int n) { return (n + kThreads - 1) / kThreads; }

}  // namespace

// dtype: 0 = float32, 1 = float16, 2 = bfloat16
void cuda_wkv_forward(int dtype, int B, int T, int C, const float* w, const float* u, const void* k,
                      const void* v, void* y, float* aa, float* bb, float* pp, cudaStream_t stream) {
  const int n = B * C;
  if (dtype == 0)
    wkv_forward_kernel<float><<<blocks_for(n), kThreads, 0, stream>>>(
        B, T, C, w, u, (const float*)k, (const float*)v, (float*)y, aa, bb, pp);
  else if (dtype == 1)
    wkv_forward_kernel<__half><<<blocks_for(n), kThreads, 0, stream>>>(
        B, T, C, w, u, (const __half*)k, (const __half*)v, (__half*)y, aa, bb, pp);
  else
    wkv_forward_kernel<__nv_bfloat16><<<blocks_for(n), kThreads, 0, stream>>>(
        B, T, C, w, u, (const __nv_bfloat16*)k, (const __nv_bfloat16*)v, (__nv_bfloat16*)y, aa, bb, pp);
}

void cuda_wkv_train_forward(int B, int T, int C, const float* w, const float* u, const float* k,
                            const float* v, float* y, float* log_d, cudaStream_t stream) {
  wkv_train_forward_kernel<<<blocks_for(B * C), kThreads, 0, stream>>>(B, T, C, w, u, k, v, y, log_d);
}

void cuda_wkv_train_backward(int B, int T, int C, const float* w, const float* u, const float* k,
                             const float* v, const float* y, const float* log_d, const float* gy,
                             float* gw_part, float* gu_part, float* gk, float* gv, cudaStream_t stream) {
  wkv_train_backward_kernel<<<blocks_for(B * C), kThreads, 0, stream>>>(B, T, C, w, u, k, v, y, log_d, gy,
                                                                        gw_part, gu_part, gk, gv);
}
