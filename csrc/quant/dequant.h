// Dequantization of one compressed expert blob into its slot, in the compute dtype.
//
// A blob holds, per part, a matrix of codes [rows, cols] (row-major; 4-bit codes two per byte, the
// element of even index in the low nibble), a grid of scales [ceil(rows / block_rows),
// ceil(cols / block_cols)] (row-major) and, for uint4, a grid of zero points of the same shape and
// dtype as the scales. Element (r, c) of a part is
//   raw codes (f32/bf16/f16):       code
//   fp8_e4m3 / e2m1 / int8:         code * scale[r / block_rows, c / block_cols]
//   uint4:                          (code - zero[..]) * scale[..]          (all in fp32)
// and lands, rounded to the slot dtype, at dst_offset + (r * dst_row_stride + c * dst_col_stride)
// elements of the slot: strides express both a part's rows inside a concatenated tensor (gate,
// then up) and a transposed in-memory orientation (GPT-OSS keeps [in, out]).
//
// The layouts are those of transformers' integrations: finegrained FP8 (`weight_scale_inv`, fp32
// or UE8M0 = e8m0 scales over [block_rows, block_cols] blocks) and MXFP4 (`*_blocks` e2m1 codes,
// `*_scales` e8m0 over 32 columns), plus remoe pack's own int8 / int4 groups. The plan is written
// in Python (remoe_engine/quant.py, `QuantLayout.plan`) and checked here once.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace remoe {

enum CodeKind : int64_t {
  kCodeF32 = 0, kCodeBF16 = 1, kCodeF16 = 2, kCodeFp8E4m3 = 3, kCodeE2m1 = 4, kCodeInt8 = 5,
  kCodeUint4 = 6, kNumCodeKinds = 7,
};
enum ScaleKind : int64_t {
  kScaleNone = -1, kScaleF32 = 0, kScaleE8m0 = 1, kScaleF16 = 2, kScaleBF16 = 3, kNumScaleKinds = 4,
};

// One row of a plan (int64 [N, kDequantFields], columns in this order).
struct DequantPart {
  int64_t code_kind, rows, cols, block_rows, block_cols, code_offset;
  int64_t scale_kind, scale_offset, zero_offset;  // zero_offset -1: none (only uint4 has one)
  int64_t dst_offset, dst_row_stride, dst_col_stride;  // dst_offset in bytes, strides in elements
};
constexpr int64_t kDequantFields = 12;

// Parses and checks a plan against a `src_bytes` blob and a `dst_bytes` slot of `dst` dtype
// (float32, bfloat16 or float16). Throws c10::Error naming the part that does not fit. Returns
// the parts; *extent = one past the last slot byte any part writes.
std::vector<DequantPart> parse_dequant_plan(const at::Tensor& plan, int64_t src_bytes,
                                            int64_t dst_bytes, at::ScalarType dst,
                                            int64_t* extent);

// Dequantizes every part of `src` into `dst` on the host. Throws std::runtime_error naming the
// part and block when a scale (or zero point) is not a finite number: a corrupt scale must not
// turn into silently wrong weights.
void dequantize_host(const std::vector<DequantPart>& parts, const uint8_t* src, uint8_t* dst,
                     at::ScalarType dst_dtype);

// Only the check of dequantize_host, for a blob a device will dequantize: throws the same
// std::runtime_error when a scale or zero point of `src` (host memory) is not finite.
void check_scales_host(const std::vector<DequantPart>& parts, const uint8_t* src);

}  // namespace remoe
