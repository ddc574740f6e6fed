// What every RWKV-5/6/7 step shares: the weights besides the layers' own math (the embedding, LN0,
// LN_out, the head; per layer the LayerNorms, the GroupNorm, r / k / v / output and the channel
// mix's key / value), the checks on the states, the work rows of one call, and the order of a
// layer: the time mix's inputs, the architecture's products and recurrence, the output
// projection, the channel mix. Each architecture's file (step_rwkv5.cpp, step_rwkv6.cpp,
// step_rwkv7.cpp) reads its own weights and writes its own math between these, following
// rwkv_playground/models/rwkv5.py, rwkv6.py, rwkv7.py line by line.
#pragma once

#include "step_common.h"

namespace rwkv_cpu {

constexpr int64_t kMaxHeadSize = 512;  // a per-head scratch row lives on the stack

// The weights every matrix model has besides its layers, and its shapes.
struct MatrixModel {
  MatrixModel(const char* owner, const std::map<std::string, at::Tensor>& named, int64_t n_layer, int64_t n_head,
              int64_t head_size, double layer_norm_eps, double group_norm_eps, const std::string& isa);
  WeightReader reader(const std::map<std::string, at::Tensor>& named) { return {owner, named, keep_alive}; }

  const char* owner;
  std::vector<at::Tensor> keep_alive;  // the tensors the raw pointers point into
  const float *ln0_weight, *ln0_bias, *ln_out_weight, *ln_out_bias;
  Matrix emb, head;
  Storage storage;  // of the layers' matrices (what `storage` reports)
  int64_t n_layer, n_embd, ffn_dim, vocab, n_head, head_size;
  float ln_eps, gn_eps;
  Isa isa;
};

// What every layer of a matrix model holds.
struct MatrixLayer {
  void read(WeightReader& rd, const std::string& p, int64_t C, int64_t F);
  const float *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias, *ln_x_weight, *ln_x_bias;
  Matrix receptance, key, value, output, ffn_key, ffn_value;
};

// Reads every layer: what all matrix models hold (MatrixLayer::read), then read_own(layer, reader,
// "blocks.{i}.") for the architecture's own weights.
template <typename Layer, typename ReadOwn>
void read_layers(MatrixModel& model, const std::map<std::string, at::Tensor>& named, std::vector<Layer>& layers,
                 const ReadOwn& read_own) {
  WeightReader rd = model.reader(named);
  layers.resize(model.n_layer);
  for (int64_t i = 0; i < model.n_layer; ++i) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    layers[i].read(rd, p, model.n_embd, model.ffn_dim);
    read_own(layers[i], rd, p);
  }
}

// RWKV-5/6's recurrence, one token of one head: y = r^T (diag(u) k v^T + S); S = k v^T + diag(w) S
// (S[key][value]); defined in step_rwkv5.cpp, used by RWKV-6 too.
void wkv5_token(float* S, const float* r, const float* k, const float* v, const float* w, const float* u, float* y,
                int64_t N);

// One call of a matrix step: the inputs checked, the rows of the work buffers ([B] pointers into
// [B, width] buffers kept per thread between calls), the logits.
class MatrixStepRun {
 public:
  MatrixStepRun(const MatrixModel& model, const at::Tensor& tokens, const std::vector<at::Tensor>& att_x,
                const std::vector<at::Tensor>& wkv_state, const std::vector<at::Tensor>& ffn_x);

  // LN1 of the residual stream into XX, D = the previous token's LN1 output - XX, then mix(b, prev)
  // makes the architecture's inputs of row b, then the token shift keeps XX.
  template <typename Mix>
  void time_mix_inputs(int64_t layer, const MatrixLayer& lw, const Mix& mix_row) {
    for_rows(B, [&](int64_t b) {
      float* prev = att_x[b].data_ptr<float>() + layer * C;
      layer_norm(X[b], lw.ln1_weight, lw.ln1_bias, model.ln_eps, XX[b], C);
      for (int64_t c = 0; c < C; ++c) D[b][c] = prev[c] - XX[b][c];
      mix_row(b, prev);
      std::copy_n(XX[b], C, prev);
    });
  }

  // OUT = output Y (the time mix's result), then the residual stream takes it and the channel
  // mix runs: LN2, mix(b, prev) makes MIX[1] (key's input) and MIX[0] (receptance's), the products,
  // and X += sigmoid(R) * OUT with a receptance (RWKV-5/6), X += OUT without (RWKV-7).
  template <typename Mix>
  void output_and_channel_mix(int64_t layer, const MatrixLayer& lw, const Matrix* ffn_receptance, const Mix& mix_row) {
    jobs = {job(lw.output, B, Y, OUT)};
    run_jobs(model.isa, jobs);
    for_rows(B, [&](int64_t b) {
      float* xb = X[b];
      for (int64_t c = 0; c < C; ++c) xb[c] += OUT[b][c];
      float* prev = ffn_x[b].data_ptr<float>() + layer * C;
      layer_norm(xb, lw.ln2_weight, lw.ln2_bias, model.ln_eps, XX[b], C);
      mix_row(b, prev);
      std::copy_n(XX[b], C, prev);
    });
    squared_relu_ffn(model.isa, B, F, lw.ffn_key, lw.ffn_value, ffn_receptance, MIX[1], MIX[0], R, FK, OUT);
    for_rows(B, [&](int64_t b) {
      float* xb = X[b];
      if (ffn_receptance == nullptr) {
        for (int64_t c = 0; c < C; ++c) xb[c] += OUT[b][c];
      } else {
        for (int64_t c = 0; c < C; ++c) xb[c] += sigmoid(R[b][c]) * OUT[b][c];
      }
    });
  }

  float* state_of(int64_t b, int64_t layer) const { return wkv_state[b].data_ptr<float>() + layer * H * N * N; }
  // [B] rows of `width` floats from the thread's pool (slot: which buffer; kept between calls)
  std::vector<float*> scratch(int slot, int64_t width);
  // LN_out and the head: the logits [B, V]
  at::Tensor finish();

  const MatrixModel& model;
  const std::vector<at::Tensor>& att_x;
  const std::vector<at::Tensor>& wkv_state;
  const std::vector<at::Tensor>& ffn_x;
  const int64_t B, C, F, H, N;
  at::Tensor logits;
  std::vector<float*> X, XX, D, R, K, V, G, Y, OUT, FK;
  std::vector<std::vector<float*>> MIX;  // six [B, C] inputs: the architecture's mixes
  std::vector<MatvecJob> jobs;
};

// One matrix-state architecture's step, by checkpoint name. The weights: as for StepWeights; the
// LoRA matrices (used as `x @ W`, stored [in, out]) are passed transposed, [out, in], so every
// product is a row-streaming matvec: v6 "att.time_maa_w1" [5 D, C], "att.time_maa_w2" [5, C, D],
// "att.time_decay_w1" [D, C], "att.time_decay_w2" [C, D]; v7 "att.w1" [Dw, C], "att.w2" [C, Dw],
// and likewise a, v, g. The state per sequence: att_x [L, C], wkv_state [L, H, N, N] (v5/v6
// [key, value], v7 [value, key]), ffn_x [L, C], all float32, advanced in place. Each
// architecture's file defines its Layer (its own weights), the constructor and the step.
template <typename Architecture>
class MatrixStep {
 public:
  MatrixStep(const std::map<std::string, at::Tensor>& named, int64_t n_layer, int64_t n_head, int64_t head_size,
             double layer_norm_eps, double group_norm_eps, const std::string& isa);
  ~MatrixStep();
  std::string isa() const { return isa_name(model_.isa); }
  std::string storage() const { return storage_name(model_.storage); }
  at::Tensor step(const at::Tensor& tokens, const std::vector<at::Tensor>& att_x,
                  const std::vector<at::Tensor>& wkv_state, const std::vector<at::Tensor>& ffn_x) const;

 private:
  struct Layer;
  MatrixModel model_;
  std::vector<Layer> layers_;
};

struct RWKV5 {};  // step_rwkv5.cpp
struct RWKV6 {};  // step_rwkv6.cpp
struct RWKV7 {};  // step_rwkv7.cpp

// what each architecture's file defines
#define RWKV_MATRIX_STEP_DEFINED_IN_ITS_FILE(A)                                                             \
  template <>                                                                                               \
  MatrixStep<A>::MatrixStep(const std::map<std::string, at::Tensor>&, int64_t, int64_t, int64_t, double,    \
                            double, const std::string&);                                                    \
  template <>                                                                                               \
  MatrixStep<A>::~MatrixStep();                                                                             \
  template <>                                                                                               \
  at::Tensor MatrixStep<A>::step(const at::Tensor&, const std::vector<at::Tensor>&,                         \
                                 const std::vector<at::Tensor>&, const std::vector<at::Tensor>&) const;
RWKV_MATRIX_STEP_DEFINED_IN_ITS_FILE(RWKV5)
RWKV_MATRIX_STEP_DEFINED_IN_ITS_FILE(RWKV6)
RWKV_MATRIX_STEP_DEFINED_IN_ITS_FILE(RWKV7)
#undef RWKV_MATRIX_STEP_DEFINED_IN_ITS_FILE
using RWKV5Step = MatrixStep<RWKV5>;
using RWKV6Step = MatrixStep<RWKV6>;
using RWKV7Step = MatrixStep<RWKV7>;

}  // namespace rwkv_cpu
