// The one-token RNN steps on the CPU: the instruction sets, the matrices as the steps read them, the
// matvec (matvec_cpu.cpp) and RWKV-4's step (step_rwkv4.cpp); RWKV-5/6/7's steps: matrix_step.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace rwkv_cpu {

// Which SIMD code runs the matvecs. Chosen at run time from cpuid ("auto"), or forced (tests
// run every variant the machine can execute against the reference).
enum class Isa { kScalar, kAvx2, kAvx512 };
Isa parse_isa(const std::string& name);  // "auto" | "avx512" | "avx2" | "scalar"
const char* isa_name(Isa isa);
std::vector<std::string> available_isas();
// What the CPU offers beyond the ISA levels (cpuid): "avx512_bf16", "amx_bf16", "avx512_vnni", ...
std::vector<std::string> cpu_features();
// Reads every byte of `buffer` once, split over all threads (the benchmark's bandwidth bound:
// what the cores can actually stream). Returns a checksum so the reads cannot be elided.
int64_t stream_read(const at::Tensor& buffer, const std::string& isa);

enum class Storage { kFloat32, kBFloat16, kInt8 };

// A weight matrix [rows, cols] as the step reads it; int8 rows carry one float32 scale each.
struct Matrix {
  Storage storage = Storage::kFloat32;
  const void* data = nullptr;
  const float* scale = nullptr;
  int64_t rows = 0, cols = 0;
};

struct LayerWeights {
  const float *ln1_weight, *ln1_bias, *att_mix_k, *att_mix_v, *att_mix_r, *att_first;
  std::vector<float> att_decay;  // w = -exp(time_decay), computed once here
  Matrix att_key, att_value, att_receptance, att_output;
  const float *ln2_weight, *ln2_bias, *ffn_mix_k, *ffn_mix_r;
  Matrix ffn_key, ffn_receptance, ffn_value;
};

// The model's weights for the step, looked up by their checkpoint names and validated once
// (shape, dtype, device, contiguity), so no positional list crosses the Python/C++ boundary.
// int8 matrices come with "<name>_scale" (float32, one per row: runtime.StoredLinear's buffer).
class StepWeights {
 public:
  StepWeights(const std::map<std::string, at::Tensor>& named, int64_t n_layer, double layer_norm_eps,
              const std::string& isa);
  // Every name the step reads, for a model of n_layer layers (int8 matrices also need "<name>_scale").
  static std::vector<std::string> slot_names(int64_t n_layer);

  int64_t n_layer() const { return static_cast<int64_t>(layers_.size()); }
  int64_t n_embd() const { return n_embd_; }
  std::string isa() const { return isa_name(isa_); }
  std::string storage() const;

  at::Tensor step(const at::Tensor& tokens, const std::vector<at::Tensor>& att_x, const std::vector<at::Tensor>& aa,
                  const std::vector<at::Tensor>& bb, const std::vector<at::Tensor>& pp,
                  const std::vector<at::Tensor>& ffn_x) const;

 private:
  std::vector<at::Tensor> keep_alive_;  // the tensors the raw pointers below point into
  std::vector<LayerWeights> layers_;
  const float *ln0_weight_, *ln0_bias_, *ln_out_weight_, *ln_out_bias_;
  Matrix emb_, head_;
  int64_t n_embd_ = 0, ffn_dim_ = 0, vocab_ = 0;
  float ln_eps_ = 1e-5f;
  Isa isa_ = Isa::kScalar;
};

// RWKV-5 / 6 / 7's one-token steps: matrix_step.h (RWKV5Step, RWKV6Step, RWKV7Step).

// y[b] = W x[b] (x: [K] or [B, K] float32; W: [N, K] float32 / bfloat16 / int8 with scale [N]).
at::Tensor matvec(const at::Tensor& W, const at::Tensor& x, const c10::optional<at::Tensor>& scale,
                  const std::string& isa);

}  // namespace rwkv_cpu
