// RWKV-5.x's one-token step for B sequences (matrix_step.h: what every matrix step shares):
// RWKV-4's lerps of r, k, v (and the gate from 5.1 on), a fixed decay and bonus per channel, the
// matrix recurrence per head, GroupNorm, the gate; the channel mix of RWKV-4. Follows
// rwkv_playground/models/rwkv5.py line by line (the tests hold this step to that module's forward).

#include "matrix_step.h"

namespace rwkv_cpu {

template <>
struct RWKV5Step::Layer : MatrixLayer {
  const float *mix_k, *mix_v, *mix_r, *mix_g = nullptr;  // the token-shift lerps
  std::vector<float> decay, bonus;  // w and u per channel (5.0/5.1's per-head values broadcast)
  bool gated = false;               // 5.1 and 5.2
  Matrix gate;
  const float *ffn_mix_k, *ffn_mix_r;
  Matrix ffn_receptance;
};

// RWKV-5/6, one token, head h: y = r^T (diag(u) k v^T + S); S = k v^T + diag(w) S   (S[key][value])
void wkv5_token(float* S, const float* r, const float* k, const float* v, const float* w, const float* u, float* y,
                int64_t N) {
  for (int64_t i = 0; i < N; ++i) y[i] = 0.f;
  for (int64_t j = 0; j < N; ++j) {
    float* row = S + j * N;
    const float kj = k[j], rj = r[j], ukj = u[j] * k[j], wj = w[j];
    for (int64_t i = 0; i < N; ++i) {
      const float kv = kj * v[i];
      y[i] += rj * (ukj * v[i] + row[i]);
      row[i] = kv + wj * row[i];
    }
  }
}

template <>
RWKV5Step::MatrixStep(const std::map<std::string, at::Tensor>& named, int64_t n_layer, int64_t n_head,
                        int64_t head_size, double layer_norm_eps, double group_norm_eps, const std::string& isa)
    : model_("RWKV5Step", named, n_layer, n_head, head_size, layer_norm_eps, group_norm_eps, isa) {
  const int64_t C = model_.n_embd;
  read_layers(model_, named, layers_, [&](Layer& l, WeightReader& rd, const std::string& p) {
    l.mix_k = rd.vec(p + "att.time_mix_k", C);
    l.mix_v = rd.vec(p + "att.time_mix_v", C);
    l.mix_r = rd.vec(p + "att.time_mix_r", C);
    l.gated = named.count(p + "att.gate.weight") > 0;
    if (l.gated) {
      l.mix_g = rd.vec(p + "att.time_mix_g", C);
      l.gate = rd.mat(p + "att.gate.weight", C, C);
    }
    // "decay_factor" / "bonus": the factors the model computes (exp(-exp(time_decay)), u), passed by
    // the runtime per channel whatever the sub-version stores ([H] or [H, N])
    const float* w = rd.vec(p + "att.decay_factor", C);
    const float* u = rd.vec(p + "att.bonus", C);
    l.decay.assign(w, w + C);
    l.bonus.assign(u, u + C);
    l.ffn_mix_k = rd.vec(p + "ffn.time_mix_k", C);
    l.ffn_mix_r = rd.vec(p + "ffn.time_mix_r", C);
    l.ffn_receptance = rd.mat(p + "ffn.receptance.weight", C, C);
  });
}

template <>
RWKV5Step::~MatrixStep() {}

template <>
at::Tensor RWKV5Step::step(const at::Tensor& tokens, const std::vector<at::Tensor>& att_x,
                           const std::vector<at::Tensor>& wkv_state, const std::vector<at::Tensor>& ffn_x) const {
  MatrixStepRun run(model_, tokens, att_x, wkv_state, ffn_x);
  const int64_t B = run.B, C = run.C, H = run.H, N = run.N;
  if (B == 0) return run.logits;
  auto& MIX = run.MIX;
  auto &XX = run.XX, &R_ = run.R, &K_ = run.K, &V_ = run.V, &G_ = run.G, &Y = run.Y;
  for (int64_t i = 0; i < model_.n_layer; ++i) {
    const Layer& lw = layers_[i];
    // ---- time mixing: MIX = r, k, v, g
    run.time_mix_inputs(i, lw, [&](int64_t b, const float* prev) {
      mix(XX[b], prev, lw.mix_r, MIX[0][b], C);
      mix(XX[b], prev, lw.mix_k, MIX[1][b], C);
      mix(XX[b], prev, lw.mix_v, MIX[2][b], C);
      if (lw.gated) mix(XX[b], prev, lw.mix_g, MIX[3][b], C);
    });
    run.jobs = {job(lw.receptance, B, MIX[0], R_), job(lw.key, B, MIX[1], K_), job(lw.value, B, MIX[2], V_)};
    if (lw.gated) run.jobs.push_back(job(lw.gate, B, MIX[3], G_));
    run_jobs(model_.isa, run.jobs);
    // ---- the recurrence, per row and head; then GroupNorm and the gate
    for_rows(B, [&](int64_t b) {
      float* S = run.state_of(b, i);
      float *rb = R_[b], *kb = K_[b], *vb = V_[b], *yb = Y[b];
      for (int64_t h = 0; h < H; ++h)
        wkv5_token(S + h * N * N, rb + h * N, kb + h * N, vb + h * N, lw.decay.data() + h * N,
                   lw.bonus.data() + h * N, yb + h * N, N);
      head_group_norm(yb, lw.ln_x_weight, lw.ln_x_bias, model_.gn_eps, H, N);
      if (lw.gated)
        for (int64_t c = 0; c < C; ++c) yb[c] *= silu(G_[b][c]);
    });
    // ---- channel mixing: RWKV-4's
    run.output_and_channel_mix(i, lw, &lw.ffn_receptance, [&](int64_t b, const float* prev) {
      mix(XX[b], prev, lw.ffn_mix_k, MIX[1][b], C);
      mix(XX[b], prev, lw.ffn_mix_r, MIX[0][b], C);
    });
  }
  return run.finish();
}

}  // namespace rwkv_cpu
