// CPU kernel of remoe::moe_experts: every routed expert's FFN over the pool's slots, weighted and
// summed, in one call per MoE layer.
//
// Legend: T = tokens, K = experts per token, H = hidden, I = expert FFN size, N = up rows,
// P = routed (token, k) pairs, G = distinct slots among them.
//
// Few tokens (decode, T <= kMaxFusedTokens): the pairs are grouped by slot, so each weight row is
// read once per group and multiplied with the group's (at most T) token vectors while it is in
// registers: the step is bound by reading the K experts' weights, which is the least any kernel
// can read. Two parallel passes: (1) the up projection and the gate, over (group, block of FFN
// inputs) -> A [P, I] fp32; (2) the down projection, over blocks of output features, each block
// owned by one thread that adds every pair's contribution in a fixed order (deterministic, no
// atomics). Weights are fp32, bf16 or fp16; accumulation is always fp32.
// Many tokens: the grouped path (moe_experts.cpp), two BLAS matmuls per slot.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_rows.h"
#include "moe_experts.h"

namespace remoe {
namespace {

// Pass 1: A[q, j] = gate(up rows of FFN input j, x of pair q) for every pair q.
template <typename W>
void up_and_gate(const SlotGroups& g, const float* xg, const W* up, int64_t up_slot_stride,
                 const W* up_bias, int64_t up_bias_stride, const MoeExpertsParams& p, float* A) {
  const int64_t H = p.hidden, I = p.ffn, N = p.up_rows;
  const int64_t groups = static_cast<int64_t>(g.slot.size());
  const int64_t blocks = (I + kRowBlock - 1) / kRowBlock;
  const bool gated = p.layout != GateLayout::kNone;
  const int64_t macs = kRowBlock * (gated ? 2 : 1) * H * (g.token.size() / std::max<int64_t>(1, groups));
  at::parallel_for(0, groups * blocks, grain_for(macs), [&](int64_t begin, int64_t end) {
    // Transposed weights: the block's up-projection columns for up to kMaxRowTokens tokens.
    std::vector<float> cols(p.transposed ? kMaxRowTokens * 2 * kRowBlock : 0);
    float gate_v[kMaxRowTokens], up_v[kMaxRowTokens];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t gi = item / blocks;
      const int64_t j0 = (item % blocks) * kRowBlock;
      const int64_t j1 = std::min(I, j0 + kRowBlock);
      const W* w = up + g.slot[gi] * up_slot_stride;
      const W* b = up_bias ? up_bias + g.slot[gi] * up_bias_stride : nullptr;
      for (int64_t q0 = g.begin[gi]; q0 < g.begin[gi + 1]; q0 += kMaxRowTokens) {
        const int nt = static_cast<int>(std::min<int64_t>(kMaxRowTokens, g.begin[gi + 1] - q0));
        const float* xs = xg + q0 * H;
        if (!p.transposed) {
          for (int64_t j = j0; j < j1; ++j) {
            dot_row_n<W>(nt, w + up_row(j, p) * H, xs, H, H, up_v);
            if (gated) dot_row_n<W>(nt, w + gate_row(j, p) * H, xs, H, H, gate_v);
            for (int t = 0; t < nt; ++t) {
              const float u = up_v[t] + (b ? to_float(b[up_row(j, p)]) : 0.0f);
              const float gv = gated ? gate_v[t] + (b ? to_float(b[gate_row(j, p)]) : 0.0f) : 0.0f;
              A[(q0 + t) * I + j] = expert_gate(gv, u, p);
            }
          }
          continue;
        }
        // Transposed [H, N]: the block's columns are [j0, j1) of the gate and of the up half
        // (chunk), [2 j0, 2 j1) holding both (interleave), or [j0, j1) (no gate).
        const int64_t width = j1 - j0;
        const int64_t span = p.layout == GateLayout::kInterleave ? 2 * width : width;
        const int64_t col_a = p.layout == GateLayout::kInterleave ? 2 * j0 : j0;
        std::fill(cols.begin(), cols.end(), 0.0f);
        // cols layout: [part][t][span], part 0 = the columns from col_a, part 1 = up half (chunk).
        axpy_rows_n<W>(nt, w + col_a, N, H, span, xs, H, cols.data());
        if (p.layout == GateLayout::kChunk) {
          axpy_rows_n<W>(nt, w + I + j0, N, H, span, xs, H, cols.data() + kMaxRowTokens * span);
        }
        for (int t = 0; t < nt; ++t) {
          for (int64_t j = j0; j < j1; ++j) {
            float gv = 0.0f, u;
            const int64_t c = j - j0;
            switch (p.layout) {
              case GateLayout::kNone:
                u = cols[t * span + c];
                break;
              case GateLayout::kChunk:
                gv = cols[t * span + c];
                u = cols[kMaxRowTokens * span + t * span + c];
                break;
              default:  // kInterleave
                gv = cols[t * span + 2 * c];
                u = cols[t * span + 2 * c + 1];
                break;
            }
            if (b) {
              u += to_float(b[up_row(j, p)]);
              if (gated) gv += to_float(b[gate_row(j, p)]);
            }
            A[(q0 + t) * I + j] = expert_gate(gv, u, p);
          }
        }
      }
    }
  });
}

// Pass 2: out[t, h] += w_q * (down_q[h, :] . A[q] + bias_q[h]) over every pair q of token t.
template <typename W>
void down_and_sum(const SlotGroups& g, const float* A, const W* down, int64_t down_slot_stride,
                  const W* down_bias, int64_t down_bias_stride, const MoeExpertsParams& p,
                  float* out) {
  const int64_t H = p.hidden, I = p.ffn;
  const int64_t groups = static_cast<int64_t>(g.slot.size());
  const int64_t blocks = (H + kRowBlock - 1) / kRowBlock;
  const int64_t macs = kRowBlock * I * static_cast<int64_t>(g.token.size());
  at::parallel_for(0, blocks, grain_for(macs), [&](int64_t begin, int64_t end) {
    float dots[kMaxRowTokens];
    std::vector<float> acc(p.transposed ? kMaxRowTokens * kRowBlock : 0);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t h0 = block * kRowBlock;
      const int64_t h1 = std::min(H, h0 + kRowBlock);
      for (int64_t gi = 0; gi < groups; ++gi) {
        const W* w = down + g.slot[gi] * down_slot_stride;
        const W* b = down_bias ? down_bias + g.slot[gi] * down_bias_stride : nullptr;
        for (int64_t q0 = g.begin[gi]; q0 < g.begin[gi + 1]; q0 += kMaxRowTokens) {
          const int nt = static_cast<int>(std::min<int64_t>(kMaxRowTokens, g.begin[gi + 1] - q0));
          const float* as = A + q0 * I;
          if (!p.transposed) {
            for (int64_t h = h0; h < h1; ++h) {
              dot_row_n<W>(nt, w + h * I, as, I, I, dots);
              const float bias = b ? to_float(b[h]) : 0.0f;
              for (int t = 0; t < nt; ++t) {
                out[g.token[q0 + t] * H + h] += g.weight[q0 + t] * (dots[t] + bias);
              }
            }
            continue;
          }
          const int64_t width = h1 - h0;
          std::fill(acc.begin(), acc.end(), 0.0f);
          axpy_rows_n<W>(nt, w + h0, H, I, width, as, I, acc.data());
          for (int t = 0; t < nt; ++t) {
            float* o = out + g.token[q0 + t] * H;
            for (int64_t c = 0; c < width; ++c) {
              const float bias = b ? to_float(b[h0 + c]) : 0.0f;
              o[h0 + c] += g.weight[q0 + t] * (acc[t * width + c] + bias);
            }
          }
        }
      }
    }
  });
}

template <typename W>
void few_tokens(const at::Tensor& hidden, const SlotGroups& g, const at::Tensor& up,
                const std::optional<at::Tensor>& up_bias, const at::Tensor& down,
                const std::optional<at::Tensor>& down_bias, const MoeExpertsParams& p,
                at::Tensor& out) {
  const int64_t P = static_cast<int64_t>(g.token.size());
  if (P == 0) return;
  const std::vector<float> xg = pair_rows(hidden, g);
  std::vector<float> A(P * p.ffn);
  const W* up_bias_ptr = up_bias ? up_bias->data_ptr<W>() : nullptr;
  const W* down_bias_ptr = down_bias ? down_bias->data_ptr<W>() : nullptr;
  up_and_gate<W>(g, xg.data(), up.data_ptr<W>(), up.stride(0), up_bias_ptr,
                 up_bias ? up_bias->stride(0) : 0, p, A.data());
  down_and_sum<W>(g, A.data(), down.data_ptr<W>(), down.stride(0), down_bias_ptr,
                  down_bias ? down_bias->stride(0) : 0, p, out.data_ptr<float>());
}

at::Tensor moe_experts_cpu(const at::Tensor& hidden, const at::Tensor& slots,
                           const at::Tensor& route_weights, const at::Tensor& up,
                           const std::optional<at::Tensor>& up_bias, const at::Tensor& down,
                           const std::optional<at::Tensor>& down_bias, std::string_view gate,
                           std::string_view activation, std::string_view clamp, double limit,
                           double alpha, double up_offset, bool transposed) {
  const MoeExpertsParams p =
      check_moe_experts_inputs(hidden, slots, route_weights, up, up_bias, down, down_bias, gate,
                               activation, clamp, limit, alpha, up_offset, transposed);
  at::Tensor out = at::zeros({p.num_tokens, p.hidden}, hidden.options().dtype(at::kFloat));
  if (p.num_tokens == 0) return out;
  const at::Tensor slots_c = slots.contiguous();
  if (p.num_tokens > kMaxFusedTokens) {
    moe_experts_grouped(hidden, slots_c, route_weights, up, up_bias, down, down_bias, p,
                        &apply_gate_cpu, out);
    return out;
  }
  const SlotGroups g = group_by_slot(slots_c, route_weights.to(at::kFloat).contiguous(), p);
  switch (up.scalar_type()) {
    case at::kFloat:
      few_tokens<float>(hidden, g, up, up_bias, down, down_bias, p, out);
      break;
    case at::kBFloat16:
      few_tokens<c10::BFloat16>(hidden, g, up, up_bias, down, down_bias, p, out);
      break;
    default:
      few_tokens<c10::Half>(hidden, g, up, up_bias, down, down_bias, p, out);
      break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(remoe, CPU, m) { m.impl("moe_experts", &moe_experts_cpu); }

}  // namespace remoe
