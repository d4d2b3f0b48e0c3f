// remoe::moe_experts, the parts both backends share: input validation and the grouped path for
// many tokens (prefill). The few-token kernels are in moe_experts_cpu.cpp and moe_experts_cuda.cu.

#include "moe_experts.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace remoe {
namespace {

GateLayout parse_layout(std::string_view gate) {
  if (gate == "none") return GateLayout::kNone;
  if (gate == "chunk") return GateLayout::kChunk;
  TORCH_CHECK(gate == "interleave", "moe_experts: gate must be \"none\", \"chunk\" or "
              "\"interleave\", got \"", std::string(gate), "\"");
  return GateLayout::kInterleave;
}

Activation parse_activation(std::string_view act) {
  if (act == "silu") return Activation::kSilu;
  if (act == "gelu") return Activation::kGelu;
  if (act == "gelu_tanh") return Activation::kGeluTanh;
  if (act == "relu") return Activation::kRelu;
  if (act == "relu2") return Activation::kRelu2;
  TORCH_CHECK(act == "swish_alpha", "moe_experts: activation must be one of silu, gelu, "
              "gelu_tanh, relu, relu2, swish_alpha; got \"", std::string(act), "\"");
  return Activation::kSwishAlpha;
}

GateClamp parse_clamp(std::string_view clamp) {
  if (clamp == "none") return GateClamp::kNone;
  if (clamp == "input") return GateClamp::kInput;
  TORCH_CHECK(clamp == "output", "moe_experts: clamp must be \"none\", \"input\" or \"output\", "
              "got \"", std::string(clamp), "\"");
  return GateClamp::kOutput;
}

// [S, rows, cols] with each slot's matrix dense (the pool's slot views: any slot stride).
void check_weight(const char* name, const at::Tensor& w, const at::Tensor& hidden, int64_t rows,
                  int64_t cols) {
  TORCH_CHECK(w.dim() == 3 && w.size(1) == rows && w.size(2) == cols, "moe_experts: ", name,
              " must be [slots, ", rows, ", ", cols, "], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == hidden.scalar_type(), "moe_experts: ", name, " is ",
              w.scalar_type(), " but hidden is ", hidden.scalar_type(),
              "; the slots hold the compute dtype");
  TORCH_CHECK(w.device() == hidden.device(), "moe_experts: ", name, " is on ", w.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(w.stride(2) == 1 && w.stride(1) == cols, "moe_experts: each slot of ", name,
              " must be a dense matrix (strides [*, ", cols, ", 1]), got ", w.strides());
}

void check_bias(const char* name, const std::optional<at::Tensor>& b, const at::Tensor& w,
                int64_t n) {
  if (!b) return;
  TORCH_CHECK(b->dim() == 2 && b->size(0) == w.size(0) && b->size(1) == n, "moe_experts: ", name,
              " must be [", w.size(0), ", ", n, "], got ", b->sizes());
  TORCH_CHECK(b->scalar_type() == w.scalar_type() && b->device() == w.device(), "moe_experts: ",
              name, " must be ", w.scalar_type(), " on ", w.device());
  TORCH_CHECK(b->stride(1) == 1, "moe_experts: ", name, " rows must be dense, got strides ",
              b->strides());
}

}  // namespace

MoeExpertsParams check_routed_inputs(const at::Tensor& hidden, const at::Tensor& slots,
                                     const at::Tensor& route_weights, std::string_view gate,
                                     std::string_view activation, std::string_view clamp,
                                     double limit, double alpha, double up_offset) {
  TORCH_CHECK(hidden.dim() == 2, "moe_experts: hidden must be [tokens, hidden], got ",
              hidden.sizes());
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "moe_experts: hidden must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == hidden.size(0) &&
                  slots.scalar_type() == at::kLong,
              "moe_experts: slots must be int64 [", hidden.size(0), ", top_k], got ",
              slots.scalar_type(), " ", slots.sizes());
  TORCH_CHECK(route_weights.sizes() == slots.sizes() && at::isFloatingType(route_weights.scalar_type()),
              "moe_experts: route_weights must be floating [", hidden.size(0), ", ",
              slots.size(1), "], got ", route_weights.scalar_type(), " ", route_weights.sizes());
  TORCH_CHECK(slots.device() == hidden.device() && route_weights.device() == hidden.device(),
              "moe_experts: slots and route_weights must be on ", hidden.device());

  MoeExpertsParams p{};
  p.num_tokens = hidden.size(0);
  p.top_k = slots.size(1);
  p.hidden = hidden.size(1);
  p.layout = parse_layout(gate);
  p.activation = parse_activation(activation);
  p.clamp = parse_clamp(clamp);
  TORCH_CHECK(p.clamp == GateClamp::kNone || (limit > 0 && std::isfinite(limit)),
              "moe_experts: a clamped gate needs a finite limit > 0, got ", limit);
  TORCH_CHECK(std::isfinite(alpha) && std::isfinite(up_offset),
              "moe_experts: alpha and up_offset must be finite, got ", alpha, " and ", up_offset);
  p.limit = static_cast<float>(limit);
  p.alpha = static_cast<float>(alpha);
  p.up_offset = static_cast<float>(up_offset);
  return p;
}

void set_up_rows(MoeExpertsParams& p, int64_t up_rows) {
  p.up_rows = up_rows;
  const bool gated = p.layout != GateLayout::kNone;
  TORCH_CHECK(up_rows > 0 && (!gated || up_rows % 2 == 0), "moe_experts: ",
              gated ? "a gated up projection has 2 * I rows" : "an up projection has I > 0 rows",
              ", got ", up_rows);
  p.ffn = gated ? up_rows / 2 : up_rows;
}

MoeExpertsParams check_moe_experts_inputs(
    const at::Tensor& hidden, const at::Tensor& slots, const at::Tensor& route_weights,
    const at::Tensor& up, const std::optional<at::Tensor>& up_bias, const at::Tensor& down,
    const std::optional<at::Tensor>& down_bias, std::string_view gate,
    std::string_view activation, std::string_view clamp, double limit, double alpha,
    double up_offset, bool transposed) {
  MoeExpertsParams p = check_routed_inputs(hidden, slots, route_weights, gate, activation, clamp,
                                           limit, alpha, up_offset);
  p.transposed = transposed;
  TORCH_CHECK(up.dim() == 3 && down.dim() == 3, "moe_experts: up and down must be [slots, *, *], "
              "got ", up.sizes(), " and ", down.sizes());
  p.num_slots = up.size(0);
  TORCH_CHECK(down.size(0) == p.num_slots, "moe_experts: up has ", p.num_slots,
              " slots but down has ", down.size(0));
  set_up_rows(p, transposed ? up.size(2) : up.size(1));
  if (transposed) {
    check_weight("up", up, hidden, p.hidden, p.up_rows);
    check_weight("down", down, hidden, p.ffn, p.hidden);
  } else {
    check_weight("up", up, hidden, p.up_rows, p.hidden);
    check_weight("down", down, hidden, p.hidden, p.ffn);
  }
  check_bias("up_bias", up_bias, up, p.up_rows);
  check_bias("down_bias", down_bias, down, p.hidden);
  p.has_up_bias = up_bias.has_value();
  p.has_down_bias = down_bias.has_value();
  return p;
}

std::vector<int64_t> pairs_by_slot(const int64_t* s, const MoeExpertsParams& p) {
  std::vector<int64_t> order;
  order.reserve(p.num_tokens * p.top_k);
  for (int64_t i = 0; i < p.num_tokens * p.top_k; ++i) {
    TORCH_CHECK(s[i] >= -1 && s[i] < p.num_slots, "moe_experts: slots[", i / p.top_k, ", ",
                i % p.top_k, "] = ", s[i], " is not a slot of a ", p.num_slots,
                "-slot pool (or -1 for no expert)");
    if (s[i] >= 0) order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(), [s](int64_t a, int64_t b) { return s[a] < s[b]; });
  return order;
}

void moe_experts_grouped(const at::Tensor& hidden, const at::Tensor& slots,
                         const at::Tensor& route_weights, const at::Tensor& up,
                         const std::optional<at::Tensor>& up_bias, const at::Tensor& down,
                         const std::optional<at::Tensor>& down_bias, const MoeExpertsParams& p,
                         ApplyGateFn apply_gate, at::Tensor& out) {
  // Host sync on CUDA: the group sizes decide the matmul shapes.
  const at::Tensor slots_cpu = slots.to(at::kCPU).contiguous();
  const int64_t* s = slots_cpu.data_ptr<int64_t>();
  const std::vector<int64_t> order = pairs_by_slot(s, p);
  if (order.empty()) return;
  const int64_t P = static_cast<int64_t>(order.size());
  at::Tensor pair_index = at::empty({P}, at::kLong);
  std::copy(order.begin(), order.end(), pair_index.data_ptr<int64_t>());
  pair_index = pair_index.to(hidden.device());
  const at::Tensor tokens = at::floor_divide(pair_index, p.top_k);
  const at::Tensor weights = route_weights.reshape({-1}).index_select(0, pair_index).to(at::kFloat);
  for (int64_t start = 0; start < P;) {
    const int64_t slot = s[order[start]];
    int64_t end = start + 1;
    while (end < P && s[order[end]] == slot) ++end;
    const at::Tensor token = tokens.slice(0, start, end);
    const at::Tensor x = hidden.index_select(0, token);
    const at::Tensor w_up = up.select(0, slot);
    at::Tensor h = p.transposed ? at::matmul(x, w_up) : at::linear(x, w_up);
    if (up_bias) h = h + up_bias->select(0, slot);
    const at::Tensor a = apply_gate(h.to(at::kFloat).contiguous(), p).to(hidden.scalar_type());
    const at::Tensor w_down = down.select(0, slot);
    at::Tensor y = p.transposed ? at::matmul(a, w_down) : at::linear(a, w_down);
    if (down_bias) y = y + down_bias->select(0, slot);
    // A token uses a slot once, so the rows of `token` are distinct.
    out.index_put_({token}, y.to(at::kFloat) * weights.slice(0, start, end).unsqueeze(1),
                   /*accumulate=*/true);
    start = end;
  }
}

}  // namespace remoe
