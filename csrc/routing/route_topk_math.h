// The arithmetic of remoe::route_topk written once for both kernels: the CPU translation unit
// compiles these as plain inline C++, the CUDA one as __host__ __device__, so the CPU tests run
// the same expressions the CUDA kernel runs. How rows are reduced and scanned (vector lanes on the
// CPU, warp shuffles on the GPU) stays in each backend; only the exp differs (see route_exp).
//
// Legend: E = experts, K = top-k.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "route_topk.h"

#if defined(__CUDACC__)
#define REMOE_HD __host__ __device__
#else
#define REMOE_HD
#endif

namespace remoe {

// The ranking rule: larger value first, NaN below every number, ties -> lower id.
REMOE_HD inline bool ranks_before(float a, int64_t a_id, float b, int64_t b_id) {
  const bool a_nan = a != a;
  const bool b_nan = b != b;
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a > b;
  return a_id < b_id;
}

REMOE_HD inline float quiet_nan() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7fc00000);
#else
  return std::numeric_limits<float>::quiet_NaN();
#endif
}

// exp(x) in fp32 with about 1 ulp error, written branch-free so the CPU row loops vectorize
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

// The one place the backends' arithmetic differs: std::exp does not vectorize, so the CPU uses
// its own; the GPU has a fast expf. Both are within a few ulp of exp, inside the tests' tolerance,
// and ids never depend on it (ranking a softmax row is ranking its logits).
REMOE_HD inline float route_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_approx(x);
#endif
}

// ---------------------------------------------------------------- per-expert scores from logits

// The shift a softmax subtracts: the row max, or NaN when the row holds a NaN, so the whole row
// comes out NaN as torch.softmax's does.
REMOE_HD inline float softmax_shift(float row_max, bool row_has_nan) {
  return row_has_nan ? quiet_nan() : row_max;
}

// A softmax numerator; the backend divides by the row's sum, which it reduces its own way.
REMOE_HD inline float softmax_term(float logit, float shift) { return route_exp(logit - shift); }

REMOE_HD inline float sigmoid_score(float logit) { return 1.0f / (1.0f + route_exp(-logit)); }

// ---------------------------------------------------------------- selection

// The score an expert is chosen by: biases move the choice, never the weights. Branch-free so the
// CPU row loop vectorizes: a per-token prefer row is close to random, and a branch on it
// mispredicts often. Adding a zero bias turns -0 into +0, which ranks the same.
REMOE_HD inline float selection_score(float score, float correction_bias, bool preferred,
                                      float reuse_bias) {
  return score + correction_bias + (preferred ? reuse_bias : 0.0f);
}

// The best two (value, id) of one group under ranks_before, fed one expert at a time. An empty
// place holds NaN with an id past every expert, so any real expert ranks before it.
template <typename Id>
struct Top2 {
  float value0, value1;
  Id id0, id1;

  REMOE_HD explicit Top2(Id past_last)
      : value0(quiet_nan()), value1(quiet_nan()), id0(past_last), id1(past_last) {}

  REMOE_HD void push(float value, Id id) {
    if (ranks_before(value, id, value0, id0)) {
      value1 = value0;
      id1 = id0;
      value0 = value;
      id0 = id;
    } else if (ranks_before(value, id, value1, id1)) {
      value1 = value;
      id1 = id;
    }
  }
};

// A group's score for group-limited selection (DeepSeek): its best selection score, or the sum
// of its best two.
template <typename Id>
REMOE_HD inline float group_score_of(const Top2<Id>& best, GroupScore kind) {
  return kind == GroupScore::kMax ? best.value0 : best.value0 + best.value1;
}

// ---------------------------------------------------------------- weights

// One token's K weights from the unbiased scores of its chosen experts, so neither the reuse bias
// nor the correction bias ever reaches them.
REMOE_HD inline void topk_weights(const float* score,    // [E] probabilities; fp32 logits
                                                         //     for softmax_over_topk
                                  const int64_t* ids,    // [K] best first
                                  const RouteTopkParams& p,
                                  float* out) {          // [K]
  // int, as E is in the CUDA kernel: 64-bit counters here cost it 8 more registers.
  const int K = static_cast<int>(p.top_k);
  if (p.scoring == Scoring::kSoftmaxOverTopk) {
    float m = -INFINITY;
    bool any_nan = false;
    for (int k = 0; k < K; ++k) {
      const float v = score[ids[k]];
      any_nan |= v != v;
      m = v > m ? v : m;
    }
    const float shift = softmax_shift(m, any_nan);
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) {
      out[k] = softmax_term(score[ids[k]], shift);
      sum += out[k];
    }
    for (int k = 0; k < K; ++k) out[k] /= sum;
  } else {
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) {
      out[k] = score[ids[k]];
      sum += out[k];
    }
    if (p.renormalize) {
      for (int k = 0; k < K; ++k) out[k] /= sum;
    }
  }
  if (p.routed_scaling != 1.0f) {
    for (int k = 0; k < K; ++k) out[k] *= p.routed_scaling;
  }
}

}  // namespace remoe
