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

#include "moe_experts.h"

namespace remoe {
namespace {

// The few-token kernel handles up to this many tokens; more go to the grouped BLAS path, where
// a weight row meets enough tokens for a GEMM to beat re-reading it per group of four.
constexpr int64_t kMaxFusedTokens = 8;
// Tokens multiplied with one weight row per pass (template instances 1..4).
constexpr int kMaxRowTokens = 4;
// FFN inputs per work item of pass 1 and output features per work item of pass 2.
constexpr int64_t kRowBlock = 16;
// Minimum multiply-adds per thread before at::parallel_for forks: below it, waking the pool's
// threads costs more than the work.
constexpr int64_t kMinMacsPerTask = 1 << 16;

// Weight element -> fp32. bf16 is widened by a shift, which vectorizes.
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_float(c10::Half v) { return static_cast<float>(v); }

// The row kernels below are compiled for AVX-512, AVX2 + FMA and baseline x86-64 and picked at
// load time. They are written with GCC vector types of 16 floats (one AVX-512 register, two AVX2
// ones, four SSE ones) rather than left to the auto-vectorizer, which turns a multi-accumulator
// dot product into a transpose; the summation order is therefore 32 interleaved partial sums,
// not a serial loop's.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define REMOE_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define REMOE_CPU_CLONES
#endif

constexpr int kLanes = 16;
typedef float Floats __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint16_t Halves __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t Words __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// kLanes consecutive elements as fp32 (unaligned loads; memcpy compiles to one vector move).
inline Floats load_floats(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Floats load_floats(const c10::BFloat16* p) {
  Halves h;
  std::memcpy(&h, p, sizeof(h));
  // bf16 is the top half of an fp32: widen and shift.
  const Words bits = __builtin_convertvector(h, Words) << 16;
  Floats v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
inline Floats load_floats(const c10::Half* p) {
  Floats v;
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
inline void store_floats(float* p, Floats v) { std::memcpy(p, &v, sizeof(v)); }
inline float lane_sum(Floats v) {
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += v[l];
  return sum;
}

// out[t] = dot(w[0:n], xs[t * ldx : t * ldx + n]) for t < NT: one weight row, NT token vectors.
// Two accumulators per token hide the FMA latency; the row is loaded once for all NT tokens.
template <typename W, int NT>
REMOE_CPU_CLONES void dot_row(const W* w, const float* xs, int64_t ldx, int64_t n, float* out) {
  Floats acc[NT][2] = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const Floats w0 = load_floats(w + i), w1 = load_floats(w + i + kLanes);
    for (int t = 0; t < NT; ++t) {
      acc[t][0] += w0 * load_floats(xs + t * ldx + i);
      acc[t][1] += w1 * load_floats(xs + t * ldx + i + kLanes);
    }
  }
  for (; i + kLanes <= n; i += kLanes) {
    const Floats w0 = load_floats(w + i);
    for (int t = 0; t < NT; ++t) acc[t][0] += w0 * load_floats(xs + t * ldx + i);
  }
  for (int t = 0; t < NT; ++t) {
    float sum = lane_sum(acc[t][0] + acc[t][1]);
    for (int64_t j = i; j < n; ++j) sum += to_float(w[j]) * xs[t * ldx + j];
    out[t] = sum;
  }
}

// acc[t * ncols + c] += sum_r coef[t * ldc + r] * w[r * ldw + c] for r < rows, c < ncols, t < NT:
// a transposed projection (weights [rows, cols]) on a block of its output columns.
template <typename W, int NT>
REMOE_CPU_CLONES void axpy_rows(const W* w, int64_t ldw, int64_t rows, int64_t ncols,
                                const float* coef, int64_t ldc, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const W* row = w + r * ldw;
    int64_t j = 0;
    for (; j + kLanes <= ncols; j += kLanes) {
      const Floats wv = load_floats(row + j);
      for (int t = 0; t < NT; ++t) {
        float* a = acc + t * ncols + j;
        store_floats(a, load_floats(a) + coef[t * ldc + r] * wv);
      }
    }
    for (; j < ncols; ++j) {
      for (int t = 0; t < NT; ++t) acc[t * ncols + j] += coef[t * ldc + r] * to_float(row[j]);
    }
  }
}

// The two row kernels for nt (1..kMaxRowTokens) tokens, chosen at run time.
template <typename W>
void dot_row_n(int nt, const W* w, const float* xs, int64_t ldx, int64_t n, float* out) {
  switch (nt) {
    case 1: return dot_row<W, 1>(w, xs, ldx, n, out);
    case 2: return dot_row<W, 2>(w, xs, ldx, n, out);
    case 3: return dot_row<W, 3>(w, xs, ldx, n, out);
    default: return dot_row<W, 4>(w, xs, ldx, n, out);
  }
}
template <typename W>
void axpy_rows_n(int nt, const W* w, int64_t ldw, int64_t rows, int64_t ncols, const float* coef,
                 int64_t ldc, float* acc) {
  switch (nt) {
    case 1: return axpy_rows<W, 1>(w, ldw, rows, ncols, coef, ldc, acc);
    case 2: return axpy_rows<W, 2>(w, ldw, rows, ncols, coef, ldc, acc);
    case 3: return axpy_rows<W, 3>(w, ldw, rows, ncols, coef, ldc, acc);
    default: return axpy_rows<W, 4>(w, ldw, rows, ncols, coef, ldc, acc);
  }
}

// The routed pairs grouped by slot: group g holds pairs [begin[g], begin[g + 1]) of `token` and
// `weight`, all computed with slot[g]. Pair order inside a group is token order.
struct SlotGroups {
  std::vector<int64_t> slot, begin, token;
  std::vector<float> weight;
};

SlotGroups group_by_slot(const at::Tensor& slots, const at::Tensor& route_weights,
                         const MoeExpertsParams& p) {
  const int64_t* s = slots.data_ptr<int64_t>();
  const float* w = route_weights.data_ptr<float>();
  const std::vector<int64_t> order = pairs_by_slot(s, p);
  SlotGroups g;
  for (size_t q = 0; q < order.size(); ++q) {
    const int64_t pair = order[q];
    if (q == 0 || s[pair] != g.slot.back()) {
      g.slot.push_back(s[pair]);
      g.begin.push_back(static_cast<int64_t>(q));
    }
    g.token.push_back(pair / p.top_k);
    g.weight.push_back(w[pair]);
  }
  g.begin.push_back(static_cast<int64_t>(order.size()));
  return g;
}

int64_t grain_for(int64_t macs_per_item) {
  return std::max<int64_t>(1, kMinMacsPerTask / std::max<int64_t>(1, macs_per_item));
}

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
  // Each pair's token row in fp32, in group order, so a group's tokens are one strided block.
  const at::Tensor x = hidden.to(at::kFloat).contiguous();
  std::vector<float> xg(P * p.hidden);
  for (int64_t q = 0; q < P; ++q) {
    std::memcpy(xg.data() + q * p.hidden, x.data_ptr<float>() + g.token[q] * p.hidden,
                p.hidden * sizeof(float));
  }
  std::vector<float> A(P * p.ffn);
  const W* up_bias_ptr = up_bias ? up_bias->data_ptr<W>() : nullptr;
  const W* down_bias_ptr = down_bias ? down_bias->data_ptr<W>() : nullptr;
  up_and_gate<W>(g, xg.data(), up.data_ptr<W>(), up.stride(0), up_bias_ptr,
                 up_bias ? up_bias->stride(0) : 0, p, A.data());
  down_and_sum<W>(g, A.data(), down.data_ptr<W>(), down.stride(0), down_bias_ptr,
                  down_bias ? down_bias->stride(0) : 0, p, out.data_ptr<float>());
}

// The grouped path's gate: h fp32 [n, N] -> fp32 [n, I].
at::Tensor apply_gate_cpu(const at::Tensor& h, const MoeExpertsParams& p) {
  const int64_t n = h.size(0), I = p.ffn, N = p.up_rows;
  at::Tensor a = at::empty({n, I}, h.options());
  const float* in = h.data_ptr<float>();
  float* o = a.data_ptr<float>();
  const bool gated = p.layout != GateLayout::kNone;
  at::parallel_for(0, n, grain_for(I * 16), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < I; ++j) {
        const float gate = gated ? in[r * N + gate_row(j, p)] : 0.0f;
        o[r * I + j] = expert_gate(gate, in[r * N + up_row(j, p)], p);
      }
    }
  });
  return a;
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
