// Device dequantization (csrc/quant/dequant.h): the kernel the CUDA copy engine runs after the
// host-to-device copy of a compressed expert blob, and remoe::dequantize on CUDA tensors. The
// element arithmetic is dequant_math.h's, shared with the host path, so both give the same bits.
//
// Legend: P = parts of a blob, n = rows * cols of one part.

#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "dequant.h"
#include "dequant_cuda.h"
#include "dequant_math.h"

namespace remoe {

namespace {

template <typename Out>
__device__ inline void store_out(uint8_t* base, int64_t at, float v);

template <>
__device__ inline void store_out<float>(uint8_t* base, int64_t at, float v) {
  reinterpret_cast<float*>(base)[at] = v;
}

template <>
__device__ inline void store_out<uint16_t>(uint8_t* base, int64_t at, float v) {  // bfloat16
  reinterpret_cast<uint16_t*>(base)[at] = float_to_bf16_bits(v);
}

template <>
__device__ inline void store_out<__half>(uint8_t* base, int64_t at, float v) {
  reinterpret_cast<__half*>(base)[at] = __float2half_rn(v);  // round to nearest even, as torch
}

// grid (x: chunks of a part, y: part); every thread walks its part with a grid stride.
template <typename Out>
__global__ void dequantize_kernel(const DequantPart* __restrict__ parts,  // [P]
                                  const uint8_t* __restrict__ src,        // [blob_bytes]
                                  uint8_t* __restrict__ dst) {            // [slot_bytes]
  const DequantPart p = parts[blockIdx.y];
  const int64_t n = p.rows * p.cols;
  const int64_t grid_cols = (p.cols + p.block_cols - 1) / p.block_cols;
  const uint8_t* codes = src + p.code_offset;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.cols, c = i - r * p.cols;
    float v = decode_code(p.code_kind, codes, i);
    if (p.scale_kind != kScaleNone) {
      const int64_t g = (r / p.block_rows) * grid_cols + c / p.block_cols;
      const float scale = decode_scale(p.scale_kind, src + p.scale_offset, g);
      v = p.zero_offset >= 0 ? (v - decode_scale(p.scale_kind, src + p.zero_offset, g)) * scale
                             : v * scale;
    }
    store_out<Out>(dst + p.dst_offset, r * p.dst_row_stride + c * p.dst_col_stride, v);
  }
}

}  // namespace

void launch_dequantize(const DequantPart* parts, int64_t num_parts, int64_t max_elements,
                       const uint8_t* src, uint8_t* dst, at::ScalarType dtype,
                       cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((max_elements + kThreads - 1) / kThreads, 1024);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(blocks, 1)),
                  static_cast<unsigned>(num_parts));
  switch (dtype) {
    case at::kFloat:
      dequantize_kernel<float><<<grid, kThreads, 0, stream>>>(parts, src, dst);
      break;
    case at::kBFloat16:
      dequantize_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(parts, src, dst);
      break;
    case at::kHalf:
      dequantize_kernel<__half><<<grid, kThreads, 0, stream>>>(parts, src, dst);
      break;
    default: TORCH_CHECK(false, "dequantize: unsupported slot dtype ", dtype);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t max_part_elements(const std::vector<DequantPart>& parts) {
  int64_t most = 0;
  for (const DequantPart& p : parts) most = std::max(most, p.rows * p.cols);
  return most;
}

namespace {

at::Tensor dequantize_cuda(const at::Tensor& blob, const at::Tensor& plan, at::ScalarType dtype,
                           int64_t out_bytes) {
  TORCH_CHECK(blob.dim() == 1 && blob.scalar_type() == at::kByte && blob.is_contiguous() &&
                  blob.is_cuda(),
              "dequantize: blob must be a contiguous CUDA uint8 [n] tensor, got ",
              blob.scalar_type(), " ", blob.sizes(), " on ", blob.device());
  TORCH_CHECK(out_bytes >= 0, "dequantize: out_bytes must be >= 0, got ", out_bytes);
  const auto parts = parse_dequant_plan(plan, blob.numel(), out_bytes, dtype, nullptr);
  // Host sync: a non-finite scale must raise here, and the kernel cannot raise. The pool checks
  // the scales on the host before its copy instead; this op is for tests and one-off use.
  const at::Tensor host = blob.to(at::kCPU);
  try {
    check_scales_host(parts, host.data_ptr<uint8_t>());
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
  const c10::cuda::CUDAGuard guard(blob.device());
  at::Tensor out = at::zeros({out_bytes}, blob.options());
  at::Tensor table = at::empty({static_cast<int64_t>(parts.size() * sizeof(DequantPart))},
                               at::TensorOptions().dtype(at::kByte));
  std::memcpy(table.data_ptr<uint8_t>(), parts.data(), parts.size() * sizeof(DequantPart));
  const at::Tensor device_table = table.to(blob.device(), /*non_blocking=*/false);
  launch_dequantize(reinterpret_cast<const DequantPart*>(device_table.data_ptr<uint8_t>()),
                    static_cast<int64_t>(parts.size()), max_part_elements(parts),
                    blob.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), dtype,
                    c10::cuda::getCurrentCUDAStream(blob.device().index()).stream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(remoe, CUDA, m) { m.impl("dequantize", &dequantize_cuda); }

}  // namespace remoe
