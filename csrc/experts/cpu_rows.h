// CPU building blocks shared by the dense (moe_experts_cpu.cpp) and compressed
// (moe_experts_compressed_cpu.cpp) kernels of the fused experts op: the row kernels over fp32 /
// bf16 / fp16 weights, the routed pairs grouped by slot, and the grouped path's gate.
//
// Legend: T = tokens, K = experts per token, H = hidden, I = expert FFN size, N = up rows,
// P = routed (token, k) pairs, G = distinct slots among them.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

// The helpers the clones call on vectors are always inlined: compiled on their own for
// baseline x86-64 they would pass a 16-float vector in memory where an AVX-512 clone passes it in
// a register (the -Wpsabi ABI change), and the call would crash.
#define REMOE_VEC_INLINE __attribute__((always_inline)) inline

constexpr int kLanes = 16;
typedef float Floats __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint16_t Halves __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t Words __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// kLanes consecutive elements as fp32 (unaligned loads; memcpy compiles to one vector move).
REMOE_VEC_INLINE Floats load_floats(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
REMOE_VEC_INLINE Floats load_floats(const c10::BFloat16* p) {
  Halves h;
  std::memcpy(&h, p, sizeof(h));
  // bf16 is the top half of an fp32: widen and shift.
  const Words bits = __builtin_convertvector(h, Words) << 16;
  Floats v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
REMOE_VEC_INLINE Floats load_floats(const c10::Half* p) {
  Floats v;
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
REMOE_VEC_INLINE void store_floats(float* p, Floats v) { std::memcpy(p, &v, sizeof(v)); }
REMOE_VEC_INLINE float lane_sum(Floats v) {
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

// Each pair's token row of hidden [T, H] in fp32, in group order ([P, H]), so a group's tokens
// are one strided block for the row kernels.
std::vector<float> pair_rows(const at::Tensor& hidden, const SlotGroups& g) {
  const int64_t P = static_cast<int64_t>(g.token.size()), H = hidden.size(1);
  const at::Tensor x = hidden.to(at::kFloat).contiguous();
  std::vector<float> xg(P * H);
  for (int64_t q = 0; q < P; ++q) {
    std::memcpy(xg.data() + q * H, x.data_ptr<float>() + g.token[q] * H, H * sizeof(float));
  }
  return xg;
}

int64_t grain_for(int64_t macs_per_item) {
  return std::max<int64_t>(1, kMinMacsPerTask / std::max<int64_t>(1, macs_per_item));
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

}  // namespace
}  // namespace remoe
