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

// ATen's own headers, not torch/extension.h: that one header (the whole C++ frontend) costs ~35 s
// of compile time per file at -O3, most of a cold build
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <vector>

namespace {

void check(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_inputs(const std::vector<std::pair<const at::Tensor*, const char*>>& seq, const at::Tensor& state) {
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
std::vector<at::Tensor> wkv5_forward(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor w,
                                        at::Tensor u, at::Tensor state) {
  check_inputs({{&r, "r"}, {&k, "k"}, {&v, "v"}, {&w, "w"}}, state);
  check(u, "u", 2);
  const int64_t B = k.size(0), T = k.size(1), H = k.size(2), N = k.size(3);
  TORCH_CHECK(u.size(0) == H && u.size(1) == N, "u must be [H, N]");
  auto y = at::empty_like(k);
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
std::vector<at::Tensor> wkv7_forward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                        at::Tensor kk, at::Tensor a, at::Tensor state) {
  check_inputs({{&r, "r"}, {&w, "w"}, {&k, "k"}, {&v, "v"}, {&kk, "kk"}, {&a, "a"}}, state);
  const int64_t B = k.size(0), T = k.size(1), H = k.size(2), N = k.size(3);
  auto y = at::empty_like(k);
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

// ---- RWKV-7 training: forward from an empty state keeping chunk checkpoints, and its backward ----
//
// Per head, with b_t = kk_t * a_t and M_t = diag(w_t) - kk_t b_t^T:   S_t = S_{t-1} M_t + v_t k_t^T,
// y_t = S_t r_t. Walking t down with dS (the loss's gradient wrt S_t, from y_t and every later S):
//   dS += dy r^T;  dr = S_t^T dy;  dv = dS k;  dk = dS^T v;
//   q = dS b;  m = S_{t-1} kk;  dw_j = sum_i S_{t-1}[i][j] dS[i][j];  dkk = -S_{t-1}^T q;  db = -dS^T m;
//   da = db * kk;  dkk += db * a;  dS <- dS diag(w) - q kk^T                    (dS_{t-1} = dS M_t^T)
// All O(N^2) per token (dM = S_{t-1}^T dS is never formed). The forward keeps S at the start of
// every kChunk tokens; the backward recomputes the states of one chunk at a time (memory
// B*H*T/kChunk*N^2 instead of B*H*T*N^2), as RWKV-LM's wkv7 CUDA kernel does. acc_t is float, or
// double for gradcheck.

namespace {

constexpr int64_t kChunk = 16;

template <typename acc_t>
inline void wkv7_train_token(acc_t* S, const acc_t* r, const acc_t* w, const acc_t* k, const acc_t* v,
                             const acc_t* kk, const acc_t* a, acc_t* y, int64_t N) {
  for (int64_t i = 0; i < N; ++i) {
    acc_t* row = S + i * N;
    acc_t removed = 0;
#pragma omp simd reduction(+ : removed)
    for (int64_t j = 0; j < N; ++j) removed += row[j] * kk[j];
    const acc_t vi = v[i];
    acc_t yi = 0;
#pragma omp simd reduction(+ : yi)
    for (int64_t j = 0; j < N; ++j) {
      row[j] = row[j] * w[j] - removed * kk[j] * a[j] + vi * k[j];
      yi += row[j] * r[j];
    }
    if (y) y[i] = yi;
  }
}

template <typename acc_t>
void wkv7_train_forward_kernel(int64_t B, int64_t T, int64_t H, int64_t N, const acc_t* r, const acc_t* w,
                               const acc_t* k, const acc_t* v, const acc_t* kk, const acc_t* a, acc_t* y,
                               acc_t* checkpoints, acc_t* final_state) {
  const int64_t n_chunks = (T + kChunk - 1) / kChunk;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      acc_t* S = final_state + task * N * N;
      std::fill(S, S + N * N, acc_t(0));
      for (int64_t t = 0; t < T; ++t) {
        if (t % kChunk == 0) std::copy(S, S + N * N, checkpoints + (task * n_chunks + t / kChunk) * N * N);
        const int64_t off = ((b * T + t) * H + h) * N;
        wkv7_train_token(S, r + off, w + off, k + off, v + off, kk + off, a + off, y + off, N);
      }
    }
  });
}

template <typename acc_t>
void wkv7_train_backward_kernel(int64_t B, int64_t T, int64_t H, int64_t N, const acc_t* r, const acc_t* w,
                                const acc_t* k, const acc_t* v, const acc_t* kk, const acc_t* a,
                                const acc_t* checkpoints, const acc_t* gy, acc_t* gr, acc_t* gw, acc_t* gk,
                                acc_t* gv, acc_t* gkk, acc_t* ga) {
  const int64_t n_chunks = (T + kChunk - 1) / kChunk;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> states((kChunk + 1) * N * N), dS(N * N), q(N), m(N), bvec(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      std::fill(dS.begin(), dS.end(), acc_t(0));
      for (int64_t c = n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * kChunk, t1 = std::min(T, t0 + kChunk);
        const acc_t* saved = checkpoints + (task * n_chunks + c) * N * N;
        std::copy(saved, saved + N * N, states.begin());
        for (int64_t t = t0; t < t1; ++t) {  // states[t - t0 + 1] = S_t
          const int64_t off = ((b * T + t) * H + h) * N;
          acc_t* next = states.data() + (t - t0 + 1) * N * N;
          std::copy(next - N * N, next, next);
          wkv7_train_token<acc_t>(next, r + off, w + off, k + off, v + off, kk + off, a + off, nullptr, N);
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t off = ((b * T + t) * H + h) * N;
          const acc_t *rt = r + off, *wt = w + off, *kt = k + off, *vt = v + off, *kkt = kk + off, *at_ = a + off,
                      *dy = gy + off;
          const acc_t* S_prev = states.data() + (t - t0) * N * N;
          const acc_t* S_now = S_prev + N * N;
          acc_t *dr = gr + off, *dw = gw + off, *dk = gk + off, *dv = gv + off, *dkk = gkk + off, *da = ga + off;
          for (int64_t j = 0; j < N; ++j) {
            bvec[j] = kkt[j] * at_[j];
            dr[j] = dw[j] = dk[j] = dkk[j] = da[j] = 0;  // da holds db until the end
          }
          for (int64_t i = 0; i < N; ++i) {
            acc_t* g = dS.data() + i * N;
            const acc_t* sp = S_prev + i * N;
            const acc_t dyi = dy[i];
            acc_t dvi = 0, qi = 0, mi = 0;
#pragma omp simd reduction(+ : dvi, qi, mi)
            for (int64_t j = 0; j < N; ++j) {
              g[j] += dyi * rt[j];
              dvi += g[j] * kt[j];
              qi += g[j] * bvec[j];
              mi += sp[j] * kkt[j];
            }
            dv[i] = dvi;
            q[i] = qi;
            m[i] = mi;
          }
          for (int64_t i = 0; i < N; ++i) {
            acc_t* g = dS.data() + i * N;
            const acc_t *sp = S_prev + i * N, *sn = S_now + i * N;
            const acc_t dyi = dy[i], vi = vt[i], qi = q[i], mi = m[i];
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) {
              dr[j] += sn[j] * dyi;
              dk[j] += g[j] * vi;
              dw[j] += sp[j] * g[j];
              dkk[j] -= sp[j] * qi;
              da[j] -= mi * g[j];
              g[j] = g[j] * wt[j] - qi * kkt[j];
            }
          }
          for (int64_t j = 0; j < N; ++j) {
            const acc_t db = da[j];
            da[j] = db * kkt[j];
            dkk[j] += db * at_[j];
          }
        }
      }
    }
  });
}

void check_train(const std::vector<std::pair<const at::Tensor*, const char*>>& seq) {
  const auto& first = *seq.front().first;
  TORCH_CHECK(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble,
              "wkv7 training: inputs must be float32 or float64");
  for (const auto& [t, name] : seq) {
    TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(t->scalar_type() == first.scalar_type(), name, " must have the dtype of r");
    TORCH_CHECK(t->dim() == 4 && t->sizes() == first.sizes(), name, " must be [B, T, H, N] like r");
    TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
  }
}

}  // namespace

// Training forward from an empty state: (y [B, T, H, N], checkpoints [B, H, ceil(T/16), N, N], final state).
std::vector<at::Tensor> wkv7_train_forward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                              at::Tensor kk, at::Tensor a) {
  check_train({{&r, "r"}, {&w, "w"}, {&k, "k"}, {&v, "v"}, {&kk, "kk"}, {&a, "a"}});
  const int64_t B = k.size(0), T = k.size(1), H = k.size(2), N = k.size(3);
  auto y = at::zeros_like(k);
  auto checkpoints = at::empty({B, H, (T + kChunk - 1) / kChunk, N, N}, k.options());
  auto final_state = at::zeros({B, H, N, N}, k.options());
  if (B * H * T == 0) return {y, checkpoints, final_state};
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv7_train_forward", [&] {
    wkv7_train_forward_kernel<scalar_t>(B, T, H, N, r.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                        k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), kk.data_ptr<scalar_t>(),
                                        a.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                        checkpoints.data_ptr<scalar_t>(), final_state.data_ptr<scalar_t>());
  });
  return {y, checkpoints, final_state};
}

// Its backward: (gr, gw, gk, gv, gkk, ga), each [B, T, H, N], for the gradient gy of y.
std::vector<at::Tensor> wkv7_train_backward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                               at::Tensor kk, at::Tensor a, at::Tensor checkpoints,
                                               at::Tensor gy) {
  check_train({{&r, "r"}, {&w, "w"}, {&k, "k"}, {&v, "v"}, {&kk, "kk"}, {&a, "a"}, {&gy, "gy"}});
  const int64_t B = k.size(0), T = k.size(1), H = k.size(2), N = k.size(3);
  TORCH_CHECK(checkpoints.is_contiguous() && checkpoints.scalar_type() == k.scalar_type() &&
                  checkpoints.sizes() == at::IntArrayRef({B, H, (T + kChunk - 1) / kChunk, N, N}),
              "checkpoints must be the tensor wkv7_train_forward returned");
  std::vector<at::Tensor> grads;
  for (int i = 0; i < 6; ++i) grads.push_back(at::zeros_like(k));
  if (B * H * T == 0) return grads;
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv7_train_backward", [&] {
    wkv7_train_backward_kernel<scalar_t>(
        B, T, H, N, r.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        kk.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), checkpoints.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(),
        grads[0].data_ptr<scalar_t>(), grads[1].data_ptr<scalar_t>(), grads[2].data_ptr<scalar_t>(),
        grads[3].data_ptr<scalar_t>(), grads[4].data_ptr<scalar_t>(), grads[5].data_ptr<scalar_t>());
  });
  return grads;
}
