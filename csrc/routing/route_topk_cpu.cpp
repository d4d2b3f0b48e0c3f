// CPU kernel of remoe::route_topk: one pass per token row, parallel over tokens.
//
// Legend: T = tokens, E = experts, K = top-k, G = n_group.
// Per row: fp32 scores (softmax / sigmoid / raw logits) -> selection score (+ correction bias
// + reuse bias on preferred experts) -> optional group mask -> top-K by insertion into a sorted
// K-buffer (K is small, E is at most a few hundred) -> weights from the unbiased scores.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "route_topk.h"

namespace remoe {
namespace {

// exp(x) in fp32 with about 1 ulp error, written branch-free so the row loop vectorizes
// (Cephes-style range reduction plus a degree-6 polynomial). exp(-inf) = 0, exp(+inf) = inf and
// exp(nan) = nan, as std::exp.
inline float exp_approx(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kMaxArg = 88.3762626647949f;
  constexpr float kMinArg = -87.3365447504019f;  // below this the result is subnormal: flush to 0
  float xc = x < kMinArg ? kMinArg : x;
  xc = xc > kMaxArg ? kMaxArg : xc;
  xc = xc != xc ? 0.0f : xc;  // keep the integer conversion below well defined for NaN
  const float n = __builtin_floorf(xc * kLog2e + 0.5f);
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float result = y * scale;
  result = x < kMinArg ? 0.0f : result;
  result = x > kMaxArg ? std::numeric_limits<float>::infinity() : result;
  result = x != x ? x : result;
  return result;
}

// The row functions below are compiled twice (AVX2 and baseline x86-64) and picked at load
// time, so one wheel runs everywhere and recent CPUs get 8-wide math. Vectorizing the branch-free
// selects needs -fno-trapping-math (setup.py): nothing here reads FP exception flags.

// out = softmax(x) over one row of n, in fp32. A NaN anywhere makes the whole row NaN, as
// torch.softmax does. The max and the sum keep 8 partial results (one per AVX2 lane) so both
// reductions vectorize; the sum's order therefore differs from a serial loop by float rounding.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void softmax_row(const float* x, float* out, int64_t n) {
  constexpr int kLanes = 8;
  float lane_max[kLanes];
  int lane_nan[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    lane_max[j] = -std::numeric_limits<float>::infinity();
    lane_nan[j] = 0;
  }
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float v = x[e + j];
      lane_nan[j] |= v != v;
      lane_max[j] = v > lane_max[j] ? v : lane_max[j];
    }
  }
  for (; e < n; ++e) {
    lane_nan[0] |= x[e] != x[e];
    lane_max[0] = x[e] > lane_max[0] ? x[e] : lane_max[0];
  }
  float row_max = lane_max[0];
  int any_nan = lane_nan[0];
  for (int j = 1; j < kLanes; ++j) {
    row_max = lane_max[j] > row_max ? lane_max[j] : row_max;
    any_nan |= lane_nan[j];
  }
  if (any_nan) row_max = std::numeric_limits<float>::quiet_NaN();
  for (e = 0; e < n; ++e) out[e] = exp_approx(x[e] - row_max);
  float lane_sum[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (e = 0; e + kLanes <= n; e += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane_sum[j] += out[e + j];
  }
  for (; e < n; ++e) lane_sum[0] += out[e];
  float sum = 0.0f;
  for (int j = 0; j < kLanes; ++j) sum += lane_sum[j];
  const float inv = 1.0f / sum;
  for (e = 0; e < n; ++e) out[e] *= inv;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void sigmoid_row(const float* in, float* out, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e] = 1.0f / (1.0f + exp_approx(-in[e]));
}

// out = score (+ correction_bias) (+ reuse_bias where preferred), in that order. Branch-free so it
// vectorizes: a per-token `prefer` row is close to random, and a branch on it mispredicts often.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void selection_row(const float* score, const float* correction_bias, const bool* prefer,
                   float reuse_bias, float* out, int64_t n) {
  if (correction_bias != nullptr) {
    for (int64_t e = 0; e < n; ++e) out[e] = score[e] + correction_bias[e];
  } else {
    std::memcpy(out, score, sizeof(float) * n);
  }
  if (prefer != nullptr) {
    const uint8_t* pref = reinterpret_cast<const uint8_t*>(prefer);
    for (int64_t e = 0; e < n; ++e) out[e] += pref[e] ? reuse_bias : 0.0f;
  }
}

// Per-thread scratch, sized once per parallel chunk.
struct RowScratch {
  std::vector<float> x;       // [E] logits as fp32
  std::vector<float> score;   // [E] unbiased scores (weights come from here)
  std::vector<float> select;  // [E] selection scores
  std::vector<uint8_t> keep;  // [E] 1 = candidate (group mask)
  std::vector<float> group;   // [G] group scores
  std::vector<uint8_t> group_keep;  // [G]
  explicit RowScratch(int64_t E, int64_t G)
      : x(E), score(E), select(E), keep(E, 1), group(G), group_keep(G) {}
};

// Inserts (value, id) into the sorted buffer (best first) of capacity `cap` holding `*count`.
// Used for the group ranking (a handful of groups); experts go through rank keys below.
inline void insert_ranked(float value, int64_t id, float* vals, int64_t* ids, int64_t* count,
                          int64_t cap) {
  int64_t i = *count < cap ? *count : cap - 1;
  if (*count == cap && !ranks_before(value, id, vals[cap - 1], ids[cap - 1])) return;
  while (i > 0 && ranks_before(value, id, vals[i - 1], ids[i - 1])) {
    vals[i] = vals[i - 1];
    ids[i] = ids[i - 1];
    --i;
  }
  vals[i] = value;
  ids[i] = id;
  if (*count < cap) ++*count;
}

// The ranking rule as int32 keys, so the top-K scan compares integers: a larger key ranks first,
// and since experts are scanned in id order, "strictly larger" also settles ties toward the lower
// id. Floats map monotonically (sign-magnitude to two's complement, -0 folded into +0 because
// the rule treats them as equal); every NaN maps to kNanKey, below -inf; experts a group mask
// excludes get kExcludedKey and are never taken.
constexpr int32_t kExcludedKey = std::numeric_limits<int32_t>::min();
constexpr int32_t kNanKey = kExcludedKey + 1;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void rank_keys_row(const float* sel, const uint8_t* keep, int32_t* key, int64_t n) {
  for (int64_t e = 0; e < n; ++e) {
    const float v = sel[e] + 0.0f;  // -0 + 0 = +0 (round to nearest)
    int32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    int32_t k = bits ^ ((bits >> 31) & 0x7fffffff);
    k = v != v ? kNanKey : k;
    if (keep != nullptr) k = keep[e] ? k : kExcludedKey;
    key[e] = k;
  }
}

// Top-K of one row's keys into ids[0..K) (best first). Most experts fail one integer compare
// against the current K-th key; the rest shift into a sorted buffer of K.
inline void top_k_of_keys(const int32_t* key, int64_t n, int64_t K, int32_t* top_key,
                          int64_t* ids) {
  int64_t count = 0;
  for (int64_t e = 0; e < n; ++e) {
    const int32_t k = key[e];
    if (k == kExcludedKey) continue;
    int64_t i;
    if (count == K) {
      if (k <= top_key[K - 1]) continue;
      i = K - 1;
    } else {
      i = count++;
    }
    while (i > 0 && k > top_key[i - 1]) {
      top_key[i] = top_key[i - 1];
      ids[i] = ids[i - 1];
      --i;
    }
    top_key[i] = k;
    ids[i] = e;
  }
}

template <typename scalar_t>
void route_topk_rows(const scalar_t* logits,          // [T, E]
                     const bool* prefer,              // [E] or [T, E] or null
                     const float* correction_bias,    // [E] or null
                     float* weights,                  // [T, K]
                     int64_t* ids,                    // [T, K]
                     const RouteTopkParams& p, int64_t begin, int64_t end) {
  const int64_t E = p.num_experts;
  const int64_t K = p.top_k;
  const int64_t G = p.n_group;
  const int64_t group_size = E / G;
  RowScratch s(E, G);
  std::vector<int32_t> keys(E);
  std::vector<int32_t> top_key(K);

  for (int64_t t = begin; t < end; ++t) {
    const scalar_t* row = logits + t * E;
    const float* x;  // the row in fp32: read in place when it already is
    if constexpr (std::is_same_v<scalar_t, float>) {
      x = row;
    } else {
      float* converted = s.x.data();
      for (int64_t e = 0; e < E; ++e) converted[e] = static_cast<float>(row[e]);
      x = converted;
    }

    // 1. Unbiased fp32 scores (softmax_over_topk scores the raw logits).
    const float* score = x;
    if (p.scoring == Scoring::kSoftmax) {
      softmax_row(x, s.score.data(), E);
      score = s.score.data();
    } else if (p.scoring == Scoring::kSigmoid) {
      sigmoid_row(x, s.score.data(), E);
      score = s.score.data();
    }

    // 2. Selection scores: biases move the choice, never the weights.
    const float* sel = score;
    if (p.has_prefer || p.has_correction_bias) {
      const bool* pref = p.has_prefer ? prefer + (p.prefer_per_token ? t * E : 0) : nullptr;
      selection_row(score, correction_bias, pref, p.reuse_bias, s.select.data(), E);
      sel = s.select.data();
    }

    // 3. Group-limited selection (DeepSeek): keep the topk_group best groups.
    const uint8_t* keep = nullptr;
    if (G > 1) {
      for (int64_t g = 0; g < G; ++g) {
        float best[2];
        int64_t best_id[2];
        int64_t n = 0;
        for (int64_t j = 0; j < group_size; ++j) {
          const int64_t e = g * group_size + j;
          insert_ranked(sel[e], e, best, best_id, &n, 2);
        }
        s.group[g] = p.group_score == GroupScore::kMax ? best[0] : best[0] + best[1];
      }
      float gval[64];
      int64_t gid[64];
      std::vector<float> gval_big;
      std::vector<int64_t> gid_big;
      float* gv = gval;
      int64_t* gi = gid;
      if (p.topk_group > 64) {
        gval_big.resize(p.topk_group);
        gid_big.resize(p.topk_group);
        gv = gval_big.data();
        gi = gid_big.data();
      }
      int64_t n = 0;
      for (int64_t g = 0; g < G; ++g) insert_ranked(s.group[g], g, gv, gi, &n, p.topk_group);
      std::fill(s.keep.begin(), s.keep.end(), 0);
      for (int64_t i = 0; i < n; ++i) {
        std::fill(s.keep.begin() + gi[i] * group_size, s.keep.begin() + (gi[i] + 1) * group_size,
                  1);
      }
      keep = s.keep.data();
    }

    // 4. Top-K by the ranking rule (ties -> lower id, NaN last).
    int64_t* out_ids = ids + t * K;
    rank_keys_row(sel, keep, keys.data(), E);
    top_k_of_keys(keys.data(), E, K, top_key.data(), out_ids);

    // 5. Weights from the unbiased scores.
    float* out_w = weights + t * K;
    if (p.scoring == Scoring::kSoftmaxOverTopk) {
      float m = -std::numeric_limits<float>::infinity();
      bool any_nan = false;
      for (int64_t k = 0; k < K; ++k) {
        const float v = x[out_ids[k]];
        any_nan |= v != v;
        m = v > m ? v : m;
      }
      if (any_nan) m = std::numeric_limits<float>::quiet_NaN();
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        out_w[k] = exp_approx(x[out_ids[k]] - m);
        sum += out_w[k];
      }
      for (int64_t k = 0; k < K; ++k) out_w[k] /= sum;
    } else {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        out_w[k] = score[out_ids[k]];
        sum += out_w[k];
      }
      if (p.renormalize) {
        for (int64_t k = 0; k < K; ++k) out_w[k] /= sum;
      }
    }
    if (p.routed_scaling != 1.0f) {
      for (int64_t k = 0; k < K; ++k) out_w[k] *= p.routed_scaling;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> route_topk_cpu(
    const at::Tensor& logits, int64_t top_k, c10::string_view scoring, bool renormalize,
    const std::optional<at::Tensor>& prefer, double reuse_bias,
    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
    c10::string_view group_score, double routed_scaling) {
  const RouteTopkParams p =
      check_route_topk_inputs(logits, top_k, scoring, renormalize, prefer, reuse_bias,
                              correction_bias, n_group, topk_group, group_score, routed_scaling);
  const at::Tensor logits_c = logits.contiguous();
  const at::Tensor prefer_c = p.has_prefer ? prefer->contiguous() : at::Tensor();
  const at::Tensor bias_c = p.has_correction_bias ? correction_bias->contiguous() : at::Tensor();
  at::Tensor weights = at::empty({p.num_tokens, p.top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({p.num_tokens, p.top_k}, logits.options().dtype(at::kLong));
  if (p.num_tokens == 0) return {weights, ids};

  const bool* prefer_ptr = p.has_prefer ? prefer_c.data_ptr<bool>() : nullptr;
  const float* bias_ptr = p.has_correction_bias ? bias_c.data_ptr<float>() : nullptr;
  // A row costs about 10 ns per expert; keep chunks big enough to amortize a task dispatch.
  const int64_t grain = std::max<int64_t>(1, 16384 / p.num_experts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits_c.scalar_type(), "route_topk_cpu",
                                  [&] {
                                    const scalar_t* lp = logits_c.data_ptr<scalar_t>();
                                    float* wp = weights.data_ptr<float>();
                                    int64_t* ip = ids.data_ptr<int64_t>();
                                    at::parallel_for(0, p.num_tokens, grain,
                                                     [&](int64_t begin, int64_t end) {
                                                       route_topk_rows<scalar_t>(
                                                           lp, prefer_ptr, bias_ptr, wp, ip, p,
                                                           begin, end);
                                                     });
                                  });
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(remoe, CPU, m) { m.impl("route_topk", &route_topk_cpu); }

}  // namespace remoe
