// CUDA kernel of remoe::moe_experts_compressed: slots hold compressed expert blobs, so a budget
// of device memory holds (compute-dtype bytes / blob bytes) times as many experts.
//
// No quantized matmul here: the routed slots are dequantized, a chunk at a time, into a scratch
// of dense experts in hidden's dtype by the copy engine's own dequantization kernel
// (csrc/quant/dequant_cuda.cu, one launch per routed slot), and the dense op (remoe::moe_experts,
// moe_experts_cuda.cu) computes from the scratch. Decoding K experts per layer from device
// memory costs their dense bytes once more at HBM speed, which is small against a PCIe miss;
// the gain is the hit rate a larger effective pool buys. One host sync per call: the routed slots
// decide which blobs to dequantize. Compiled in CI, not yet run on a GPU (bench/gpu_check.sh).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../quant/dequant_cuda.h"
#include "moe_experts.h"
#include "moe_experts_compressed.h"

namespace remoe {
namespace {

// Scratch per chunk of routed slots (or one expert, if larger).
constexpr int64_t kScratchBytes = int64_t{256} << 20;

using DenseOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const std::optional<at::Tensor>&, std::string_view, std::string_view,
                           std::string_view, double, double, double, bool);

at::Tensor moe_experts_compressed_cuda(const at::Tensor& hidden, const at::Tensor& slots,
                                       const at::Tensor& route_weights, const at::Tensor& blobs,
                                       const at::Tensor& plan, int64_t up_rows,
                                       std::string_view gate, std::string_view activation,
                                       std::string_view clamp, double limit, double alpha,
                                       double up_offset) {
  MoeExpertsParams p;
  const CompressedPlan cp = check_compressed_inputs(hidden, slots, route_weights, blobs, plan,
                                                    up_rows, gate, activation, clamp, limit,
                                                    alpha, up_offset, &p);
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  at::Tensor out = at::zeros({p.num_tokens, p.hidden}, hidden.options().dtype(at::kFloat));
  if (p.num_tokens == 0) return out;
  // Host sync: which blobs to dequantize.
  const at::Tensor slots_cpu = slots.to(at::kCPU).contiguous();
  const std::vector<int64_t> used = routed_slots(slots_cpu.data_ptr<int64_t>(), p);
  if (used.empty()) return out;

  const at::ScalarType dtype = hidden.scalar_type();
  const int64_t dense_bytes = cp.dense_elements * c10::elementSize(dtype);
  const int64_t chunk = std::max<int64_t>(1, kScratchBytes / dense_bytes);
  const int64_t num_parts = static_cast<int64_t>(cp.parts.size());
  // The parts, as the kernel reads them, in device memory.
  at::Tensor parts_host = at::empty({num_parts * static_cast<int64_t>(sizeof(DequantPart))},
                                    at::TensorOptions().dtype(at::kByte));
  std::memcpy(parts_host.data_ptr<uint8_t>(), cp.parts.data(), parts_host.numel());
  const at::Tensor parts = parts_host.to(hidden.device());
  const int64_t max_elements = max_part_elements(cp.parts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  static const auto dense_op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("remoe::moe_experts", "")
                                   .typed<DenseOp>();
  for (size_t c0 = 0; c0 < used.size(); c0 += chunk) {
    const int64_t n = std::min<int64_t>(chunk, static_cast<int64_t>(used.size() - c0));
    at::Tensor scratch = at::empty({n, cp.dense_elements}, hidden.options());
    uint8_t* dst = static_cast<uint8_t*>(scratch.data_ptr());
    for (int64_t i = 0; i < n; ++i) {
      // Scales were checked finite by the pool's reader when the blob was loaded.
      launch_dequantize(reinterpret_cast<const DequantPart*>(parts.data_ptr<uint8_t>()),
                        num_parts, max_elements,
                        blobs.data_ptr<uint8_t>() + used[c0 + i] * blobs.stride(0),
                        dst + i * dense_bytes, dtype, stream);
    }
    const DenseExperts d = dense_views(scratch, cp, p);
    const at::Tensor ids = chunk_slot_ids(slots_cpu, used, c0, n, p.num_slots);
    out.add_(dense_op.call(hidden, ids.to(hidden.device()), route_weights, d.up, d.up_bias,
                           d.down, d.down_bias, gate, activation, clamp, limit, alpha, up_offset,
                           /*transposed=*/false));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(remoe, CUDA, m) {
  m.impl("moe_experts_compressed", &moe_experts_compressed_cuda);
}

}  // namespace remoe
