// Top-p / top-k / temperature sampling of one token from float32 logits, on the CPU.
//
// Same result as rwkv_playground.sampling.sample_logits (the numpy reference beside it) for the
// same uniform draw: the kept set is the smallest set of most probable tokens whose mass reaches
// top_p (ties at the cut-off kept), the draw walks the kept tokens in id order. The reference
// sorts candidates. Here, on a ~2 GHz laptop-class core where even a scalar pass over 50k floats
// costs ~100 us, every pass over the vocabulary is SIMD (max, exp + sum, the candidate filter; AVX-512
// or AVX2, chosen by cpuid like the step's matvecs),
// and the cut-off comes from a histogram of the candidates' mass over their float bits (positive
// floats order like their bit patterns), so only the one boundary bucket is ever sorted.
// Buffers are thread_local: a fresh 200 KB allocation per token costs page faults in a VM.

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "rnn_cpu.h"  // rwkv_cpu::Isa, parse_isa: the same instruction-set choice as the step
#include "wkv_step.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RWKV_X86 1
#endif

namespace {

using rwkv_cpu::Isa;

constexpr int kBucketShift = 19;  // 8 exponent bits + 4 mantissa bits: 16 buckets per octave
constexpr int kBuckets = 1 << (31 - kBucketShift);
constexpr int64_t kSlack = 16;  // the vector passes store whole vectors past the last kept value

inline uint32_t float_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

// The three passes over the vocabulary, in one version per instruction set:
//   max_of       the largest logit
//   exp_and_sum  weights[i] = exp(x[i] - top), returning their sum (float lanes per block of 1024,
//                the blocks added in double)
//   collect      ids (ascending) and values of the weights >= threshold (> 0 when it is 0); many
//                tokens can pass (16k of 50k for a flat distribution at top_p 0.95), so no
//                branch per token. Returns their number.
struct Passes {
  float (*max_of)(const float* x, int64_t n);
  double (*exp_and_sum)(const float* x, float top, float* weights, int64_t n);
  int64_t (*collect)(const float* weights, int64_t n, float threshold, int32_t* ids, float* vals);
};

inline bool passes_threshold(float w, float threshold) { return threshold <= 0.f ? w > 0.f : w >= threshold; }

namespace scalar {
float max_of(const float* x, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) top = std::max(top, x[i]);
  return top;
}
double exp_and_sum(const float* x, float top, float* weights, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    weights[i] = rwkv_cpu::exp_nonpos(x[i] - top);
    total += weights[i];
  }
  return total;
}
int64_t collect(const float* weights, int64_t n, float threshold, int32_t* ids, float* vals) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (passes_threshold(weights[i], threshold)) {
      ids[count] = static_cast<int32_t>(i);
      vals[count++] = weights[i];
    }
  }
  return count;
}
}  // namespace scalar

#ifdef RWKV_X86
// ---- AVX2 + FMA: 8 lanes ----------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
// exp(x) for x <= 0, eight at a time; the same steps as rwkv_cpu::exp_nonpos.
inline __m256 exp_nonpos(__m256 x) {
  const __m256 clamped = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 shifter = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(clamped, _mm256_set1_ps(1.44269504088896341f), shifter), shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), clamped);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.3888889e-3f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3333333e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1666667e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666667e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_and_ps(result, _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ));
}

float max_of(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  float top = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
  for (; i < n; ++i) top = std::max(top, x[i]);
  return top;
}

double exp_and_sum(const float* x, float top, float* weights, int64_t n) {
  double total = 0.0;
  int64_t i = 0;
  const __m256 shift = _mm256_set1_ps(top);
  while (i + 8 <= n) {
    __m256 acc = _mm256_setzero_ps();
    const int64_t end = std::min(n & ~int64_t(7), i + 1024);
    for (; i < end; i += 8) {
      const __m256 w = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift));
      _mm256_storeu_ps(weights + i, w);
      acc = _mm256_add_ps(acc, w);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (float v : lanes) total += v;
  }
  for (; i < n; ++i) {
    weights[i] = rwkv_cpu::exp_nonpos(x[i] - top);
    total += weights[i];
  }
  return total;
}

// For each 8-bit mask, the lanes whose bit is set, packed to the front: a branch-free "compress".
struct CompressTable {
  alignas(32) int32_t lanes[256][8];
  CompressTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int n = 0;
      for (int j = 0; j < 8; ++j) if (mask & (1 << j)) lanes[mask][n++] = j;
      for (; n < 8; ++n) lanes[mask][n] = 0;
    }
  }
};
const CompressTable kCompress;

int64_t collect(const float* weights, int64_t n, float threshold, int32_t* ids, float* vals) {
  int64_t count = 0, i = 0;
  const bool strict = threshold <= 0.f;
  const __m256 t = _mm256_set1_ps(strict ? 0.f : threshold);
  const __m256i lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; i + 8 <= n; i += 8) {
    const __m256 w = _mm256_loadu_ps(weights + i);
    const int mask = _mm256_movemask_ps(strict ? _mm256_cmp_ps(w, t, _CMP_GT_OQ) : _mm256_cmp_ps(w, t, _CMP_GE_OQ));
    const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.lanes[mask]));
    _mm256_storeu_ps(vals + count, _mm256_permutevar8x32_ps(w, order));
    const __m256i idx = _mm256_add_epi32(lane_ids, _mm256_set1_epi32(static_cast<int32_t>(i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ids + count), _mm256_permutevar8x32_epi32(idx, order));
    count += __builtin_popcount(mask);
  }
  for (; i < n; ++i) {
    if (passes_threshold(weights[i], threshold)) {
      ids[count] = static_cast<int32_t>(i);
      vals[count++] = weights[i];
    }
  }
  return count;
}
}  // namespace avx2
#pragma GCC pop_options

// ---- AVX-512: 16 lanes, with the mask registers' compress -------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace avx512 {
inline __m512 exp_nonpos(__m512 x) {  // the same steps as avx2::exp_nonpos, sixteen at a time
  const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 shifter = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(clamped, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.3888889e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3333333e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1666667e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666667e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 result = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), result);
}

float max_of(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  float top = _mm512_reduce_max_ps(m);
  for (; i < n; ++i) top = std::max(top, x[i]);
  return top;
}

double exp_and_sum(const float* x, float top, float* weights, int64_t n) {
  double total = 0.0;
  int64_t i = 0;
  const __m512 shift = _mm512_set1_ps(top);
  while (i + 16 <= n) {
    __m512 acc = _mm512_setzero_ps();
    const int64_t end = std::min(n & ~int64_t(15), i + 1024);
    for (; i < end; i += 16) {
      const __m512 w = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift));
      _mm512_storeu_ps(weights + i, w);
      acc = _mm512_add_ps(acc, w);
    }
    float lanes[16];
    _mm512_storeu_ps(lanes, acc);
    for (float v : lanes) total += v;
  }
  for (; i < n; ++i) {
    weights[i] = rwkv_cpu::exp_nonpos(x[i] - top);
    total += weights[i];
  }
  return total;
}

int64_t collect(const float* weights, int64_t n, float threshold, int32_t* ids, float* vals) {
  int64_t count = 0, i = 0;
  const bool strict = threshold <= 0.f;
  const __m512 t = _mm512_set1_ps(strict ? 0.f : threshold);
  const __m512i lane_ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= n; i += 16) {
    const __m512 w = _mm512_loadu_ps(weights + i);
    const __mmask16 mask = strict ? _mm512_cmp_ps_mask(w, t, _CMP_GT_OQ) : _mm512_cmp_ps_mask(w, t, _CMP_GE_OQ);
    // compress in registers, then a full store (compress-to-memory is microcoded on some CPUs)
    _mm512_storeu_ps(vals + count, _mm512_maskz_compress_ps(mask, w));
    const __m512i idx = _mm512_add_epi32(lane_ids, _mm512_set1_epi32(static_cast<int32_t>(i)));
    _mm512_storeu_si512(ids + count, _mm512_maskz_compress_epi32(mask, idx));
    count += __builtin_popcount(mask);
  }
  for (; i < n; ++i) {
    if (passes_threshold(weights[i], threshold)) {
      ids[count] = static_cast<int32_t>(i);
      vals[count++] = weights[i];
    }
  }
  return count;
}
}  // namespace avx512
#pragma GCC pop_options
#endif  // RWKV_X86

Passes passes_for(Isa isa) {
#ifdef RWKV_X86
  if (isa == Isa::kAvx512) return {avx512::max_of, avx512::exp_and_sum, avx512::collect};
  if (isa == Isa::kAvx2) return {avx2::max_of, avx2::exp_and_sum, avx2::collect};
#endif
  return {scalar::max_of, scalar::exp_and_sum, scalar::collect};
}

// The value v such that the values >= v are the smallest most-probable set whose summed mass
// reaches `target` (ties at v included). If rounding keeps the total below target: the smallest.
// kept_mass: the summed mass of the values >= v.
float top_p_cutoff(const float* vals, int64_t count, double target, double& kept_mass) {
  static thread_local std::vector<double> mass;
  mass.assign(kBuckets, 0.0);
  float smallest = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < count; ++i) {
    const float v = vals[i];
    mass[float_bits(v) >> kBucketShift] += v;
    smallest = std::min(smallest, v);
  }
  double above = 0.0;  // mass of the buckets above the current one
  for (int b = kBuckets - 1; b >= 0; --b) {
    if (mass[b] == 0.0 || above + mass[b] < target) {
      above += mass[b];
      continue;
    }
    // the boundary bucket: sort its members, walk down until the mass is reached
    static thread_local std::vector<float> members;
    members.clear();
    for (int64_t i = 0; i < count; ++i) {
      if (static_cast<int>(float_bits(vals[i]) >> kBucketShift) == b) members.push_back(vals[i]);
    }
    std::sort(members.begin(), members.end(), std::greater<float>());
    double cumulative = above;
    for (size_t i = 0; i < members.size(); ++i) {
      cumulative += members[i];
      if (cumulative >= target) {
        for (size_t j = i + 1; j < members.size() && members[j] == members[i]; ++j) cumulative += members[j];
        kept_mass = cumulative;
        return members[i];
      }
    }
    kept_mass = cumulative;
    return members.back();
  }
  kept_mass = above;
  return smallest;
}

}  // namespace

// Returns the sampled token id, or -1 when the logits have no finite maximum (the caller then
// uses the reference, which defines those cases). temperature > 0, 0 < top_p <= 1, top_k != 1
// (the caller handles the greedy cases), uniform in [0, 1).
int64_t sample_top_p(const at::Tensor& logits, double temperature, double top_p, int64_t top_k, double uniform,
                     const std::string& isa) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 1 &&
                  logits.is_contiguous(),
              "sample_top_p: logits must be a contiguous float32 CPU vector");
  TORCH_CHECK(logits.numel() < std::numeric_limits<int32_t>::max(), "sample_top_p: vocabulary too large");
  const int64_t V = logits.numel();
  const float* lp = logits.data_ptr<float>();
  static thread_local std::string cached_isa;  // parse once per thread, not per token
  static thread_local Passes passes = passes_for(rwkv_cpu::parse_isa("auto"));
  if (isa != cached_isa) {
    passes = passes_for(rwkv_cpu::parse_isa(isa));
    cached_isa = isa;
  }
  const float top = passes.max_of(lp, V);
  if (!std::isfinite(top)) return -1;

  static thread_local std::vector<float> weights;
  static thread_local std::vector<int32_t> ids;
  static thread_local std::vector<float> vals;
  weights.resize(V);
  const double total = passes.exp_and_sum(lp, top, weights.data(), V);
  if (!std::isfinite(total)) return -1;  // NaN logits
  // Tokens below tau hold less than (1 - top_p) of the mass together: the kept set is above it.
  // (compared in float32, as the reference does)
  if (static_cast<int64_t>(ids.size()) < V + kSlack) {  // sized once (no re-zeroing per token)
    ids.resize(V + kSlack);
    vals.resize(V + kSlack);
  }
  const int64_t count = passes.collect(weights.data(), V, static_cast<float>((1.0 - top_p) * total / V), ids.data(),
                                       vals.data());
  float cutoff = 0.f;
  double kept_mass = -1.0;  // known without another pass in the common case (top_p only, T = 1)
  if (top_p < 1.0) cutoff = top_p_cutoff(vals.data(), count, top_p * total, kept_mass);
  // top_k: keep the k largest; among ties at the k-th value, the first ones in id order
  int64_t ties_allowed = std::numeric_limits<int64_t>::max();
  if (top_k > 0) {
    static thread_local std::vector<float> kept;
    kept.clear();
    for (int64_t j = 0; j < count; ++j) if (vals[j] >= cutoff) kept.push_back(vals[j]);
    if (top_k < static_cast<int64_t>(kept.size())) {
      std::nth_element(kept.begin(), kept.begin() + (top_k - 1), kept.end(), std::greater<float>());
      cutoff = kept[top_k - 1];
      ties_allowed = top_k - std::count_if(kept.begin(), kept.end(), [&](float v) { return v > cutoff; });
    }
  }
  // draw: walk the kept tokens in id order (twice: the total, then the pick) with
  // p = w ** (1 / temperature) = exp((logit - top) / temperature)
  const float inv_t = static_cast<float>(1.0 / temperature);
  auto weight = [&](int64_t j) {
    return temperature == 1.0 ? double(vals[j]) : double(rwkv_cpu::exp_nonpos((lp[ids[j]] - top) * inv_t));
  };
  auto kept_at = [&](int64_t j, int64_t& ties) {
    if (vals[j] < cutoff) return false;
    return !(vals[j] == cutoff && ties-- <= 0);
  };
  double sum = 0.0;
  int64_t ties = ties_allowed, last = -1;
  if (kept_mass > 0 && temperature == 1.0 && ties_allowed == std::numeric_limits<int64_t>::max()) {
    sum = kept_mass;
    for (int64_t j = count - 1; j >= 0; --j) {
      if (vals[j] >= cutoff) { last = ids[j]; break; }
    }
  } else {
    for (int64_t j = 0; j < count; ++j) {
      if (!kept_at(j, ties)) continue;
      sum += weight(j);
      last = ids[j];
    }
  }
  if (last < 0) return -1;
  const double r = uniform * sum;
  double cumulative = 0.0;
  ties = ties_allowed;
  for (int64_t j = 0; j < count; ++j) {
    if (!kept_at(j, ties)) continue;
    cumulative += weight(j);
    if (cumulative > r) return ids[j];
  }
  return last;
}
