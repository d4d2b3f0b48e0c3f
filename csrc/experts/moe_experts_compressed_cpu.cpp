// CPU kernel of remoe::moe_experts_compressed: the fused experts op over slots that hold
// compressed expert blobs (csrc/quant/dequant.h), not compute-dtype weights.
//
// A compressed slot holds more experts per byte of budget (int4:g128: 3.8x as many as bf16), and
// a miss moves and checks the compressed bytes only: nothing is dequantized on load. The cost
// moves to compute, where every use decodes the codes it reads:
//
// - Few tokens (decode, T <= kMaxFusedTokens): as the dense kernel (moe_experts_cpu.cpp), pairs
//   grouped by slot, each weight row read once per group. A row is decoded 16 codes at a time
//   into fp32 registers (int8 and uint4 by widening, fp8 e4m3 by bit arithmetic, e2m1 by one
//   lane permutation) and multiplied with the group's token vectors there; the block scale
//   multiplies a block's partial sums once, and a uint4 zero point is folded in as
//   zero * scale * sum(x over the block). The step reads the compressed bytes and nothing else.
//   Measured (bench/bench_compressed_compute.py): 1.1x (int8) to 2.1x (fp8) the time of the
//   same experts in bf16 slots, never more than float32 slots.
// - Many tokens (prefill): the routed slots are dequantized, a chunk at a time, into a scratch
//   of dense experts in hidden's dtype (the reader's own dequantize_host, in parallel over
//   slots), and the grouped BLAS path (moe_experts.cpp) runs on the scratch. Per token of the
//   prompt the dequantization is amortized; the matmuls are what they are for dense slots.
//
// The plan (remoe_engine/quant.py, QuantLayout.compute_plan): int64 [n, kComputeFields], one row
// per part: which matrix it fills (kParamUp [N, H], kParamUpBias [1, N], kParamDown [H, I],
// kParamDownBias [1, H], all seen [out, in]), its first row there, and its codes and scales as
// in a DequantPart. Codes of a compressed part are always stored [out, in] row-major, whatever
// the family's in-memory orientation, so one row kernel serves transposed families too.
//
// Legend: T = tokens, K = experts per token, H = hidden, I = expert FFN size, N = up rows,
// P = routed (token, k) pairs, S = slots, B = blob bytes.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../quant/dequant.h"
#include "../quant/dequant_math.h"
#include "cpu_rows.h"
#include "moe_experts.h"
#include "moe_experts_compressed.h"

namespace remoe {
namespace {

// Prefill dequantizes routed slots into a scratch of at most this many bytes at a time (or one
// expert, if larger). The scratch is kept between calls (per calling thread): a fresh one would
// be fresh pages, and faulting them in cost more than dequantizing into them.
constexpr int64_t kScratchBytes = int64_t{64} << 20;

// The calling thread's scratch, grown to `bytes` when smaller.
uint8_t* scratch_of(int64_t bytes) {
  thread_local std::vector<uint8_t> scratch;
  if (static_cast<int64_t>(scratch.size()) < bytes) {
    scratch = std::vector<uint8_t>();  // release the old one first
    scratch.resize(bytes);
  }
  return scratch.data();
}

// ---- decoding 16 codes into fp32 lanes --------------------------------------------------------

typedef uint8_t Bytes8 __attribute__((vector_size(8)));
typedef uint8_t Bytes16 __attribute__((vector_size(16)));
typedef int8_t Int8s16 __attribute__((vector_size(16)));
typedef int16_t Shorts __attribute__((vector_size(kLanes * sizeof(int16_t))));
typedef uint16_t UShorts __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));

REMOE_VEC_INLINE Floats words_as_floats(Words w) {
  Floats f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

// 16 4-bit codes from 8 bytes, element 2k in the low nibble of byte k: each byte duplicated into
// two 32-bit lanes, then shifted by 0 or 4 and masked (a byte shuffle, two widenings, a variable
// shift and an and; splitting the nibbles in bytes first costs twice the instructions).
REMOE_VEC_INLINE Words nibbles16(const uint8_t* p) {
  Bytes8 b;
  std::memcpy(&b, p, sizeof(b));
  const Bytes16 pairs =
      __builtin_shufflevector(b, b, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const Words w = __builtin_convertvector(__builtin_convertvector(pairs, UShorts), Words);
  const Words shift = {0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4};
  return (w >> shift) & 0xF;
}

struct Int8Codes {
  static constexpr int kBits = 8;
  REMOE_VEC_INLINE static Floats load(const uint8_t* row, int64_t c) {
    Int8s16 v;
    std::memcpy(&v, row + c, sizeof(v));
    // Widened by halves (int8 -> int16 -> int32 -> float): GCC vectorizes each doubling, but
    // scalarizes int8 -> int32 or -> float in one step (16 scalar converts).
    const Shorts wide = __builtin_convertvector(v, Shorts);
    return __builtin_convertvector(__builtin_convertvector(wide, Ints), Floats);
  }
};

struct Uint4Codes {
  static constexpr int kBits = 4;
  REMOE_VEC_INLINE static Floats load(const uint8_t* row, int64_t c) {
    return __builtin_convertvector(reinterpret_cast<Ints>(nibbles16(row + c / 2)), Floats);
  }
};

// float8_e4m3fn as fp8_e4m3fn_to_float computes it, 16 lanes at once: a normal number's exponent
// and mantissa move into fp32's fields (bias 7 -> 127); a subnormal m * 2^-9 is made from the
// normal 2^-7 (1 + m / 8) as 2x - 2^-6, so no fp32 denormal is ever formed (those are slow,
// and zero under flush-to-zero); S.1111.111 is NaN.
struct Fp8Codes {
  static constexpr int kBits = 8;
  REMOE_VEC_INLINE static Floats load(const uint8_t* row, int64_t c) {
    Bytes16 b;
    std::memcpy(&b, row + c, sizeof(b));
    const Words w = __builtin_convertvector(__builtin_convertvector(b, UShorts), Words);
    const Words magnitude = w & 0x7F;
    Floats x = words_as_floats((magnitude << 20) + (120u << 23));
    const Floats subnormal = x * 2.0f - 0.015625f;  // exact: one FMA
    const Floats nan = Floats{} + std::numeric_limits<float>::quiet_NaN();
    x = magnitude < 8 ? subnormal : x;
    x = magnitude == 0x7F ? nan : x;
    Words bits;
    std::memcpy(&bits, &x, sizeof(bits));
    return words_as_floats(bits | ((w & 0x80) << 24));
  }
};

// e2m1 (MXFP4): the 16 values of transformers' FP4_VALUES looked up by a lane permutation (one
// vpermps on AVX-512).
struct E2m1Codes {
  static constexpr int kBits = 4;
  REMOE_VEC_INLINE static Floats load(const uint8_t* row, int64_t c) {
    const Floats values = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                           -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
    return __builtin_shuffle(values, reinterpret_cast<Ints>(nibbles16(row + c / 2)));
  }
};

// A scale (or zero point) inside the row kernels: the same value as decode_scale, without its
// call and branches (fp16 through the compiler's _Float16, one instruction with F16C).
REMOE_VEC_INLINE float scale_at(int64_t kind, const uint8_t* p, int64_t i) {
  switch (kind) {
    case kScaleF32: {
      float f;
      std::memcpy(&f, p + 4 * i, 4);
      return f;
    }
    case kScaleF16: {
      _Float16 h;
      std::memcpy(&h, p + 2 * i, 2);
      return static_cast<float>(h);
    }
    case kScaleBF16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return bits_to_float(static_cast<uint32_t>(h) << 16);
    }
    default:
      return e8m0_to_float(p[i]);
  }
}

// out[t] = sum_c decode(row, c) * scale(c) * xs[t][c] (uint4: (code - zero) * scale) for a row
// of a quantized part. Per block of columns the codes' dot with x accumulates in vectors; the
// block's scale then multiplies the vectors, so a row costs one horizontal sum per token.
template <typename Codes, int NT>
REMOE_CPU_CLONES void quantized_dot_row(const DequantPart& part, const uint8_t* blob, int64_t r,
                                        const float* xs, int64_t ldx, float* out) {
  constexpr bool kZero = std::is_same_v<Codes, Uint4Codes>;
  const int64_t cols = part.cols, bc = part.block_cols;
  const int64_t grid_cols = (cols + bc - 1) / bc;
  const uint8_t* codes = blob + part.code_offset;
  // Elements before this row, in codes: 4-bit rows start on a byte (cols is even).
  const uint8_t* row = codes + r * cols * Codes::kBits / 8;
  const int64_t scale_row = (r / part.block_rows) * grid_cols;
  Floats total[NT] = {};
  float tail[NT] = {};
  for (int64_t g = 0; g < grid_cols; ++g) {
    const int64_t c0 = g * bc, c1 = std::min(cols, c0 + bc);
    const float scale = scale_at(part.scale_kind, blob + part.scale_offset, scale_row + g);
    const float zero =
        kZero ? scale_at(part.scale_kind, blob + part.zero_offset, scale_row + g) : 0.0f;
    // Two accumulators per token: one chain of dependent FMAs would bound a long block (a
    // per-row int8 scale) by the FMA latency, not by decoding.
    Floats acc[NT] = {}, acc2[NT] = {}, xsum[NT] = {};
    int64_t c = c0;
    for (; c + 2 * kLanes <= c1; c += 2 * kLanes) {
      const Floats w = Codes::load(row, c), w2 = Codes::load(row, c + kLanes);
      for (int t = 0; t < NT; ++t) {
        const Floats x = load_floats(xs + t * ldx + c);
        const Floats x2 = load_floats(xs + t * ldx + c + kLanes);
        acc[t] += w * x;
        acc2[t] += w2 * x2;
        if constexpr (kZero) xsum[t] += x + x2;
      }
    }
    for (; c + kLanes <= c1; c += kLanes) {
      const Floats w = Codes::load(row, c);
      for (int t = 0; t < NT; ++t) {
        const Floats x = load_floats(xs + t * ldx + c);
        acc[t] += w * x;
        if constexpr (kZero) xsum[t] += x;
      }
    }
    for (int t = 0; t < NT; ++t) {
      const Floats sum = acc[t] + acc2[t];
      total[t] += scale * (kZero ? sum - zero * xsum[t] : sum);
      for (int64_t j = c; j < c1; ++j) {
        const float code = decode_code(part.code_kind, codes, r * cols + j);
        tail[t] += (code - zero) * scale * xs[t * ldx + j];
      }
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = lane_sum(total[t]) + tail[t];
}

template <int NT>
void compressed_dot_row(const DequantPart& part, const uint8_t* blob, int64_t r, const float* xs,
                        int64_t ldx, float* out) {
  const uint8_t* codes = blob + part.code_offset;
  const int64_t at = r * part.cols;
  switch (part.code_kind) {
    case kCodeF32:
      return dot_row<float, NT>(reinterpret_cast<const float*>(codes) + at, xs, ldx, part.cols,
                                out);
    case kCodeBF16:
      return dot_row<c10::BFloat16, NT>(reinterpret_cast<const c10::BFloat16*>(codes) + at, xs,
                                        ldx, part.cols, out);
    case kCodeF16:
      return dot_row<c10::Half, NT>(reinterpret_cast<const c10::Half*>(codes) + at, xs, ldx,
                                    part.cols, out);
    case kCodeInt8: return quantized_dot_row<Int8Codes, NT>(part, blob, r, xs, ldx, out);
    case kCodeUint4: return quantized_dot_row<Uint4Codes, NT>(part, blob, r, xs, ldx, out);
    case kCodeFp8E4m3: return quantized_dot_row<Fp8Codes, NT>(part, blob, r, xs, ldx, out);
    default: return quantized_dot_row<E2m1Codes, NT>(part, blob, r, xs, ldx, out);
  }
}

void compressed_dot_row_n(int nt, const DequantPart& part, const uint8_t* blob, int64_t r,
                          const float* xs, int64_t ldx, float* out) {
  switch (nt) {
    case 1: return compressed_dot_row<1>(part, blob, r, xs, ldx, out);
    case 2: return compressed_dot_row<2>(part, blob, r, xs, ldx, out);
    case 3: return compressed_dot_row<3>(part, blob, r, xs, ldx, out);
    default: return compressed_dot_row<4>(part, blob, r, xs, ldx, out);
  }
}

// The fp32 row r of matrix m of one blob, dotted with up to 4 token vectors.
struct BlobRows {
  const CompressedPlan& cp;
  void dot(int nt, int64_t m, const uint8_t* blob, int64_t r, const float* xs, int64_t ldx,
           float* out) const {
    const int32_t i = cp.part_of_row[m][r];
    compressed_dot_row_n(nt, cp.parts[i], blob, r - cp.row0[i], xs, ldx, out);
  }
  // A bias element (bias parts are one row of raw codes).
  float bias(int64_t m, const uint8_t* blob, int64_t c) const {
    const DequantPart& part = cp.parts[cp.part_of_row[m][0]];
    return decode_code(part.code_kind, blob + part.code_offset, c);
  }
};

void few_tokens_compressed(const at::Tensor& hidden, const SlotGroups& g, const at::Tensor& blobs,
                           const CompressedPlan& cp, const MoeExpertsParams& p, at::Tensor& out) {
  const int64_t P = static_cast<int64_t>(g.token.size());
  if (P == 0) return;
  const int64_t H = p.hidden, I = p.ffn;
  const std::vector<float> xg = pair_rows(hidden, g);
  const uint8_t* base = blobs.data_ptr<uint8_t>();
  const int64_t blob_stride = blobs.stride(0);
  const BlobRows rows{cp};
  const int64_t groups = static_cast<int64_t>(g.slot.size());
  const bool gated = p.layout != GateLayout::kNone;
  const bool up_bias = cp.has[kParamUpBias], down_bias = cp.has[kParamDownBias];

  // Pass 1: A[q, j] = gate(up rows of FFN input j . x_q), over (group, block of FFN inputs).
  std::vector<float> A(P * I);
  const int64_t blocks = (I + kRowBlock - 1) / kRowBlock;
  const int64_t macs = kRowBlock * (gated ? 2 : 1) * H * (P / std::max<int64_t>(1, groups));
  at::parallel_for(0, groups * blocks, grain_for(macs), [&](int64_t begin, int64_t end) {
    float gate_v[kMaxRowTokens], up_v[kMaxRowTokens];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t gi = item / blocks;
      const int64_t j0 = (item % blocks) * kRowBlock, j1 = std::min(I, j0 + kRowBlock);
      const uint8_t* blob = base + g.slot[gi] * blob_stride;
      for (int64_t q0 = g.begin[gi]; q0 < g.begin[gi + 1]; q0 += kMaxRowTokens) {
        const int nt = static_cast<int>(std::min<int64_t>(kMaxRowTokens, g.begin[gi + 1] - q0));
        const float* xs = xg.data() + q0 * H;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t ur = up_row(j, p), gr = gate_row(j, p);
          rows.dot(nt, kParamUp, blob, ur, xs, H, up_v);
          if (gated) rows.dot(nt, kParamUp, blob, gr, xs, H, gate_v);
          const float ub = up_bias ? rows.bias(kParamUpBias, blob, ur) : 0.0f;
          const float gb = up_bias && gated ? rows.bias(kParamUpBias, blob, gr) : 0.0f;
          for (int t = 0; t < nt; ++t) {
            A[(q0 + t) * I + j] = expert_gate(gated ? gate_v[t] + gb : 0.0f, up_v[t] + ub, p);
          }
        }
      }
    }
  });

  // Pass 2: out[t, h] += w_q * (down row h . A[q] + bias[h]), each block of h owned by one thread
  // that adds the pairs in a fixed order (deterministic).
  float* o = out.data_ptr<float>();
  const int64_t out_blocks = (H + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, out_blocks, grain_for(kRowBlock * I * P), [&](int64_t begin, int64_t end) {
    float dots[kMaxRowTokens];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t h0 = block * kRowBlock, h1 = std::min(H, h0 + kRowBlock);
      for (int64_t gi = 0; gi < groups; ++gi) {
        const uint8_t* blob = base + g.slot[gi] * blob_stride;
        for (int64_t q0 = g.begin[gi]; q0 < g.begin[gi + 1]; q0 += kMaxRowTokens) {
          const int nt = static_cast<int>(std::min<int64_t>(kMaxRowTokens, g.begin[gi + 1] - q0));
          for (int64_t h = h0; h < h1; ++h) {
            rows.dot(nt, kParamDown, blob, h, A.data() + q0 * I, I, dots);
            const float bias = down_bias ? rows.bias(kParamDownBias, blob, h) : 0.0f;
            for (int t = 0; t < nt; ++t) {
              o[g.token[q0 + t] * H + h] += g.weight[q0 + t] * (dots[t] + bias);
            }
          }
        }
      }
    }
  });
}

// Prefill: chunks of the routed slots dequantized into dense scratch experts, then the grouped
// BLAS path on them.
void many_tokens_compressed(const at::Tensor& hidden, const at::Tensor& slots,
                            const at::Tensor& route_weights, const at::Tensor& blobs,
                            const CompressedPlan& cp, MoeExpertsParams p, at::Tensor& out) {
  const std::vector<int64_t> used = routed_slots(slots.data_ptr<int64_t>(), p);
  const at::ScalarType dtype = hidden.scalar_type();
  const int64_t dense_bytes = cp.dense_elements * c10::elementSize(dtype);
  const int64_t chunk = std::max<int64_t>(1, kScratchBytes / dense_bytes);
  const uint8_t* base = blobs.data_ptr<uint8_t>();
  for (size_t c0 = 0; c0 < used.size(); c0 += chunk) {
    const int64_t n = std::min<int64_t>(chunk, static_cast<int64_t>(used.size() - c0));
    uint8_t* dst = scratch_of(n * dense_bytes);
    const at::Tensor scratch =
        at::from_blob(dst, {n, cp.dense_elements}, hidden.options());
    std::mutex failure_mu;
    std::string failure;
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        try {
          dequantize_host(cp.parts, base + used[c0 + i] * blobs.stride(0), dst + i * dense_bytes,
                          dtype);
        } catch (const std::runtime_error& e) {  // a non-finite scale: reported below
          std::lock_guard<std::mutex> lock(failure_mu);
          failure = e.what();
        }
      }
    });
    TORCH_CHECK(failure.empty(), "moe_experts_compressed: ", failure);
    MoeExpertsParams q = p;
    q.num_slots = n;
    q.transposed = false;
    const DenseExperts d = dense_views(scratch, cp, p);
    moe_experts_grouped(hidden, chunk_slot_ids(slots, used, c0, n, p.num_slots), route_weights,
                        d.up, d.up_bias, d.down, d.down_bias, q, &apply_gate_cpu, out);
  }
}

at::Tensor moe_experts_compressed_cpu(const at::Tensor& hidden, const at::Tensor& slots,
                                      const at::Tensor& route_weights, const at::Tensor& blobs,
                                      const at::Tensor& plan, int64_t up_rows,
                                      std::string_view gate, std::string_view activation,
                                      std::string_view clamp, double limit, double alpha,
                                      double up_offset) {
  MoeExpertsParams p;
  const CompressedPlan cp = check_compressed_inputs(hidden, slots, route_weights, blobs, plan,
                                                    up_rows, gate, activation, clamp, limit,
                                                    alpha, up_offset, &p);
  at::Tensor out = at::zeros({p.num_tokens, p.hidden}, hidden.options().dtype(at::kFloat));
  if (p.num_tokens == 0) return out;
  const at::Tensor slots_c = slots.contiguous();
  if (p.num_tokens > kMaxFusedTokens) {
    many_tokens_compressed(hidden, slots_c, route_weights, blobs, cp, p, out);
    return out;
  }
  const SlotGroups g = group_by_slot(slots_c, route_weights.to(at::kFloat).contiguous(), p);
  few_tokens_compressed(hidden, g, blobs, cp, p, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(remoe, CPU, m) { m.impl("moe_experts_compressed", &moe_experts_compressed_cpu); }

}  // namespace remoe
