// The WKV step shared by the CPU kernels (kernels/wkv_cpu.cpp, kernels/rnn_cpu.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace rwkv_cpu {

// exp(x) for x <= 0, about 2 ulp, vectorisable. Below -87.3 the true value is denormal or zero
// and is flushed to 0 (it is always added to a term equal to 1, so nothing is lost).
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

// One WKV step of one channel: returns the output for the current token and advances the state
// (a, b, p). In each pair of factors one is exp(0) = 1, so one exp per pair suffices. With
// kLogD, also writes log D_t (the log of the output's denominator) for the training backward.
template <bool kLogD, typename acc_t>
inline acc_t wkv_step(acc_t& a, acc_t& b, acc_t& p, const acc_t w, const acc_t u, const acc_t kk,
                             const acc_t vv, acc_t* log_d) {
  const acc_t ww = u + kk;
  const acc_t d = p - ww;
  const acc_t ed = exp_nonpos(d > 0 ? -d : d);
  const acc_t e1 = d > 0 ? acc_t(1) : ed;  // weight of the state
  const acc_t e2 = d > 0 ? ed : acc_t(1);  // weight of the current token (with its bonus)
  const acc_t den = e1 * b + e2;
  const acc_t y = (e1 * a + e2 * vv) / den;
  if (kLogD) *log_d = (d > 0 ? p : ww) + std::log(den);
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

}  // namespace rwkv_cpu
