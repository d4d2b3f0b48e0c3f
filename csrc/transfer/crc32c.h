// CRC32C (Castagnoli, reflected polynomial 0x82F63B78): the checksum of every packed expert blob,
// verified by the reader thread before a blob can reach a slot.
//
// Hardware instructions where the CPU has them (SSE4.2 on x86-64, the CRC32 extension on ARMv8,
// e.g. Jetson Orin), three independent streams interleaved to hide the instruction's latency
// (the scheme of Mark Adler's crc32c.c: shift-and-combine with precomputed zero operators), and
// a table-driven fallback elsewhere. The result is the same on every path.
#pragma once

#include <cstddef>
#include <cstdint>

namespace remoe {

// Extends `crc` (the CRC32C of earlier bytes, 0 for none) over `len` bytes at `data`:
// crc32c(b, crc32c(a)) == crc32c(a ++ b), and crc32c("123456789") == 0xE3069283.
uint32_t crc32c(const void* data, size_t len, uint32_t crc = 0);

// Which implementation crc32c() runs on this CPU: "sse4.2", "armv8-crc" or "table".
const char* crc32c_impl();

}  // namespace remoe
