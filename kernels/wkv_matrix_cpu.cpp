// The RWKV-5/6/7 matrix-state recurrences on the CPU, state in and out. Same math and layout as
// rwkv_playground/wkv.py (wkv5_reference, wkv7_reference), which the tests hold these to.
//
// Layout: r, k, v, w, kk, a are [B, T, H, N] float32 contiguous; u is [H, N]; the state is
// [B, H, N, N] float32 (v5/v6: S[key j][value i]; v7: S[value i][key j]). y is [B, T, H, N].
//
// Work is split over (batch, head): each task keeps its N x N matrix (16 KB at N = 64) in L1 for
// the whole chunk, and the inner loops run over a contiguous row of it, which the compiler
// vectorises (-O3 -march=native). The recurrence is sequential in T; prompts still batch every
// projection over the chunk (the model's GEMMs), so this loop is a small part of a prompt.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

void check(const torch::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_inputs(const std::vector<std::pair<const torch::Tensor*, const char*>>& seq, const torch::Tensor& state) {
  const auto& first = *seq.front().first;
  for (const auto& [t, name] : seq) {
    check(*t, name, 4);
    TORCH_CHECK(t->sizes() == first.sizes(), name, " must have the shape of ", seq.front().second, " [B, T, H, N]");
  }
  check(state, "state", 4);
  const int64_t B = first.size(0), H = first.size(2), N = first.size(3);
  TORCH_CHECK(state.size(0) == B && state.size(1) == H && state.size(2) == N && state.size(3) == N,
              "state must be [B, H, N, N] for inputs [B, T, H, N]");
}

}  // namespace

// y_t = r_t^T (diag(u) k_t v_t^T + S);  S <- k_t v_t^T + diag(w_t) S        (S[key j][value i])
std::vector<torch::Tensor> wkv5_forward(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w,
                                        torch::Tensor u, torch::Tensor state) {
  check_inputs({{&r, "r"}, {&k, "k"}, {&v, "v"}, {&w, "w"}}, state);
  check(u, "u", 2);
  const int64_t B = k.size(0), T = k.size(1), H = k.size(2), N = k.size(3);
  TORCH_CHECK(u.size(0) == H && u.size(1) == N, "u must be [H, N]");
  auto y = torch::empty_like(k);
  auto S_out = state.clone();
  const float *rp = r.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(),
              *wp = w.data_ptr<float>(), *up = u.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *sp = S_out.data_ptr<float>();
  if (B * H * T == 0) return {y, S_out};
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> out(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      float* S = sp + task * N * N;
      const float* uh = up + h * N;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t off = ((b * T + t) * H + h) * N;
        const float *rt = rp + off, *kt = kp + off, *vt = vp + off, *wt = wp + off;
        for (int64_t i = 0; i < N; ++i) out[i] = 0.f;
        for (int64_t j = 0; j < N; ++j) {
          float* row = S + j * N;
          const float kj = kt[j], rj = rt[j], ukj = uh[j] * kt[j], wj = wt[j];
#pragma omp simd
          for (int64_t i = 0; i < N; ++i) {
            const float kv = kj * vt[i];
            out[i] += rj * (ukj * vt[i] + row[i]);
            row[i] = kv + wj * row[i];
          }
        }
        for (int64_t i = 0; i < N; ++i) yp[off + i] = out[i];
      }
    }
  });
  return {y, S_out};
}

// S <- S diag(w_t) - (S kk_t)(kk_t * a_t)^T + v_t k_t^T;  y_t = S r_t       (S[value i][key j])
std::vector<torch::Tensor> wkv7_forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                        torch::Tensor kk, torch::Tensor a, torch::Tensor state) {
  check_inputs({{&r, "r"}, {&w, "w"}, {&k, "k"}, {&v, "v"}, {&kk, "kk"}, {&a, "a"}}, state);
  const int64_t B = k.size(0), T = k.size(1), H = k.size(2), N = k.size(3);
  auto y = torch::empty_like(k);
  auto S_out = state.clone();
  const float *rp = r.data_ptr<float>(), *wp = w.data_ptr<float>(), *kp = k.data_ptr<float>(),
              *vp = v.data_ptr<float>(), *kkp = kk.data_ptr<float>(), *ap = a.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *sp = S_out.data_ptr<float>();
  if (B * H * T == 0) return {y, S_out};
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kka(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      float* S = sp + task * N * N;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t off = ((b * T + t) * H + h) * N;
        const float *rt = rp + off, *wt = wp + off, *kt = kp + off, *vt = vp + off, *kkt = kkp + off, *at_ = ap + off;
        for (int64_t j = 0; j < N; ++j) kka[j] = kkt[j] * at_[j];
        int64_t i = 0;
        // four rows at a time: four independent sums per loop, so the reductions do not wait on
        // one accumulator's latency (each row's own arithmetic is the same as alone)
        for (; i + 4 <= N; i += 4) {
          float *s0 = S + i * N, *s1 = s0 + N, *s2 = s1 + N, *s3 = s2 + N;
          float m0 = 0.f, m1 = 0.f, m2 = 0.f, m3 = 0.f;  // (S kk)_i with the old S
#pragma omp simd reduction(+ : m0, m1, m2, m3)
          for (int64_t j = 0; j < N; ++j) {
            m0 += s0[j] * kkt[j];
            m1 += s1[j] * kkt[j];
            m2 += s2[j] * kkt[j];
            m3 += s3[j] * kkt[j];
          }
          const float v0 = vt[i], v1 = vt[i + 1], v2 = vt[i + 2], v3 = vt[i + 3];
          float y0 = 0.f, y1 = 0.f, y2 = 0.f, y3 = 0.f;
#pragma omp simd reduction(+ : y0, y1, y2, y3)
          for (int64_t j = 0; j < N; ++j) {
            s0[j] = s0[j] * wt[j] - m0 * kka[j] + v0 * kt[j];
            s1[j] = s1[j] * wt[j] - m1 * kka[j] + v1 * kt[j];
            s2[j] = s2[j] * wt[j] - m2 * kka[j] + v2 * kt[j];
            s3[j] = s3[j] * wt[j] - m3 * kka[j] + v3 * kt[j];
            y0 += s0[j] * rt[j];
            y1 += s1[j] * rt[j];
            y2 += s2[j] * rt[j];
            y3 += s3[j] * rt[j];
          }
          yp[off + i] = y0;
          yp[off + i + 1] = y1;
          yp[off + i + 2] = y2;
          yp[off + i + 3] = y3;
        }
        for (; i < N; ++i) {
          float* row = S + i * N;
          float removed = 0.f;
#pragma omp simd reduction(+ : removed)
          for (int64_t j = 0; j < N; ++j) removed += row[j] * kkt[j];
          const float vi = vt[i];
          float yi = 0.f;
#pragma omp simd reduction(+ : yi)
          for (int64_t j = 0; j < N; ++j) {
            row[j] = row[j] * wt[j] - removed * kka[j] + vi * kt[j];
            yi += row[j] * rt[j];
          }
          yp[off + i] = yi;
        }
      }
    }
  });
  return {y, S_out};
}
