// Device side of expert transfers: where the slot buffer lives and how bytes reach a slot.
//
// One interface, one implementation per device type, each registered from its own source file
// (copy_engine_cpu.cpp, copy_engine_cuda.cu), so a CPU-only build simply leaves the CUDA engine
// out and asking for a CUDA pool there fails with a clear error, with no #ifdef.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "../quant/dequant.h"

namespace remoe {

class CopyEngine {
 public:
  virtual ~CopyEngine() = default;

  // The slot buffer [num_slots, slot_bytes] uint8 on the engine's device; every row starts
  // kDirectIoAlign-aligned (slot_bytes is a multiple of it), so O_DIRECT can read into slots.
  virtual at::Tensor slots() const = 0;

  // Where a reader thread puts the bytes of a load into `slot`: the slot itself (CPU) or the
  // calling worker's staging buffer (CUDA), `slot_bytes` long and kDirectIoAlign-aligned. May
  // block until that staging buffer's previous copy has left it.
  virtual uint8_t* read_target(int64_t slot, int worker) = 0;
  // The first `nbytes` of read_target(slot, worker) are filled: make them reach the slot (CUDA:
  // enqueue the staging -> slot copy and record the slot's load event). Returns bytes copied.
  virtual int64_t commit_read(int64_t slot, int worker, int64_t nbytes) = 0;
  // Copies `nbytes` of host memory into the start of `slot` (host tier). Returns bytes copied.
  virtual int64_t copy_from_host(int64_t slot, const uint8_t* src, int64_t nbytes) = 0;
  // True when copy_from_host only enqueues work (CUDA), so the pool runs it on the caller's
  // thread instead of handing it to a reader.
  virtual bool host_copy_is_async() const = 0;

  // Orders the caller's current stream after the last load into `slot` (CUDA: stream waits on
  // the load event; CPU: nothing, the load is complete when its ticket is).
  virtual void wait_loaded(int64_t slot) = 0;
  // The caller has enqueued its last use of `slot` on its current stream; the next load into the
  // slot must not start before that work (CUDA: records the slot's reuse event; CPU: nothing).
  virtual void mark_released(int64_t slot) = 0;

  // Compressed experts (csrc/quant/dequant.h). An engine that dequantizes on its device returns
  // true from enable_dequant (called once, before any load, with the plan and the compressed
  // blob size); the pool then hands it compressed blobs, checked (CRC32C, finite scales) on the
  // host: commit_dequant takes the first `nbytes` of read_target(slot, worker), dequant_from_host
  // host memory (a pinned host-tier row), and each makes the blob reach the device and
  // dequantizes it into `slot` (returns bytes copied: the compressed bytes). The default
  // engine does neither: the pool dequantizes on the host into read_target.
  virtual bool enable_dequant(const std::vector<DequantPart>& /*parts*/, at::ScalarType /*dtype*/,
                              int64_t /*blob_bytes*/) {
    return false;
  }
  virtual int64_t commit_dequant(int64_t slot, int worker, int64_t nbytes);
  virtual int64_t dequant_from_host(int64_t slot, const uint8_t* src, int64_t nbytes);
};

using CopyEngineFactory = std::unique_ptr<CopyEngine> (*)(const c10::Device& device,
                                                          int64_t num_slots, int64_t slot_bytes,
                                                          int num_workers);

// Called once per device type at library load (static initializer in the engine's file).
bool register_copy_engine(c10::DeviceType type, CopyEngineFactory factory);

// Throws c10::Error naming the device when no engine for its type was built.
std::unique_ptr<CopyEngine> make_copy_engine(const c10::Device& device, int64_t num_slots,
                                             int64_t slot_bytes, int num_workers);

}  // namespace remoe
