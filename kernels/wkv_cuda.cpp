// Python binding of kernels/wkv_cuda.cu (RWKV-4) and kernels/wkv_matrix_cuda.cu (RWKV-5/6/7): the
// same functions as the CPU module's (kernels/wkv_cpu.cpp, kernels/wkv_matrix_cpu.cpp), with the
// same checks on every tensor.
//
// The tests' CPU emulation (tests/cuda_emulation/) compiles this file too, with stand-ins for the
// c10/cuda headers, and runs it on CPU tensors: RWKV_ON_DEVICE is then "on the CPU".
// ATen and pybind11 with torch's Tensor casters, not torch/extension.h (the whole C++ frontend:
// ~30 s of compile time for nothing this file uses)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#ifdef RWKV_CUDA_EMULATION
#define RWKV_ON_DEVICE(t) ((t).is_cpu())
#else
#define RWKV_ON_DEVICE(t) ((t).is_cuda())
#endif

cudaError_t cuda_wkv_forward(int dtype, int B, int T, int C, const float* w, const float* u, const void* k,
                             const void* v, void* y, float* aa, float* bb, float* pp, cudaStream_t stream);
cudaError_t cuda_wkv_train_forward(int B, int T, int C, const float* w, const float* u, const float* k,
                                   const float* v, float* y, float* log_d, cudaStream_t stream);
cudaError_t cuda_wkv_train_backward(int B, int T, int C, const float* w, const float* u, const float* k,
                                    const float* v, const float* y, const float* log_d, const float* gy,
                                    float* gw_part, float* gu_part, float* gk, float* gv, cudaStream_t stream);

cudaError_t cuda_wkv5_forward(int dtype, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                              const float* w, const float* u, void* y, float* state, cudaStream_t stream);
cudaError_t cuda_wkv7_forward(int dtype, int B, int T, int H, int N, const void* r, const float* w, const void* k,
                              const void* v, const void* kk, const void* a, void* y, float* state,
                              cudaStream_t stream);

namespace {

void check_inputs(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(RWKV_ON_DEVICE(k) && RWKV_ON_DEVICE(v) && RWKV_ON_DEVICE(w) && RWKV_ON_DEVICE(u),
              "wkv_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "wkv_cuda: k and v must be [B, T, C] of equal shape");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "wkv_cuda: k and v must have the same dtype");
  TORCH_CHECK(w.numel() == k.size(2) && u.numel() == k.size(2), "wkv_cuda: w and u must have C elements");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && w.is_contiguous() && u.is_contiguous(),
              "wkv_cuda: inputs must be contiguous");
  TORCH_CHECK(k.size(0) * k.size(2) < (1LL << 31) && k.size(1) < (1LL << 31), "wkv_cuda: B * C or T too large");
}

void check_state(const at::Tensor& s, const at::Tensor& k) {  // the same checks as the CPU binding's
  TORCH_CHECK(RWKV_ON_DEVICE(s) && s.device() == k.device(), "wkv_cuda: aa, bb, pp must be on k's CUDA device");
  TORCH_CHECK(s.scalar_type() == at::kFloat, "wkv_cuda: aa, bb, pp must be float32");
  TORCH_CHECK(s.sizes() == at::IntArrayRef({k.size(0), k.size(2)}), "wkv_cuda: aa, bb, pp must be [B, C]");
}

void check_launch(cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "wkv_cuda: the kernel launch failed: ", cudaGetErrorString(error));
}

int dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, op, ": r, k, v must be float32, float16 or bfloat16");
  }
}

// [B, T, H, N] inputs of one dtype (w: float32), a [B, H, N, N] float32 state, N in {16, 32, 64}
void check_matrix(const char* op, const std::vector<const at::Tensor*>& same_dtype, const at::Tensor& w,
                  const at::Tensor& state) {
  const at::Tensor& k = *same_dtype.front();
  TORCH_CHECK(k.dim() == 4, op, ": inputs must be [B, T, H, N]");
  for (const at::Tensor* t : same_dtype) {
    TORCH_CHECK(RWKV_ON_DEVICE(*t) && t->device() == k.device(), op, ": tensors must be on one CUDA device");
    TORCH_CHECK(t->sizes() == k.sizes(), op, ": r, k, v (kk, a) and w must have one shape [B, T, H, N]");
    TORCH_CHECK(t->scalar_type() == k.scalar_type(), op, ": r, k, v (kk, a) must have one dtype");
    TORCH_CHECK(t->is_contiguous(), op, ": inputs must be contiguous");
  }
  TORCH_CHECK(RWKV_ON_DEVICE(w) && w.device() == k.device() && w.sizes() == k.sizes() && w.is_contiguous() &&
                  w.scalar_type() == at::kFloat,
              op, ": w must be a contiguous float32 [B, T, H, N] on the inputs' device");
  const int64_t N = k.size(3);
  TORCH_CHECK(N == 16 || N == 32 || N == 64, op, ": head size ", N, " is not compiled (16, 32 or 64)");
  TORCH_CHECK(RWKV_ON_DEVICE(state) && state.device() == k.device() && state.scalar_type() == at::kFloat,
              op, ": the state must be float32 on the inputs' device");
  TORCH_CHECK(state.sizes() == at::IntArrayRef({k.size(0), k.size(2), N, N}), op, ": the state must be [B, H, N, N]");
  TORCH_CHECK(k.size(0) * k.size(2) < (1LL << 31) && k.size(1) < (1LL << 31), op, ": B * H or T too large");
}

}  // namespace

std::vector<at::Tensor> wkv5_forward(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor w,
                                        at::Tensor u, at::Tensor state) {
  check_matrix("wkv5_cuda", {&k, &r, &v}, w, state);
  TORCH_CHECK(RWKV_ON_DEVICE(u) && u.scalar_type() == at::kFloat && u.is_contiguous() &&
                  u.sizes() == at::IntArrayRef({k.size(2), k.size(3)}),
              "wkv5_cuda: u must be a contiguous float32 [H, N]");
  const c10::cuda::CUDAGuard guard(k.device());
  auto S = state.contiguous().clone();
  auto y = at::empty_like(k);
  check_launch(cuda_wkv5_forward(dtype_code(k, "wkv5_cuda"), k.size(0), k.size(1), k.size(2), k.size(3), r.data_ptr(),
                                 k.data_ptr(), v.data_ptr(), w.data_ptr<float>(), u.data_ptr<float>(), y.data_ptr(),
                                 S.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {y, S};
}

std::vector<at::Tensor> wkv7_forward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                        at::Tensor kk, at::Tensor a, at::Tensor state) {
  check_matrix("wkv7_cuda", {&k, &r, &v, &kk, &a}, w, state);
  const c10::cuda::CUDAGuard guard(k.device());
  auto S = state.contiguous().clone();
  auto y = at::empty_like(k);
  check_launch(cuda_wkv7_forward(dtype_code(k, "wkv7_cuda"), k.size(0), k.size(1), k.size(2), k.size(3), r.data_ptr(),
                                 w.data_ptr<float>(), k.data_ptr(), v.data_ptr(), kk.data_ptr(), a.data_ptr(),
                                 y.data_ptr(), S.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {y, S};
}

std::vector<at::Tensor> wkv_forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v,
                                       at::Tensor aa, at::Tensor bb, at::Tensor pp) {
  check_inputs(w, u, k, v);
  TORCH_CHECK(w.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat, "wkv_cuda: w, u must be float32");
  for (const at::Tensor* s : {&aa, &bb, &pp}) check_state(*s, k);
  const c10::cuda::CUDAGuard guard(k.device());
  const int B = k.size(0), T = k.size(1), C = k.size(2);
  auto aa_out = aa.contiguous().clone();
  auto bb_out = bb.contiguous().clone();
  auto pp_out = pp.contiguous().clone();
  auto y = at::empty_like(v);
  int dtype;
  switch (k.scalar_type()) {
    case at::kFloat: dtype = 0; break;
    case at::kHalf: dtype = 1; break;
    case at::kBFloat16: dtype = 2; break;
    default: TORCH_CHECK(false, "wkv_cuda: k, v must be float32, float16 or bfloat16");
  }
  check_launch(cuda_wkv_forward(dtype, B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(),
                                v.data_ptr(), y.data_ptr(), aa_out.data_ptr<float>(), bb_out.data_ptr<float>(),
                                pp_out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {y, aa_out, bb_out, pp_out};
}

at::Tensor wkv_train_forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v) {
  check_inputs(w, u, k, v);
  TORCH_CHECK(k.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "wkv_cuda: training takes float32");
  const c10::cuda::CUDAGuard guard(k.device());
  auto y = at::empty_like(v), log_d = at::empty_like(v);
  check_launch(cuda_wkv_train_forward(k.size(0), k.size(1), k.size(2), w.data_ptr<float>(), u.data_ptr<float>(),
                                      k.data_ptr<float>(), v.data_ptr<float>(), y.data_ptr<float>(),
                                      log_d.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

std::vector<at::Tensor> wkv_train_backward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v,
                                              at::Tensor y, at::Tensor gy) {
  check_inputs(w, u, k, v);
  TORCH_CHECK(k.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "wkv_cuda: training takes float32");
  TORCH_CHECK(y.sizes() == k.sizes() && gy.sizes() == k.sizes(), "wkv_cuda: y and gy must be [B, T, C]");
  const c10::cuda::CUDAGuard guard(k.device());
  const int B = k.size(0), T = k.size(1), C = k.size(2);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  gy = gy.contiguous();
  y = y.contiguous();
  // Recompute log D_t rather than keep it alive between forward and backward (memory over time).
  auto y_re = at::empty_like(v), log_d = at::empty_like(v);
  check_launch(cuda_wkv_train_forward(B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<float>(),
                                      v.data_ptr<float>(), y_re.data_ptr<float>(), log_d.data_ptr<float>(), stream));
  auto gk = at::empty_like(k), gv = at::empty_like(v);
  auto gw_part = at::empty({B, C}, k.options()), gu_part = at::empty({B, C}, k.options());
  check_launch(cuda_wkv_train_backward(B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<float>(),
                                       v.data_ptr<float>(), y.data_ptr<float>(), log_d.data_ptr<float>(),
                                       gy.data_ptr<float>(), gw_part.data_ptr<float>(), gu_part.data_ptr<float>(),
                                       gk.data_ptr<float>(), gv.data_ptr<float>(), stream));
  return {gw_part.sum(0), gu_part.sum(0), gk, gv};
}

#ifndef RWKV_CUDA_EXTRA_BINDINGS
#define RWKV_CUDA_EXTRA_BINDINGS(m)
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV Playground CUDA kernels: the WKV operators (RWKV-4; RWKV-5/6/7 matrix states)";
  m.def("wkv5_forward", &wkv5_forward, "RWKV-5/6 recurrence, state [B, H, N, N] [key, value] in; (y, state) out");
  m.def("wkv7_forward", &wkv7_forward, "RWKV-7 recurrence, state [B, H, N, N] [value, key] in; (y, state) out");
  m.def("wkv_forward", &wkv_forward, "WKV forward with state in/out (CUDA)");
  m.def("wkv_train_forward", &wkv_train_forward, "WKV training forward from an empty state (CUDA)");
  m.def("wkv_train_backward", &wkv_train_backward, "WKV training backward: (gw, gu, gk, gv) (CUDA)");
  RWKV_CUDA_EXTRA_BINDINGS(m)  // the CPU emulation adds its test hooks here
}
