// Shared by the CPU and CUDA route_topk kernels: the parsed, validated arguments. The arithmetic
// both backends run is in route_topk_math.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string_view>

namespace remoe {

enum class Scoring : int32_t { kSoftmax = 0, kSigmoid = 1, kSoftmaxOverTopk = 2 };
enum class GroupScore : int32_t { kMax = 0, kTop2Sum = 1 };

// Everything a kernel needs besides the data pointers, in plain types so it can be passed by value
// to a CUDA kernel.
struct RouteTopkParams {
  int64_t num_tokens;     // T
  int64_t num_experts;    // E
  int64_t top_k;          // K
  int64_t n_group;        // groups for group-limited selection (1 = off)
  int64_t topk_group;     // groups kept
  Scoring scoring;
  GroupScore group_score;
  bool renormalize;
  bool has_prefer;
  bool prefer_per_token;  // prefer is [T, E] rather than [E]
  bool has_correction_bias;
  float reuse_bias;
  float routed_scaling;
};

// Validates every input (messages show the values received) and returns the parsed parameters.
RouteTopkParams check_route_topk_inputs(const at::Tensor& logits, int64_t top_k,
                                        std::string_view scoring, bool renormalize,
                                        const std::optional<at::Tensor>& prefer, double reuse_bias,
                                        const std::optional<at::Tensor>& correction_bias,
                                        int64_t n_group, int64_t topk_group,
                                        std::string_view group_score, double routed_scaling);

// The kernels' operands: contiguous inputs (prefer and correction_bias undefined when absent) and
// the outputs, weights [T, K] float32 and ids [T, K] int64, on the logits' device.
struct RouteTopkOperands {
  at::Tensor logits, prefer, correction_bias, weights, ids;

  const bool* prefer_ptr() const { return prefer.defined() ? prefer.data_ptr<bool>() : nullptr; }
  const float* correction_bias_ptr() const {
    return correction_bias.defined() ? correction_bias.data_ptr<float>() : nullptr;
  }
};

RouteTopkOperands route_topk_operands(const at::Tensor& logits, const RouteTopkParams& p,
                                      const std::optional<at::Tensor>& prefer,
                                      const std::optional<at::Tensor>& correction_bias);

// remoe::route_topk_previous: logits [B, S, E] walked position by position, each position
// preferring the K experts the one before it chose. Validated once for both backends.
struct RoutePreviousArgs {
  RouteTopkParams params;   // num_tokens = B * S; has_prefer false (the kernels build it)
  int64_t batch, seq_len;   // B, S
  at::Tensor logits;        // [B, S, E] contiguous
  at::Tensor previous;      // [B, K] int64 contiguous, or undefined
  at::Tensor correction_bias;  // [E] float32 contiguous, or undefined
  at::Tensor weights, ids;  // [B, S, K] float32 / int64 outputs
};

RoutePreviousArgs check_route_previous_inputs(
    const at::Tensor& logits, const std::optional<at::Tensor>& previous, int64_t top_k,
    std::string_view scoring, bool renormalize, double reuse_bias,
    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
    std::string_view group_score, double routed_scaling);

}  // namespace remoe
