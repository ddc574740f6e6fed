// The matvecs of the one-token RNN steps on the CPU, at the memory's streaming rate, and what every
// architecture's step shares (step_common.h); the steps themselves are step_rwkv4.cpp ... step_rwkv7.cpp,
// each the whole model (every layer, then the head) for B sequences in one call.
//
// Generating a token reads every weight once, so the step is bound by memory bandwidth:
//  * each matrix row is streamed from memory once per step whatever B is: the threads split the
//    rows, and every row is multiplied with all B inputs while it sits in L1;
//  * bf16 weights are widened in registers (a shift and a mask: a bf16 is the top half of a
//    float), int8 ones by a sign extension and a convert; both read 1/2 or 1/4 of fp32's bytes;
//  * the small per-layer work (LayerNorm, token-shift mixing, the WKV step, sigmoid, relu^2)
//    runs in plain loops between the matvecs, and matvecs that share a step run as one
//    parallel pass (attention key/value/receptance; FFN key/receptance).
//
// Reproducibility: every dot product is accumulated in one fixed order per instruction set and
// weight type (one vector accumulator over fixed-size steps, a fixed horizontal sum, then the
// tail in order: matvec_block.inc), whatever the batch size and the blocking. So a sequence's logits do not depend on which other
// sequences share its step: row b of a batched step equals the one-sequence step bit for bit.
// (Built with -ffp-contract=off so the scalar parts are not fused differently in different places.)

#include "step_common.h"

#include <atomic>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define RWKV_X86 1
#endif

namespace rwkv_cpu {
namespace {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &widened, sizeof(f));
  return f;
}
inline float widen(float w) { return w; }
inline float widen(uint16_t w) { return bf16_to_float(w); }
inline float widen(int8_t w) { return static_cast<float>(w); }
inline float finish(const MatvecJob& j, int64_t n, float dot) { return j.W.scale ? dot * j.W.scale[n] : dot; }

// ---- portable code: one sequential sum per dot product ---------------------------------------
namespace scalar {
template <typename W>
void rows(const MatvecJob& j, int64_t n0, int64_t n1) {
  const W* M = static_cast<const W*>(j.W.data);
  const int64_t K = j.W.cols;
  for (int64_t n = n0; n < n1; ++n) {
    const W* row = M + n * K;
    for (int64_t b = 0; b < j.B; ++b) {
      const float* x = j.x[b];
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += widen(row[k]) * x[k];
      j.y[b][n] = finish(j, n, s);
    }
  }
}
void run(const MatvecJob& j, int64_t n0, int64_t n1) {
  switch (j.W.storage) {
    case Storage::kFloat32: rows<float>(j, n0, n1); break;
    case Storage::kBFloat16: rows<uint16_t>(j, n0, n1); break;
    case Storage::kInt8: rows<int8_t>(j, n0, n1); break;
  }
}
}  // namespace scalar

constexpr int64_t kPrefetchBytes = 16384;  // how far ahead the matvecs prefetch (whole blocks)

#ifdef RWKV_X86
// ---- AVX2 + FMA: 8-lane vectors ---------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using V = __m256;
constexpr int64_t kLanes = 8;
constexpr int kRowBlock = 2;  // rows per block when several inputs share the rows (16 registers)
inline V zero() { return _mm256_setzero_ps(); }
inline V loadu(const float* p) { return _mm256_loadu_ps(p); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(V v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
struct F32 {
  using W = float;
  static constexpr int64_t kStep = 8;
  static constexpr int kParts = 1;
  static constexpr bool kPairs = false;
  static inline void load(const float* p, V* w) { w[0] = _mm256_loadu_ps(p); }
};
struct BF16 {  // 16 bf16 = 8 lanes of two: `lane << 16` is the even one, `lane & 0xFFFF0000` the odd
  using W = uint16_t;
  static constexpr int64_t kStep = 16;
  static constexpr int kParts = 2;
  static constexpr bool kPairs = true;
  static inline void load(const uint16_t* p, V* w) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    w[1] = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};
struct I8 {
  using W = int8_t;
  static constexpr int64_t kStep = 16;
  static constexpr int kParts = 2;
  static constexpr bool kPairs = false;
  static inline void load(const int8_t* p, V* w) {  // two sign-extending loads: no shuffle uop
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  }
};
#include "matvec_block.inc"
}  // namespace avx2
#pragma GCC pop_options

// ---- AVX-512: 16-lane vectors -----------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace avx512 {
using V = __m512;
constexpr int64_t kLanes = 16;
constexpr int kRowBlock = 4;  // 4 rows x 4 inputs = 16 accumulators of 32 registers
inline V zero() { return _mm512_setzero_ps(); }
inline V loadu(const float* p) { return _mm512_loadu_ps(p); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(V v) { return _mm512_reduce_add_ps(v); }
struct F32 {
  using W = float;
  static constexpr int64_t kStep = 16;
  static constexpr int kParts = 1;
  static constexpr bool kPairs = false;
  static inline void load(const float* p, V* w) { w[0] = _mm512_loadu_ps(p); }
};
struct BF16 {
  using W = uint16_t;
  static constexpr int64_t kStep = 32;
  static constexpr int kParts = 2;
  static constexpr bool kPairs = true;
  static inline void load(const uint16_t* p, V* w) {
    const __m512i v = _mm512_loadu_si512(p);
    w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    w[1] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};
struct I8 {  // a whole cache line (64 weights) per step: one prefetch per line
  using W = int8_t;
  static constexpr int64_t kStep = 64;
  static constexpr int kParts = 4;
  static constexpr bool kPairs = false;
  static inline void load(const int8_t* p, V* w) {  // sign-extending loads: no shuffle uop
    for (int part = 0; part < 4; ++part)
      w[part] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * part))));
  }
};
#include "matvec_block.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif  // RWKV_X86

// the step of the bf16 loader: how the inputs are de-interleaved for it
int64_t bf16_step_of(Isa isa) {
#ifdef RWKV_X86
  if (isa == Isa::kAvx512) return avx512::BF16::kStep;
  if (isa == Isa::kAvx2) return avx2::BF16::kStep;
#endif
  return 0;
}

// x in the order the widened bf16 weights come in: per step of S, the S/2 even elements then the
// S/2 odd ones (the tail is read from x itself).
void deinterleave(const float* x, int64_t K, int64_t S, float* out) {
  for (int64_t k = 0; k + S <= K; k += S) {
    for (int64_t e = 0; e < S / 2; ++e) {
      out[k + e] = x[k + 2 * e];
      out[k + S / 2 + e] = x[k + 2 * e + 1];
    }
  }
}

bool cpu_has_avx512() {
#ifdef RWKV_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#ifdef RWKV_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// Sum of the 64-bit words of [begin, end): every byte is loaded, with four independent chains,
// prefetched kPrefetchBytes ahead into L2 as the matvecs do (without it this loop read ~35 GB/s on
// an AVX-512 EPYC where the prefetched matvecs streamed ~55: a bound below what the step reads).
#ifdef RWKV_X86
#pragma GCC push_options
#pragma GCC target("avx2")
uint64_t sum_words_avx2(const uint8_t* begin, const uint8_t* end) {
  __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  const uint8_t* p = begin;
  for (; p + 128 <= end; p += 128) {
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + 64), _MM_HINT_T1);
    for (int a = 0; a < 4; ++a)
      acc[a] = _mm256_add_epi64(acc[a], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * a)));
  }
  uint64_t lanes[4], total = 0;
  for (int a = 0; a < 4; ++a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), acc[a]);
    total += lanes[0] + lanes[1] + lanes[2] + lanes[3];
  }
  for (; p < end; ++p) total += *p;
  return total;
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f")
uint64_t sum_words_avx512(const uint8_t* begin, const uint8_t* end) {
  __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  const uint8_t* p = begin;
  for (; p + 256 <= end; p += 256) {
    for (int a = 0; a < 4; ++a) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + 64 * a), _MM_HINT_T1);
    for (int a = 0; a < 4; ++a) acc[a] = _mm512_add_epi64(acc[a], _mm512_loadu_si512(p + 64 * a));
  }
  uint64_t total = 0;
  for (int a = 0; a < 4; ++a) total += static_cast<uint64_t>(_mm512_reduce_add_epi64(acc[a]));
  for (; p < end; ++p) total += *p;
  return total;
}
#pragma GCC pop_options
#endif

uint64_t sum_words_scalar(const uint8_t* begin, const uint8_t* end) {
  uint64_t total = 0;
  const uint8_t* p = begin;
  for (; p + 8 <= end; p += 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    total += w;
  }
  for (; p < end; ++p) total += *p;
  return total;
}

}  // namespace

// Several matvecs in one parallel pass: the threads split the rows of all of them together, so
// each thread streams about the same number of bytes and there is one fork/join, not several.
void run_jobs(Isa isa, std::vector<MatvecJob>& jobs) {
  static thread_local std::vector<std::vector<float>> pair_storage;
  static thread_local std::vector<std::vector<const float*>> pair_pointers;
  const int64_t S = bf16_step_of(isa);
  if (pair_storage.size() < jobs.size()) {
    pair_storage.resize(jobs.size());
    pair_pointers.resize(jobs.size());
  }
  int64_t rows = 0, row_bytes = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    MatvecJob& j = jobs[i];
    rows += j.W.rows;
    const int64_t bytes = j.W.storage == Storage::kFloat32 ? 4 : j.W.storage == Storage::kBFloat16 ? 2 : 1;
    row_bytes = std::max(row_bytes, bytes * j.W.cols);
    if (j.W.storage == Storage::kBFloat16 && S > 0) {
      auto& store = pair_storage[i];
      auto& ptrs = pair_pointers[i];
      if (static_cast<int64_t>(store.size()) < j.B * j.W.cols) store.resize(j.B * j.W.cols);
      ptrs.resize(j.B);
      for (int64_t b = 0; b < j.B; ++b) {
        deinterleave(j.x[b], j.W.cols, S, store.data() + b * j.W.cols);
        ptrs[b] = store.data() + b * j.W.cols;
      }
      j.pairs = ptrs.data();
    }
  }
  // at least ~16 KB of weights per task
  const int64_t grain = std::max<int64_t>(4, 16384 / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    int64_t offset = 0;
    for (const MatvecJob& j : jobs) {
      const int64_t a = std::max(begin, offset) - offset;
      const int64_t b = std::min(end, offset + j.W.rows) - offset;
      if (a < b) {
        switch (isa) {
#ifdef RWKV_X86
          case Isa::kAvx512: avx512::run(j, a, b); break;
          case Isa::kAvx2: avx2::run(j, a, b); break;
#endif
          default: scalar::run(j, a, b); break;
        }
      }
      offset += j.W.rows;
    }
  });
}

// LayerNorm of one row; mean and variance accumulated in double (C is small, exactness is cheap).
void layer_norm(const float* x, const float* weight, const float* bias, float eps, float* out, int64_t C) {
  double sum = 0.0;
  for (int64_t c = 0; c < C; ++c) sum += x[c];
  const double mean = sum / C;
  double sq = 0.0;
  for (int64_t c = 0; c < C; ++c) sq += (x[c] - mean) * (x[c] - mean);
  const float inv_std = static_cast<float>(1.0 / std::sqrt(sq / C + eps));
  const float m = static_cast<float>(mean);
  for (int64_t c = 0; c < C; ++c) out[c] = (x[c] - m) * inv_std * weight[c] + bias[c];
}

// GroupNorm of one row, one group per head of N channels: each head's channels normalised as a
// LayerNorm of their own, in place
void head_group_norm(float* y, const float* weight, const float* bias, float eps, int64_t H, int64_t N) {
  for (int64_t h = 0; h < H; ++h) layer_norm(y + h * N, weight + h * N, bias + h * N, eps, y + h * N, N);
}

Storage storage_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Storage::kFloat32;
    case at::kBFloat16: return Storage::kBFloat16;
    case at::kChar: return Storage::kInt8;
    default: TORCH_CHECK(false, "rnn_cpu: weights must be float32, bfloat16 or int8, not ", t.scalar_type());
  }
}

const char* storage_name(Storage s) {
  return s == Storage::kFloat32 ? "fp32" : s == Storage::kBFloat16 ? "bf16" : "int8";
}

// A [rows] block of pointers into a [B, width] buffer.
std::vector<float*> rows_of(std::vector<float>& buffer, int64_t B, int64_t width) {
  std::vector<float*> out(B);
  for (int64_t b = 0; b < B; ++b) out[b] = buffer.data() + b * width;
  return out;
}

MatvecJob job(const Matrix& W, int64_t B, const std::vector<float*>& x, const std::vector<float*>& y) {
  return {W, B, const_cast<const float* const*>(x.data()), nullptr, y.data()};
}

void embed_rows(const Matrix& emb, const int64_t* token, int64_t B, int64_t C, const float* ln_weight,
                const float* ln_bias, float eps, const std::vector<float*>& scratch, const std::vector<float*>& x) {
  for (int64_t b = 0; b < B; ++b) {
    if (emb.storage == Storage::kFloat32) {
      std::copy_n(static_cast<const float*>(emb.data) + token[b] * C, C, scratch[b]);
    } else {
      const uint16_t* row = static_cast<const uint16_t*>(emb.data) + token[b] * C;
      for (int64_t c = 0; c < C; ++c) scratch[b][c] = bf16_to_float(row[c]);
    }
    layer_norm(scratch[b], ln_weight, ln_bias, eps, x[b], C);
  }
}

void squared_relu_ffn(Isa isa, int64_t B, int64_t F, const Matrix& key, const Matrix& value, const Matrix* receptance,
                      const std::vector<float*>& xk, const std::vector<float*>& xr, const std::vector<float*>& r,
                      const std::vector<float*>& fk, const std::vector<float*>& out) {
  std::vector<MatvecJob> jobs = {job(key, B, xk, fk)};
  if (receptance != nullptr) jobs.push_back(job(*receptance, B, xr, r));
  run_jobs(isa, jobs);
  square_relu_rows(B, fk, F);
  jobs = {job(value, B, fk, out)};
  run_jobs(isa, jobs);
}

std::vector<std::string> cpu_features() {
  std::vector<std::string> out;
#ifdef RWKV_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    if (b & (1u << 5)) out.push_back("avx2");
    if (b & (1u << 16)) out.push_back("avx512f");
    if (c & (1u << 11)) out.push_back("avx512_vnni");
    if (d & (1u << 22)) out.push_back("amx_bf16");
    if (d & (1u << 24)) out.push_back("amx_tile");
    if (d & (1u << 25)) out.push_back("amx_int8");
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) {
    if (a & (1u << 4)) out.push_back("avx_vnni");
    if (a & (1u << 5)) out.push_back("avx512_bf16");
  }
  if (cpu_has_avx2()) out.push_back("fma");
#endif
  return out;
}

int64_t stream_read(const at::Tensor& buffer, const std::string& isa) {
  TORCH_CHECK(buffer.device().is_cpu() && buffer.is_contiguous(), "stream_read: a contiguous CPU tensor");
  const uint8_t* data = static_cast<const uint8_t*>(buffer.data_ptr());
  const int64_t bytes = buffer.numel() * buffer.element_size();
  const Isa chosen = parse_isa(isa);
  constexpr int64_t kChunk = 1 << 20;  // 1 MB per task: the threads stream disjoint ranges
  std::atomic<uint64_t> total{0};
  at::parallel_for(0, (bytes + kChunk - 1) / kChunk, 1, [&](int64_t begin, int64_t end) {
    const uint8_t* first = data + begin * kChunk;
    const uint8_t* last = data + std::min(bytes, end * kChunk);
    uint64_t sum;
    switch (chosen) {
#ifdef RWKV_X86
      case Isa::kAvx512: sum = sum_words_avx512(first, last); break;
      case Isa::kAvx2: sum = sum_words_avx2(first, last); break;
#endif
      default: sum = sum_words_scalar(first, last); break;
    }
    total += sum;
  });
  return static_cast<int64_t>(total.load());
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  if (cpu_has_avx512()) out.push_back("avx512");
  if (cpu_has_avx2()) out.push_back("avx2");
  out.push_back("scalar");
  return out;
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") return cpu_has_avx512() ? Isa::kAvx512 : cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar;
  if (name == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "rnn_cpu: this CPU has no AVX-512");
    return Isa::kAvx512;
  }
  if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "rnn_cpu: this CPU has no AVX2");
    return Isa::kAvx2;
  }
  TORCH_CHECK(name == "scalar", "rnn_cpu: unknown instruction set '", name, "' (auto, avx512, avx2 or scalar)");
  return Isa::kScalar;
}

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "scalar";
}

at::Tensor matvec(const at::Tensor& W, const at::Tensor& x, const c10::optional<at::Tensor>& scale,
                  const std::string& isa) {
  TORCH_CHECK(W.device().is_cpu() && x.device().is_cpu(), "matvec: CPU tensors only");
  TORCH_CHECK(W.dim() == 2 && W.is_contiguous(), "matvec: W must be a contiguous [N, K] matrix");
  const int64_t N = W.size(0), K = W.size(1);
  TORCH_CHECK(x.size(-1) == K && x.dim() <= 2, "matvec: x must be [K] or [B, K]");
  const at::Tensor xf = x.to(at::kFloat).contiguous().view({-1, K});
  const int64_t B = xf.size(0);
  Matrix m;
  m.storage = storage_of(W);
  m.data = W.data_ptr();
  m.rows = N;
  m.cols = K;
  at::Tensor s;
  if (m.storage == Storage::kInt8) {
    TORCH_CHECK(scale.has_value() && scale->numel() == N, "matvec: int8 weights need a scale per row");
    s = scale->to(at::kFloat).contiguous();
    m.scale = s.data_ptr<float>();
  }
  at::Tensor y = at::empty({B, N}, xf.options());
  std::vector<float*> xs(B), ys(B);
  for (int64_t b = 0; b < B; ++b) {
    xs[b] = const_cast<float*>(xf.data_ptr<float>()) + b * K;
    ys[b] = y.data_ptr<float>() + b * N;
  }
  std::vector<MatvecJob> jobs = {job(m, B, xs, ys)};
  run_jobs(parse_isa(isa), jobs);
  return x.dim() == 1 ? y.view({N}) : y;
}

}  // namespace rwkv_cpu
