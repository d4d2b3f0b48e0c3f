// Autograd for remoe::route_topk, in C++ so the forward stays a single dispatcher hop: a Python
// autograd kernel would cost several microseconds on every decode step, gradients or not.
//
// The ids are a discrete choice and get no gradient. The weights are a smooth function of the
// logits at those ids, so the backward scatters d(weights)/d(logits) into [T, E]:
//   softmax + renormalize, softmax_over_topk: w = s * softmax(x[ids]) (the full-E normalizer
//     cancels), so dx[ids] = s * w' * (g - sum(g * w'));
//   softmax without renormalize: w = s * p[ids], dx = s * (scatter(g * p[ids]) - p * sum(g * p[ids]));
//   sigmoid: w = s * sig[ids] (/ sum(sig[ids])), chain rule through the sum and sig * (1 - sig).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

namespace remoe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_route_topk_below_autograd(
    const at::Tensor& logits, int64_t top_k, c10::string_view scoring, bool renormalize,
    const std::optional<at::Tensor>& prefer, double reuse_bias,
    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
    c10::string_view group_score, double routed_scaling) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("remoe::route_topk", "")
                       .typed<decltype(call_route_topk_below_autograd)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(logits, top_k, scoring, renormalize, prefer, reuse_bias, correction_bias, n_group,
                 topk_group, group_score, routed_scaling);
}

at::Tensor route_topk_weights_backward(const at::Tensor& grad_weights,  // [T, K]
                                       const at::Tensor& logits,        // [T, E]
                                       const at::Tensor& ids,           // [T, K]
                                       const std::string& scoring, bool renormalize,
                                       double routed_scaling) {
  const at::Tensor x = logits.to(at::kFloat);
  const at::Tensor g = grad_weights.to(at::kFloat) * routed_scaling;
  at::Tensor grad_chosen;  // d loss / d x[ids], [T, K]
  at::Tensor grad_dense;   // extra dense term over all E, or undefined
  if (scoring == "softmax_over_topk" || (scoring == "softmax" && renormalize)) {
    const at::Tensor w = at::softmax(x.gather(1, ids), -1);
    grad_chosen = w * (g - (g * w).sum(-1, true));
  } else if (scoring == "softmax") {
    const at::Tensor p = at::softmax(x, -1);
    const at::Tensor gp = g * p.gather(1, ids);
    grad_chosen = gp;
    grad_dense = -p * gp.sum(-1, true);
  } else {
    const at::Tensor sig = at::sigmoid(x.gather(1, ids));
    at::Tensor d_sig = g;
    if (renormalize) {
      const at::Tensor total = sig.sum(-1, true);
      d_sig = g / total - (g * sig).sum(-1, true) / (total * total);
    }
    grad_chosen = d_sig * sig * (1 - sig);
  }
  at::Tensor grad = grad_dense.defined() ? grad_dense : at::zeros_like(x);
  grad = grad.scatter_add(1, ids, grad_chosen);
  return grad.to(logits.scalar_type());
}

class RouteTopkFunction : public torch::autograd::Function<RouteTopkFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t top_k,
                               c10::string_view scoring, bool renormalize,
                               const std::optional<at::Tensor>& prefer, double reuse_bias,
                               const std::optional<at::Tensor>& correction_bias, int64_t n_group,
                               int64_t topk_group, c10::string_view group_score,
                               double routed_scaling) {
    auto [weights, ids] =
        call_route_topk_below_autograd(logits, top_k, scoring, renormalize, prefer, reuse_bias,
                                       correction_bias, n_group, topk_group, group_score,
                                       routed_scaling);
    ctx->save_for_backward({logits, ids});
    ctx->saved_data["scoring"] = std::string(scoring);
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["routed_scaling"] = routed_scaling;
    ctx->mark_non_differentiable({ids});
    return {weights, ids};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    if (grad_outputs[0].defined()) {
      grad_logits = route_topk_weights_backward(
          grad_outputs[0], saved[0], saved[1], ctx->saved_data["scoring"].toStringRef(),
          ctx->saved_data["renormalize"].toBool(), ctx->saved_data["routed_scaling"].toDouble());
    }
    // One gradient slot per forward input; only the logits are differentiable.
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> route_topk_autograd(
    const at::Tensor& logits, int64_t top_k, c10::string_view scoring, bool renormalize,
    const std::optional<at::Tensor>& prefer, double reuse_bias,
    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
    c10::string_view group_score, double routed_scaling) {
  // Inference (the hot path) skips the autograd node entirely.
  if (!at::GradMode::is_enabled() || !logits.requires_grad()) {
    return call_route_topk_below_autograd(logits, top_k, scoring, renormalize, prefer, reuse_bias,
                                          correction_bias, n_group, topk_group, group_score,
                                          routed_scaling);
  }
  auto outputs = RouteTopkFunction::apply(logits, top_k, scoring, renormalize, prefer, reuse_bias,
                                          correction_bias, n_group, topk_group, group_score,
                                          routed_scaling);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(remoe, Autograd, m) { m.impl("route_topk", &route_topk_autograd); }

}  // namespace remoe
