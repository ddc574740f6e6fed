// RWKV-7's one-token step for B sequences (matrix_step.h: what every matrix step shares): six
// static lerps, the decay / in-context rate / gate / value-residual LoRAs, the removal key, the
// generalised delta rule per head, GroupNorm plus the r_k bonus, the gate; a channel mix without
// receptance. Follows rwkv_playground/models/rwkv7.py line by line (the tests hold this step to that
// module's forward).

#include "matrix_step.h"

namespace rwkv_cpu {

template <>
struct RWKV7Step::Layer : MatrixLayer {
  const float* x_[6];  // the lerps of r, w, k, v, a, g
  const float *w0, *a0, *v0, *k_k, *k_a, *r_k;
  Matrix w1, w2, a1, a2, v1, v2, g1, g2;  // LoRAs, [D, C] and [C, D] (layer 0's v LoRA is not used)
  const float* ffn_x_k;
};

namespace {

// RWKV-7, one token, head h: S = S diag(w) - (S kk)(kk a)^T + v k^T; y = S r      (S[value][key])
void wkv7_token(float* S, const float* r, const float* w, const float* k, const float* v, const float* kk,
                const float* a, float* y, int64_t N, float* kka) {
  for (int64_t j = 0; j < N; ++j) kka[j] = kk[j] * a[j];
  for (int64_t i = 0; i < N; ++i) {
    float* row = S + i * N;
    float removed = 0.f;
    for (int64_t j = 0; j < N; ++j) removed += row[j] * kk[j];
    const float vi = v[i];
    float yi = 0.f;
    for (int64_t j = 0; j < N; ++j) {
      row[j] = row[j] * w[j] - removed * kka[j] + vi * k[j];
      yi += row[j] * r[j];
    }
    y[i] = yi;
  }
}

}  // namespace

template <>
RWKV7Step::MatrixStep(const std::map<std::string, at::Tensor>& named, int64_t n_layer, int64_t n_head,
                        int64_t head_size, double layer_norm_eps, double group_norm_eps, const std::string& isa)
    : model_("RWKV7Step", named, n_layer, n_head, head_size, layer_norm_eps, group_norm_eps, isa) {
  const int64_t C = model_.n_embd;
  read_layers(model_, named, layers_, [&](Layer& l, WeightReader& rd, const std::string& p) {
    const char* lerps[6] = {"r", "w", "k", "v", "a", "g"};
    for (int m = 0; m < 6; ++m) l.x_[m] = rd.vec(p + "att.x_" + lerps[m], C);
    l.w0 = rd.vec(p + "att.w0", C);
    l.a0 = rd.vec(p + "att.a0", C);
    l.v0 = rd.vec(p + "att.v0", C);
    l.k_k = rd.vec(p + "att.k_k", C);
    l.k_a = rd.vec(p + "att.k_a", C);
    l.r_k = rd.vec(p + "att.r_k", C);
    auto lora = [&](const char* name, Matrix& first, Matrix& second) {
      const at::Tensor& t = rd.get(p + "att." + name + "1");
      TORCH_CHECK(t.dim() == 2, "RWKV7Step: ", p, "att.", name, "1 must be 2-D");
      first = rd.mat(p + "att." + name + "1", t.size(0), C);
      second = rd.mat(p + "att." + name + "2", C, t.size(0));
    };
    lora("w", l.w1, l.w2);
    lora("a", l.a1, l.a2);
    lora("v", l.v1, l.v2);
    lora("g", l.g1, l.g2);
    l.ffn_x_k = rd.vec(p + "ffn.x_k", C);
  });
}

template <>
RWKV7Step::~MatrixStep() {}

template <>
at::Tensor RWKV7Step::step(const at::Tensor& tokens, const std::vector<at::Tensor>& att_x,
                           const std::vector<at::Tensor>& wkv_state, const std::vector<at::Tensor>& ffn_x) const {
  MatrixStepRun run(model_, tokens, att_x, wkv_state, ffn_x);
  const int64_t B = run.B, C = run.C, H = run.H, N = run.N;
  if (B == 0) return run.logits;
  auto& MIX = run.MIX;
  auto &XX = run.XX, &D_ = run.D, &R_ = run.R, &K_ = run.K, &V_ = run.V, &G_ = run.G, &Y = run.Y;
  auto& OUT = run.OUT;
  int64_t lora_max = 1;
  for (const Layer& l : layers_) lora_max = std::max({lora_max, l.w1.rows, l.a1.rows, l.v1.rows, l.g1.rows});
  auto L1 = run.scratch(0, lora_max), L2 = run.scratch(1, lora_max), L3 = run.scratch(2, lora_max),
       L4 = run.scratch(3, lora_max);
  auto W_ = run.scratch(4, C), A_ = run.scratch(5, C), KK = run.scratch(6, C), VF = run.scratch(7, C);
  for (int64_t i = 0; i < model_.n_layer; ++i) {
    const Layer& lw = layers_[i];
    // ---- time mixing: MIX = x + d x_* for r, w, k, v, a, g
    run.time_mix_inputs(i, lw, [&](int64_t b, const float*) {
      for (int m = 0; m < 6; ++m)
        for (int64_t c = 0; c < C; ++c) MIX[m][b][c] = XX[b][c] + D_[b][c] * lw.x_[m][c];
    });
    run.jobs = {job(lw.receptance, B, MIX[0], R_), job(lw.key, B, MIX[2], K_), job(lw.value, B, MIX[3], V_),
                job(lw.w1, B, MIX[1], L1), job(lw.a1, B, MIX[4], L2), job(lw.g1, B, MIX[5], L3)};
    if (i > 0) run.jobs.push_back(job(lw.v1, B, MIX[3], L4));
    run_jobs(model_.isa, run.jobs);
    for_rows(B, [&](int64_t b) {
      for (int64_t j = 0; j < lw.w1.rows; ++j) L1[b][j] = std::tanh(L1[b][j]);
      for (int64_t j = 0; j < lw.g1.rows; ++j) L3[b][j] = sigmoid(L3[b][j]);
    });
    run.jobs = {job(lw.w2, B, L1, W_), job(lw.a2, B, L2, A_), job(lw.g2, B, L3, G_)};
    if (i > 0) run.jobs.push_back(job(lw.v2, B, L4, OUT));
    run_jobs(model_.isa, run.jobs);
    // ---- the recurrence, per row and head; then GroupNorm, the r_k bonus, the gate
    for_rows(B, [&](int64_t b) {
      float* S = run.state_of(b, i);
      float *rb = R_[b], *kb = K_[b], *vb = V_[b], *yb = Y[b];
      float *wb = W_[b], *ab = A_[b], *kkb = KK[b];
      for (int64_t c = 0; c < C; ++c) {
        wb[c] = std::exp(-0.606531f * sigmoid(lw.w0[c] + wb[c]));
        ab[c] = sigmoid(lw.a0[c] + ab[c]);
        kkb[c] = kb[c] * lw.k_k[c];
      }
      for (int64_t h = 0; h < H; ++h) {  // F.normalize: x / max(||x||, 1e-12)
        double sq = 0.0;
        for (int64_t j = 0; j < N; ++j) sq += static_cast<double>(kkb[h * N + j]) * kkb[h * N + j];
        const float norm = std::max(static_cast<float>(std::sqrt(sq)), 1e-12f);
        for (int64_t j = 0; j < N; ++j) kkb[h * N + j] /= norm;
      }
      for (int64_t c = 0; c < C; ++c) kb[c] = kb[c] * (1.f + (ab[c] - 1.f) * lw.k_a[c]);
      if (i == 0) {
        std::copy_n(vb, C, VF[b]);
      } else {
        for (int64_t c = 0; c < C; ++c) vb[c] = vb[c] + (VF[b][c] - vb[c]) * sigmoid(lw.v0[c] + OUT[b][c]);
      }
      float kka[kMaxHeadSize];
      for (int64_t h = 0; h < H; ++h)
        wkv7_token(S + h * N * N, rb + h * N, wb + h * N, kb + h * N, vb + h * N, kkb + h * N, ab + h * N,
                   yb + h * N, N, kka);
      head_group_norm(yb, lw.ln_x_weight, lw.ln_x_bias, model_.gn_eps, H, N);
      for (int64_t h = 0; h < H; ++h) {
        float bonus = 0.f;
        for (int64_t j = 0; j < N; ++j) bonus += rb[h * N + j] * kb[h * N + j] * lw.r_k[h * N + j];
        for (int64_t j = 0; j < N; ++j) yb[h * N + j] += bonus * vb[h * N + j];
      }
      for (int64_t c = 0; c < C; ++c) yb[c] *= G_[b][c];
    });
    // ---- channel mixing: one lerp, no receptance
    run.output_and_channel_mix(i, lw, nullptr, [&](int64_t b, const float* prev) {
      for (int64_t c = 0; c < C; ++c) MIX[1][b][c] = XX[b][c] + (prev[c] - XX[b][c]) * lw.ffn_x_k[c];
    });
  }
  return run.finish();
}

}  // namespace rwkv_cpu
