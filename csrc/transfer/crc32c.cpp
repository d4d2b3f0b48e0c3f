// CRC32C: hardware three-stream path (x86-64 SSE4.2 or ARMv8 CRC) with a table fallback.

#include "crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#define REMOE_CRC_HW 1
#define REMOE_CRC_TARGET __attribute__((target("sse4.2")))
#elif defined(__aarch64__)
#include <arm_acle.h>
#include <sys/auxv.h>
#define REMOE_CRC_HW 1
#define REMOE_CRC_TARGET __attribute__((target("+crc")))
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#else
#define REMOE_CRC_HW 0
#endif

namespace remoe {

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

// --- table fallback ------------------------------------------------------------------------

struct ByteTable {
  std::array<uint32_t, 256> t{};
  ByteTable() {
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ kPoly : c >> 1;
      t[n] = c;
    }
  }
};

uint32_t crc32c_table(uint32_t crc, const uint8_t* p, size_t len) {
  static const ByteTable table;
  crc = ~crc;
  while (len--) crc = table.t[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

#if REMOE_CRC_HW

// --- combining independent streams -------------------------------------------------------
// Three CRCs run on adjacent blocks at once; the first one is then "shifted" over the bytes of
// the next block (multiplied by x^(8*len) mod P, a linear map over GF(2)) and XORed with it.
// A linear map of a 32-bit CRC is applied bytewise through four 256-entry tables.

uint32_t gf2_times(const uint32_t* mat, uint32_t vec) {
  uint32_t sum = 0;
  for (; vec; vec >>= 1, ++mat) {
    if (vec & 1) sum ^= *mat;
  }
  return sum;
}

void gf2_square(uint32_t* square, const uint32_t* mat) {
  for (int n = 0; n < 32; ++n) square[n] = gf2_times(mat, mat[n]);
}

// Tables that append `len` zero bytes (len a power of two) to a raw (not inverted) CRC.
struct ShiftTables {
  uint32_t t[4][256];
  explicit ShiftTables(size_t len) {
    uint32_t odd[32], even[32];
    odd[0] = kPoly;  // operator for one zero bit
    for (int n = 1; n < 32; ++n) odd[n] = 1u << (n - 1);
    gf2_square(even, odd);  // two zero bits
    gf2_square(odd, even);  // four zero bits
    // Squaring alternates between the buffers: one byte in even, two in odd, four in even...
    const uint32_t* op = nullptr;
    for (;;) {
      gf2_square(even, odd);
      len >>= 1;
      if (len == 0) { op = even; break; }
      gf2_square(odd, even);
      len >>= 1;
      if (len == 0) { op = odd; break; }
    }
    for (uint32_t n = 0; n < 256; ++n) {
      t[0][n] = gf2_times(op, n);
      t[1][n] = gf2_times(op, n << 8);
      t[2][n] = gf2_times(op, n << 16);
      t[3][n] = gf2_times(op, n << 24);
    }
  }
  uint32_t shift(uint32_t crc) const {
    return t[0][crc & 0xFF] ^ t[1][(crc >> 8) & 0xFF] ^ t[2][(crc >> 16) & 0xFF] ^ t[3][crc >> 24];
  }
};

constexpr size_t kLong = 8192;  // bytes per stream in the main loop
constexpr size_t kShort = 256;  // bytes per stream for what is left

#if defined(__x86_64__)
REMOE_CRC_TARGET inline uint64_t step8(uint64_t crc, uint64_t v) { return _mm_crc32_u64(crc, v); }
REMOE_CRC_TARGET inline uint64_t step1(uint64_t crc, uint8_t v) {
  return _mm_crc32_u8(static_cast<uint32_t>(crc), v);
}
bool cpu_has_crc() { return __builtin_cpu_supports("sse4.2"); }
#else
REMOE_CRC_TARGET inline uint64_t step8(uint64_t crc, uint64_t v) {
  return __crc32cd(static_cast<uint32_t>(crc), v);
}
REMOE_CRC_TARGET inline uint64_t step1(uint64_t crc, uint8_t v) {
  return __crc32cb(static_cast<uint32_t>(crc), v);
}
bool cpu_has_crc() { return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0; }
#endif

inline uint64_t load8(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // unaligned-safe; compiles to one load
  return v;
}

// The instruction has a latency of ~3 cycles and a throughput of one per cycle: three
// independent streams over adjacent `block`-byte blocks keep it busy. Consumes whole 3-block
// chunks of [p, p + len) and returns the running raw (inverted) CRC.
REMOE_CRC_TARGET uint64_t three_way(uint64_t c0, const uint8_t*& p, size_t& len, size_t block,
                                    const ShiftTables& tables) {
  while (len >= 3 * block) {
    uint64_t c1 = 0, c2 = 0;
    const uint8_t* end = p + block;
    do {
      c0 = step8(c0, load8(p));
      c1 = step8(c1, load8(p + block));
      c2 = step8(c2, load8(p + 2 * block));
      p += 8;
    } while (p < end);
    c0 = tables.shift(static_cast<uint32_t>(c0)) ^ c1;
    c0 = tables.shift(static_cast<uint32_t>(c0)) ^ c2;
    p += 2 * block;
    len -= 3 * block;
  }
  return c0;
}

REMOE_CRC_TARGET uint32_t crc32c_hw(uint32_t crc, const uint8_t* p, size_t len) {
  static const ShiftTables long_shift(kLong), short_shift(kShort);
  uint64_t c0 = static_cast<uint32_t>(~crc);
  while (len && (reinterpret_cast<uintptr_t>(p) & 7)) {
    c0 = step1(c0, *p++);
    --len;
  }
  c0 = three_way(c0, p, len, kLong, long_shift);
  c0 = three_way(c0, p, len, kShort, short_shift);
  for (; len >= 8; len -= 8, p += 8) c0 = step8(c0, load8(p));
  while (len--) c0 = step1(c0, *p++);
  return ~static_cast<uint32_t>(c0);
}

const bool kHardware = cpu_has_crc();

#else
const bool kHardware = false;
#endif

}  // namespace

uint32_t crc32c(const void* data, size_t len, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
#if REMOE_CRC_HW
  if (kHardware) return crc32c_hw(crc, p, len);
#endif
  return crc32c_table(crc, p, len);
}

const char* crc32c_impl() {
#if REMOE_CRC_HW && defined(__x86_64__)
  if (kHardware) return "sse4.2";
#elif REMOE_CRC_HW
  if (kHardware) return "armv8-crc";
#endif
  return "table";
}

}  // namespace remoe
