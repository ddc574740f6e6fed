// Matrix-vector product y = W x for the RNN step on the CPU (W [N, K] fp32 or bf16, x [K] fp32).
//
// Generating one token reads every weight once: the step is bound by memory bandwidth, and
// torch's matvec on these shapes reads far below the machine's streaming rate (bf16 especially).
// Here each thread streams a contiguous block of rows, 4 rows at a time sharing the loads of x
// (which stays in L1/L2), with a vectorised fp32 reduction.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

namespace {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &widened, sizeof(f));
  return f;
}

inline float as_float(float w) { return w; }
inline float as_float(uint16_t w) { return bf16_to_float(w); }

template <typename w_t>
void rows(const w_t* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const w_t* w0 = W + n * K;
    const w_t* w1 = w0 + K;
    const w_t* w2 = w1 + K;
    const w_t* w3 = w2 + K;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < K; ++k) {
      const float xv = x[k];
      s0 += as_float(w0[k]) * xv;
      s1 += as_float(w1[k]) * xv;
      s2 += as_float(w2[k]) * xv;
      s3 += as_float(w3[k]) * xv;
    }
    y[n] = s0;
    y[n + 1] = s1;
    y[n + 2] = s2;
    y[n + 3] = s3;
  }
  for (; n < n1; ++n) {
    const w_t* w0 = W + n * K;
    float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
    for (int64_t k = 0; k < K; ++k) s0 += as_float(w0[k]) * x[k];
    y[n] = s0;
  }
}

}  // namespace

at::Tensor matvec(const at::Tensor& W, const at::Tensor& x) {
  TORCH_CHECK(W.device().is_cpu() && x.device().is_cpu(), "matvec: CPU tensors only");
  TORCH_CHECK(W.dim() == 2 && W.is_contiguous(), "matvec: W must be a contiguous [N, K] matrix");
  TORCH_CHECK(x.numel() == W.size(1), "matvec: x must have K elements");
  const int64_t N = W.size(0), K = W.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous().view({K});
  at::Tensor y = at::empty({N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // ~64 rows per task keeps every thread streaming long contiguous runs
  const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(K, 1));
  if (W.scalar_type() == at::kFloat) {
    const float* wp = W.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) { rows<float>(wp, xp, yp, a, b, K); });
  } else if (W.scalar_type() == at::kBFloat16) {
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
    at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) { rows<uint16_t>(wp, xp, yp, a, b, K); });
  } else {
    TORCH_CHECK(false, "matvec: W must be float32 or bfloat16");
  }
  return y;
}
