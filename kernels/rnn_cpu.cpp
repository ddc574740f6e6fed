// The one-token RNN step on the CPU: matvecs at the memory's streaming rate, and the whole model
// (every layer, then the head) for B sequences in one call.
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

#include "rnn_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define RWKV_X86 1
#endif

#include "wkv_step.h"

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

// y_b[n] = scale[n] * (W[n, :] . x_b) for every input b, over a range of rows.
struct MatvecJob {
  Matrix W;
  int64_t B;
  const float* const* x;      // B inputs of W.cols floats
  const float* const* pairs;  // bf16: the inputs de-interleaved to match the widened weights
  float* const* y;            // B outputs of W.rows floats
};

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

// 1 / (1 + e^-x) with only a non-positive exponent evaluated (exp_nonpos: branch-free, so the
// loops around it vectorise); ~2 ulp.
inline float sigmoid(float x) {
  const float e = exp_nonpos(x > 0.f ? -x : x);
  return (x > 0.f ? 1.0f : e) / (1.0f + e);
}

// fn(b) for every row b: inline for one row, else spread over the threads. Rows are independent,
// so where a row runs never changes its numbers.
template <typename Fn>
void for_rows(int64_t B, const Fn& fn) {
  if (B == 1) {
    fn(0);
    return;
  }
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fn(b);
  });
}

// token shift: mixed = current * mix + previous * (1 - mix)
inline void mix(const float* cur, const float* prev, const float* m, float* out, int64_t C) {
  for (int64_t c = 0; c < C; ++c) out[c] = cur[c] * m[c] + prev[c] * (1.0f - m[c]);
}

// x[b] = LN0(emb[token[b]]) for every row (scratch[b]: the widened embedding row)
void embed_rows(const Matrix& emb, const int64_t* token, int64_t B, int64_t C, const float* ln_weight,
                const float* ln_bias, float eps, const std::vector<float*>& scratch, const std::vector<float*>& x);

// the feed-forward's relu(k)^2, in place, for every row
template <typename Rows>
void square_relu_rows(int64_t B, const Rows& rows, int64_t F) {
  for_rows(B, [&](int64_t b) {
    float* fb = rows[b];
    for (int64_t j = 0; j < F; ++j) {
      const float relu = fb[j] > 0.f ? fb[j] : 0.f;
      fb[j] = relu * relu;
    }
  });
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

// Weights looked up by checkpoint name and validated (shape, dtype, device, contiguity) once, for
// both steps; int8 matrices come with "<name>_scale" (float32, one per row). `keep` holds the
// tensors the returned raw pointers point into.
struct WeightReader {
  const char* owner;  // "StepWeights" / "MatrixStepWeights": who asks, in the messages
  const std::map<std::string, at::Tensor>& named;
  std::vector<at::Tensor>& keep;

  const at::Tensor& get(const std::string& name) const {
    auto it = named.find(name);
    TORCH_CHECK(it != named.end(), owner, ": missing '", name, "'");
    return it->second;
  }
  const float* vec(const std::string& name, int64_t n) {
    const at::Tensor& t = get(name);
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                owner, ": '", name, "' must be a contiguous float32 CPU tensor");
    TORCH_CHECK(t.numel() == n, owner, ": '", name, "' has ", t.numel(), " elements, expected ", n);
    keep.push_back(t);
    return t.data_ptr<float>();
  }
  Matrix mat(const at::Tensor& t, const std::string& name, int64_t rows, int64_t cols, const float* scale = nullptr) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 2,
                owner, ": '", name, "' must be a contiguous 2-D CPU tensor");
    TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, owner, ": '", name, "' has shape [", t.size(0),
                ", ", t.size(1), "], expected [", rows, ", ", cols, "]");
    Matrix m;
    m.storage = storage_of(t);
    m.data = t.data_ptr();
    m.rows = rows;
    m.cols = cols;
    m.scale = scale;
    keep.push_back(t);
    return m;
  }
  Matrix mat(const std::string& name, int64_t rows, int64_t cols) {
    const at::Tensor& t = get(name);
    const float* scale = nullptr;
    if (t.scalar_type() == at::kChar) {
      auto s = named.find(name + "_scale");
      TORCH_CHECK(s != named.end() && s->second.device().is_cpu() && s->second.scalar_type() == at::kFloat &&
                      s->second.is_contiguous() && s->second.numel() == rows,
                  owner, ": int8 '", name, "' needs '", name, "_scale' (", rows, " float32 values)");
      keep.push_back(s->second);
      scale = s->second.data_ptr<float>();
    }
    return mat(t, name, rows, cols, scale);
  }
};

}  // namespace

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
    jobs = {job(w.ffn_key, B, XK, FK), job(w.ffn_receptance, B, XR, R_)};
    run_jobs(isa_, jobs);
    square_relu_rows(B, FK, F);
    jobs = {job(w.ffn_value, B, FK, OUT)};
    run_jobs(isa_, jobs);
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

// ================================================================================================
// RWKV-5 / 6 / 7: the one-token step for the matrix-state architectures. The same matvecs (one
// parallel pass per group of products that share inputs), with each architecture's elementwise
// math between them, written to follow rwkv_playground/models/rwkv5.py, rwkv6.py, rwkv7.py line
// by line (the tests hold this step to those modules' forward).
// ================================================================================================
namespace rwkv_cpu {

struct MatrixLayerWeights {
  const float *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias, *ln_x_weight, *ln_x_bias;
  // v5: lerps (RWKV-4 form), fixed decay factor w [C] and bonus u [C] (per-head values broadcast)
  const float *mix_k = nullptr, *mix_v = nullptr, *mix_r = nullptr, *mix_g = nullptr;
  std::vector<float> decay, bonus;
  // v6: ddlerp and data-dependent decay
  const float *maa_x = nullptr, *maa[5] = {nullptr, nullptr, nullptr, nullptr, nullptr}, *decay_base = nullptr;
  Matrix maa_w1, maa_w2[5], decay_w1, decay_w2;
  // v7
  const float *x_[6] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  const float *w0 = nullptr, *a0 = nullptr, *v0 = nullptr, *k_k = nullptr, *k_a = nullptr, *r_k = nullptr;
  Matrix w1, w2, a1, a2, v1, v2, g1, g2;
  Matrix receptance, key, value, gate, output;
  bool gated = false;
  // channel mix
  const float *ffn_mix_k = nullptr, *ffn_mix_r = nullptr, *ffn_x_k = nullptr;
  Matrix ffn_key, ffn_receptance, ffn_value;
};

namespace {

// GroupNorm of one row, one group per head of N channels (mean / variance in double, as layer_norm)
void head_group_norm(float* y, const float* weight, const float* bias, float eps, int64_t H, int64_t N) {
  for (int64_t h = 0; h < H; ++h) {
    float* g = y + h * N;
    double sum = 0.0;
    for (int64_t i = 0; i < N; ++i) sum += g[i];
    const double mean = sum / N;
    double sq = 0.0;
    for (int64_t i = 0; i < N; ++i) sq += (g[i] - mean) * (g[i] - mean);
    const float inv_std = static_cast<float>(1.0 / std::sqrt(sq / N + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < N; ++i) g[i] = (g[i] - m) * inv_std * weight[h * N + i] + bias[h * N + i];
  }
}

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

inline float silu(float x) { return x * sigmoid(x); }

constexpr int64_t kMaxHeadSize = 512;  // a per-head scratch row lives on the stack

}  // namespace

MatrixStepWeights::MatrixStepWeights(const std::map<std::string, at::Tensor>& named, const std::string& architecture,
                                     int64_t n_layer, int64_t n_head, int64_t head_size, double layer_norm_eps,
                                     double group_norm_eps, const std::string& isa)
    : n_head_(n_head), head_size_(head_size), ln_eps_(static_cast<float>(layer_norm_eps)),
      gn_eps_(static_cast<float>(group_norm_eps)), isa_(parse_isa(isa)) {
  TORCH_CHECK(architecture == "rwkv5" || architecture == "rwkv6" || architecture == "rwkv7",
              "MatrixStepWeights: architecture must be rwkv5, rwkv6 or rwkv7, not '", architecture, "'");
  arch_ = architecture == "rwkv5" ? MatrixArch::kV5 : architecture == "rwkv6" ? MatrixArch::kV6 : MatrixArch::kV7;
  TORCH_CHECK(n_layer >= 1 && n_head >= 1 && head_size >= 1, "MatrixStepWeights: empty model");
  WeightReader rd{"MatrixStepWeights", named, keep_alive_};
  const at::Tensor& emb = rd.get("emb.weight");
  const at::Tensor& ffn = rd.get("blocks.0.ffn.key.weight");
  TORCH_CHECK(emb.dim() == 2 && ffn.dim() == 2, "MatrixStepWeights: emb.weight and ffn.key.weight must be 2-D");
  vocab_ = emb.size(0);
  n_embd_ = emb.size(1);
  ffn_dim_ = ffn.size(0);
  const int64_t C = n_embd_, F = ffn_dim_, H = n_head_, N = head_size_;
  TORCH_CHECK(H * N == C, "MatrixStepWeights: ", H, " heads of ", N, " do not make the width ", C);
  TORCH_CHECK(N <= kMaxHeadSize, "MatrixStepWeights: head size ", N, " is above ", kMaxHeadSize);
  emb_ = rd.mat("emb.weight", vocab_, C);
  TORCH_CHECK(emb_.storage != Storage::kInt8, "MatrixStepWeights: the embedding must be float32 or bfloat16");
  ln0_weight_ = rd.vec("blocks.0.ln0.weight", C);
  ln0_bias_ = rd.vec("blocks.0.ln0.bias", C);
  for (int64_t i = 0; i < n_layer; ++i) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    auto* l = new MatrixLayerWeights();
    layers_.push_back(l);
    l->ln1_weight = rd.vec(p + "ln1.weight", C);
    l->ln1_bias = rd.vec(p + "ln1.bias", C);
    l->ln2_weight = rd.vec(p + "ln2.weight", C);
    l->ln2_bias = rd.vec(p + "ln2.bias", C);
    l->ln_x_weight = rd.vec(p + "att.ln_x.weight", C);
    l->ln_x_bias = rd.vec(p + "att.ln_x.bias", C);
    l->receptance = rd.mat(p + "att.receptance.weight", C, C);
    l->key = rd.mat(p + "att.key.weight", C, C);
    l->value = rd.mat(p + "att.value.weight", C, C);
    l->output = rd.mat(p + "att.output.weight", C, C);
    l->ffn_key = rd.mat(p + "ffn.key.weight", F, C);
    l->ffn_value = rd.mat(p + "ffn.value.weight", C, F);
    if (arch_ == MatrixArch::kV5) {
      l->mix_k = rd.vec(p + "att.time_mix_k", C);
      l->mix_v = rd.vec(p + "att.time_mix_v", C);
      l->mix_r = rd.vec(p + "att.time_mix_r", C);
      l->gated = named.count(p + "att.gate.weight") > 0;
      if (l->gated) {
        l->mix_g = rd.vec(p + "att.time_mix_g", C);
        l->gate = rd.mat(p + "att.gate.weight", C, C);
      }
      // decay factor and bonus per channel: the stored [H] (5.0/5.1) or [H, N] (5.2) broadcast over heads;
      // "decay" / "bonus" are passed by the runtime as the factors the model computes (exp(-exp(td)), u)
      const float* w = rd.vec(p + "att.decay_factor", C);
      const float* u = rd.vec(p + "att.bonus", C);
      l->decay.assign(w, w + C);
      l->bonus.assign(u, u + C);
      l->ffn_mix_k = rd.vec(p + "ffn.time_mix_k", C);
      l->ffn_mix_r = rd.vec(p + "ffn.time_mix_r", C);
      l->ffn_receptance = rd.mat(p + "ffn.receptance.weight", C, C);
    } else if (arch_ == MatrixArch::kV6) {
      l->maa_x = rd.vec(p + "att.time_maa_x", C);
      const char* names[5] = {"w", "k", "v", "r", "g"};
      for (int m = 0; m < 5; ++m) l->maa[m] = rd.vec(p + "att.time_maa_" + names[m], C);
      const at::Tensor& w1 = rd.get(p + "att.time_maa_w1");
      TORCH_CHECK(w1.dim() == 2 && w1.size(0) % 5 == 0, "MatrixStepWeights: time_maa_w1 must be [5 D, C]");
      const int64_t D = w1.size(0) / 5;
      l->maa_w1 = rd.mat(p + "att.time_maa_w1", 5 * D, C);
      const at::Tensor& w2 = rd.get(p + "att.time_maa_w2");
      TORCH_CHECK(w2.dim() == 3 && w2.size(0) == 5 && w2.size(1) == C && w2.size(2) == D && w2.is_contiguous() &&
                      w2.scalar_type() == at::kFloat,
                  "MatrixStepWeights: time_maa_w2 must be a contiguous float32 [5, C, D]");
      for (int m = 0; m < 5; ++m) l->maa_w2[m] = rd.mat(w2[m], p + "att.time_maa_w2", C, D);
      l->decay_base = rd.vec(p + "att.time_decay", C);
      const at::Tensor& d1 = rd.get(p + "att.time_decay_w1");
      TORCH_CHECK(d1.dim() == 2, "MatrixStepWeights: time_decay_w1 must be 2-D");
      l->decay_w1 = rd.mat(p + "att.time_decay_w1", d1.size(0), C);
      l->decay_w2 = rd.mat(p + "att.time_decay_w2", C, d1.size(0));
      const float* u = rd.vec(p + "att.time_faaaa", C);
      l->bonus.assign(u, u + C);
      l->gated = true;
      l->gate = rd.mat(p + "att.gate.weight", C, C);
      l->ffn_mix_k = rd.vec(p + "ffn.time_maa_k", C);
      l->ffn_mix_r = rd.vec(p + "ffn.time_maa_r", C);
      l->ffn_receptance = rd.mat(p + "ffn.receptance.weight", C, C);
    } else {
      const char* lerps[6] = {"r", "w", "k", "v", "a", "g"};
      for (int m = 0; m < 6; ++m) l->x_[m] = rd.vec(p + "att.x_" + lerps[m], C);
      l->w0 = rd.vec(p + "att.w0", C);
      l->a0 = rd.vec(p + "att.a0", C);
      l->v0 = rd.vec(p + "att.v0", C);
      l->k_k = rd.vec(p + "att.k_k", C);
      l->k_a = rd.vec(p + "att.k_a", C);
      l->r_k = rd.vec(p + "att.r_k", C);
      auto lora = [&](const char* name, Matrix& first, Matrix& second) {
        const at::Tensor& t = rd.get(p + "att." + name + "1");
        TORCH_CHECK(t.dim() == 2, "MatrixStepWeights: ", p, "att.", name, "1 must be 2-D");
        first = rd.mat(p + "att." + name + "1", t.size(0), C);
        second = rd.mat(p + "att." + name + "2", C, t.size(0));
      };
      lora("w", l->w1, l->w2);
      lora("a", l->a1, l->a2);
      lora("v", l->v1, l->v2);
      lora("g", l->g1, l->g2);
      l->ffn_x_k = rd.vec(p + "ffn.x_k", C);
    }
  }
  ln_out_weight_ = rd.vec("ln_out.weight", C);
  ln_out_bias_ = rd.vec("ln_out.bias", C);
  head_ = rd.mat("head.weight", vocab_, C);
}

MatrixStepWeights::~MatrixStepWeights() {
  for (auto* l : layers_) delete l;
}

std::string MatrixStepWeights::storage() const { return storage_name(layers_.front()->key.storage); }

at::Tensor MatrixStepWeights::step(const at::Tensor& tokens, const std::vector<at::Tensor>& att_x,
                                   const std::vector<at::Tensor>& wkv_state,
                                   const std::vector<at::Tensor>& ffn_x) const {
  TORCH_CHECK(tokens.device().is_cpu() && tokens.scalar_type() == at::kLong && tokens.dim() == 1,
              "matrix_step: tokens must be a 1-D int64 CPU tensor");
  const int64_t B = tokens.numel(), L = static_cast<int64_t>(layers_.size()), C = n_embd_, F = ffn_dim_, V = vocab_;
  const int64_t H = n_head_, N = head_size_;
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
    TORCH_CHECK(token[b] >= 0 && token[b] < V, "matrix_step: token id out of range");
  }
  at::Tensor logits = at::empty({B, V}, at::TensorOptions().dtype(at::kFloat));
  if (B == 0) return logits;

  // work buffers, reused between calls
  static thread_local std::vector<float> x, xx, d, r, k, v, g, w, a, kk, vfirst, y, out, fk, lo1, lo2, lo3, lo4,
      mixed, m5;
  for (auto* buf : {&x, &xx, &d, &r, &k, &v, &g, &w, &a, &kk, &vfirst, &y, &out}) buf->resize(B * C);
  fk.resize(B * F);
  mixed.resize(6 * B * C);
  int64_t lora_max = 1;
  for (const auto* l : layers_) {
    for (const Matrix* m : {&l->maa_w1, &l->decay_w1, &l->w1, &l->a1, &l->v1, &l->g1})
      lora_max = std::max(lora_max, m->rows);
  }
  for (auto* buf : {&lo1, &lo2, &lo3, &lo4}) buf->resize(B * lora_max);
  m5.resize(B * C * 5);
  auto X = rows_of(x, B, C), XX = rows_of(xx, B, C), D_ = rows_of(d, B, C);
  auto R_ = rows_of(r, B, C), K_ = rows_of(k, B, C), V_ = rows_of(v, B, C), G_ = rows_of(g, B, C);
  auto W_ = rows_of(w, B, C), A_ = rows_of(a, B, C), VF = rows_of(vfirst, B, C), Y = rows_of(y, B, C);
  auto KK = rows_of(kk, B, C);  // (the row lambdas run on other threads: pointers, never the thread_locals)
  auto OUT = rows_of(out, B, C), FK = rows_of(fk, B, F);
  auto L1 = rows_of(lo1, B, lora_max), L2 = rows_of(lo2, B, lora_max), L3 = rows_of(lo3, B, lora_max),
       L4 = rows_of(lo4, B, lora_max);
  std::vector<std::vector<float*>> MIX(6);
  for (int m = 0; m < 6; ++m) {
    MIX[m].resize(B);
    for (int64_t b = 0; b < B; ++b) MIX[m][b] = mixed.data() + (m * B + b) * C;
  }
  std::vector<std::vector<float*>> M5(5);
  for (int m = 0; m < 5; ++m) {
    M5[m].resize(B);
    for (int64_t b = 0; b < B; ++b) M5[m][b] = m5.data() + (m * B + b) * C;
  }
  std::vector<float*> LOGITS(B);
  for (int64_t b = 0; b < B; ++b) LOGITS[b] = logits.data_ptr<float>() + b * V;

  embed_rows(emb_, token, B, C, ln0_weight_, ln0_bias_, ln_eps_, XX, X);

  std::vector<MatvecJob> jobs;
  for (int64_t i = 0; i < L; ++i) {
    const MatrixLayerWeights& lw = *layers_[i];
    // ---- time mixing: LN1, the token shift, the mixed inputs
    for_rows(B, [&](int64_t b) {
      float* prev = att_x[b].data_ptr<float>() + i * C;
      layer_norm(X[b], lw.ln1_weight, lw.ln1_bias, ln_eps_, XX[b], C);
      for (int64_t c = 0; c < C; ++c) D_[b][c] = prev[c] - XX[b][c];
      if (arch_ == MatrixArch::kV5) {
        mix(XX[b], prev, lw.mix_r, MIX[0][b], C);
        mix(XX[b], prev, lw.mix_k, MIX[1][b], C);
        mix(XX[b], prev, lw.mix_v, MIX[2][b], C);
        if (lw.gated) mix(XX[b], prev, lw.mix_g, MIX[3][b], C);
      } else if (arch_ == MatrixArch::kV6) {
        for (int64_t c = 0; c < C; ++c) MIX[5][b][c] = XX[b][c] + D_[b][c] * lw.maa_x[c];
      } else {
        for (int m = 0; m < 6; ++m)
          for (int64_t c = 0; c < C; ++c) MIX[m][b][c] = XX[b][c] + D_[b][c] * lw.x_[m][c];
      }
      std::copy_n(XX[b], C, prev);
    });
    // the mixed inputs of r, k, v (and g): MIX[0..3] = r, k, v, g for v5 and v6; v7: r, w, k, v, a, g
    const std::vector<float*>* xr = &MIX[0];
    const std::vector<float*>* xk = &MIX[1];
    const std::vector<float*>* xv = &MIX[2];
    const std::vector<float*>* xg = &MIX[3];
    if (arch_ == MatrixArch::kV6) {
      // ddlerp: m = tanh(xxx W1) W2 (five LoRAs), x_* = xx + d (maa_* + m_*); order w, k, v, r, g
      const int64_t D5 = lw.maa_w1.rows, D = D5 / 5;
      jobs = {job(lw.maa_w1, B, MIX[5], L1)};
      run_jobs(isa_, jobs);
      for_rows(B, [&](int64_t b) {
        for (int64_t j = 0; j < D5; ++j) L1[b][j] = std::tanh(L1[b][j]);
      });
      jobs.clear();
      std::vector<std::vector<float*>> parts(5, std::vector<float*>(B));
      for (int m = 0; m < 5; ++m) {
        for (int64_t b = 0; b < B; ++b) parts[m][b] = L1[b] + m * D;
        jobs.push_back(job(lw.maa_w2[m], B, parts[m], M5[m]));
      }
      run_jobs(isa_, jobs);
      // into MIX: 0 r, 1 k, 2 v, 3 g, 4 w
      const int order[5] = {4, 1, 2, 0, 3};  // ddlerp index (w, k, v, r, g) -> MIX slot
      for_rows(B, [&](int64_t b) {
        for (int m = 0; m < 5; ++m)
          for (int64_t c = 0; c < C; ++c) MIX[order[m]][b][c] = XX[b][c] + D_[b][c] * (lw.maa[m][c] + M5[m][b][c]);
      });
    } else if (arch_ == MatrixArch::kV7) {
      xk = &MIX[2];
      xv = &MIX[3];
      xg = &MIX[5];
    }
    jobs = {job(lw.receptance, B, *xr, R_), job(lw.key, B, *xk, K_), job(lw.value, B, *xv, V_)};
    if (lw.gated) jobs.push_back(job(lw.gate, B, *xg, G_));
    if (arch_ == MatrixArch::kV6) jobs.push_back(job(lw.decay_w1, B, MIX[4], L2));
    if (arch_ == MatrixArch::kV7) {
      jobs.push_back(job(lw.w1, B, MIX[1], L1));
      jobs.push_back(job(lw.a1, B, MIX[4], L2));
      jobs.push_back(job(lw.g1, B, MIX[5], L3));
      if (i > 0) jobs.push_back(job(lw.v1, B, MIX[3], L4));
    }
    run_jobs(isa_, jobs);

    if (arch_ == MatrixArch::kV6) {
      const int64_t Dd = lw.decay_w1.rows;
      for_rows(B, [&](int64_t b) {
        for (int64_t j = 0; j < Dd; ++j) L2[b][j] = std::tanh(L2[b][j]);
      });
      jobs = {job(lw.decay_w2, B, L2, W_)};
      run_jobs(isa_, jobs);
      for_rows(B, [&](int64_t b) {
        for (int64_t c = 0; c < C; ++c) W_[b][c] = std::exp(-std::exp(lw.decay_base[c] + W_[b][c]));
      });
    } else if (arch_ == MatrixArch::kV7) {
      for_rows(B, [&](int64_t b) {
        for (int64_t j = 0; j < lw.w1.rows; ++j) L1[b][j] = std::tanh(L1[b][j]);
        for (int64_t j = 0; j < lw.g1.rows; ++j) L3[b][j] = sigmoid(L3[b][j]);
      });
      jobs = {job(lw.w2, B, L1, W_), job(lw.a2, B, L2, A_), job(lw.g2, B, L3, G_)};
      if (i > 0) jobs.push_back(job(lw.v2, B, L4, OUT));
      run_jobs(isa_, jobs);
    }

    // ---- the recurrence, per row and head; then GroupNorm, bonus, gate
    for_rows(B, [&](int64_t b) {
      float* S = wkv_state[b].data_ptr<float>() + i * H * N * N;
      float *rb = R_[b], *kb = K_[b], *vb = V_[b], *yb = Y[b];
      if (arch_ == MatrixArch::kV7) {
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
        head_group_norm(yb, lw.ln_x_weight, lw.ln_x_bias, gn_eps_, H, N);
        for (int64_t h = 0; h < H; ++h) {
          float bonus = 0.f;
          for (int64_t j = 0; j < N; ++j) bonus += rb[h * N + j] * kb[h * N + j] * lw.r_k[h * N + j];
          for (int64_t j = 0; j < N; ++j) yb[h * N + j] += bonus * vb[h * N + j];
        }
        for (int64_t c = 0; c < C; ++c) yb[c] *= G_[b][c];
      } else {
        const float* wb = arch_ == MatrixArch::kV5 ? lw.decay.data() : W_[b];
        for (int64_t h = 0; h < H; ++h)
          wkv5_token(S + h * N * N, rb + h * N, kb + h * N, vb + h * N, wb + h * N, lw.bonus.data() + h * N,
                     yb + h * N, N);
        head_group_norm(yb, lw.ln_x_weight, lw.ln_x_bias, gn_eps_, H, N);
        if (lw.gated)
          for (int64_t c = 0; c < C; ++c) yb[c] *= silu(G_[b][c]);
      }
    });
    jobs = {job(lw.output, B, Y, OUT)};
    run_jobs(isa_, jobs);

    // ---- channel mixing
    for_rows(B, [&](int64_t b) {
      float* xb = X[b];
      for (int64_t c = 0; c < C; ++c) xb[c] += OUT[b][c];
      float* prev = ffn_x[b].data_ptr<float>() + i * C;
      layer_norm(xb, lw.ln2_weight, lw.ln2_bias, ln_eps_, XX[b], C);
      if (arch_ == MatrixArch::kV5) {
        mix(XX[b], prev, lw.ffn_mix_k, MIX[1][b], C);
        mix(XX[b], prev, lw.ffn_mix_r, MIX[0][b], C);
      } else if (arch_ == MatrixArch::kV6) {
        for (int64_t c = 0; c < C; ++c) {
          const float dd = prev[c] - XX[b][c];
          MIX[1][b][c] = XX[b][c] + dd * lw.ffn_mix_k[c];
          MIX[0][b][c] = XX[b][c] + dd * lw.ffn_mix_r[c];
        }
      } else {
        for (int64_t c = 0; c < C; ++c) MIX[1][b][c] = XX[b][c] + (prev[c] - XX[b][c]) * lw.ffn_x_k[c];
      }
      std::copy_n(XX[b], C, prev);
    });
    jobs = {job(lw.ffn_key, B, MIX[1], FK)};
    if (arch_ != MatrixArch::kV7) jobs.push_back(job(lw.ffn_receptance, B, MIX[0], R_));
    run_jobs(isa_, jobs);
    square_relu_rows(B, FK, F);
    jobs = {job(lw.ffn_value, B, FK, OUT)};
    run_jobs(isa_, jobs);
    for_rows(B, [&](int64_t b) {
      float* xb = X[b];
      if (arch_ == MatrixArch::kV7) {
        for (int64_t c = 0; c < C; ++c) xb[c] += OUT[b][c];
      } else {
        for (int64_t c = 0; c < C; ++c) xb[c] += sigmoid(R_[b][c]) * OUT[b][c];
      }
    });
  }
  for (int64_t b = 0; b < B; ++b) layer_norm(X[b], ln_out_weight_, ln_out_bias_, ln_eps_, XX[b], C);
  jobs = {job(head_, B, XX, LOGITS)};
  run_jobs(isa_, jobs);
  return logits;
}

}  // namespace rwkv_cpu
