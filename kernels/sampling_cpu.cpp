// Top-p / top-k / temperature sampling of one token from float32 logits, on the CPU.
//
// Same result as rwkv_playground.sampling.sample_logits (the numpy reference beside it) for the
// same uniform draw: the kept set is the smallest set of most probable tokens whose mass reaches
// top_p (ties at the cut-off kept), the draw walks the kept tokens in id order. The reference
// sorts candidates. Here, on a ~2 GHz laptop-class core where even a scalar pass over 50k floats
// costs ~100 us, every pass over the vocabulary is AVX2 (max, exp + sum, the candidate filter),
// and the cut-off comes from a histogram of the candidates' mass over their float bits (positive
// floats order like their bit patterns), so only the one boundary bucket is ever sorted.
// Buffers are thread_local: a fresh 200 KB allocation per token costs page faults in a VM.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RWKV_AVX2 1
#endif

#include "wkv_step.h"

namespace {

constexpr int kBucketShift = 19;  // 8 exponent bits + 4 mantissa bits: 16 buckets per octave
constexpr int kBuckets = 1 << (31 - kBucketShift);

inline uint32_t float_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

#ifdef RWKV_AVX2
// exp(x) for x <= 0, eight at a time; the same steps as rwkv_cpu::exp_nonpos.
inline __m256 exp_nonpos8(__m256 x) {
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

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
#endif

float max_of(const float* x, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#ifdef RWKV_AVX2
  __m256 m = _mm256_set1_ps(top);
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  top = hmax(m);
#endif
  for (; i < n; ++i) top = std::max(top, x[i]);
  return top;
}

// weights[i] = exp(x[i] - top); returns their sum (float lanes per block, added in double)
double exp_and_sum(const float* x, float top, float* weights, int64_t n) {
  double total = 0.0;
  int64_t i = 0;
#ifdef RWKV_AVX2
  const __m256 shift = _mm256_set1_ps(top);
  while (i + 8 <= n) {
    __m256 acc = _mm256_setzero_ps();
    const int64_t end = std::min(n & ~int64_t(7), i + 1024);
    for (; i < end; i += 8) {
      const __m256 w = exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift));
      _mm256_storeu_ps(weights + i, w);
      acc = _mm256_add_ps(acc, w);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (float v : lanes) total += v;
  }
#endif
  for (; i < n; ++i) {
    weights[i] = rwkv_cpu::exp_nonpos(x[i] - top);
    total += weights[i];
  }
  return total;
}

#ifdef RWKV_AVX2
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
#endif

// ids (ascending) and values of the weights >= threshold (> 0 when threshold is 0).
// Many tokens can pass (16k of 50k for a flat distribution at top_p 0.95): no branch per token.
// Returns their number; the buffers keep their size (n + 8) between calls (no re-zeroing).
int64_t collect(const float* weights, int64_t n, float threshold, std::vector<int32_t>& ids, std::vector<float>& vals) {
  if (static_cast<int64_t>(ids.size()) < n + 8) ids.resize(n + 8);
  if (static_cast<int64_t>(vals.size()) < n + 8) vals.resize(n + 8);
  int32_t* id_out = ids.data();
  float* val_out = vals.data();
  int64_t count = 0, i = 0;
  const bool strict = threshold <= 0.f;
#ifdef RWKV_AVX2
  const __m256 t = _mm256_set1_ps(strict ? 0.f : threshold);
  const __m256i lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; i + 8 <= n; i += 8) {
    const __m256 w = _mm256_loadu_ps(weights + i);
    const int mask = _mm256_movemask_ps(strict ? _mm256_cmp_ps(w, t, _CMP_GT_OQ) : _mm256_cmp_ps(w, t, _CMP_GE_OQ));
    const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.lanes[mask]));
    _mm256_storeu_ps(val_out + count, _mm256_permutevar8x32_ps(w, order));
    const __m256i idx = _mm256_add_epi32(lane_ids, _mm256_set1_epi32(static_cast<int32_t>(i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(id_out + count), _mm256_permutevar8x32_epi32(idx, order));
    count += __builtin_popcount(mask);
  }
#endif
  for (; i < n; ++i) {
    if (strict ? weights[i] > 0.f : weights[i] >= threshold) {
      id_out[count] = static_cast<int32_t>(i);
      val_out[count++] = weights[i];
    }
  }
  return count;
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
int64_t sample_top_p(const at::Tensor& logits, double temperature, double top_p, int64_t top_k, double uniform) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 1 &&
                  logits.is_contiguous(),
              "sample_top_p: logits must be a contiguous float32 CPU vector");
  TORCH_CHECK(logits.numel() < std::numeric_limits<int32_t>::max(), "sample_top_p: vocabulary too large");
  const int64_t V = logits.numel();
  const float* lp = logits.data_ptr<float>();
  const float top = max_of(lp, V);
  if (!std::isfinite(top)) return -1;

  static thread_local std::vector<float> weights;
  static thread_local std::vector<int32_t> ids;
  static thread_local std::vector<float> vals;
  weights.resize(V);
  const double total = exp_and_sum(lp, top, weights.data(), V);
  if (!std::isfinite(total)) return -1;  // NaN logits
  // Tokens below tau hold less than (1 - top_p) of the mass together: the kept set is above it.
  // (compared in float32, as the reference does)
  const int64_t count = collect(weights.data(), V, static_cast<float>((1.0 - top_p) * total / V), ids, vals);
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
