// Page-locked host memory of exactly the size asked for.
//
// torch's pinned allocator (pin_memory=True) rounds every request up to a power of two: 54 GiB of
// experts pins 64 GiB, 88 GiB pins 128 GiB. Instead, host tensors are allocated normally
// (page-aligned) and registered with the driver in chunks (cudaHostRegister), so exactly the
// bytes needed are page-locked; the tensor's deleter unregisters them before freeing.
//
// The CUDA side registers itself from host_memory_cuda.cu (static initializer), so a CPU-only
// build leaves it out with no #ifdef and refuses clearly when asked to pin.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

namespace remoe {

struct HostPinner {
  // Page-locks [ptr, ptr + nbytes); throws c10::Error with the driver's message on failure.
  void (*lock)(void* ptr, size_t nbytes);
  // Undoes lock(ptr, ...). Must not throw (runs in a deleter).
  void (*unlock)(void* ptr);
};

// Called once at library load by the CUDA build.
bool register_host_pinner(HostPinner pinner);

// uint8 [rows, cols] CPU tensor of page-locked memory: allocated page-aligned, registered in
// pieces of `chunk_bytes` (a positive multiple of 4096; pass a multiple of the row size so that
// no row straddles two registrations). Throws in a build without CUDA.
at::Tensor pinned_host_empty(int64_t rows, int64_t cols, int64_t chunk_bytes);

// Bytes page-locked through pinned_host_empty and not yet freed (page-rounded per tensor).
int64_t pinned_host_bytes();

}  // namespace remoe
