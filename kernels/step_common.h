// What every architecture's one-token step shares (defined in matvec_cpu.cpp): the matvecs, run
// as one parallel pass per group of products that share a step (MatvecJob, run_jobs); LayerNorm and
// the per-head GroupNorm; the token-shift mix; the squared-ReLU channel mix's products; weights read
// by checkpoint name. Each architecture's step (step_rwkv4.cpp, step_rwkv5.cpp, step_rwkv6.cpp,
// step_rwkv7.cpp) writes its own elementwise math between these.
#pragma once

#include "rnn_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "wkv_step.h"

namespace rwkv_cpu {

// y_b[n] = scale[n] * (W[n, :] . x_b) for every input b, over a range of rows.
struct MatvecJob {
  Matrix W;
  int64_t B;
  const float* const* x;      // B inputs of W.cols floats
  const float* const* pairs;  // bf16: the inputs de-interleaved to match the widened weights
  float* const* y;            // B outputs of W.rows floats
};

// Several matvecs in one parallel pass (the threads split the rows of all of them together).
void run_jobs(Isa isa, std::vector<MatvecJob>& jobs);

MatvecJob job(const Matrix& W, int64_t B, const std::vector<float*>& x, const std::vector<float*>& y);

// A [rows] block of pointers into a [B, width] buffer.
std::vector<float*> rows_of(std::vector<float>& buffer, int64_t B, int64_t width);

// LayerNorm of one row; mean and variance accumulated in double (C is small, exactness is cheap).
void layer_norm(const float* x, const float* weight, const float* bias, float eps, float* out, int64_t C);

// GroupNorm of one row, one group per head of N channels (mean / variance in double, as layer_norm)
void head_group_norm(float* y, const float* weight, const float* bias, float eps, int64_t H, int64_t N);

// 1 / (1 + e^-x) with only a non-positive exponent evaluated (exp_nonpos: branch-free, so the
// loops around it vectorise); ~2 ulp.
inline float sigmoid(float x) {
  const float e = exp_nonpos(x > 0.f ? -x : x);
  return (x > 0.f ? 1.0f : e) / (1.0f + e);
}

// fn(b) for every row b: inline for one row, else spread over the threads. Rows are independent,
// so where a row runs never changes its numbers.
template <typename Fn>
void for_rows(int64_t B, const Fn& fn) {
  if (B == 1) {
    fn(0);
    return;
  }
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fn(b);
  });
}

// token shift: mixed = current * mix + previous * (1 - mix)
inline void mix(const float* cur, const float* prev, const float* m, float* out, int64_t C) {
  for (int64_t c = 0; c < C; ++c) out[c] = cur[c] * m[c] + prev[c] * (1.0f - m[c]);
}

// x[b] = LN0(emb[token[b]]) for every row (scratch[b]: the widened embedding row)
void embed_rows(const Matrix& emb, const int64_t* token, int64_t B, int64_t C, const float* ln_weight,
                const float* ln_bias, float eps, const std::vector<float*>& scratch, const std::vector<float*>& x);

// the feed-forward's relu(k)^2, in place, for every row
template <typename Rows>
void square_relu_rows(int64_t B, const Rows& rows, int64_t F) {
  for_rows(B, [&](int64_t b) {
    float* fb = rows[b];
    for (int64_t j = 0; j < F; ++j) {
      const float relu = fb[j] > 0.f ? fb[j] : 0.f;
      fb[j] = relu * relu;
    }
  });
}

inline float silu(float x) { return x * sigmoid(x); }

// The squared-ReLU channel mix's products for every row: fk = relu(key xk)^2 and out = value fk;
// with `receptance`, also r = receptance xr, in the same parallel pass as the key.
void squared_relu_ffn(Isa isa, int64_t B, int64_t F, const Matrix& key, const Matrix& value, const Matrix* receptance,
                      const std::vector<float*>& xk, const std::vector<float*>& xr, const std::vector<float*>& r,
                      const std::vector<float*>& fk, const std::vector<float*>& out);

Storage storage_of(const at::Tensor& t);
const char* storage_name(Storage s);

// Weights looked up by checkpoint name and validated (shape, dtype, device, contiguity) once, for
// every step; int8 matrices come with "<name>_scale" (float32, one per row). `keep` holds the
// tensors the returned raw pointers point into.
struct WeightReader {
  const char* owner;  // "StepWeights" / "RWKV7Step": who asks, in the messages
  const std::map<std::string, at::Tensor>& named;
  std::vector<at::Tensor>& keep;

  const at::Tensor& get(const std::string& name) const {
    auto it = named.find(name);
    TORCH_CHECK(it != named.end(), owner, ": missing '", name, "'");
    return it->second;
  }
  const float* vec(const std::string& name, int64_t n) {
    const at::Tensor& t = get(name);
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                owner, ": '", name, "' must be a contiguous float32 CPU tensor");
    TORCH_CHECK(t.numel() == n, owner, ": '", name, "' has ", t.numel(), " elements, expected ", n);
    keep.push_back(t);
    return t.data_ptr<float>();
  }
  Matrix mat(const at::Tensor& t, const std::string& name, int64_t rows, int64_t cols, const float* scale = nullptr) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 2,
                owner, ": '", name, "' must be a contiguous 2-D CPU tensor");
    TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, owner, ": '", name, "' has shape [", t.size(0),
                ", ", t.size(1), "], expected [", rows, ", ", cols, "]");
    Matrix m;
    m.storage = storage_of(t);
    m.data = t.data_ptr();
    m.rows = rows;
    m.cols = cols;
    m.scale = scale;
    keep.push_back(t);
    return m;
  }
  Matrix mat(const std::string& name, int64_t rows, int64_t cols) {
    const at::Tensor& t = get(name);
    const float* scale = nullptr;
    if (t.scalar_type() == at::kChar) {
      auto s = named.find(name + "_scale");
      TORCH_CHECK(s != named.end() && s->second.device().is_cpu() && s->second.scalar_type() == at::kFloat &&
                      s->second.is_contiguous() && s->second.numel() == rows,
                  owner, ": int8 '", name, "' needs '", name, "_scale' (", rows, " float32 values)");
      keep.push_back(s->second);
      scale = s->second.data_ptr<float>();
    }
    return mat(t, name, rows, cols, scale);
  }
};

}  // namespace rwkv_cpu
