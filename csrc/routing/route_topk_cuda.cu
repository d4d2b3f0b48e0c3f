// CUDA kernel of remoe::route_topk: one warp per token row.
//
// Legend: T = tokens, E = experts, K = top-k, G = n_group.
// A warp stages the row's fp32 scores (and biased selection scores) in shared memory, keeps the
// topk_group best groups, then picks the K winners in K rounds of a warp-wide arg-best. Round r
// only considers entries ranked strictly after round r-1's winner under the total order
// (value desc, NaN last, id asc), so nothing needs to be marked as taken. Decode has T = 1..B, so
// the kernel is latency-bound: no block-wide syncs, no atomics, no host syncs. The per-element
// arithmetic is route_topk_math.h's: the CPU kernel runs the same code, exp aside.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "route_topk.h"
#include "route_topk_math.h"

namespace remoe {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Shared memory a block may use without opting in to more.
constexpr int64_t kSharedBudget = 40 * 1024;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

// Warp-wide best (value, id) under ranks_before; every lane gets the winner.
__device__ __forceinline__ void warp_best(float& value, int& id) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other_value = __shfl_xor_sync(kFullMask, value, offset);
    const int other_id = __shfl_xor_sync(kFullMask, id, offset);
    if (ranks_before(other_value, other_id, value, id)) {
      value = other_value;
      id = other_id;
    }
  }
}

// A lane with no candidate offers NaN with an id past every real one: it ranks last.
__device__ __forceinline__ void no_candidate(float& value, int& id, int limit) {
  value = quiet_nan();
  id = limit + static_cast<int>(threadIdx.x % kWarpSize);
}

// One token row by one warp: steps 1-5 of the file comment. Shared-memory scratch of the warp:
// score [E], select [E] (select == score when `biased` is false), group_score [G],
// group_kept [G]. pref: bool [E] or null.
template <typename scalar_t>
__device__ __forceinline__ void route_row_warp(const scalar_t* __restrict__ row,     // [E]
                                               const bool* pref,                      // [E] | null
                                               const float* __restrict__ correction_bias,  // [E]|null
                                               float* __restrict__ out_w,             // [K]
                                               int64_t* __restrict__ out_ids,         // [K]
                                               const RouteTopkParams& p, bool biased, float* score,
                                               float* select, float* group_score,
                                               float* group_kept, int lane) {
  const int E = static_cast<int>(p.num_experts);
  const int K = static_cast<int>(p.top_k);
  const int G = static_cast<int>(p.n_group);

  // 1. Unbiased fp32 scores.
  if (p.scoring == Scoring::kSoftmax) {
    float row_max = -INFINITY;
    bool any_nan = false;
    for (int e = lane; e < E; e += kWarpSize) {
      const float x = static_cast<float>(row[e]);
      any_nan |= x != x;
      row_max = fmaxf(row_max, x);
    }
    const float shift = softmax_shift(warp_max(row_max), __any_sync(kFullMask, any_nan));
    float sum = 0.0f;
    for (int e = lane; e < E; e += kWarpSize) {
      const float v = softmax_term(static_cast<float>(row[e]), shift);
      score[e] = v;
      sum += v;
    }
    const float inv = 1.0f / warp_sum(sum);
    for (int e = lane; e < E; e += kWarpSize) score[e] *= inv;
  } else if (p.scoring == Scoring::kSigmoid) {
    for (int e = lane; e < E; e += kWarpSize) {
      score[e] = sigmoid_score(static_cast<float>(row[e]));
    }
  } else {
    for (int e = lane; e < E; e += kWarpSize) score[e] = static_cast<float>(row[e]);
  }

  // 2. Selection scores: biases move the choice, never the weights.
  if (biased) {
    for (int e = lane; e < E; e += kWarpSize) {
      select[e] = selection_score(score[e], correction_bias != nullptr ? correction_bias[e] : 0.0f,
                                  pref != nullptr && pref[e], p.reuse_bias);
    }
  }
  __syncwarp();

  // 3. Group-limited selection (DeepSeek): keep the topk_group best groups.
  const int group_size = E / G;
  if (G > 1) {
    for (int g = lane; g < G; g += kWarpSize) {
      Top2<int> best(E);
      for (int e = g * group_size; e < (g + 1) * group_size; ++e) best.push(select[e], e);
      group_score[g] = group_score_of(best, p.group_score);
      group_kept[g] = 0.0f;
    }
    __syncwarp();
    float prev_value = 0.0f;
    int prev_id = -1;
    for (int round = 0; round < p.topk_group; ++round) {
      float value;
      int id;
      no_candidate(value, id, G);
      for (int g = lane; g < G; g += kWarpSize) {
        const float v = group_score[g];
        const bool after_prev = prev_id < 0 || ranks_before(prev_value, prev_id, v, g);
        if (after_prev && ranks_before(v, g, value, id)) {
          value = v;
          id = g;
        }
      }
      warp_best(value, id);
      if (lane == 0) group_kept[id] = 1.0f;
      prev_value = value;
      prev_id = id;
    }
    __syncwarp();
  }

  // 4. Top-K in K rounds; lane 0 writes each winner.
  float prev_value = 0.0f;
  int prev_id = -1;
  for (int round = 0; round < K; ++round) {
    float value;
    int id;
    no_candidate(value, id, E);
    for (int e = lane; e < E; e += kWarpSize) {
      if (G > 1 && group_kept[e / group_size] == 0.0f) continue;
      const float v = select[e];
      const bool after_prev = prev_id < 0 || ranks_before(prev_value, prev_id, v, e);
      if (after_prev && ranks_before(v, e, value, id)) {
        value = v;
        id = e;
      }
    }
    warp_best(value, id);
    if (lane == 0) out_ids[round] = id;
    prev_value = value;
    prev_id = id;
  }

  // 5. Weights from the unbiased scores (lane 0 alone: K is small).
  if (lane == 0) topk_weights(score, out_ids, p, out_w);
}

template <typename scalar_t>
__global__ void route_topk_kernel(const scalar_t* __restrict__ logits,        // [T, E]
                                  const bool* __restrict__ prefer,            // [E] | [T, E] | null
                                  const float* __restrict__ correction_bias,  // [E] | null
                                  float* __restrict__ weights,                // [T, K]
                                  int64_t* __restrict__ ids,                  // [T, K]
                                  const RouteTopkParams p) {
  extern __shared__ float shared[];
  const int E = static_cast<int>(p.num_experts);
  const int K = static_cast<int>(p.top_k);
  const int G = static_cast<int>(p.n_group);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const bool biased = p.has_prefer || p.has_correction_bias;
  // Per warp: score [E], select [E] when biased, group scores [G], group kept flags [G].
  const int per_warp = E + (biased ? E : 0) + 2 * G;
  float* score = shared + warp * per_warp;
  float* select = biased ? score + E : score;
  float* group_score = select + E;
  float* group_kept = group_score + G;

  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (t >= p.num_tokens) return;  // whole warps exit together, so the shuffles below stay full
  const bool* pref = p.has_prefer ? prefer + (p.prefer_per_token ? t * E : 0) : nullptr;
  route_row_warp(logits + t * E, pref, correction_bias, weights + t * K, ids + t * K, p, biased,
                 score, select, group_score, group_kept, lane);
}

// route_topk_previous: one warp walks one sequence, position by position (each position needs
// the ids of the one before it), so a prefill is one launch per layer instead of ~5 per
// position. Per warp: score [E], select [E], group scores [G], group kept [G], mask bool [E].
template <typename scalar_t>
__global__ void route_topk_previous_kernel(const scalar_t* __restrict__ logits,  // [B, S, E]
                                           const int64_t* __restrict__ previous,  // [B, K] | null
                                           const float* __restrict__ correction_bias,  // [E]|null
                                           float* __restrict__ weights,           // [B, S, K]
                                           int64_t* __restrict__ ids,             // [B, S, K]
                                           const RouteTopkParams p, int64_t batch,
                                           int64_t seq_len) {
  extern __shared__ float shared[];
  const int E = static_cast<int>(p.num_experts);
  const int K = static_cast<int>(p.top_k);
  const int G = static_cast<int>(p.n_group);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int per_warp = 2 * E + 2 * G + (E + 3) / 4;  // floats; the mask's bytes rounded up
  float* score = shared + warp * per_warp;
  float* select = score + E;
  float* group_score = select + E;
  float* group_kept = group_score + G;
  bool* mask = reinterpret_cast<bool*>(group_kept + G);

  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (b >= batch) return;  // whole warps exit together
  const int64_t* prev = previous != nullptr ? previous + b * K : nullptr;
  for (int64_t s = 0; s < seq_len; ++s) {
    const int64_t row = b * seq_len + s;
    if (prev != nullptr) {
      for (int e = lane; e < E; e += kWarpSize) mask[e] = false;
      __syncwarp();
      for (int k = lane; k < K; k += kWarpSize) {
        const int64_t id = prev[k];
        if (id >= 0 && id < E) mask[id] = true;
      }
      __syncwarp();
    }
    route_row_warp(logits + row * E, prev != nullptr ? mask : nullptr, correction_bias,
                   weights + row * K, ids + row * K, p, /*biased=*/true, score, select,
                   group_score, group_kept, lane);
    __syncwarp();  // lane 0 wrote this row's ids: the next position's mask reads them
    prev = ids + row * K;
  }
}

template <typename scalar_t>
void launch_route_topk(const at::Tensor& logits, const bool* prefer, const float* correction_bias,
                       at::Tensor& weights, at::Tensor& ids, const RouteTopkParams& p,
                       cudaStream_t stream) {
  const bool biased = p.has_prefer || p.has_correction_bias;
  const int64_t per_warp_bytes =
      sizeof(float) * (p.num_experts * (biased ? 2 : 1) + 2 * p.n_group);
  const int64_t warps = std::max<int64_t>(1, std::min<int64_t>(8, kSharedBudget / per_warp_bytes));
  const int64_t blocks = (p.num_tokens + warps - 1) / warps;
  route_topk_kernel<scalar_t><<<blocks, warps * kWarpSize, warps * per_warp_bytes, stream>>>(
      logits.data_ptr<scalar_t>(), prefer, correction_bias, weights.data_ptr<float>(),
      ids.data_ptr<int64_t>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> route_topk_cuda(
    const at::Tensor& logits, int64_t top_k, c10::string_view scoring, bool renormalize,
    const std::optional<at::Tensor>& prefer, double reuse_bias,
    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
    c10::string_view group_score, double routed_scaling) {
  const RouteTopkParams p =
      check_route_topk_inputs(logits, top_k, scoring, renormalize, prefer, reuse_bias,
                              correction_bias, n_group, topk_group, group_score, routed_scaling);
  const bool biased = p.has_prefer || p.has_correction_bias;
  const int64_t per_warp_bytes =
      sizeof(float) * (p.num_experts * (biased ? 2 : 1) + 2 * p.n_group);
  TORCH_CHECK(per_warp_bytes <= kSharedBudget, "route_topk (CUDA): ", p.num_experts,
              " experts need ", per_warp_bytes, " bytes of shared memory per token, more than the ",
              kSharedBudget, " this kernel uses");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  RouteTopkOperands io = route_topk_operands(logits, p, prefer, correction_bias);
  if (p.num_tokens == 0) return {io.weights, io.ids};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, io.logits.scalar_type(),
                                  "route_topk_cuda", [&] {
                                    launch_route_topk<scalar_t>(io.logits, io.prefer_ptr(),
                                                                io.correction_bias_ptr(),
                                                                io.weights, io.ids, p, stream);
                                  });
  return {io.weights, io.ids};
}

std::tuple<at::Tensor, at::Tensor> route_topk_previous_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& previous, int64_t top_k,
    c10::string_view scoring, bool renormalize, double reuse_bias,
    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
    c10::string_view group_score, double routed_scaling) {
  const RoutePreviousArgs a =
      check_route_previous_inputs(logits, previous, top_k, scoring, renormalize, reuse_bias,
                                  correction_bias, n_group, topk_group, group_score,
                                  routed_scaling);
  const RouteTopkParams& p = a.params;
  const int64_t per_warp_bytes =
      sizeof(float) * (2 * p.num_experts + 2 * p.n_group + (p.num_experts + 3) / 4);
  TORCH_CHECK(per_warp_bytes <= kSharedBudget, "route_topk_previous (CUDA): ", p.num_experts,
              " experts need ", per_warp_bytes, " bytes of shared memory per sequence, more than "
              "the ", kSharedBudget, " this kernel uses");
  // Out-of-range previous ids are ignored by the kernel (checking them here would cost a host
  // sync); the router only passes ids route_topk chose.
  if (p.num_tokens == 0) return {a.weights, a.ids};
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Few sequences, each walked serially: small blocks spread them over more SMs.
  const int64_t warps = std::max<int64_t>(1, std::min<int64_t>(4, kSharedBudget / per_warp_bytes));
  const int64_t blocks = (a.batch + warps - 1) / warps;
  const float* bias_ptr = a.correction_bias.defined() ? a.correction_bias.data_ptr<float>() : nullptr;
  const int64_t* prev_ptr = a.previous.defined() ? a.previous.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, a.logits.scalar_type(), "route_topk_previous_cuda", [&] {
        route_topk_previous_kernel<scalar_t>
            <<<blocks, warps * kWarpSize, warps * per_warp_bytes, stream>>>(
                a.logits.data_ptr<scalar_t>(), prev_ptr, bias_ptr, a.weights.data_ptr<float>(),
                a.ids.data_ptr<int64_t>(), p, a.batch, a.seq_len);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {a.weights, a.ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(remoe, CUDA, m) {
  m.impl("route_topk", &route_topk_cuda);
  m.impl("route_topk_previous", &route_topk_previous_cuda);
}

}  // namespace remoe
