// RWKV-6's one-token step for B sequences (matrix_step.h: what every matrix step shares): the
// data-dependent token shift (ddlerp: five LoRAs from one mixed input), the data-dependent decay
// (a LoRA), RWKV-5's recurrence per head, GroupNorm, the SiLU gate; a channel mix with receptance.
// Follows rwkv_playground/models/rwkv6.py line by line (the tests hold this step to that module's
// forward).

#include "matrix_step.h"

namespace rwkv_cpu {

template <>
struct RWKV6Step::Layer : MatrixLayer {
  const float *maa_x, *maa[5];      // ddlerp's base mixes, in the LoRAs' order: w, k, v, r, g
  Matrix maa_w1, maa_w2[5];         // [5 D, C] and five [C, D]
  const float* decay_base;          // time_decay [C]
  Matrix decay_w1, decay_w2;        // [Dd, C], [C, Dd]
  std::vector<float> bonus;         // u per channel
  Matrix gate;
  const float *ffn_mix_k, *ffn_mix_r;
  Matrix ffn_receptance;
};

template <>
RWKV6Step::MatrixStep(const std::map<std::string, at::Tensor>& named, int64_t n_layer, int64_t n_head,
                        int64_t head_size, double layer_norm_eps, double group_norm_eps, const std::string& isa)
    : model_("RWKV6Step", named, n_layer, n_head, head_size, layer_norm_eps, group_norm_eps, isa) {
  const int64_t C = model_.n_embd;
  read_layers(model_, named, layers_, [&](Layer& l, WeightReader& rd, const std::string& p) {
    l.maa_x = rd.vec(p + "att.time_maa_x", C);
    const char* names[5] = {"w", "k", "v", "r", "g"};
    for (int m = 0; m < 5; ++m) l.maa[m] = rd.vec(p + "att.time_maa_" + names[m], C);
    const at::Tensor& w1 = rd.get(p + "att.time_maa_w1");
    TORCH_CHECK(w1.dim() == 2 && w1.size(0) % 5 == 0, "RWKV6Step: time_maa_w1 must be [5 D, C]");
    const int64_t D = w1.size(0) / 5;
    l.maa_w1 = rd.mat(p + "att.time_maa_w1", 5 * D, C);
    const at::Tensor& w2 = rd.get(p + "att.time_maa_w2");
    TORCH_CHECK(w2.dim() == 3 && w2.size(0) == 5 && w2.size(1) == C && w2.size(2) == D && w2.is_contiguous() &&
                    w2.scalar_type() == at::kFloat,
                "RWKV6Step: time_maa_w2 must be a contiguous float32 [5, C, D]");
    for (int m = 0; m < 5; ++m) l.maa_w2[m] = rd.mat(w2[m], p + "att.time_maa_w2", C, D);
    l.decay_base = rd.vec(p + "att.time_decay", C);
    const at::Tensor& d1 = rd.get(p + "att.time_decay_w1");
    TORCH_CHECK(d1.dim() == 2, "RWKV6Step: time_decay_w1 must be 2-D");
    l.decay_w1 = rd.mat(p + "att.time_decay_w1", d1.size(0), C);
    l.decay_w2 = rd.mat(p + "att.time_decay_w2", C, d1.size(0));
    const float* u = rd.vec(p + "att.time_faaaa", C);
    l.bonus.assign(u, u + C);
    l.gate = rd.mat(p + "att.gate.weight", C, C);
    l.ffn_mix_k = rd.vec(p + "ffn.time_maa_k", C);
    l.ffn_mix_r = rd.vec(p + "ffn.time_maa_r", C);
    l.ffn_receptance = rd.mat(p + "ffn.receptance.weight", C, C);
  });
}

template <>
RWKV6Step::~MatrixStep() {}

template <>
at::Tensor RWKV6Step::step(const at::Tensor& tokens, const std::vector<at::Tensor>& att_x,
                           const std::vector<at::Tensor>& wkv_state, const std::vector<at::Tensor>& ffn_x) const {
  MatrixStepRun run(model_, tokens, att_x, wkv_state, ffn_x);
  const int64_t B = run.B, C = run.C, H = run.H, N = run.N;
  if (B == 0) return run.logits;
  auto& MIX = run.MIX;
  auto &XX = run.XX, &D_ = run.D, &R_ = run.R, &K_ = run.K, &V_ = run.V, &G_ = run.G, &Y = run.Y;
  int64_t lora_max = 1;
  for (const Layer& l : layers_) lora_max = std::max({lora_max, l.maa_w1.rows, l.decay_w1.rows});
  auto L1 = run.scratch(0, lora_max), L2 = run.scratch(1, lora_max), W_ = run.scratch(2, C);
  std::vector<std::vector<float*>> M5(5);
  for (int m = 0; m < 5; ++m) M5[m] = run.scratch(3 + m, C);
  for (int64_t i = 0; i < model_.n_layer; ++i) {
    const Layer& lw = layers_[i];
    // ---- time mixing: ddlerp. xxx = x + d maa_x; m = tanh(xxx W1) W2 (five LoRAs);
    // x_* = x + d (maa_* + m_*), into MIX = r, k, v, g, w
    run.time_mix_inputs(i, lw, [&](int64_t b, const float*) {
      for (int64_t c = 0; c < C; ++c) MIX[5][b][c] = XX[b][c] + D_[b][c] * lw.maa_x[c];
    });
    const int64_t D5 = lw.maa_w1.rows, D = D5 / 5;
    run.jobs = {job(lw.maa_w1, B, MIX[5], L1)};
    run_jobs(model_.isa, run.jobs);
    for_rows(B, [&](int64_t b) {
      for (int64_t j = 0; j < D5; ++j) L1[b][j] = std::tanh(L1[b][j]);
    });
    run.jobs.clear();
    std::vector<std::vector<float*>> parts(5, std::vector<float*>(B));
    for (int m = 0; m < 5; ++m) {
      for (int64_t b = 0; b < B; ++b) parts[m][b] = L1[b] + m * D;
      run.jobs.push_back(job(lw.maa_w2[m], B, parts[m], M5[m]));
    }
    run_jobs(model_.isa, run.jobs);
    const int slot[5] = {4, 1, 2, 0, 3};  // the LoRAs' order (w, k, v, r, g) -> MIX's (r, k, v, g, w)
    for_rows(B, [&](int64_t b) {
      for (int m = 0; m < 5; ++m)
        for (int64_t c = 0; c < C; ++c) MIX[slot[m]][b][c] = XX[b][c] + D_[b][c] * (lw.maa[m][c] + M5[m][b][c]);
    });
    run.jobs = {job(lw.receptance, B, MIX[0], R_), job(lw.key, B, MIX[1], K_), job(lw.value, B, MIX[2], V_),
                job(lw.gate, B, MIX[3], G_), job(lw.decay_w1, B, MIX[4], L2)};
    run_jobs(model_.isa, run.jobs);
    // the decay: w = exp(-exp(time_decay + tanh(x_w Dw1) Dw2))
    const int64_t Dd = lw.decay_w1.rows;
    for_rows(B, [&](int64_t b) {
      for (int64_t j = 0; j < Dd; ++j) L2[b][j] = std::tanh(L2[b][j]);
    });
    run.jobs = {job(lw.decay_w2, B, L2, W_)};
    run_jobs(model_.isa, run.jobs);
    for_rows(B, [&](int64_t b) {
      for (int64_t c = 0; c < C; ++c) W_[b][c] = std::exp(-std::exp(lw.decay_base[c] + W_[b][c]));
    });
    // ---- the recurrence, per row and head; then GroupNorm and the gate
    for_rows(B, [&](int64_t b) {
      float* S = run.state_of(b, i);
      float *rb = R_[b], *kb = K_[b], *vb = V_[b], *yb = Y[b], *wb = W_[b];
      for (int64_t h = 0; h < H; ++h)
        wkv5_token(S + h * N * N, rb + h * N, kb + h * N, vb + h * N, wb + h * N, lw.bonus.data() + h * N,
                   yb + h * N, N);
      head_group_norm(yb, lw.ln_x_weight, lw.ln_x_bias, model_.gn_eps, H, N);
      for (int64_t c = 0; c < C; ++c) yb[c] *= silu(G_[b][c]);
    });
    // ---- channel mixing: its own lerps, a receptance
    run.output_and_channel_mix(i, lw, &lw.ffn_receptance, [&](int64_t b, const float* prev) {
      for (int64_t c = 0; c < C; ++c) {
        const float dd = prev[c] - XX[b][c];
        MIX[1][b][c] = XX[b][c] + dd * lw.ffn_mix_k[c];
        MIX[0][b][c] = XX[b][c] + dd * lw.ffn_mix_r[c];
      }
    });
  }
  return run.finish();
}

}  // namespace rwkv_cpu
