// The WKV step of RWKV-4, written once for every kernel: the C++ CPU kernels (wkv_cpu.cpp,
// step_rwkv4.cpp) and the CUDA kernels (wkv_cuda.cu, compiled by nvcc, or as host C++ by the tests'
// CPU emulation). Only exponents <= 0 are ever exponentiated (the running-maximum trick), so
// nothing overflows for any finite w, k.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RWKV_HD __host__ __device__ __forceinline__
#else
#define RWKV_HD inline
#endif

namespace rwkv_cpu {

// exp(x) for x <= 0, about 2 ulp, vectorisable (libm's expf stops the compiler from vectorising
// the channel loops). Below -87.3 the true value is denormal or zero and is flushed to 0 (it is
// always added to a term equal to 1, so nothing is lost).
inline float exp_nonpos(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float log2e = 1.44269504088896341f;
  // round(clamped * log2e) with the 1.5 * 2^23 trick (valid without -ffast-math)
  const float shifter = 12582912.0f;
  const float n = (clamped * log2e + shifter) - shifter;
  const float r = clamped - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // Cody-Waite
  // exp(r) on |r| <= ln2/2: degree-6 Taylor/minimax polynomial
  float p = 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

inline double exp_nonpos(double x) { return std::exp(x); }

template <typename scalar_t>
inline float to_float(scalar_t x) { return static_cast<float>(x); }

}  // namespace rwkv_cpu

namespace rwkv {

// exp of a non-positive exponent: the GPU's expf in CUDA code (and in its CPU emulation, which
// runs the CUDA source as written), the vectorisable polynomial in the CPU kernels.
#if defined(__CUDACC__) || defined(RWKV_CUDA_EMULATION)
RWKV_HD float exp_nonpos(float x) { return expf(x); }
#else
RWKV_HD float exp_nonpos(float x) { return rwkv_cpu::exp_nonpos(x); }
#endif
RWKV_HD double exp_nonpos(double x) { return exp(x); }
#if defined(__CUDACC__)
RWKV_HD float log_of(float x) { return logf(x); }
RWKV_HD double log_of(double x) { return log(x); }
#else
RWKV_HD float log_of(float x) { return std::log(x); }
RWKV_HD double log_of(double x) { return std::log(x); }
#endif

// One WKV step of one channel: returns the output for the current token and advances the state
// (a, b, p). In each pair of factors one is exp(0) = 1, so one exp per pair suffices. With
// kLogD, also writes log D_t (the log of the output's denominator) for the training backward.
template <bool kLogD, typename acc_t>
RWKV_HD acc_t wkv_step(acc_t& a, acc_t& b, acc_t& p, const acc_t w, const acc_t u, const acc_t kk, const acc_t vv,
                       acc_t* log_d) {
  const acc_t ww = u + kk;
  const acc_t d = p - ww;
  const acc_t ed = exp_nonpos(d > 0 ? -d : d);
  const acc_t e1 = d > 0 ? acc_t(1) : ed;  // weight of the state
  const acc_t e2 = d > 0 ? ed : acc_t(1);  // weight of the current token (with its bonus)
  const acc_t den = e1 * b + e2;
  const acc_t y = (e1 * a + e2 * vv) / den;
  if (kLogD) *log_d = (d > 0 ? p : ww) + log_of(den);
  const acc_t ws = p + w;
  const acc_t d2 = ws - kk;
  const acc_t ed2 = exp_nonpos(d2 > 0 ? -d2 : d2);
  const acc_t f1 = d2 > 0 ? acc_t(1) : ed2;
  const acc_t f2 = d2 > 0 ? ed2 : acc_t(1);
  a = f1 * a + f2 * vv;
  b = f1 * b + f2;
  p = d2 > 0 ? ws : kk;
  return y;
}

// The training backward's running sums of one channel, walking t from T-1 down to 0. With D_t
// the denominator at t:
//   direct:   gv_t += gy_t e^{u+k_t}/D_t,   gk_t, gu += gy_t e^{u+k_t}(v_t - y_t)/D_t
//   indirect: token i feeds every t > i with weight e^{(t-1-i)w + k_i}:
//     gv_i += e^{k_i} S_i,  gk_i += e^{k_i}(v_i S_i - H_i),  gw += e^{k_i}(v_i SQ_i - HQ_i)
//   where S_i = sum_{t>i} gy_t e^{(t-1-i)w}/D_t, H_i the same with gy_t y_t, and SQ_i, HQ_i carry
//   an extra factor (t-1-i). All four share one running exponent `gp`, as aa/bb share pp.
template <typename acc_t>
struct BackwardSums {
  acc_t s = 0, h = 0, sq = 0, hq = 0, gp = acc_t(-1e30), gw = 0, gu = 0;
};

// Token t's gradients (gk, gv), given its inputs and log D_t; folds it into the sums.
template <typename acc_t>
RWKV_HD void wkv_backward_step(BackwardSums<acc_t>& S, const acc_t w, const acc_t u, const acc_t kk, const acc_t vv,
                               const acc_t yy, const acc_t g, const acc_t ld, acc_t& gk, acc_t& gv) {
  // direct path of token t into y_t (u + k_t <= log D_t: the exponent is <= 0 up to rounding)
  const acc_t direct_exp = u + kk - ld;
  const acc_t direct = g * exp_nonpos(direct_exp < 0 ? direct_exp : acc_t(0));
  const acc_t k_exp = kk + S.gp;  // e^{k_t} times the scale of S..HQ (<= 1)
  const acc_t ek = exp_nonpos(k_exp < 0 ? k_exp : acc_t(0));
  gv = direct + ek * S.s;
  gk = direct * (vv - yy) + ek * (vv * S.s - S.h);
  S.gu += direct * (vv - yy);
  S.gw += ek * (vv * S.sq - S.hq);
  // fold token t in as a target for the earlier tokens
  const acc_t old_exp = S.gp + w;
  const acc_t new_exp = -ld;
  const acc_t dd = old_exp - new_exp;
  const acc_t edd = exp_nonpos(dd > 0 ? -dd : dd);
  const acc_t f_old = dd > 0 ? acc_t(1) : edd;
  const acc_t f_new = dd > 0 ? edd : acc_t(1);
  S.sq = f_old * (S.s + S.sq);
  S.hq = f_old * (S.h + S.hq);
  S.s = f_old * S.s + f_new * g;
  S.h = f_old * S.h + f_new * g * yy;
  S.gp = dd > 0 ? old_exp : new_exp;
}

}  // namespace rwkv
