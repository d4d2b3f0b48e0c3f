// Input validation for remoe::route_topk, shared by the CPU and CUDA kernels.

#include "route_topk.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace remoe {

RouteTopkParams check_route_topk_inputs(const at::Tensor& logits, int64_t top_k,
                                        std::string_view scoring, bool renormalize,
                                        const std::optional<at::Tensor>& prefer, double reuse_bias,
                                        const std::optional<at::Tensor>& correction_bias,
                                        int64_t n_group, int64_t topk_group,
                                        std::string_view group_score, double routed_scaling) {
  TORCH_CHECK(logits.dim() == 2, "route_topk: logits must be 2-D [tokens, experts], got shape ",
              logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "route_topk: logits must be float32, bfloat16 or float16, got ", dtype);
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(num_experts >= 1, "route_topk: logits need at least one expert column, got shape ",
              logits.sizes());
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "route_topk: top_k must be in [1, ", num_experts,
              "] for ", num_experts, " experts, got ", top_k);

  RouteTopkParams p{};
  p.num_tokens = num_tokens;
  p.num_experts = num_experts;
  p.top_k = top_k;
  p.renormalize = renormalize;
  if (scoring == "softmax") {
    p.scoring = Scoring::kSoftmax;
  } else if (scoring == "sigmoid") {
    p.scoring = Scoring::kSigmoid;
  } else if (scoring == "softmax_over_topk") {
    p.scoring = Scoring::kSoftmaxOverTopk;
  } else {
    TORCH_CHECK(false, "route_topk: scoring must be 'softmax', 'sigmoid' or 'softmax_over_topk', got '",
                std::string(scoring), "'");
  }
  if (group_score == "max") {
    p.group_score = GroupScore::kMax;
  } else if (group_score == "top2_sum") {
    p.group_score = GroupScore::kTop2Sum;
  } else {
    TORCH_CHECK(false, "route_topk: group_score must be 'max' or 'top2_sum', got '",
                std::string(group_score), "'");
  }

  TORCH_CHECK(std::isfinite(reuse_bias), "route_topk: reuse_bias must be finite, got ", reuse_bias);
  TORCH_CHECK(std::isfinite(routed_scaling), "route_topk: routed_scaling must be finite, got ",
              routed_scaling);
  p.reuse_bias = static_cast<float>(reuse_bias);
  p.routed_scaling = static_cast<float>(routed_scaling);

  p.has_prefer = prefer.has_value();
  if (p.has_prefer) {
    const auto& pr = *prefer;
    TORCH_CHECK(pr.scalar_type() == at::kBool, "route_topk: prefer must be a bool tensor, got ",
                pr.scalar_type());
    TORCH_CHECK(pr.device() == logits.device(), "route_topk: prefer is on ", pr.device(),
                " but logits are on ", logits.device());
    const bool shared = pr.dim() == 1 && pr.size(0) == num_experts;
    const bool per_token = pr.dim() == 2 && pr.size(0) == num_tokens && pr.size(1) == num_experts;
    TORCH_CHECK(shared || per_token, "route_topk: prefer must have shape [", num_experts,
                "] or [", num_tokens, ", ", num_experts, "], got ", pr.sizes());
    p.prefer_per_token = per_token && !shared;
  }

  p.has_correction_bias = correction_bias.has_value();
  if (p.has_correction_bias) {
    const auto& cb = *correction_bias;
    TORCH_CHECK(cb.dim() == 1 && cb.size(0) == num_experts,
                "route_topk: correction_bias must have shape [", num_experts, "], got ", cb.sizes());
    TORCH_CHECK(cb.scalar_type() == at::kFloat, "route_topk: correction_bias must be float32, got ",
                cb.scalar_type());
    TORCH_CHECK(cb.device() == logits.device(), "route_topk: correction_bias is on ", cb.device(),
                " but logits are on ", logits.device());
  }

  TORCH_CHECK(n_group >= 1 && num_experts % n_group == 0, "route_topk: n_group must divide the ",
              num_experts, " experts, got n_group=", n_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "route_topk: topk_group must be in [1, ",
              n_group, "], got ", topk_group);
  const int64_t group_size = num_experts / n_group;
  TORCH_CHECK(top_k <= topk_group * group_size, "route_topk: top_k=", top_k,
              " exceeds the experts in the kept groups (topk_group=", topk_group, " x group size ",
              group_size, ")");
  TORCH_CHECK(p.group_score != GroupScore::kTop2Sum || n_group == 1 || group_size >= 2,
              "route_topk: group_score='top2_sum' needs at least 2 experts per group, got ",
              group_size);
  TORCH_CHECK(p.scoring != Scoring::kSoftmaxOverTopk || n_group == 1,
              "route_topk: group-limited selection is not defined for scoring='softmax_over_topk'");
  p.n_group = n_group;
  p.topk_group = topk_group;
  return p;
}

RouteTopkOperands route_topk_operands(const at::Tensor& logits, const RouteTopkParams& p,
                                      const std::optional<at::Tensor>& prefer,
                                      const std::optional<at::Tensor>& correction_bias) {
  RouteTopkOperands io;
  io.logits = logits.contiguous();
  if (p.has_prefer) io.prefer = prefer->contiguous();
  if (p.has_correction_bias) io.correction_bias = correction_bias->contiguous();
  io.weights = at::empty({p.num_tokens, p.top_k}, logits.options().dtype(at::kFloat));
  io.ids = at::empty({p.num_tokens, p.top_k}, logits.options().dtype(at::kLong));
  return io;
}

RoutePreviousArgs check_route_previous_inputs(
    const at::Tensor& logits, const std::optional<at::Tensor>& previous, int64_t top_k,
    std::string_view scoring, bool renormalize, double reuse_bias,
    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
    std::string_view group_score, double routed_scaling) {
  TORCH_CHECK(logits.dim() == 3, "route_topk_previous: logits must be 3-D [batch, positions, "
              "experts], got shape ", logits.sizes());
  RoutePreviousArgs a;
  a.batch = logits.size(0);
  a.seq_len = logits.size(1);
  const int64_t E = logits.size(2);
  // The per-row rules are route_topk's: check them on the [B * S, E] view.
  a.params = check_route_topk_inputs(logits.reshape({a.batch * a.seq_len, E}), top_k, scoring,
                                     renormalize, std::nullopt, reuse_bias, correction_bias,
                                     n_group, topk_group, group_score, routed_scaling);
  if (previous.has_value()) {
    const auto& pr = *previous;
    TORCH_CHECK(pr.dim() == 2 && pr.size(0) == a.batch && pr.size(1) == top_k &&
                    pr.scalar_type() == at::kLong,
                "route_topk_previous: previous must be int64 [", a.batch, ", ", top_k,
                "] (the ids the position before the first one chose), got ", pr.scalar_type(),
                " ", pr.sizes());
    TORCH_CHECK(pr.device() == logits.device(), "route_topk_previous: previous is on ",
                pr.device(), " but logits are on ", logits.device());
    a.previous = pr.contiguous();
  }
  a.logits = logits.contiguous();
  if (correction_bias.has_value()) a.correction_bias = correction_bias->contiguous();
  a.weights = at::empty({a.batch, a.seq_len, top_k}, logits.options().dtype(at::kFloat));
  a.ids = at::empty({a.batch, a.seq_len, top_k}, logits.options().dtype(at::kLong));
  return a;
}

}  // namespace remoe
