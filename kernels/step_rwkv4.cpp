// RWKV-4's one-token step for B sequences: every layer, then the head (step_common.h: the
// matvecs and what every step shares). Follows rwkv_playground/models/rwkv4.py line by line; the
// tests hold it to that module's forward, bit for bit across batch sizes.

#include "step_common.h"

namespace rwkv_cpu {

// ---- named weights ----------------------------------------------------------------------------

StepWeights::StepWeights(const std::map<std::string, at::Tensor>& named, int64_t n_layer, double layer_norm_eps,
                         const std::string& isa)
    : ln_eps_(static_cast<float>(layer_norm_eps)), isa_(parse_isa(isa)) {
  WeightReader rd{"StepWeights", named, keep_alive_};
  TORCH_CHECK(n_layer >= 1, "StepWeights: n_layer must be at least 1");
  auto emb = named.find("emb.weight");
  auto ffn = named.find("blocks.0.ffn.key.weight");
  TORCH_CHECK(emb != named.end() && emb->second.dim() == 2, "StepWeights: missing 'emb.weight'");
  TORCH_CHECK(ffn != named.end() && ffn->second.dim() == 2, "StepWeights: missing 'blocks.0.ffn.key.weight'");
  vocab_ = emb->second.size(0);
  n_embd_ = emb->second.size(1);
  ffn_dim_ = ffn->second.size(0);
  const int64_t C = n_embd_, F = ffn_dim_;
  emb_ = rd.mat("emb.weight", vocab_, C);
  TORCH_CHECK(emb_.storage != Storage::kInt8, "StepWeights: the embedding must be float32 or bfloat16");
  ln0_weight_ = rd.vec("blocks.0.ln0.weight", C);
  ln0_bias_ = rd.vec("blocks.0.ln0.bias", C);
  for (int64_t i = 0; i < n_layer; ++i) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    LayerWeights l;
    l.ln1_weight = rd.vec(p + "ln1.weight", C);
    l.ln1_bias = rd.vec(p + "ln1.bias", C);
    l.att_mix_k = rd.vec(p + "att.time_mix_k", C);
    l.att_mix_v = rd.vec(p + "att.time_mix_v", C);
    l.att_mix_r = rd.vec(p + "att.time_mix_r", C);
    const float* decay = rd.vec(p + "att.time_decay", C);
    l.att_decay.resize(C);
    for (int64_t c = 0; c < C; ++c) l.att_decay[c] = -std::exp(decay[c]);
    l.att_first = rd.vec(p + "att.time_first", C);
    l.att_key = rd.mat(p + "att.key.weight", C, C);
    l.att_value = rd.mat(p + "att.value.weight", C, C);
    l.att_receptance = rd.mat(p + "att.receptance.weight", C, C);
    l.att_output = rd.mat(p + "att.output.weight", C, C);
    l.ln2_weight = rd.vec(p + "ln2.weight", C);
    l.ln2_bias = rd.vec(p + "ln2.bias", C);
    l.ffn_mix_k = rd.vec(p + "ffn.time_mix_k", C);
    l.ffn_mix_r = rd.vec(p + "ffn.time_mix_r", C);
    l.ffn_key = rd.mat(p + "ffn.key.weight", F, C);
    l.ffn_receptance = rd.mat(p + "ffn.receptance.weight", C, C);
    l.ffn_value = rd.mat(p + "ffn.value.weight", C, F);
    layers_.push_back(std::move(l));
  }
  ln_out_weight_ = rd.vec("ln_out.weight", C);
  ln_out_bias_ = rd.vec("ln_out.bias", C);
  head_ = rd.mat("head.weight", vocab_, C);
}

std::vector<std::string> StepWeights::slot_names(int64_t n_layer) {
  std::vector<std::string> names = {"emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias"};
  for (int64_t i = 0; i < n_layer; ++i) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    for (const char* s : {"ln1.weight", "ln1.bias", "att.time_mix_k", "att.time_mix_v", "att.time_mix_r",
                          "att.time_decay", "att.time_first", "att.key.weight", "att.value.weight",
                          "att.receptance.weight", "att.output.weight", "ln2.weight", "ln2.bias",
                          "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key.weight", "ffn.receptance.weight",
                          "ffn.value.weight"})
      names.push_back(p + s);
  }
  for (const char* s : {"ln_out.weight", "ln_out.bias", "head.weight"}) names.push_back(s);
  return names;
}

std::string StepWeights::storage() const { return storage_name(layers_.front().att_key.storage); }

// ---- the step ---------------------------------------------------------------------------------

at::Tensor StepWeights::step(const at::Tensor& tokens, const std::vector<at::Tensor>& att_x,
                             const std::vector<at::Tensor>& aa, const std::vector<at::Tensor>& bb,
                             const std::vector<at::Tensor>& pp, const std::vector<at::Tensor>& ffn_x) const {
  TORCH_CHECK(tokens.device().is_cpu() && tokens.scalar_type() == at::kLong && tokens.dim() == 1,
              "rnn_step: tokens must be a 1-D int64 CPU tensor");
  const int64_t B = tokens.numel(), L = n_layer(), C = n_embd_, F = ffn_dim_, V = vocab_;
  const at::Tensor ids = tokens.contiguous();
  const int64_t* token = ids.data_ptr<int64_t>();
  for (const auto* list : {&att_x, &aa, &bb, &pp, &ffn_x}) {
    TORCH_CHECK(static_cast<int64_t>(list->size()) == B, "rnn_step: one state tensor per token");
    for (const at::Tensor& s : *list) {
      TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 &&
                      s.size(0) == L && s.size(1) == C,
                  "rnn_step: state tensors must be contiguous float32 [", L, ", ", C, "]");
    }
  }
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(token[b] >= 0 && token[b] < V, "rnn_step: token id out of range");
  at::Tensor logits = at::empty({B, V}, at::TensorOptions().dtype(at::kFloat));
  if (B == 0) return logits;

  // work buffers, reused between calls (fresh allocations fault pages in on every token)
  static thread_local std::vector<float> x, xx, xk, xv, xr, k, v, r, y, out, fk;
  for (auto* buf : {&x, &xx, &xk, &xv, &xr, &k, &v, &r, &y, &out}) buf->resize(B * C);
  fk.resize(B * F);
  // (thread_local buffers: the row lambdas below run on other threads, so they use these pointers)
  auto XS = rows_of(x, B, C), XX = rows_of(xx, B, C);
  auto XK = rows_of(xk, B, C), XV = rows_of(xv, B, C), XR = rows_of(xr, B, C);
  auto K_ = rows_of(k, B, C), V_ = rows_of(v, B, C), R_ = rows_of(r, B, C), Y = rows_of(y, B, C);
  auto OUT = rows_of(out, B, C), FK = rows_of(fk, B, F);
  std::vector<float*> LOGITS(B);
  for (int64_t b = 0; b < B; ++b) LOGITS[b] = logits.data_ptr<float>() + b * V;

  embed_rows(emb_, token, B, C, ln0_weight_, ln0_bias_, ln_eps_, XX, XS);

  std::vector<MatvecJob> jobs;
  for (int64_t i = 0; i < L; ++i) {
    const LayerWeights& w = layers_[i];
    // ---- time mixing
    for_rows(B, [&](int64_t b) {
      float* prev = att_x[b].data_ptr<float>() + i * C;
      layer_norm(XS[b], w.ln1_weight, w.ln1_bias, ln_eps_, XX[b], C);
      mix(XX[b], prev, w.att_mix_k, XK[b], C);
      mix(XX[b], prev, w.att_mix_v, XV[b], C);
      mix(XX[b], prev, w.att_mix_r, XR[b], C);
      std::copy_n(XX[b], C, prev);
    });
    jobs = {job(w.att_key, B, XK, K_), job(w.att_value, B, XV, V_), job(w.att_receptance, B, XR, R_)};
    run_jobs(isa_, jobs);
    for_rows(B, [&](int64_t b) {
      float* a = aa[b].data_ptr<float>() + i * C;
      float* d = bb[b].data_ptr<float>() + i * C;
      float* m = pp[b].data_ptr<float>() + i * C;
      const float *kb = K_[b], *vb = V_[b], *rb = R_[b];
      float* yb = Y[b];
      for (int64_t c = 0; c < C; ++c) {
        yb[c] = sigmoid(rb[c]) * rwkv::wkv_step<false, float>(a[c], d[c], m[c], w.att_decay[c], w.att_first[c], kb[c],
                                                         vb[c], nullptr);
      }
    });
    jobs = {job(w.att_output, B, Y, OUT)};
    run_jobs(isa_, jobs);
    // ---- channel mixing
    for_rows(B, [&](int64_t b) {
      float* xb = XS[b];
      for (int64_t c = 0; c < C; ++c) xb[c] += OUT[b][c];
      float* prev = ffn_x[b].data_ptr<float>() + i * C;
      layer_norm(xb, w.ln2_weight, w.ln2_bias, ln_eps_, XX[b], C);
      mix(XX[b], prev, w.ffn_mix_k, XK[b], C);
      mix(XX[b], prev, w.ffn_mix_r, XR[b], C);
      std::copy_n(XX[b], C, prev);
    });
    squared_relu_ffn(isa_, B, F, w.ffn_key, w.ffn_value, &w.ffn_receptance, XK, XR, R_, FK, OUT);
    for_rows(B, [&](int64_t b) {
      float* xb = XS[b];
      for (int64_t c = 0; c < C; ++c) xb[c] += sigmoid(R_[b][c]) * OUT[b][c];
    });
  }
  for (int64_t b = 0; b < B; ++b) layer_norm(XS[b], ln_out_weight_, ln_out_bias_, ln_eps_, XX[b], C);
  jobs = {job(head_, B, XX, LOGITS)};
  run_jobs(isa_, jobs);
  return logits;
}

}  // namespace rwkv_cpu
