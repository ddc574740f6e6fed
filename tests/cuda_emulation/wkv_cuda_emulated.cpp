// kernels/wkv_cuda.cu, kernels/wkv_matrix_cuda.cu and their binding kernels/wkv_cuda.cpp, compiled
// as host C++ for the tests
// (cuda_shim.h runs every block and thread on the host; include/c10/cuda stands in for the
// device guard and stream). Built by tests/cuda_emulation/build.py with the kernels' folder on
// the include path, so a mutated copy of the sources can be built the same way.
//
// Test hooks, added to the binding's module: the block order, launch counts, and the host entry
// points run on buffers with guard zones: every output element must be written, nothing outside
// the arrays may be, and the inputs must be left as they were.
#include "cuda_shim.h"

#include <ATen/core/Tensor.h>  // not torch/extension.h: ~30 s of compile time for nothing used here
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <cstring>
#include <string>
#include <vector>

// libcudart is not linked in the emulation: the one function of it the binding calls.
const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error";
  }
}

#include "wkv_cuda.cu"
#include "wkv_matrix_cuda.cu"

namespace emulation_hooks {

constexpr size_t kGuard = 64;  // elements before and after every array
constexpr unsigned char kGuardByte = 0xA5;
constexpr unsigned char kUnwritten = 0xFF;  // an all-ones element is a NaN in fp32, fp16 and bf16

// One array in the middle of a guard zone; an input is copied in, an output starts "unwritten".
struct Guarded {
  std::string name;
  size_t elem, count;
  bool output;
  std::vector<unsigned char> bytes, original;

  Guarded(std::string name_, const at::Tensor& like, bool output_)
      : name(std::move(name_)), elem(like.element_size()), count(like.numel()), output(output_) {
    bytes.assign((count + 2 * kGuard) * elem, kGuardByte);
    unsigned char* payload = bytes.data() + kGuard * elem;
    if (output) {
      std::memset(payload, kUnwritten, count * elem);
    } else if (count > 0) {  // (an empty tensor's data pointer may be null)
      const at::Tensor c = like.contiguous();
      std::memcpy(payload, c.data_ptr(), count * elem);
      original.assign(payload, payload + count * elem);
    }
  }
  void* data() { return bytes.data() + kGuard * elem; }

  void check() const {
    const unsigned char* p = bytes.data();
    for (size_t i = 0; i < kGuard * elem; ++i) {
      TORCH_CHECK(p[i] == kGuardByte, "emulated CUDA: a kernel wrote before the start of ", name);
      TORCH_CHECK(p[(kGuard + count) * elem + i] == kGuardByte, "emulated CUDA: a kernel wrote past the end of ", name);
    }
    const unsigned char* payload = p + kGuard * elem;
    if (!output) {
      TORCH_CHECK(count == 0 || std::memcmp(payload, original.data(), count * elem) == 0, "emulated CUDA: input ", name,
                  " was modified");
      return;
    }
    for (size_t i = 0; i < count; ++i) {
      bool unwritten = true;
      for (size_t b = 0; b < elem; ++b) unwritten = unwritten && payload[i * elem + b] == kUnwritten;
      TORCH_CHECK(!unwritten, "emulated CUDA: element ", i, " of ", name, " was never written");
    }
  }
  at::Tensor tensor(const at::Tensor& like) {
    auto out = at::empty_like(like, at::MemoryFormat::Contiguous);
    if (count > 0) std::memcpy(out.data_ptr(), data(), count * elem);
    return out;
  }
};

void launched(cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "emulated CUDA: the launch failed: ", cudaGetErrorString(error));
}

std::vector<at::Tensor> guarded_forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v,
                                           at::Tensor aa, at::Tensor bb, at::Tensor pp) {
  const int B = k.size(0), T = k.size(1), C = k.size(2);
  const int dtype = k.scalar_type() == at::kFloat ? 0 : k.scalar_type() == at::kHalf ? 1 : 2;
  Guarded gw("w", w, false), gu("u", u, false), gk("k", k, false), gv("v", v, false), gy("y", v, true);
  // the state is read and written in place: its guard zones and its "every element written"
  // check come from outputs that start as copies of the inputs
  Guarded ga("aa", aa, false), gb("bb", bb, false), gp("pp", pp, false);
  launched(cuda_wkv_forward(dtype, B, T, C, static_cast<float*>(gw.data()), static_cast<float*>(gu.data()),
                            gk.data(), gv.data(), gy.data(), static_cast<float*>(ga.data()),
                            static_cast<float*>(gb.data()), static_cast<float*>(gp.data()), nullptr));
  for (const Guarded* g : {&gw, &gu, &gk, &gv, &gy}) g->check();
  for (Guarded* g : {&ga, &gb, &gp}) {  // in/out: only the guard zones can be checked here
    g->output = true;
    g->original.clear();
    for (size_t i = 0; i < kGuard * g->elem; ++i) {
      TORCH_CHECK(g->bytes[i] == kGuardByte && g->bytes[(kGuard + g->count) * g->elem + i] == kGuardByte,
                  "emulated CUDA: a kernel wrote outside ", g->name);
    }
  }
  return {gy.tensor(v), ga.tensor(aa), gb.tensor(bb), gp.tensor(pp)};
}

std::vector<at::Tensor> guarded_train(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v,
                                         at::Tensor gy) {
  const int B = k.size(0), T = k.size(1), C = k.size(2);
  Guarded gw("w", w, false), gu("u", u, false), gk("k", k, false), gv("v", v, false), ggy("gy", gy, false);
  Guarded y("y", v, true), log_d("log_d", v, true);
  launched(cuda_wkv_train_forward(B, T, C, static_cast<float*>(gw.data()), static_cast<float*>(gu.data()),
                                  static_cast<float*>(gk.data()), static_cast<float*>(gv.data()),
                                  static_cast<float*>(y.data()), static_cast<float*>(log_d.data()), nullptr));
  y.check();
  log_d.check();
  auto part = at::empty({B, C}, k.options());
  Guarded gw_part("gw_part", part, true), gu_part("gu_part", part, true), gk_out("gk", k, true), gv_out("gv", v, true);
  launched(cuda_wkv_train_backward(B, T, C, static_cast<float*>(gw.data()), static_cast<float*>(gu.data()),
                                   static_cast<float*>(gk.data()), static_cast<float*>(gv.data()),
                                   static_cast<float*>(y.data()), static_cast<float*>(log_d.data()),
                                   static_cast<float*>(ggy.data()), static_cast<float*>(gw_part.data()),
                                   static_cast<float*>(gu_part.data()), static_cast<float*>(gk_out.data()),
                                   static_cast<float*>(gv_out.data()), nullptr));
  for (const Guarded* g : {&gw, &gu, &gk, &gv, &ggy, &gw_part, &gu_part, &gk_out, &gv_out}) g->check();
  return {y.tensor(v), gw_part.tensor(part).sum(0), gu_part.tensor(part).sum(0), gk_out.tensor(k), gv_out.tensor(v)};
}

// An in/out array: only its guard zones can be checked (its payload starts as the input's copy).
void check_guards_only(const Guarded& g) {
  for (size_t i = 0; i < kGuard * g.elem; ++i) {
    TORCH_CHECK(g.bytes[i] == kGuardByte && g.bytes[(kGuard + g.count) * g.elem + i] == kGuardByte,
                "emulated CUDA: a kernel wrote outside ", g.name);
  }
}

int dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? 0 : t.scalar_type() == at::kHalf ? 1 : 2;
}

std::vector<at::Tensor> guarded_wkv5(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor w,
                                        at::Tensor u, at::Tensor state) {
  const int B = k.size(0), T = k.size(1), H = k.size(2), N = k.size(3);
  Guarded gr("r", r, false), gk("k", k, false), gv("v", v, false), gw("w", w, false), gu("u", u, false);
  Guarded gy("y", k, true), gs("state", state, false);
  launched(cuda_wkv5_forward(dtype_of(k), B, T, H, N, gr.data(), gk.data(), gv.data(), static_cast<float*>(gw.data()),
                             static_cast<float*>(gu.data()), gy.data(), static_cast<float*>(gs.data()), nullptr));
  for (const Guarded* g : {&gr, &gk, &gv, &gw, &gu}) g->check();
  if (T > 0) gy.check();
  check_guards_only(gs);
  return {gy.tensor(k), gs.tensor(state)};
}

std::vector<at::Tensor> guarded_wkv7(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                        at::Tensor kk, at::Tensor a, at::Tensor state) {
  const int B = k.size(0), T = k.size(1), H = k.size(2), N = k.size(3);
  Guarded gr("r", r, false), gw("w", w, false), gk("k", k, false), gv("v", v, false), gkk("kk", kk, false),
      ga("a", a, false);
  Guarded gy("y", k, true), gs("state", state, false);
  launched(cuda_wkv7_forward(dtype_of(k), B, T, H, N, gr.data(), static_cast<float*>(gw.data()), gk.data(), gv.data(),
                             gkk.data(), ga.data(), gy.data(), static_cast<float*>(gs.data()), nullptr));
  for (const Guarded* g : {&gr, &gw, &gk, &gv, &gkk, &ga}) g->check();
  if (T > 0) gy.check();
  check_guards_only(gs);
  return {gy.tensor(k), gs.tensor(state)};
}

void set_block_order(int order, unsigned seed) {
  cuda_emulation::block_order = order;
  cuda_emulation::shuffle_seed = seed;
}

std::vector<int64_t> launch_counts() {
  return {static_cast<int64_t>(cuda_emulation::launches), static_cast<int64_t>(cuda_emulation::threads_run)};
}

void bind(pybind11::module_& m) {
  m.def("guarded_forward", &guarded_forward);
  m.def("guarded_train", &guarded_train);
  m.def("guarded_wkv5", &guarded_wkv5);
  m.def("guarded_wkv7", &guarded_wkv7);
  m.def("set_block_order", &set_block_order, "0: in order, 1: reversed, 2: shuffled with the seed");
  m.def("launch_counts", &launch_counts, "(launches, threads run) so far");
}

}  // namespace emulation_hooks

#define RWKV_CUDA_EXTRA_BINDINGS(m) emulation_hooks::bind(m);
#include "wkv_cuda.cpp"
