// CPU kernel of remoe::route_topk: one pass per token row, parallel over tokens.
//
// Legend: T = tokens, E = experts, K = top-k, G = n_group.
// Per row: fp32 scores (softmax / sigmoid / raw logits) -> selection score (+ correction bias
// + reuse bias on preferred experts) -> optional group mask -> top-K by insertion into a sorted
// K-buffer (K is small, E is at most a few hundred) -> weights from the unbiased scores.
// The per-element arithmetic is route_topk_math.h's, shared with the CUDA kernel.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "route_topk.h"
#include "route_topk_math.h"

namespace remoe {
namespace {

// The row functions below are compiled twice (AVX2 and baseline x86-64) and picked at load
// time, so one wheel runs everywhere and recent CPUs get 8-wide math. Vectorizing the branch-free
// selects needs -fno-trapping-math (setup.py): nothing here reads FP exception flags.

// out = softmax(x) over one row of n, in fp32. The max and the sum keep 8 partial results (one
// per AVX2 lane) so both reductions vectorize; the sum's order therefore differs from a serial
// loop by float rounding.
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
  const float shift = softmax_shift(row_max, any_nan);
  for (e = 0; e < n; ++e) out[e] = softmax_term(x[e], shift);
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
  for (int64_t e = 0; e < n; ++e) out[e] = sigmoid_score(in[e]);
}

// out = selection_score of each expert; a null correction_bias or prefer counts as zero / false.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void selection_row(const float* score, const float* correction_bias, const bool* prefer,
                   float reuse_bias, float* out, int64_t n) {
  const uint8_t* pref = reinterpret_cast<const uint8_t*>(prefer);
  for (int64_t e = 0; e < n; ++e) {
    out[e] = selection_score(score[e], correction_bias != nullptr ? correction_bias[e] : 0.0f,
                             pref != nullptr && pref[e] != 0, reuse_bias);
  }
}

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

// Per-thread scratch, sized once per parallel chunk.
struct RowScratch {
  std::vector<float> x;                 // [E] logits as fp32
  std::vector<float> score;             // [E] unbiased scores (weights come from here)
  std::vector<float> select;            // [E] selection scores
  std::vector<uint8_t> keep;            // [E] 1 = candidate (group mask)
  std::vector<float> group;             // [G] group scores
  std::vector<float> kept_group_score;  // [topk_group]
  std::vector<int64_t> kept_group;      // [topk_group]
  std::vector<int32_t> key;             // [E] rank keys
  std::vector<int32_t> top_key;         // [K]
  explicit RowScratch(const RouteTopkParams& p)
      : x(p.num_experts),
        score(p.num_experts),
        select(p.num_experts),
        keep(p.num_experts),
        group(p.n_group),
        kept_group_score(p.topk_group),
        kept_group(p.topk_group),
        key(p.num_experts),
        top_key(p.top_k) {}
};

// The row in fp32: read in place when it already is.
template <typename scalar_t>
const float* row_as_fp32(const scalar_t* row, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    for (int64_t e = 0; e < n; ++e) buf[e] = static_cast<float>(row[e]);
    return buf;
  }
}

// The scores the weights come from: probabilities, or the raw logits for softmax_over_topk.
const float* unbiased_scores(const float* x, Scoring scoring, float* buf, int64_t n) {
  if (scoring == Scoring::kSoftmax) {
    softmax_row(x, buf, n);
    return buf;
  }
  if (scoring == Scoring::kSigmoid) {
    sigmoid_row(x, buf, n);
    return buf;
  }
  return x;
}

// Group-limited selection (DeepSeek): 1 for the experts of the topk_group best groups.
const uint8_t* kept_group_mask(const float* sel, const RouteTopkParams& p, RowScratch& s) {
  const int64_t G = p.n_group;
  const int64_t group_size = p.num_experts / G;
  for (int64_t g = 0; g < G; ++g) {
    Top2<int64_t> best(p.num_experts);
    for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) best.push(sel[e], e);
    s.group[g] = group_score_of(best, p.group_score);
  }
  int64_t kept = 0;
  for (int64_t g = 0; g < G; ++g) {
    insert_ranked(s.group[g], g, s.kept_group_score.data(), s.kept_group.data(), &kept,
                  p.topk_group);
  }
  std::fill(s.keep.begin(), s.keep.end(), 0);
  for (int64_t i = 0; i < kept; ++i) {
    const int64_t g = s.kept_group[i];
    std::fill(s.keep.begin() + g * group_size, s.keep.begin() + (g + 1) * group_size, 1);
  }
  return s.keep.data();
}

// One token row: logits [E] -> ids [K] (best first) and weights [K]. `prefer` [E] or null.
template <typename scalar_t>
void route_row(const scalar_t* logits,        // [E]
               const bool* prefer,            // [E] or null
               const float* correction_bias,  // [E] or null
               float* weights,                // [K]
               int64_t* ids,                  // [K]
               const RouteTopkParams& p, RowScratch& s) {
  const int64_t E = p.num_experts;
  const float* x = row_as_fp32(logits, E, s.x.data());
  const float* score = unbiased_scores(x, p.scoring, s.score.data(), E);
  const float* sel = score;  // unbiased rows skip the copy
  if (prefer != nullptr || correction_bias != nullptr) {
    selection_row(score, correction_bias, prefer, p.reuse_bias, s.select.data(), E);
    sel = s.select.data();
  }
  const uint8_t* keep = p.n_group > 1 ? kept_group_mask(sel, p, s) : nullptr;
  rank_keys_row(sel, keep, s.key.data(), E);
  top_k_of_keys(s.key.data(), E, p.top_k, s.top_key.data(), ids);
  topk_weights(score, ids, p, weights);
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
  RowScratch s(p);
  for (int64_t t = begin; t < end; ++t) {
    const bool* pref = p.has_prefer ? prefer + (p.prefer_per_token ? t * E : 0) : nullptr;
    route_row(logits + t * E, pref, correction_bias, weights + t * K, ids + t * K, p, s);
  }
}

// The "previous" reuse bias over whole sequences: position s of sequence b prefers the K
// experts position s-1 chose (position 0: `previous` [B, K], or no preference when null).
// The recurrence is sequential along S, so one task walks one sequence; sequences run in
// parallel.
template <typename scalar_t>
void route_previous_sequences(const scalar_t* logits,        // [B, S, E]
                              const int64_t* previous,       // [B, K] or null
                              const float* correction_bias,  // [E] or null
                              float* weights,                // [B, S, K]
                              int64_t* ids,                  // [B, S, K]
                              const RouteTopkParams& p, int64_t S, int64_t begin, int64_t end) {
  const int64_t E = p.num_experts;
  const int64_t K = p.top_k;
  RowScratch s(p);
  std::vector<uint8_t> mask(E);  // bool [E]: the previous position's experts
  const bool* pref_mask = reinterpret_cast<const bool*>(mask.data());
  for (int64_t b = begin; b < end; ++b) {
    const int64_t* prev = previous != nullptr ? previous + b * K : nullptr;
    for (int64_t t = 0; t < S; ++t) {
      const int64_t row = b * S + t;
      if (prev != nullptr) {
        std::fill(mask.begin(), mask.end(), 0);
        for (int64_t k = 0; k < K; ++k) mask[prev[k]] = 1;
      }
      route_row(logits + row * E, prev != nullptr ? pref_mask : nullptr, correction_bias,
                weights + row * K, ids + row * K, p, s);
      prev = ids + row * K;
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
  const RouteTopkOperands io = route_topk_operands(logits, p, prefer, correction_bias);
  if (p.num_tokens == 0) return {io.weights, io.ids};

  const bool* prefer_ptr = io.prefer_ptr();
  const float* bias_ptr = io.correction_bias_ptr();
  // A row costs about 10 ns per expert; keep chunks big enough to amortize a task dispatch.
  const int64_t grain = std::max<int64_t>(1, 16384 / p.num_experts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, io.logits.scalar_type(), "route_topk_cpu",
                                  [&] {
                                    const scalar_t* lp = io.logits.data_ptr<scalar_t>();
                                    float* wp = io.weights.data_ptr<float>();
                                    int64_t* ip = io.ids.data_ptr<int64_t>();
                                    at::parallel_for(0, p.num_tokens, grain,
                                                     [&](int64_t begin, int64_t end) {
                                                       route_topk_rows<scalar_t>(
                                                           lp, prefer_ptr, bias_ptr, wp, ip, p,
                                                           begin, end);
                                                     });
                                  });
  return {io.weights, io.ids};
}

std::tuple<at::Tensor, at::Tensor> route_topk_previous_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& previous, int64_t top_k,
    c10::string_view scoring, bool renormalize, double reuse_bias,
    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
    c10::string_view group_score, double routed_scaling) {
  const RoutePreviousArgs a =
      check_route_previous_inputs(logits, previous, top_k, scoring, renormalize, reuse_bias,
                                  correction_bias, n_group, topk_group, group_score,
                                  routed_scaling);
  const RouteTopkParams& p = a.params;
  if (a.previous.defined()) {
    // Ids index the mask: out-of-range ones would write outside it. Cheap on the host (B * K).
    const int64_t* prev = a.previous.data_ptr<int64_t>();
    for (int64_t i = 0; i < a.previous.numel(); ++i) {
      TORCH_CHECK(prev[i] >= 0 && prev[i] < p.num_experts, "route_topk_previous: previous id ",
                  prev[i], " at position ", i, " is outside [0, ", p.num_experts, ")");
    }
  }
  if (p.num_tokens == 0) return {a.weights, a.ids};
  const float* bias_ptr = a.correction_bias.defined() ? a.correction_bias.data_ptr<float>() : nullptr;
  const int64_t* prev_ptr = a.previous.defined() ? a.previous.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, a.logits.scalar_type(), "route_topk_previous_cpu", [&] {
        const scalar_t* lp = a.logits.data_ptr<scalar_t>();
        float* wp = a.weights.data_ptr<float>();
        int64_t* ip = a.ids.data_ptr<int64_t>();
        const auto run = [&](int64_t begin, int64_t end) {
          route_previous_sequences<scalar_t>(lp, prev_ptr, bias_ptr, wp, ip, p, a.seq_len,
                                             begin, end);
        };
        // One sequence (the usual prefill) runs inline: at::parallel_for would still open an
        // OpenMP region for it, whose barrier costs milliseconds on a busy machine (measured:
        // 2.3 ms inline vs 35-60 ms for 4096 positions with the other core loaded).
        if (a.batch == 1) {
          run(0, 1);
        } else {
          at::parallel_for(0, a.batch, 1, run);
        }
      });
  return {a.weights, a.ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(remoe, CPU, m) {
  m.impl("route_topk", &route_topk_cpu);
  m.impl("route_topk_previous", &route_topk_previous_cpu);
}

}  // namespace remoe
