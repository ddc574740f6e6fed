// RWKV-4 WKV operator on the CPU: inference forward with state in/out, and the training
// forward/backward (empty initial state). Same math and signature as wkv.wkv_reference.
//
// Layout: k, v, y are [B, T, C] contiguous; w, u are [C]; aa, bb, pp are [B, C] float32.
// Work is split over (batch, block of channels) with at::parallel_for; inside a block the
// channel loop is contiguous and branch-free, so the compiler vectorises it (exp included:
// exp_nonpos below is plain arithmetic, unlike libm's expf).
//
// Only exponents <= 0 are ever exponentiated (the running-maximum trick), so nothing overflows
// for any w or k a float can hold.

// ATen's own headers, not torch/extension.h: that one header (the whole C++ frontend) costs ~35 s
// of compile time per file at -O3, most of a cold build
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "wkv_step.h"

namespace {

using rwkv::wkv_step;
using rwkv_cpu::to_float;

constexpr int64_t kBlock = 64;  // channels per task: 256 B of each stream per time step

// ---------------------------------------------------------------------------------------------
// Inference forward: state in, state out, y in the input dtype.
template <typename scalar_t>
void forward_kernel(int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                    const scalar_t* k, const scalar_t* v, scalar_t* y,
                    float* aa, float* bb, float* pp) {
  const int64_t blocks_per_row = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks_per_row, 1, [&](int64_t begin, int64_t end) {
    float a[kBlock], b[kBlock], p[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / blocks_per_row;
      const int64_t c0 = (task % blocks_per_row) * kBlock;
      const int64_t n = std::min(kBlock, C - c0);
      float* aa_row = aa + bi * C + c0;
      float* bb_row = bb + bi * C + c0;
      float* pp_row = pp + bi * C + c0;
      const float* wc = w + c0;
      const float* uc = u + c0;
      for (int64_t j = 0; j < n; ++j) { a[j] = aa_row[j]; b[j] = bb_row[j]; p[j] = pp_row[j]; }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t off = (bi * T + t) * C + c0;
        const scalar_t* kt = k + off;
        const scalar_t* vt = v + off;
        scalar_t* yt = y + off;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          yt[j] = static_cast<scalar_t>(
              wkv_step<false, float>(a[j], b[j], p[j], wc[j], uc[j], to_float(kt[j]), to_float(vt[j]), nullptr));
        }
      }
      for (int64_t j = 0; j < n; ++j) { aa_row[j] = a[j]; bb_row[j] = b[j]; pp_row[j] = p[j]; }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Training forward (empty state). Also writes log D_t (log of the denominator at t), which the
// backward needs to keep every exponent <= 0. acc_t is float, or double for gradcheck.
template <typename acc_t>
void train_forward_kernel(int64_t B, int64_t T, int64_t C, const acc_t* w, const acc_t* u,
                          const acc_t* k, const acc_t* v, acc_t* y, acc_t* log_d) {
  const int64_t blocks_per_row = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks_per_row, 1, [&](int64_t begin, int64_t end) {
    acc_t a[kBlock], b[kBlock], p[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / blocks_per_row;
      const int64_t c0 = (task % blocks_per_row) * kBlock;
      const int64_t n = std::min(kBlock, C - c0);
      for (int64_t j = 0; j < n; ++j) { a[j] = 0; b[j] = 0; p[j] = acc_t(-1e30); }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t off = (bi * T + t) * C + c0;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          y[off + j] = wkv_step<true, acc_t>(a[j], b[j], p[j], w[c0 + j], u[c0 + j], k[off + j], v[off + j],
                                             log_d + off + j);
        }
      }
    }
  });
}

// Backward, walking t from T-1 down to 0 (the sums and their derivation: wkv_step.h).
template <typename acc_t>
void train_backward_kernel(int64_t B, int64_t T, int64_t C, const acc_t* w, const acc_t* u,
                           const acc_t* k, const acc_t* v, const acc_t* y, const acc_t* log_d,
                           const acc_t* gy, acc_t* gw_part, acc_t* gu_part, acc_t* gk, acc_t* gv) {
  const int64_t blocks_per_row = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks_per_row, 1, [&](int64_t begin, int64_t end) {
    rwkv::BackwardSums<acc_t> sums[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / blocks_per_row;
      const int64_t c0 = (task % blocks_per_row) * kBlock;
      const int64_t n = std::min(kBlock, C - c0);
      for (int64_t j = 0; j < n; ++j) sums[j] = rwkv::BackwardSums<acc_t>();
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t off = (bi * T + t) * C + c0;
        for (int64_t j = 0; j < n; ++j) {
          rwkv::wkv_backward_step(sums[j], w[c0 + j], u[c0 + j], k[off + j], v[off + j], y[off + j], gy[off + j],
                                  log_d[off + j], gk[off + j], gv[off + j]);
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        gw_part[bi * C + c0 + j] = sums[j].gw;
        gu_part[bi * C + c0 + j] = sums[j].gu;
      }
    }
  });
}

void check_inputs(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k,
                  const at::Tensor& v) {
  TORCH_CHECK(k.device().is_cpu(), "wkv_cpu: tensors must be on the CPU");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "wkv_cpu: k and v must be [B, T, C] of equal shape");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "wkv_cpu: k and v must have the same dtype");
  TORCH_CHECK(w.numel() == k.size(2) && u.numel() == k.size(2), "wkv_cpu: w and u must have C elements");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && w.is_contiguous() && u.is_contiguous(),
              "wkv_cpu: inputs must be contiguous");
}

}  // namespace

std::vector<at::Tensor> wkv_forward(at::Tensor w, at::Tensor u, at::Tensor k,
                                       at::Tensor v, at::Tensor aa, at::Tensor bb,
                                       at::Tensor pp) {
  check_inputs(w, u, k, v);
  TORCH_CHECK(w.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat, "wkv_cpu: w, u must be float32");
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  for (const at::Tensor* s : {&aa, &bb, &pp}) {  // the same checks as the CUDA binding's
    TORCH_CHECK(s->device().is_cpu(), "wkv_cpu: aa, bb, pp must be on the CPU");
    TORCH_CHECK(s->scalar_type() == at::kFloat, "wkv_cpu: aa, bb, pp must be float32");
    TORCH_CHECK(s->sizes() == at::IntArrayRef({B, C}), "wkv_cpu: aa, bb, pp must be [B, C]");
  }
  auto aa_out = aa.contiguous().clone();
  auto bb_out = bb.contiguous().clone();
  auto pp_out = pp.contiguous().clone();
  auto y = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "wkv_cpu_forward", [&] {
    forward_kernel<scalar_t>(B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<scalar_t>(),
                             v.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), aa_out.data_ptr<float>(),
                             bb_out.data_ptr<float>(), pp_out.data_ptr<float>());
  });
  return {y, aa_out, bb_out, pp_out};
}

static std::vector<at::Tensor> train_forward_impl(at::Tensor w, at::Tensor u, at::Tensor k,
                                                     at::Tensor v) {
  check_inputs(w, u, k, v);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto y = at::empty_like(v);
  auto log_d = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_cpu_train_forward", [&] {
    train_forward_kernel<scalar_t>(B, T, C, w.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                                   k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                   log_d.data_ptr<scalar_t>());
  });
  return {y, log_d};
}

at::Tensor wkv_train_forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v) {
  return train_forward_impl(w, u, k, v)[0];
}

std::vector<at::Tensor> wkv_train_backward(at::Tensor w, at::Tensor u, at::Tensor k,
                                              at::Tensor v, at::Tensor y, at::Tensor gy) {
  check_inputs(w, u, k, v);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  // Recompute log D_t rather than keep it alive between forward and backward (memory over time).
  auto log_d = train_forward_impl(w, u, k, v)[1];
  gy = gy.contiguous();
  auto gk = at::empty_like(k), gv = at::empty_like(v);
  auto gw_part = at::empty({B, C}, k.options()), gu_part = at::empty({B, C}, k.options());
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_cpu_train_backward", [&] {
    train_backward_kernel<scalar_t>(B, T, C, w.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                                    k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                    log_d.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(),
                                    gw_part.data_ptr<scalar_t>(), gu_part.data_ptr<scalar_t>(),
                                    gk.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>());
  });
  return {gw_part.sum(0), gu_part.sum(0), gk, gv};
}
