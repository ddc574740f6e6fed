// The one-token RNN step on the CPU: a streaming matrix-vector product, and a whole-model step
// (every layer, then the head) in one call.
//
// Generating one token reads every weight once, so the step is bound by memory bandwidth. Two
// things keep it there rather than below:
//  * the matvec streams each thread's block of rows, 4 rows at a time sharing the loads of x
//    (which stays in L1), with AVX2 FMAs; bf16 weights are widened in registers (a shift), so
//    bf16 reads half the bytes of fp32 at the same instruction count;
//  * rnn_step runs the small per-layer work (LayerNorm, token-shift mixing, the WKV step,
//    sigmoid, relu^2) in plain C++ loops between the matvecs, and fuses the matvecs that share a
//    step into one parallel pass (att key/value/receptance; ffn key/receptance). In PyTorch the
//    same step is ~30 small operator calls per layer, which cost about as much as the reads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RWKV_AVX2 1
#endif

#include "wkv_step.h"

namespace {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &widened, sizeof(f));
  return f;
}

#ifdef RWKV_AVX2
inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

// y[n] = W[n, :] . x for n in [n0, n1). fp32: 4 rows at a time share the loads of x, two
// accumulators per row hide the FMA latency.
void matvec_rows(const float* W, const float* x, const float*, float* y, int64_t n0, int64_t n1, int64_t K) {
  int64_t n = n0;
#ifdef RWKV_AVX2
  const int64_t K16 = K & ~int64_t(15);
  for (; n + 4 <= n1; n += 4) {
    const float* rows[4] = {W + n * K, W + (n + 1) * K, W + (n + 2) * K, W + (n + 3) * K};
    __m256 lo[4], hi[4];
    for (int j = 0; j < 4; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K16; k += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int j = 0; j < 4; ++j) {
        lo[j] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[j] + k), x0, lo[j]);
        hi[j] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[j] + k + 8), x1, hi[j]);
      }
    }
    for (int j = 0; j < 4; ++j) {
      float r = hsum(_mm256_add_ps(lo[j], hi[j]));
      for (int64_t k = K16; k < K; ++k) r += rows[j][k] * x[k];
      y[n + j] = r;
    }
  }
#endif
  for (; n < n1; ++n) {
    const float* w0 = W + n * K;
    float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
    for (int64_t k = 0; k < K; ++k) s0 += w0[k] * x[k];
    y[n] = s0;
  }
}

// bf16 weights: a 256-bit load holds 16 of them, two per 32-bit lane. A bf16 is the top half of
// a float, so `lane << 16` is the even element as fp32 and `lane & 0xFFFF0000` the odd one: two
// cheap integer ops widen 16 weights (no lane-crossing unpack), and x is de-interleaved once per
// call to match (x_pairs: per 16 elements, the 8 even ones then the 8 odd ones).
// One row at a time with a software prefetch 1 KB ahead: measured here, a single stream per
// core with prefetch reads ~20 GB/s where 4 interleaved row streams read ~12.
void matvec_rows(const uint16_t* W, const float* x, const float* x_pairs, float* y, int64_t n0, int64_t n1,
                 int64_t K) {
  int64_t n = n0;
#ifdef RWKV_AVX2
  const int64_t K32 = K & ~int64_t(31);
  const int64_t K16 = K & ~int64_t(15);
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  auto even = [](__m256i w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); };
  auto odd = [&](__m256i w) { return _mm256_castsi256_ps(_mm256_and_si256(w, high)); };
  auto load = [](const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  for (; n < n1; ++n) {
    const uint16_t* row = W + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k < K32; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k + 512), _MM_HINT_T0);
      const __m256i w0 = load(row + k), w1 = load(row + k + 16);
      a0 = _mm256_fmadd_ps(even(w0), _mm256_loadu_ps(x_pairs + k), a0);
      a1 = _mm256_fmadd_ps(odd(w0), _mm256_loadu_ps(x_pairs + k + 8), a1);
      a2 = _mm256_fmadd_ps(even(w1), _mm256_loadu_ps(x_pairs + k + 16), a2);
      a3 = _mm256_fmadd_ps(odd(w1), _mm256_loadu_ps(x_pairs + k + 24), a3);
    }
    if (k < K16) {
      const __m256i w0 = load(row + k);
      a0 = _mm256_fmadd_ps(even(w0), _mm256_loadu_ps(x_pairs + k), a0);
      a1 = _mm256_fmadd_ps(odd(w0), _mm256_loadu_ps(x_pairs + k + 8), a1);
      k += 16;
    }
    float r = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) r += bf16_to_float(row[k]) * x[k];
    y[n] = r;
  }
#endif
  for (; n < n1; ++n) {
    const uint16_t* w0 = W + n * K;
    float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
    for (int64_t k = 0; k < K; ++k) s0 += bf16_to_float(w0[k]) * x[k];
    y[n] = s0;
  }
}

// Several matvecs in one parallel pass: the threads split the rows of all of them together, so
// each thread streams about the same number of bytes and there is one fork/join, not several.
struct MatvecJob {
  const void* W;
  const float* x;
  float* y;
  int64_t N, K;
};

template <typename w_t>
void run_jobs(const std::vector<MatvecJob>& jobs) {
  int64_t rows = 0;
  for (const auto& j : jobs) rows += j.N;
  std::vector<std::vector<float>> x_pairs(jobs.size());
  if (sizeof(w_t) == 2) {
    for (size_t i = 0; i < jobs.size(); ++i) {
      const float* x = jobs[i].x;
      auto& out = x_pairs[i];
      out.resize(jobs[i].K);
      for (int64_t k = 0; k + 16 <= jobs[i].K; k += 16) {
        for (int e = 0; e < 8; ++e) {
          out[k + e] = x[k + 2 * e];
          out[k + 8 + e] = x[k + 2 * e + 1];
        }
      }
    }
  }
  // at least ~16 KB of weights per task
  const int64_t grain = std::max<int64_t>(16, 16384 / (sizeof(w_t) * std::max<int64_t>(jobs[0].K, 1)));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    int64_t offset = 0;
    for (size_t i = 0; i < jobs.size(); ++i) {
      const MatvecJob& j = jobs[i];
      const int64_t a = std::max(begin, offset) - offset;
      const int64_t b = std::min(end, offset + j.N) - offset;
      if (a < b) matvec_rows(static_cast<const w_t*>(j.W), j.x, x_pairs[i].data(), j.y, a, b, j.K);
      offset += j.N;
    }
  });
}

void run_jobs(const std::vector<MatvecJob>& jobs, bool bf16) {
  if (bf16) run_jobs<uint16_t>(jobs); else run_jobs<float>(jobs);
}

const void* weight_ptr(const at::Tensor& W) {
  return W.scalar_type() == at::kFloat ? static_cast<const void*>(W.data_ptr<float>())
                                       : static_cast<const void*>(W.data_ptr<at::BFloat16>());
}

// LayerNorm of one row; mean and variance accumulated in double (C is small, exactness is cheap).
void layer_norm(const float* x, const float* weight, const float* bias, float* out, int64_t C) {
  double sum = 0.0;
  for (int64_t c = 0; c < C; ++c) sum += x[c];
  const double mean = sum / C;
  double sq = 0.0;
  for (int64_t c = 0; c < C; ++c) sq += (x[c] - mean) * (x[c] - mean);
  const float inv_std = static_cast<float>(1.0 / std::sqrt(sq / C + 1e-5));
  const float m = static_cast<float>(mean);
  for (int64_t c = 0; c < C; ++c) out[c] = (x[c] - m) * inv_std * weight[c] + bias[c];
}

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// token shift: mixed = current * mix + previous * (1 - mix)
inline void mix(const float* cur, const float* prev, const float* m, float* out, int64_t C) {
  for (int64_t c = 0; c < C; ++c) out[c] = cur[c] * m[c] + prev[c] * (1.0f - m[c]);
}

// Per-layer slots in rnn_step's weight list (after the kGlobal leading ones).
enum Slot {
  kLn1W, kLn1B, kAttMixK, kAttMixV, kAttMixR, kDecay /* w = -exp(time_decay) */, kFirst /* u */,
  kAttKey, kAttValue, kAttReceptance, kAttOutput,
  kLn2W, kLn2B, kFfnMixK, kFfnMixR, kFfnKey, kFfnReceptance, kFfnValue,
  kPerLayer
};
enum Global { kLn0W, kLn0B, kLnOutW, kLnOutB, kHead, kGlobal };

float* f32(const at::Tensor& t) { return t.data_ptr<float>(); }

}  // namespace

at::Tensor matvec(const at::Tensor& W, const at::Tensor& x) {
  TORCH_CHECK(W.device().is_cpu() && x.device().is_cpu(), "matvec: CPU tensors only");
  TORCH_CHECK(W.dim() == 2 && W.is_contiguous(), "matvec: W must be a contiguous [N, K] matrix");
  TORCH_CHECK(W.scalar_type() == at::kFloat || W.scalar_type() == at::kBFloat16,
              "matvec: W must be float32 or bfloat16");
  TORCH_CHECK(x.numel() == W.size(1), "matvec: x must have K elements");
  const int64_t N = W.size(0), K = W.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous().view({K});
  at::Tensor y = at::empty({N}, x.options().dtype(at::kFloat));
  run_jobs({{weight_ptr(W), xf.data_ptr<float>(), y.data_ptr<float>(), N, K}},
           W.scalar_type() == at::kBFloat16);
  return y;
}

// One token through the whole model. emb_row: the token's embedding [C]; weights: kGlobal
// tensors then kPerLayer per layer (vectors float32 [C], matrices all float32 or all bfloat16,
// contiguous); att_x, aa, bb, pp, ffn_x: the state [L, C] float32, advanced in place.
// Returns the logits [V] float32. Same math as RWKV4._forward_chunk with T = 1.
at::Tensor rnn_step(const at::Tensor& emb_row, const std::vector<at::Tensor>& weights, at::Tensor att_x,
                    at::Tensor aa, at::Tensor bb, at::Tensor pp, at::Tensor ffn_x) {
  TORCH_CHECK(weights.size() >= kGlobal && (weights.size() - kGlobal) % kPerLayer == 0,
              "rnn_step: the weight list must hold ", int(kGlobal), " + ", int(kPerLayer), " x n_layer tensors");
  const int64_t L = (weights.size() - kGlobal) / kPerLayer;
  const at::Tensor& head = weights[kHead];
  const int64_t C = head.size(1), V = head.size(0);
  const bool bf16 = head.scalar_type() == at::kBFloat16;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& t = weights[i];
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "rnn_step: weight ", i, " must be a contiguous CPU tensor");
    const bool matrix = t.dim() == 2;
    TORCH_CHECK(t.scalar_type() == (matrix ? head.scalar_type() : at::kFloat),
                "rnn_step: weight ", i, " has the wrong dtype");
    TORCH_CHECK(matrix || t.numel() == C, "rnn_step: weight ", i, " must have ", C, " elements");
  }
  for (const at::Tensor* s : {&att_x, &aa, &bb, &pp, &ffn_x}) {
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->dim() == 2 && s->size(0) == L &&
                    s->size(1) == C,
                "rnn_step: state tensors must be contiguous float32 [", L, ", ", C, "]");
  }
  TORCH_CHECK(emb_row.numel() == C, "rnn_step: the embedding row must have ", C, " elements");
  const int64_t F = L > 0 ? weights[kGlobal + kFfnKey].size(0) : 0;

  const at::Tensor emb = emb_row.to(at::kFloat).contiguous();
  std::vector<float> x(C), xx(C), xk(C), xv(C), xr(C), k(C), v(C), r(C), y(C), out(C), fk(F);
  layer_norm(emb.data_ptr<float>(), f32(weights[kLn0W]), f32(weights[kLn0B]), x.data(), C);

  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor* p = weights.data() + kGlobal + i * kPerLayer;
    // ---- time mixing
    float* prev_att = f32(att_x) + i * C;
    layer_norm(x.data(), f32(p[kLn1W]), f32(p[kLn1B]), xx.data(), C);
    mix(xx.data(), prev_att, f32(p[kAttMixK]), xk.data(), C);
    mix(xx.data(), prev_att, f32(p[kAttMixV]), xv.data(), C);
    mix(xx.data(), prev_att, f32(p[kAttMixR]), xr.data(), C);
    std::copy(xx.begin(), xx.end(), prev_att);
    run_jobs({{weight_ptr(p[kAttKey]), xk.data(), k.data(), C, C},
              {weight_ptr(p[kAttValue]), xv.data(), v.data(), C, C},
              {weight_ptr(p[kAttReceptance]), xr.data(), r.data(), C, C}}, bf16);
    float* a = f32(aa) + i * C;
    float* b = f32(bb) + i * C;
    float* m = f32(pp) + i * C;
    const float* w = f32(p[kDecay]);
    const float* u = f32(p[kFirst]);
    for (int64_t c = 0; c < C; ++c) {
      y[c] = sigmoid(r[c]) * rwkv_cpu::wkv_step<false, float>(a[c], b[c], m[c], w[c], u[c], k[c], v[c], nullptr);
    }
    run_jobs({{weight_ptr(p[kAttOutput]), y.data(), out.data(), C, C}}, bf16);
    for (int64_t c = 0; c < C; ++c) x[c] += out[c];
    // ---- channel mixing
    float* prev_ffn = f32(ffn_x) + i * C;
    layer_norm(x.data(), f32(p[kLn2W]), f32(p[kLn2B]), xx.data(), C);
    mix(xx.data(), prev_ffn, f32(p[kFfnMixK]), xk.data(), C);
    mix(xx.data(), prev_ffn, f32(p[kFfnMixR]), xr.data(), C);
    std::copy(xx.begin(), xx.end(), prev_ffn);
    run_jobs({{weight_ptr(p[kFfnKey]), xk.data(), fk.data(), F, C},
              {weight_ptr(p[kFfnReceptance]), xr.data(), r.data(), C, C}}, bf16);
    for (int64_t j = 0; j < F; ++j) {
      const float relu = fk[j] > 0.f ? fk[j] : 0.f;
      fk[j] = relu * relu;
    }
    run_jobs({{weight_ptr(p[kFfnValue]), fk.data(), out.data(), C, F}}, bf16);
    for (int64_t c = 0; c < C; ++c) x[c] += sigmoid(r[c]) * out[c];
  }
  layer_norm(x.data(), f32(weights[kLnOutW]), f32(weights[kLnOutB]), xx.data(), C);
  at::Tensor logits = at::empty({V}, emb.options().dtype(at::kFloat));
  run_jobs({{weight_ptr(head), xx.data(), logits.data_ptr<float>(), V, C}}, bf16);
  return logits;
}
