// Shared by the CPU and CUDA kernels of remoe::moe_experts: the parsed, validated arguments, the
// per-element gate arithmetic (written once, __host__ __device__ under nvcc), and the grouped
// path both backends run for many tokens.
//
// Legend: T = tokens, K = experts per token, S = pool slots, H = hidden size, I = expert FFN size,
// N = rows of the up projection (2I for gated experts, I otherwise), P = routed (token, k) pairs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#if defined(__CUDACC__)
#define REMOE_EXPERTS_HD __host__ __device__
#else
#define REMOE_EXPERTS_HD
#endif

namespace remoe {

// How the up projection's N outputs become the I inputs of the down projection.
enum class GateLayout : int32_t {
  kNone = 0,        // no gate: act(up)                                (Nemotron-H)
  kChunk = 1,       // gate = rows [0, I), up = rows [I, 2I)           (Mixtral, Qwen, DeepSeek...)
  kInterleave = 2,  // gate = even rows, up = odd rows                 (GPT-OSS)
};

enum class Activation : int32_t {
  kSilu = 0,        // x * sigmoid(x)
  kGelu = 1,        // exact (erf) GELU
  kGeluTanh = 2,    // tanh approximation
  kRelu = 3,
  kRelu2 = 4,       // relu(x)^2
  kSwishAlpha = 5,  // x * sigmoid(alpha * x)                          (GPT-OSS)
};

// Where the gate is clamped to at most `limit` (and the up value then to [-limit, limit]).
enum class GateClamp : int32_t {
  kNone = 0,
  kInput = 1,   // min(gate, limit) before the activation              (GPT-OSS, DeepSeek-V4)
  kOutput = 2,  // min(act(gate), limit) after it                      (Step-3.7)
};

struct MoeExpertsParams {
  int64_t num_tokens;  // T
  int64_t top_k;       // K
  int64_t num_slots;   // S
  int64_t hidden;      // H
  int64_t ffn;         // I
  int64_t up_rows;     // N
  GateLayout layout;
  Activation activation;
  GateClamp clamp;
  float limit;
  float alpha;
  float up_offset;  // added to the up value after its clamp (GPT-OSS: 1)
  bool transposed;  // up is [S, H, N] and down [S, I, H] instead of [S, N, H] and [S, H, I]
  bool has_up_bias;
  bool has_down_bias;
};

// Validates every input (messages show what was received) and returns the parsed parameters.
MoeExpertsParams check_moe_experts_inputs(
    const at::Tensor& hidden, const at::Tensor& slots, const at::Tensor& route_weights,
    const at::Tensor& up, const std::optional<at::Tensor>& up_bias, const at::Tensor& down,
    const std::optional<at::Tensor>& down_bias, std::string_view gate,
    std::string_view activation, std::string_view clamp, double limit, double alpha,
    double up_offset, bool transposed);

// The checks and parameters that do not depend on how the weights are stored: hidden, slots,
// route_weights and the gate. The weight fields are left zero (set_up_rows fills N and I).
MoeExpertsParams check_routed_inputs(const at::Tensor& hidden, const at::Tensor& slots,
                                     const at::Tensor& route_weights, std::string_view gate,
                                     std::string_view activation, std::string_view clamp,
                                     double limit, double alpha, double up_offset);
void set_up_rows(MoeExpertsParams& p, int64_t up_rows);

// The routed pairs (t * K + k) with a slot (not -1), stably sorted by slot; raises naming the
// first slot id outside [-1, S). slots: host int64 [T, K], contiguous.
std::vector<int64_t> pairs_by_slot(const int64_t* slots, const MoeExpertsParams& p);

// The gate of the grouped path on one backend: h fp32 [n, N] contiguous -> fp32 [n, I], each
// element through expert_gate below.
using ApplyGateFn = at::Tensor (*)(const at::Tensor& h, const MoeExpertsParams& p);

// The grouped path: tokens gathered per slot, each group's two projections as one ATen matmul
// (BLAS / cuBLAS, in the weights' dtype), the gate in fp32 between them. Device-generic but for
// apply_gate; out is fp32 [T, H], zeroed. The groups are formed on the host: slots is copied
// there if it is not (a host sync on CUDA).
void moe_experts_grouped(const at::Tensor& hidden, const at::Tensor& slots,
                         const at::Tensor& route_weights, const at::Tensor& up,
                         const std::optional<at::Tensor>& up_bias, const at::Tensor& down,
                         const std::optional<at::Tensor>& down_bias, const MoeExpertsParams& p,
                         ApplyGateFn apply_gate, at::Tensor& out);

// ---- per-element arithmetic, shared by both backends ---------------------------------------

REMOE_EXPERTS_HD inline float expert_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

REMOE_EXPERTS_HD inline float expert_activation(float x, Activation act, float alpha) {
  switch (act) {
    case Activation::kSilu:
      return x * expert_sigmoid(x);
    case Activation::kGelu:
      return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case Activation::kGeluTanh: {
      const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.0f + tanhf(inner));
    }
    case Activation::kRelu:
      return x > 0.0f ? x : 0.0f;
    case Activation::kRelu2: {
      const float r = x > 0.0f ? x : 0.0f;
      return r * r;
    }
    case Activation::kSwishAlpha:
      return x * expert_sigmoid(alpha * x);
  }
  return x;
}

// One FFN input from the up projection's output(s): `gate` is unused for GateLayout::kNone.
REMOE_EXPERTS_HD inline float expert_gate(float gate, float up, const MoeExpertsParams& p) {
  if (p.layout == GateLayout::kNone) return expert_activation(up, p.activation, p.alpha);
  if (p.clamp == GateClamp::kInput) gate = gate < p.limit ? gate : p.limit;
  float a = expert_activation(gate, p.activation, p.alpha);
  if (p.clamp == GateClamp::kOutput) a = a < p.limit ? a : p.limit;
  if (p.clamp != GateClamp::kNone) {
    up = up < p.limit ? up : p.limit;
    up = up > -p.limit ? up : -p.limit;
  }
  return a * (up + p.up_offset);
}

// Rows of the up projection holding FFN input j's gate and up values.
REMOE_EXPERTS_HD inline int64_t gate_row(int64_t j, const MoeExpertsParams& p) {
  return p.layout == GateLayout::kInterleave ? 2 * j : j;
}
REMOE_EXPERTS_HD inline int64_t up_row(int64_t j, const MoeExpertsParams& p) {
  switch (p.layout) {
    case GateLayout::kNone:
      return j;
    case GateLayout::kChunk:
      return p.ffn + j;
    case GateLayout::kInterleave:
      return 2 * j + 1;
  }
  return j;
}

}  // namespace remoe
