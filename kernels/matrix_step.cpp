// The parts every RWKV-5/6/7 step shares (matrix_step.h): the model's weights besides its layers'
// own, the checks on a call's inputs, its work rows, the head.

#include "matrix_step.h"

namespace rwkv_cpu {

MatrixModel::MatrixModel(const char* owner_, const std::map<std::string, at::Tensor>& named, int64_t n_layer_,
                         int64_t n_head_, int64_t head_size_, double layer_norm_eps, double group_norm_eps,
                         const std::string& isa_)
    : owner(owner_), n_layer(n_layer_), n_head(n_head_), head_size(head_size_),
      ln_eps(static_cast<float>(layer_norm_eps)), gn_eps(static_cast<float>(group_norm_eps)), isa(parse_isa(isa_)) {
  TORCH_CHECK(n_layer >= 1 && n_head >= 1 && head_size >= 1, owner, ": empty model");
  WeightReader rd = reader(named);
  const at::Tensor& e = rd.get("emb.weight");
  const at::Tensor& ffn = rd.get("blocks.0.ffn.key.weight");
  TORCH_CHECK(e.dim() == 2 && ffn.dim() == 2, owner, ": emb.weight and ffn.key.weight must be 2-D");
  vocab = e.size(0);
  n_embd = e.size(1);
  ffn_dim = ffn.size(0);
  const int64_t C = n_embd;
  TORCH_CHECK(n_head * head_size == C, owner, ": ", n_head, " heads of ", head_size, " do not make the width ", C);
  TORCH_CHECK(head_size <= kMaxHeadSize, owner, ": head size ", head_size, " is above ", kMaxHeadSize);
  emb = rd.mat("emb.weight", vocab, C);
  TORCH_CHECK(emb.storage != Storage::kInt8, owner, ": the embedding must be float32 or bfloat16");
  storage = storage_of(rd.get("blocks.0.att.key.weight"));
  ln0_weight = rd.vec("blocks.0.ln0.weight", C);
  ln0_bias = rd.vec("blocks.0.ln0.bias", C);
  ln_out_weight = rd.vec("ln_out.weight", C);
  ln_out_bias = rd.vec("ln_out.bias", C);
  head = rd.mat("head.weight", vocab, C);
}

void MatrixLayer::read(WeightReader& rd, const std::string& p, int64_t C, int64_t F) {
  ln1_weight = rd.vec(p + "ln1.weight", C);
  ln1_bias = rd.vec(p + "ln1.bias", C);
  ln2_weight = rd.vec(p + "ln2.weight", C);
  ln2_bias = rd.vec(p + "ln2.bias", C);
  ln_x_weight = rd.vec(p + "att.ln_x.weight", C);
  ln_x_bias = rd.vec(p + "att.ln_x.bias", C);
  receptance = rd.mat(p + "att.receptance.weight", C, C);
  key = rd.mat(p + "att.key.weight", C, C);
  value = rd.mat(p + "att.value.weight", C, C);
  output = rd.mat(p + "att.output.weight", C, C);
  ffn_key = rd.mat(p + "ffn.key.weight", F, C);
  ffn_value = rd.mat(p + "ffn.value.weight", C, F);
}

namespace {
// work buffers, reused between calls (fresh allocations fault pages in on every token); the row
// lambdas run on other threads, so they use the row pointers, never these thread_locals
thread_local std::vector<std::vector<float>> pool;
enum Slot { kX, kXX, kD, kR, kK, kV, kG, kY, kOut, kFK, kMix, kScratch = kMix + 6 };
}  // namespace

std::vector<float*> MatrixStepRun::scratch(int slot, int64_t width) {
  if (static_cast<int64_t>(pool.size()) <= kScratch + slot) pool.resize(kScratch + slot + 1);
  auto& buffer = pool[kScratch + slot];
  buffer.resize(B * width);
  return rows_of(buffer, B, width);
}

MatrixStepRun::MatrixStepRun(const MatrixModel& m, const at::Tensor& tokens, const std::vector<at::Tensor>& att_x_,
                             const std::vector<at::Tensor>& wkv_state_, const std::vector<at::Tensor>& ffn_x_)
    : model(m), att_x(att_x_), wkv_state(wkv_state_), ffn_x(ffn_x_), B(tokens.numel()), C(m.n_embd), F(m.ffn_dim),
      H(m.n_head), N(m.head_size) {
  TORCH_CHECK(tokens.device().is_cpu() && tokens.scalar_type() == at::kLong && tokens.dim() == 1,
              "matrix_step: tokens must be a 1-D int64 CPU tensor");
  const int64_t L = m.n_layer, vocab = m.vocab;
  const at::Tensor ids = tokens.contiguous();
  const int64_t* token = ids.data_ptr<int64_t>();
  TORCH_CHECK(static_cast<int64_t>(att_x.size()) == B && static_cast<int64_t>(wkv_state.size()) == B &&
                  static_cast<int64_t>(ffn_x.size()) == B,
              "matrix_step: one state per token");
  for (int64_t b = 0; b < B; ++b) {
    for (const at::Tensor* s : {&att_x[b], &ffn_x[b]}) {
      TORCH_CHECK(s->device().is_cpu() && s->scalar_type() == at::kFloat && s->is_contiguous() && s->dim() == 2 &&
                      s->size(0) == L && s->size(1) == C,
                  "matrix_step: token-shift states must be contiguous float32 [", L, ", ", C, "]");
    }
    const at::Tensor& S = wkv_state[b];
    TORCH_CHECK(S.device().is_cpu() && S.scalar_type() == at::kFloat && S.is_contiguous() && S.dim() == 4 &&
                    S.size(0) == L && S.size(1) == H && S.size(2) == N && S.size(3) == N,
                "matrix_step: wkv_state must be contiguous float32 [", L, ", ", H, ", ", N, ", ", N, "]");
    TORCH_CHECK(token[b] >= 0 && token[b] < vocab, "matrix_step: token id out of range");
  }
  logits = at::empty({B, vocab}, at::TensorOptions().dtype(at::kFloat));
  if (B == 0) return;
  if (static_cast<int64_t>(pool.size()) < kScratch) pool.resize(kScratch);
  auto rows = [&](int slot, int64_t width) {
    pool[slot].resize(B * width);
    return rows_of(pool[slot], B, width);
  };
  X = rows(kX, C), XX = rows(kXX, C), D = rows(kD, C), R = rows(kR, C), K = rows(kK, C), V = rows(kV, C);
  G = rows(kG, C), Y = rows(kY, C), OUT = rows(kOut, C), FK = rows(kFK, F);
  MIX.resize(6);
  for (int mix = 0; mix < 6; ++mix) MIX[mix] = rows(kMix + mix, C);
  embed_rows(m.emb, token, B, C, m.ln0_weight, m.ln0_bias, m.ln_eps, XX, X);
}

at::Tensor MatrixStepRun::finish() {
  if (B == 0) return logits;
  const int64_t V = model.vocab;
  std::vector<float*> rows(B);
  for (int64_t b = 0; b < B; ++b) rows[b] = logits.data_ptr<float>() + b * V;
  for (int64_t b = 0; b < B; ++b) layer_norm(X[b], model.ln_out_weight, model.ln_out_bias, model.ln_eps, XX[b], C);
  jobs = {job(model.head, B, XX, rows)};
  run_jobs(model.isa, jobs);
  return logits;
}

}  // namespace rwkv_cpu
