// CUDA kernel of remoe::moe_experts.
//
// Legend: T = tokens, K = experts per token, H = hidden, I = expert FFN size, N = up rows,
// P = T * K routed pairs.
//
// Few tokens (decode, T <= kMaxFusedTokens), two launches per MoE layer whatever K is:
//   1. up + gate: grid (FFN-input blocks, P). Each pair's token row is staged in shared memory
//      as fp32; a warp computes one FFN input's gate and up dot products (lanes stride over H,
//      then a shuffle reduction), applies the gate, and writes A[pair, j] fp32. Transposed weights
//      ([H, N]) are read by one thread per FFN input instead, so a warp's loads are coalesced.
//   2. down + weighted sum: grid (H blocks, T). A warp owns out[t, h] and adds its K pairs'
//      contributions in k order: deterministic, no atomics, no zero-fill.
// A pair whose slot is -1 contributes nothing. Slots are read on the device (no host sync).
// Many tokens: the grouped path (moe_experts.cpp): cuBLAS matmuls per slot, the gate below.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "moe_experts.h"

namespace remoe {
namespace {

constexpr int64_t kMaxFusedTokens = 8;
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * kWarpSize;
// The token row staged per block (fp32); larger hidden sizes take the grouped path.
constexpr int64_t kMaxStagedHidden = 40 * 1024 / sizeof(float);

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename W>
__device__ __forceinline__ float load(const W* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Pass 1. blockIdx.y = pair, blockIdx.x = block of FFN inputs (kWarpsPerBlock of them when the
// weights are [N, H], kThreads when they are [H, N]).
template <typename W>
__global__ void up_gate_kernel(const W* __restrict__ hidden, const int64_t* __restrict__ slots,
                               const W* __restrict__ up, int64_t up_slot_stride,
                               const W* __restrict__ up_bias, int64_t up_bias_stride,
                               float* __restrict__ A, MoeExpertsParams p) {
  extern __shared__ float x[];  // [H]
  const int64_t pair = blockIdx.y;
  const int64_t slot = slots[pair];
  CUDA_KERNEL_ASSERT(slot >= -1 && slot < p.num_slots);
  if (slot < 0) return;
  const int64_t H = p.hidden, I = p.ffn, N = p.up_rows;
  const W* row = hidden + (pair / p.top_k) * H;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) x[h] = load(row, h);
  __syncthreads();
  const W* w = up + slot * up_slot_stride;
  const W* b = p.has_up_bias ? up_bias + slot * up_bias_stride : nullptr;
  const bool gated = p.layout != GateLayout::kNone;
  if (!p.transposed) {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
    if (j >= I) return;
    const W* up_w = w + up_row(j, p) * H;
    const W* gate_w = w + gate_row(j, p) * H;
    float u = 0.0f, g = 0.0f;
    for (int64_t h = lane; h < H; h += kWarpSize) {
      u += load(up_w, h) * x[h];
      if (gated) g += load(gate_w, h) * x[h];
    }
    u = warp_sum(u);
    g = gated ? warp_sum(g) : 0.0f;
    if (lane == 0) {
      if (b) {
        u += load(b, up_row(j, p));
        if (gated) g += load(b, gate_row(j, p));
      }
      A[pair * I + j] = expert_gate(g, u, p);
    }
    return;
  }
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= I) return;
  const int64_t uc = up_row(j, p), gc = gate_row(j, p);
  float u = 0.0f, g = 0.0f;
  for (int64_t h = 0; h < H; ++h) {
    u += load(w, h * N + uc) * x[h];
    if (gated) g += load(w, h * N + gc) * x[h];
  }
  if (b) {
    u += load(b, uc);
    if (gated) g += load(b, gc);
  }
  A[pair * I + j] = expert_gate(g, u, p);
}

// Pass 2. blockIdx.y = token, blockIdx.x = block of output features (kWarpsPerBlock when the
// weights are [H, I], kThreads when they are [I, H]).
template <typename W>
__global__ void down_sum_kernel(const int64_t* __restrict__ slots,
                                const float* __restrict__ route_weights,
                                const W* __restrict__ down, int64_t down_slot_stride,
                                const W* __restrict__ down_bias, int64_t down_bias_stride,
                                const float* __restrict__ A, float* __restrict__ out,
                                MoeExpertsParams p) {
  const int64_t t = blockIdx.y;
  const int64_t H = p.hidden, I = p.ffn;
  if (!p.transposed) {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int64_t h = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
    if (h >= H) return;
    float total = 0.0f;
    for (int64_t k = 0; k < p.top_k; ++k) {
      const int64_t pair = t * p.top_k + k;
      const int64_t slot = slots[pair];
      if (slot < 0) continue;
      const W* w = down + slot * down_slot_stride + h * I;
      const float* a = A + pair * I;
      float dot = 0.0f;
      for (int64_t i = lane; i < I; i += kWarpSize) dot += load(w, i) * a[i];
      dot = warp_sum(dot);
      if (p.has_down_bias) dot += load(down_bias + slot * down_bias_stride, h);
      total += route_weights[pair] * dot;
    }
    if (lane == 0) out[t * H + h] = total;
    return;
  }
  const int64_t h = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (h >= H) return;
  float total = 0.0f;
  for (int64_t k = 0; k < p.top_k; ++k) {
    const int64_t pair = t * p.top_k + k;
    const int64_t slot = slots[pair];
    if (slot < 0) continue;
    const W* w = down + slot * down_slot_stride;
    const float* a = A + pair * I;
    float dot = 0.0f;
    for (int64_t i = 0; i < I; ++i) dot += a[i] * load(w, i * H + h);
    if (p.has_down_bias) dot += load(down_bias + slot * down_bias_stride, h);
    total += route_weights[pair] * dot;
  }
  out[t * H + h] = total;
}

__global__ void apply_gate_kernel(const float* __restrict__ h, float* __restrict__ a, int64_t n,
                                  MoeExpertsParams p) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= n * p.ffn) return;
  const int64_t r = index / p.ffn, j = index % p.ffn;
  const float* row = h + r * p.up_rows;
  const float gate = p.layout == GateLayout::kNone ? 0.0f : row[gate_row(j, p)];
  a[index] = expert_gate(gate, row[up_row(j, p)], p);
}

// The grouped path's gate: h fp32 [n, N] -> fp32 [n, I].
at::Tensor apply_gate_cuda(const at::Tensor& h, const MoeExpertsParams& p) {
  const int64_t n = h.size(0);
  at::Tensor a = at::empty({n, p.ffn}, h.options());
  const int64_t total = n * p.ffn;
  if (total == 0) return a;
  const int64_t blocks = (total + 255) / 256;
  apply_gate_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      h.data_ptr<float>(), a.data_ptr<float>(), n, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a;
}

template <typename W>
void few_tokens(const at::Tensor& hidden, const at::Tensor& slots, const at::Tensor& weights,
                const at::Tensor& up, const std::optional<at::Tensor>& up_bias,
                const at::Tensor& down, const std::optional<at::Tensor>& down_bias,
                const MoeExpertsParams& p, at::Tensor& out) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t pairs = p.num_tokens * p.top_k;
  at::Tensor A = at::empty({pairs, p.ffn}, hidden.options().dtype(at::kFloat));
  const int64_t per_block = p.transposed ? kThreads : kWarpsPerBlock;
  const dim3 up_grid((p.ffn + per_block - 1) / per_block, pairs);
  up_gate_kernel<W><<<up_grid, kThreads, p.hidden * sizeof(float), stream>>>(
      hidden.data_ptr<W>(), slots.data_ptr<int64_t>(), up.data_ptr<W>(), up.stride(0),
      up_bias ? up_bias->data_ptr<W>() : nullptr, up_bias ? up_bias->stride(0) : 0,
      A.data_ptr<float>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 down_grid((p.hidden + per_block - 1) / per_block, p.num_tokens);
  down_sum_kernel<W><<<down_grid, kThreads, 0, stream>>>(
      slots.data_ptr<int64_t>(), weights.data_ptr<float>(), down.data_ptr<W>(), down.stride(0),
      down_bias ? down_bias->data_ptr<W>() : nullptr, down_bias ? down_bias->stride(0) : 0,
      A.data_ptr<float>(), out.data_ptr<float>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor moe_experts_cuda(const at::Tensor& hidden, const at::Tensor& slots,
                            const at::Tensor& route_weights, const at::Tensor& up,
                            const std::optional<at::Tensor>& up_bias, const at::Tensor& down,
                            const std::optional<at::Tensor>& down_bias, c10::string_view gate,
                            c10::string_view activation, c10::string_view clamp, double limit,
                            double alpha, double up_offset, bool transposed) {
  const MoeExpertsParams p =
      check_moe_experts_inputs(hidden, slots, route_weights, up, up_bias, down, down_bias, gate,
                               activation, clamp, limit, alpha, up_offset, transposed);
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  if (p.num_tokens > kMaxFusedTokens || p.hidden > kMaxStagedHidden) {
    at::Tensor out = at::zeros({p.num_tokens, p.hidden}, hidden.options().dtype(at::kFloat));
    if (p.num_tokens > 0) {
      moe_experts_grouped(hidden, slots, route_weights, up, up_bias, down, down_bias, p,
                          &apply_gate_cuda, out);
    }
    return out;
  }
  // Every output element is written by pass 2, so no zero-fill.
  at::Tensor out = at::empty({p.num_tokens, p.hidden}, hidden.options().dtype(at::kFloat));
  if (p.num_tokens == 0) return out;
  const at::Tensor x = hidden.contiguous();
  const at::Tensor s = slots.contiguous();
  const at::Tensor w = route_weights.to(at::kFloat).contiguous();
  switch (up.scalar_type()) {
    case at::kFloat:
      few_tokens<float>(x, s, w, up, up_bias, down, down_bias, p, out);
      break;
    case at::kBFloat16:
      few_tokens<c10::BFloat16>(x, s, w, up, up_bias, down, down_bias, p, out);
      break;
    default:
      few_tokens<c10::Half>(x, s, w, up, up_bias, down, down_bias, p, out);
      break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(remoe, CUDA, m) { m.impl("moe_experts", &moe_experts_cuda); }

}  // namespace remoe
