// remoe::moe_experts_compressed, what both backends share: the compute plan (where each part's
// codes and scales are in a compressed expert blob, and which matrix rows they fill) and the
// validation of the op's inputs. Kernels: moe_experts_compressed_cpu.cpp (codes decoded in
// registers), moe_experts_compressed_cuda.cu (routed blobs dequantized, then the dense op).
#pragma once

#include <ATen/core/Tensor.h>

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

}  // namespace remoe
