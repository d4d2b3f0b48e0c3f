// Element decoders of csrc/quant/dequant.h written once for both backends: plain inline C++ in
// the CPU translation unit, __host__ __device__ in the CUDA one, so both compute the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "dequant.h"

#if defined(__CUDACC__)
#define REMOE_QD __host__ __device__
#else
#define REMOE_QD
#endif

namespace remoe {

REMOE_QD inline float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

REMOE_QD inline uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

// float8_e4m3fn: bias 7, no infinities, S.1111.111 is NaN, subnormals man * 2^-9.
REMOE_QD inline float fp8_e4m3fn_to_float(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 0xFu, man = b & 0x7u;
  if (exp == 0xFu && man == 0x7u) return bits_to_float(sign | 0x7FC00000u);
  if (exp == 0) return bits_to_float(sign | float_to_bits(static_cast<float>(man) * 0.001953125f));
  return bits_to_float(sign | ((exp + 120u) << 23) | (man << 20));
}

// e2m1 (MXFP4's element type), transformers' FP4_VALUES order.
REMOE_QD inline float e2m1_to_float(uint32_t nibble) {
  // Magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 as fp32 bits; bit 3 is the sign.
  const uint32_t exp = (nibble >> 1) & 0x3u, man = nibble & 0x1u;
  float mag = exp == 0 ? 0.5f * static_cast<float>(man)
                       : bits_to_float(((exp + 126u) << 23) | (man << 22));
  return (nibble & 0x8u) ? -mag : mag;
}

// UE8M0 (float8_e8m0fnu): 2^(b - 127); 255 is NaN. b = 0 is 2^-127, an fp32 subnormal.
REMOE_QD inline float e8m0_to_float(uint8_t b) {
  if (b == 0xFFu) return bits_to_float(0x7FC00000u);
  if (b == 0) return bits_to_float(0x00400000u);
  return bits_to_float(static_cast<uint32_t>(b) << 23);
}

REMOE_QD inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// IEEE half -> float, exact (subnormals included).
REMOE_QD inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (man << 13));
  if (exp == 0) return bits_to_float(sign | float_to_bits(static_cast<float>(man) * 5.9604644775390625e-8f));
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// float -> bf16 bits, round to nearest even; NaN stays a quiet NaN (as c10::BFloat16).
REMOE_QD inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// A code at element index i (row-major over the part) as a float, before scaling.
REMOE_QD inline float decode_code(int64_t kind, const uint8_t* codes, int64_t i) {
  switch (kind) {
    case kCodeF32: {
      uint32_t bits;
      memcpy(&bits, codes + 4 * i, 4);
      return bits_to_float(bits);
    }
    case kCodeBF16: {
      uint16_t h;
      memcpy(&h, codes + 2 * i, 2);
      return bf16_to_float(h);
    }
    case kCodeF16: {
      uint16_t h;
      memcpy(&h, codes + 2 * i, 2);
      return f16_to_float(h);
    }
    case kCodeFp8E4m3: return fp8_e4m3fn_to_float(codes[i]);
    case kCodeE2m1: return e2m1_to_float((codes[i >> 1] >> ((i & 1) * 4)) & 0xFu);
    case kCodeInt8: return static_cast<float>(static_cast<int8_t>(codes[i]));
    case kCodeUint4: return static_cast<float>((codes[i >> 1] >> ((i & 1) * 4)) & 0xFu);
    default: return 0.0f;
  }
}

REMOE_QD inline float decode_scale(int64_t kind, const uint8_t* scales, int64_t i) {
  switch (kind) {
    case kScaleF32: return decode_code(kCodeF32, scales, i);
    case kScaleE8m0: return e8m0_to_float(scales[i]);
    case kScaleF16: return decode_code(kCodeF16, scales, i);
    case kScaleBF16: return decode_code(kCodeBF16, scales, i);
    default: return 1.0f;
  }
}

REMOE_QD inline bool is_finite(float f) { return (float_to_bits(f) & 0x7F800000u) != 0x7F800000u; }

REMOE_QD inline int64_t code_bits(int64_t kind) {
  switch (kind) {
    case kCodeF32: return 32;
    case kCodeBF16: case kCodeF16: return 16;
    case kCodeFp8E4m3: case kCodeInt8: return 8;
    default: return 4;
  }
}

REMOE_QD inline int64_t scale_bytes(int64_t kind) {
  return kind == kScaleF32 ? 4 : kind == kScaleE8m0 ? 1 : 2;
}

}  // namespace remoe
