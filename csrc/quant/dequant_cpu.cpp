// Host dequantization (csrc/quant/dequant.h): the plan check, the reader thread's dequantize
// step, and remoe::dequantize on CPU tensors.

#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <sstream>
#include <type_traits>
#include <stdexcept>

#include "dequant.h"
#include "dequant_math.h"

namespace remoe {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

[[noreturn]] void throw_not_finite(int64_t part_index, const char* what, float value,
                                  int64_t grid_row, int64_t grid_col) {
  std::ostringstream msg;
  msg << "dequantize: part " << part_index << " has a " << what
      << " that is not a finite number (" << value << ") at block (" << grid_row << ", "
      << grid_col << "): the scales are corrupt";
  throw std::runtime_error(msg.str());
}

// float -> the slot's element type (Out: float, uint16_t holding bfloat16 bits, c10::Half).
template <typename Out>
inline Out to_out(float v) {
  if constexpr (std::is_same_v<Out, uint16_t>) {
    return float_to_bf16_bits(v);
  } else {
    return Out(v);  // float, or c10::Half: round to nearest even, as torch's .to(float16)
  }
}

// Every float8_e4m3fn byte as a float, built once.
const float* fp8_table() {
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = fp8_e4m3fn_to_float(static_cast<uint8_t>(b));
    return t;
  }();
  return table.data();
}

// One part, its code kind and slot type compile-time constants. Per block, 4-bit codes become a
// 16-entry table of finished values ((q - zero) * scale or e2m1(q) * scale, the very products the
// per-element formula computes) and fp8 codes a lookup times the scale, so the inner loop is a
// lookup, a multiply at most and a store.
template <int64_t Kind, typename Out, bool UnitStride>
void dequantize_kind(const DequantPart& p, const uint8_t* src, uint8_t* dst, int64_t part_index) {
  const uint8_t* codes = src + p.code_offset;
  const uint8_t* scales = p.scale_kind == kScaleNone ? nullptr : src + p.scale_offset;
  const uint8_t* zeros = p.zero_offset < 0 ? nullptr : src + p.zero_offset;
  Out* out = reinterpret_cast<Out*>(dst + p.dst_offset);
  // A unit column stride known at compile time lets the compiler vectorize the inner loops.
  const int64_t rs = p.dst_row_stride, cs = UnitStride ? 1 : p.dst_col_stride;
  const int64_t grid_cols = ceil_div(p.cols, p.block_cols);
  const float* fp8 = fp8_table();
  float lut[16];
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t grid_row = (r / p.block_rows) * grid_cols;
    Out* row_out = out + r * rs;
    for (int64_t c0 = 0; c0 < p.cols; c0 += p.block_cols) {
      const int64_t c1 = std::min(p.cols, c0 + p.block_cols);
      if constexpr (Kind == kCodeF32 || Kind == kCodeBF16 || Kind == kCodeF16) {
        for (int64_t c = c0; c < c1; ++c) {
          row_out[c * cs] = to_out<Out>(decode_code(Kind, codes, r * p.cols + c));
        }
        continue;
      }
      const int64_t g = grid_row + c0 / p.block_cols;
      const float scale = decode_scale(p.scale_kind, scales, g);
      const float zero = zeros ? decode_scale(p.scale_kind, zeros, g) : 0.0f;
      if (!is_finite(scale)) {
        throw_not_finite(part_index, "scale", scale, r / p.block_rows, c0 / p.block_cols);
      }
      if (!is_finite(zero)) {
        throw_not_finite(part_index, "zero point", zero, r / p.block_rows, c0 / p.block_cols);
      }
      if constexpr (Kind == kCodeE2m1 || Kind == kCodeUint4) {
        for (uint32_t q = 0; q < 16; ++q) {
          lut[q] = Kind == kCodeUint4 ? (static_cast<float>(q) - zero) * scale
                                      : e2m1_to_float(q) * scale;
        }
        // cols and block_cols are even (checked with the plan; 4-bit groups hold an even number
        // of columns), so a block is whole bytes: low nibble, then high.
        const uint8_t* row = codes + r * p.cols / 2;
        for (int64_t c = c0; c < c1; c += 2) {
          const uint8_t b = row[c >> 1];
          row_out[c * cs] = to_out<Out>(lut[b & 0xFu]);
          row_out[(c + 1) * cs] = to_out<Out>(lut[b >> 4]);
        }
      } else if constexpr (Kind == kCodeFp8E4m3) {
        const uint8_t* row = codes + r * p.cols;
        for (int64_t c = c0; c < c1; ++c) row_out[c * cs] = to_out<Out>(fp8[row[c]] * scale);
      } else {  // int8
        const int8_t* row = reinterpret_cast<const int8_t*>(codes) + r * p.cols;
        for (int64_t c = c0; c < c1; ++c) {
          row_out[c * cs] = to_out<Out>(static_cast<float>(row[c]) * scale);
        }
      }
    }
  }
}

template <typename Out, bool UnitStride>
void dequantize_strided(const DequantPart& p, const uint8_t* src, uint8_t* dst, int64_t index) {
  switch (p.code_kind) {
    case kCodeF32: return dequantize_kind<kCodeF32, Out, UnitStride>(p, src, dst, index);
    case kCodeBF16: return dequantize_kind<kCodeBF16, Out, UnitStride>(p, src, dst, index);
    case kCodeF16: return dequantize_kind<kCodeF16, Out, UnitStride>(p, src, dst, index);
    case kCodeFp8E4m3: return dequantize_kind<kCodeFp8E4m3, Out, UnitStride>(p, src, dst, index);
    case kCodeE2m1: return dequantize_kind<kCodeE2m1, Out, UnitStride>(p, src, dst, index);
    case kCodeInt8: return dequantize_kind<kCodeInt8, Out, UnitStride>(p, src, dst, index);
    case kCodeUint4: return dequantize_kind<kCodeUint4, Out, UnitStride>(p, src, dst, index);
    default: TORCH_INTERNAL_ASSERT(false, "unchecked code kind ", p.code_kind);
  }
}

template <typename Out>
void dequantize_part(const DequantPart& p, const uint8_t* src, uint8_t* dst, int64_t index) {
  if (p.dst_col_stride == 1) return dequantize_strided<Out, true>(p, src, dst, index);
  dequantize_strided<Out, false>(p, src, dst, index);
}

}  // namespace

void check_scales_host(const std::vector<DequantPart>& parts, const uint8_t* src) {
  for (size_t i = 0; i < parts.size(); ++i) {
    const DequantPart& p = parts[i];
    if (p.scale_kind == kScaleNone) continue;
    const int64_t grid_cols = ceil_div(p.cols, p.block_cols);
    const int64_t grid = ceil_div(p.rows, p.block_rows) * grid_cols;
    for (int64_t g = 0; g < grid; ++g) {
      const float scale = decode_scale(p.scale_kind, src + p.scale_offset, g);
      if (!is_finite(scale)) throw_not_finite(i, "scale", scale, g / grid_cols, g % grid_cols);
      if (p.zero_offset >= 0) {
        const float zero = decode_scale(p.scale_kind, src + p.zero_offset, g);
        if (!is_finite(zero)) {
          throw_not_finite(i, "zero point", zero, g / grid_cols, g % grid_cols);
        }
      }
    }
  }
}

std::vector<DequantPart> parse_dequant_plan(const at::Tensor& plan, int64_t src_bytes,
                                            int64_t dst_bytes, at::ScalarType dst,
                                            int64_t* extent) {
  TORCH_CHECK(plan.dim() == 2 && plan.size(1) == kDequantFields && plan.scalar_type() == at::kLong &&
                  plan.device().is_cpu() && plan.size(0) >= 1,
              "dequantize: plan must be a CPU int64 [N >= 1, ", kDequantFields, "] tensor, got ",
              plan.scalar_type(), " ", plan.sizes(), " on ", plan.device());
  TORCH_CHECK(dst == at::kFloat || dst == at::kBFloat16 || dst == at::kHalf,
              "dequantize: the slot dtype must be float32, bfloat16 or float16, got ", dst);
  const int64_t out_size = c10::elementSize(dst);
  const at::Tensor t = plan.contiguous();
  const int64_t* row = t.data_ptr<int64_t>();
  std::vector<DequantPart> parts;
  int64_t end = 0;
  for (int64_t i = 0; i < t.size(0); ++i, row += kDequantFields) {
    const DequantPart p{row[0], row[1], row[2], row[3], row[4], row[5],
                        row[6], row[7], row[8], row[9], row[10], row[11]};
    TORCH_CHECK(p.code_kind >= 0 && p.code_kind < kNumCodeKinds, "dequantize: part ", i,
                " has code kind ", p.code_kind);
    TORCH_CHECK(p.rows >= 1 && p.cols >= 1 && p.block_rows >= 1 && p.block_cols >= 1,
                "dequantize: part ", i, " has rows ", p.rows, ", cols ", p.cols, ", block ",
                p.block_rows, "x", p.block_cols);
    const bool raw = p.code_kind <= kCodeF16;
    TORCH_CHECK(raw == (p.scale_kind == kScaleNone) && p.scale_kind >= kScaleNone &&
                    p.scale_kind < kNumScaleKinds,
                "dequantize: part ", i, " (code kind ", p.code_kind, ") has scale kind ",
                p.scale_kind, ": raw codes take none, the others one");
    TORCH_CHECK((p.code_kind == kCodeUint4) == (p.zero_offset >= 0) &&
                    (p.zero_offset < 0 || p.scale_kind != kScaleE8m0),
                "dequantize: part ", i, ": uint4 codes need zero points (in a float scale "
                "dtype), other codes none");
    const int64_t n = p.rows * p.cols;
    const int64_t code_bytes = (n * code_bits(p.code_kind) + 7) / 8;
    TORCH_CHECK(code_bits(p.code_kind) != 4 || (p.cols % 2 == 0 && p.block_cols % 2 == 0),
                "dequantize: part ", i, " packs 4-bit codes but has an odd number of columns (",
                p.cols, ") or of block columns (", p.block_cols, ")");
    const int64_t grid = ceil_div(p.rows, p.block_rows) * ceil_div(p.cols, p.block_cols);
    auto inside = [&](int64_t offset, int64_t nbytes) {
      return offset >= 0 && nbytes >= 0 && offset + nbytes <= src_bytes;
    };
    TORCH_CHECK(inside(p.code_offset, code_bytes), "dequantize: part ", i, "'s codes (",
                code_bytes, " bytes at ", p.code_offset, ") fall outside the ", src_bytes,
                "-byte blob");
    if (!raw) {
      TORCH_CHECK(inside(p.scale_offset, grid * scale_bytes(p.scale_kind)), "dequantize: part ", i,
                  "'s scales fall outside the ", src_bytes, "-byte blob");
    }
    if (p.zero_offset >= 0) {
      TORCH_CHECK(inside(p.zero_offset, grid * scale_bytes(p.scale_kind)), "dequantize: part ", i,
                  "'s zero points fall outside the ", src_bytes, "-byte blob");
    }
    TORCH_CHECK(p.dst_row_stride >= 0 && p.dst_col_stride >= 0 && p.dst_offset >= 0 &&
                    p.dst_offset % out_size == 0,
                "dequantize: part ", i, " has a negative or misaligned destination");
    const int64_t last = p.dst_offset +
                         out_size * ((p.rows - 1) * p.dst_row_stride + (p.cols - 1) * p.dst_col_stride + 1);
    TORCH_CHECK(last <= dst_bytes, "dequantize: part ", i, " writes up to byte ", last,
                " of a ", dst_bytes, "-byte slot");
    end = std::max(end, last);
    parts.push_back(p);
  }
  if (extent != nullptr) *extent = end;
  return parts;
}

void dequantize_host(const std::vector<DequantPart>& parts, const uint8_t* src, uint8_t* dst,
                     at::ScalarType dst_dtype) {
  for (size_t i = 0; i < parts.size(); ++i) {
    const int64_t index = static_cast<int64_t>(i);
    switch (dst_dtype) {
      case at::kFloat: dequantize_part<float>(parts[i], src, dst, index); break;
      case at::kBFloat16: dequantize_part<uint16_t>(parts[i], src, dst, index); break;
      case at::kHalf: dequantize_part<c10::Half>(parts[i], src, dst, index); break;
      default: TORCH_INTERNAL_ASSERT(false, "unsupported dequantize target");
    }
  }
}

namespace {

at::Tensor dequantize_cpu(const at::Tensor& blob, const at::Tensor& plan, at::ScalarType dtype,
                          int64_t out_bytes) {
  TORCH_CHECK(blob.dim() == 1 && blob.scalar_type() == at::kByte && blob.is_contiguous(),
              "dequantize: blob must be a contiguous uint8 [n] tensor, got ", blob.scalar_type(),
              " ", blob.sizes());
  TORCH_CHECK(out_bytes >= 0, "dequantize: out_bytes must be >= 0, got ", out_bytes);
  const auto parts = parse_dequant_plan(plan, blob.numel(), out_bytes, dtype, nullptr);
  at::Tensor out = at::zeros({out_bytes}, blob.options());
  try {
    dequantize_host(parts, blob.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), dtype);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(remoe, CPU, m) { m.impl("dequantize", &dequantize_cpu); }

}  // namespace remoe
