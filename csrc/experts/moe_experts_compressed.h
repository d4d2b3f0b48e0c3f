// remoe::moe_experts_compressed, what both backends share: the compute plan (where each part's
// codes and scales are in a compressed expert blob, and which matrix rows they fill) and the
// validation of the op's inputs. Kernels: moe_experts_compressed_cpu.cpp (codes decoded in
// registers), moe_experts_compressed_cuda.cu (routed blobs dequantized, then the dense op).
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/Optional.h>

#include <cstdint>
#include <string_view>
#include <vector>

#include "../quant/dequant.h"
#include "moe_experts.h"

namespace remoe {

enum ComputeParam : int64_t { kParamUp = 0, kParamUpBias = 1, kParamDown = 2, kParamDownBias = 3 };
constexpr int64_t kNumParams = 4;
constexpr int64_t kComputeFields = 11;  // param, row0, then DequantPart's code/scale fields
struct CompressedPlan {
  std::vector<DequantPart> parts;  // destinations: a dense expert [up | up_bias | down | down_bias]
  std::vector<int64_t> param, row0;
  int64_t dense_elements = 0;
  int64_t param_base[kNumParams] = {};  // element offset of each matrix in the dense expert
  std::vector<int32_t> part_of_row[kNumParams];  // matrix row -> part
  bool has[kNumParams] = {};
};

// Parses the plan against the op's shapes; TORCH_CHECK errors name the part that does not fit.
// `dense_dtype` sets the dense destinations (prefill's scratch: [up | up_bias | down |
// down_bias], each [out, in] row-major) and, through parse_dequant_plan, checks every part's
// codes and scales lie inside a `blob_bytes` blob.
CompressedPlan parse_compute_plan(const at::Tensor& plan, const MoeExpertsParams& p,
                                  int64_t blob_bytes, at::ScalarType dense_dtype);

// Validates every input of the op (messages show what was received); fills *p and returns the
// parsed plan.
CompressedPlan check_compressed_inputs(const at::Tensor& hidden, const at::Tensor& slots,
                                       const at::Tensor& route_weights, const at::Tensor& blobs,
                                       const at::Tensor& plan, int64_t up_rows,
                                       std::string_view gate, std::string_view activation,
                                       std::string_view clamp, double limit, double alpha,
                                       double up_offset, MoeExpertsParams* p);

// Many tokens: the routed slots are dequantized into a scratch of dense experts (a chunk of them
// at a time) and the dense op runs on the scratch. These are the steps both backends share.

// The distinct slots the pairs of `slots` (host int64 [T, K], -1 = none) route to, ascending;
// raises naming a slot id outside [-1, S).
std::vector<int64_t> routed_slots(const int64_t* slots, const MoeExpertsParams& p);

// `slots` (host int64 [T, K]) with the pairs of slots used[begin, begin + n) renumbered 0..n-1
// (their place in the scratch) and every other pair -1.
at::Tensor chunk_slot_ids(const at::Tensor& slots, const std::vector<int64_t>& used,
                          int64_t begin, int64_t n, int64_t num_slots);

// A scratch [n, dense_elements] of dense experts seen as the dense op's weights: up [n, N, H],
// down [n, H, I] (rows, not transposed) and the biases [n, N], [n, H] where the plan has them.
struct DenseExperts {
  at::Tensor up, down;
  std::optional<at::Tensor> up_bias, down_bias;
};
DenseExperts dense_views(const at::Tensor& scratch, const CompressedPlan& cp,
                         const MoeExpertsParams& p);

}  // namespace remoe
