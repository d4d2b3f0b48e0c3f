// pinned_host_empty: see host_memory.h.

#include "host_memory.h"

#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "reader.h"  // kDirectIoAlign: page alignment (also what O_DIRECT needs)

namespace remoe {

namespace {

HostPinner& pinner() {
  static HostPinner p{nullptr, nullptr};  // function-local: safe from other static initializers
  return p;
}

std::atomic<int64_t>& locked_bytes() {
  static std::atomic<int64_t> n{0};
  return n;
}

// Owns one allocation and its registrations; deleting it unregisters, then frees.
struct PinnedBlock {
  void* base = nullptr;
  int64_t nbytes = 0;  // page-rounded
  std::vector<void*> chunks;

  ~PinnedBlock() {
    for (void* c : chunks) pinner().unlock(c);
    if (!chunks.empty()) locked_bytes().fetch_sub(nbytes);
    std::free(base);
  }
};

}  // namespace

bool register_host_pinner(HostPinner p) {
  pinner() = p;
  return true;
}

at::Tensor pinned_host_empty(int64_t rows, int64_t cols, int64_t chunk_bytes) {
  TORCH_CHECK(pinner().lock != nullptr, "pinned_host_empty: this build of remoe_engine._C has no "
              "CUDA support, so it cannot page-lock host memory (pinned memory only serves "
              "copies to a GPU; rebuild with REMOE_BUILD_CUDA=1 on a machine with nvcc)");
  TORCH_CHECK(rows >= 0 && cols >= 0, "pinned_host_empty: rows and cols must be >= 0, got ", rows,
              " x ", cols);
  TORCH_CHECK(chunk_bytes > 0 && chunk_bytes % kDirectIoAlign == 0, "pinned_host_empty: "
              "chunk_bytes must be a positive multiple of ", kDirectIoAlign, ", got ", chunk_bytes);
  const int64_t want = rows * cols;
  auto block = std::make_unique<PinnedBlock>();
  block->nbytes = (std::max<int64_t>(want, 1) + kDirectIoAlign - 1) / kDirectIoAlign *
                  kDirectIoAlign;
  const int err = posix_memalign(&block->base, kDirectIoAlign, static_cast<size_t>(block->nbytes));
  TORCH_CHECK(err == 0, "pinned_host_empty: cannot allocate ", block->nbytes, " bytes of host "
              "memory: ", std::strerror(err));
  uint8_t* base = static_cast<uint8_t*>(block->base);
  for (int64_t off = 0; off < block->nbytes; off += chunk_bytes) {
    const int64_t n = std::min(chunk_bytes, block->nbytes - off);
    // On failure the block's destructor unregisters the chunks registered so far and frees.
    pinner().lock(base + off, static_cast<size_t>(n));
    block->chunks.push_back(base + off);
  }
  locked_bytes().fetch_add(block->nbytes);
  PinnedBlock* owner = block.release();
  return at::from_blob(
      owner->base, {rows, cols}, [owner](void*) { delete owner; },
      at::TensorOptions().dtype(at::kByte));
}

int64_t pinned_host_bytes() { return locked_bytes().load(); }

}  // namespace remoe
