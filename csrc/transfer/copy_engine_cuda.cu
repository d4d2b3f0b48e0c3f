// CUDA copy engine: the slot buffer lives on the GPU; loads copy host bytes into slots with
// cudaMemcpyAsync on one dedicated copy stream.
//
// Ordering, all with events (no device-wide or stream-wide sync on the hot path):
//   released_[s]  recorded on the consumer's stream by release(): the next copy into slot s waits
//                 on it, so an evicted expert is never overwritten while a kernel still reads it.
//   loaded_[s]    recorded on the copy stream after the copy into slot s: acquire()/wait() make
//                 the consumer's current stream wait on it.
//   staged_[w]    recorded after the copy out of reader w's pinned staging buffer: the reader
//                 host-waits on it before reading the next expert into that buffer.
// Compressed experts: the compressed blob is copied into a device scratch buffer (one per reader,
// one more for host-tier rows) and the dequantize kernel writes the slot, both on the copy stream
// (so a scratch buffer is reused only after the kernel that read it), between the released_ wait
// and the loaded_ record.

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <vector>

#include "../quant/dequant_cuda.h"
#include "copy_engine.h"
#include "reader.h"

namespace remoe {

namespace {

class CudaCopyEngine final : public CopyEngine {
 public:
  CudaCopyEngine(const c10::Device& device, int64_t num_slots, int64_t slot_bytes, int num_workers)
      : device_(device), slot_bytes_(slot_bytes) {
    TORCH_CHECK(device.has_index(), "SlotPool: CUDA device needs an index, got ", device);
    const c10::cuda::CUDAGuard guard(device_);
    // From the caching allocator, allocated once. Reads never target device memory (they go
    // through staging), so only the host side needs O_DIRECT alignment.
    slots_ = at::empty({num_slots, slot_bytes}, at::TensorOptions().dtype(at::kByte).device(device_));
    base_ = slots_.data_ptr<uint8_t>();
    int least = 0, greatest = 0;
    C10_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    // A stream of our own (not the shared pool): the copy queue is the pool's alone, and the
    // highest priority lets copies overtake bulk work on other streams.
    C10_CUDA_CHECK(cudaStreamCreateWithPriority(&copy_stream_, cudaStreamNonBlocking, greatest));
    loaded_.resize(num_slots);
    released_.resize(num_slots);
    for (int64_t s = 0; s < num_slots; ++s) {
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&loaded_[s], cudaEventDisableTiming));
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&released_[s], cudaEventDisableTiming));
    }
    staging_.resize(num_workers, nullptr);
    staged_.resize(num_workers);
    for (int w = 0; w < num_workers; ++w) {
      // cudaHostAlloc memory is page-aligned: O_DIRECT can read straight into it.
      C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&staging_[w]),
                                   static_cast<size_t>(slot_bytes_), cudaHostAllocDefault));
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&staged_[w], cudaEventDisableTiming));
    }
  }

  ~CudaCopyEngine() override {
    const c10::cuda::CUDAGuard guard(device_);
    // Host sync on our own stream only: staging buffers and events may be freed only after the
    // copies that use them have finished. Errors are ignored: destructors must not throw.
    cudaStreamSynchronize(copy_stream_);
    for (uint8_t* p : staging_) {
      if (p != nullptr) cudaFreeHost(p);
    }
    for (cudaEvent_t e : staged_) cudaEventDestroy(e);
    for (cudaEvent_t e : loaded_) cudaEventDestroy(e);
    for (cudaEvent_t e : released_) cudaEventDestroy(e);
    cudaStreamDestroy(copy_stream_);
  }

  at::Tensor slots() const override { return slots_; }

  uint8_t* read_target(int64_t /*slot*/, int worker) override {
    TORCH_CHECK(worker >= 0 && worker < static_cast<int>(staging_.size()),
                "SlotPool (CUDA): storage reads must run on a reader thread, got worker ", worker);
    const c10::cuda::CUDAGuard guard(device_);
    // Host sync on one event: the previous copy out of this staging buffer must finish before
    // the next read overwrites it. Usually long done (the PCIe copy is faster than the read).
    C10_CUDA_CHECK(cudaEventSynchronize(staged_[worker]));
    return staging_[worker];
  }

  int64_t commit_read(int64_t slot, int worker, int64_t nbytes) override {
    const c10::cuda::CUDAGuard guard(device_);
    enqueue_copy(slot, staging_[worker], nbytes);
    C10_CUDA_CHECK(cudaEventRecord(staged_[worker], copy_stream_));
    return nbytes;
  }

  int64_t copy_from_host(int64_t slot, const uint8_t* src, int64_t nbytes) override {
    const c10::cuda::CUDAGuard guard(device_);
    enqueue_copy(slot, src, nbytes);
    return nbytes;
  }

  bool host_copy_is_async() const override { return true; }

  bool enable_dequant(const std::vector<DequantPart>& parts, at::ScalarType dtype,
                      int64_t blob_bytes) override {
    // A compressed blob is read into the staging buffer; one that does not fit stays on the host.
    if (blob_bytes > slot_bytes_) return false;
    const c10::cuda::CUDAGuard guard(device_);
    const auto bytes = static_cast<int64_t>(parts.size() * sizeof(DequantPart));
    at::Tensor table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(table.data_ptr<uint8_t>(), parts.data(), static_cast<size_t>(bytes));
    parts_ = table.to(slots_.device());  // a synchronous copy, once
    num_parts_ = static_cast<int64_t>(parts.size());
    max_elements_ = max_part_elements(parts);
    dtype_ = dtype;
    // [readers + 1, blob_bytes]: the last row serves host-tier rows (copy_from_host's callers).
    scratch_ = at::empty({static_cast<int64_t>(staging_.size()) + 1, blob_bytes},
                         slots_.options());
    return true;
  }

  int64_t commit_dequant(int64_t slot, int worker, int64_t nbytes) override {
    const c10::cuda::CUDAGuard guard(device_);
    enqueue_dequant(slot, worker, staging_[worker], nbytes);
    C10_CUDA_CHECK(cudaEventRecord(staged_[worker], copy_stream_));
    return nbytes;
  }

  int64_t dequant_from_host(int64_t slot, const uint8_t* src, int64_t nbytes) override {
    const c10::cuda::CUDAGuard guard(device_);
    // Host-tier loads are enqueued by the acquiring threads: one at a time on the shared row.
    std::lock_guard<std::mutex> lock(host_scratch_mu_);
    enqueue_dequant(slot, static_cast<int>(staging_.size()), src, nbytes);
    return nbytes;
  }

  void wait_loaded(int64_t slot) override {
    const c10::cuda::CUDAGuard guard(device_);
    const cudaStream_t consumer = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
    C10_CUDA_CHECK(cudaStreamWaitEvent(consumer, loaded_[slot], 0));
  }

  void mark_released(int64_t slot) override {
    const c10::cuda::CUDAGuard guard(device_);
    const cudaStream_t consumer = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
    C10_CUDA_CHECK(cudaEventRecord(released_[slot], consumer));
  }

 private:
  void enqueue_copy(int64_t slot, const uint8_t* src, int64_t nbytes) {
    // The slot's previous consumer must be done with it (an evicted expert is dropped, but a
    // kernel enqueued before its release may still be reading it).
    C10_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, released_[slot], 0));
    C10_CUDA_CHECK(cudaMemcpyAsync(base_ + slot * slot_bytes_, src, static_cast<size_t>(nbytes),
                                   cudaMemcpyHostToDevice, copy_stream_));
    C10_CUDA_CHECK(cudaEventRecord(loaded_[slot], copy_stream_));
  }

  // Copy stream: wait for the slot's release, copy the compressed blob into scratch row `row`,
  // dequantize it into the slot, record the slot's load.
  void enqueue_dequant(int64_t slot, int row, const uint8_t* src, int64_t nbytes) {
    TORCH_CHECK(scratch_.defined() && nbytes <= scratch_.size(1), "SlotPool (CUDA): ", nbytes,
                "-byte compressed blob without enable_dequant for it");
    uint8_t* scratch = scratch_.data_ptr<uint8_t>() + row * scratch_.size(1);
    C10_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, released_[slot], 0));
    C10_CUDA_CHECK(cudaMemcpyAsync(scratch, src, static_cast<size_t>(nbytes),
                                   cudaMemcpyHostToDevice, copy_stream_));
    launch_dequantize(reinterpret_cast<const DequantPart*>(parts_.data_ptr<uint8_t>()),
                      num_parts_, max_elements_, scratch, base_ + slot * slot_bytes_, dtype_,
                      copy_stream_);
    C10_CUDA_CHECK(cudaEventRecord(loaded_[slot], copy_stream_));
  }

  c10::Device device_;
  int64_t slot_bytes_;
  at::Tensor slots_;  // [num_slots, slot_bytes] uint8 on device_
  uint8_t* base_ = nullptr;
  cudaStream_t copy_stream_ = nullptr;
  std::vector<cudaEvent_t> loaded_;    // [num_slots]
  std::vector<cudaEvent_t> released_;  // [num_slots]
  std::vector<uint8_t*> staging_;      // [num_workers] pinned, slot_bytes each
  std::vector<cudaEvent_t> staged_;    // [num_workers]
  // Compressed experts (enable_dequant): the plan on the device, scratch rows for blobs.
  at::Tensor parts_;                   // [num_parts * sizeof(DequantPart)] uint8 on device_
  int64_t num_parts_ = 0, max_elements_ = 0;
  at::ScalarType dtype_ = at::kFloat;
  at::Tensor scratch_;                 // [num_workers + 1, blob_bytes] uint8 on device_
  std::mutex host_scratch_mu_;
};

std::unique_ptr<CopyEngine> make_cuda_engine(const c10::Device& device, int64_t num_slots,
                                             int64_t slot_bytes, int num_workers) {
  return std::make_unique<CudaCopyEngine>(device, num_slots, slot_bytes, num_workers);
}

const bool kRegistered = register_copy_engine(c10::DeviceType::CUDA, &make_cuda_engine);

}  // namespace

}  // namespace remoe
