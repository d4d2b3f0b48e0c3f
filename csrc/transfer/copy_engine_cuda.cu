// CUDA copy engine: the slot buffer lives on the GPU; loads copy host bytes into slots with
// cudaMemcpyAsync on copy streams of the engine's own.
//
// Ordering, all with events (no device-wide or stream-wide sync on the hot path):
//   released_[s]  recorded on the consumer's stream by release(): the next copy into slot s waits
//                 on it, so an evicted expert is never overwritten while a kernel still reads it.
//   loaded_[s]    recorded on the copy's stream after the copy into slot s: acquire()/wait() make
//                 the consumer's current stream wait on it, and the next copy into slot s (maybe
//                 on another stream) waits on it too, so two loads into one slot land in order.
//   staged_[w][i] recorded after the copy out of reader w's pinned staging buffer i: the reader
//                 host-waits on it (blocking sync, no spinning) before reading into buffer i again.
//
// Pipelining:
//   - Each reader has two staging buffers, used in turn: the disk read of its next expert goes
//     into one while the copy of the previous expert leaves the other.
//   - Each reader has its own copy stream, and copies made on the caller's thread (host tier) one
//     more: a copy waiting for a busy slot only holds up its own stream.
//   - Waits are added only for events not yet complete (cudaEventQuery first): a copy into a slot
//     whose release and previous load are long done goes straight onto its stream; a copy that
//     must wait goes onto the wait lane of its slot (slot % kWaitLanes), so a slot still read by
//     a kernel never delays copies into other slots.
// Compressed experts: the compressed blob is copied into a device scratch row (one per reader,
// one more for host-tier rows) and the dequantize kernel writes the slot, both on the reader's
// own stream (the caller thread's for host-tier rows), never on a wait lane: the next dequant of
// that reader reuses the row, and one stream orders it after the kernel that read it.

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <cstring>
#include <mutex>
#include <vector>

#include "../quant/dequant_cuda.h"
#include "copy_engine.h"
#include "reader.h"

namespace remoe {

namespace {

// Streams a copy that must wait for its slot can go to; more lanes, fewer unrelated copies
// stuck behind one busy slot.
constexpr int kWaitLanes = 4;
// Staging buffers per reader: one being read into while the other is copied out.
constexpr int kStagingPerReader = 2;

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
    // Streams of our own (not the shared pool): the copy queues are the pool's alone, and the
    // highest priority lets copies overtake bulk work on other streams.
    // [0, num_workers): reader w's; num_workers: the caller thread's; then the wait lanes.
    streams_.resize(num_workers + 1 + kWaitLanes);
    for (cudaStream_t& st : streams_) {
      C10_CUDA_CHECK(cudaStreamCreateWithPriority(&st, cudaStreamNonBlocking, greatest));
    }
    loaded_.resize(num_slots);
    released_.resize(num_slots);
    for (int64_t s = 0; s < num_slots; ++s) {
      // Never host-waited: only queried and waited on by streams, so no blocking-sync flag.
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&loaded_[s], cudaEventDisableTiming));
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&released_[s], cudaEventDisableTiming));
    }
    staging_.resize(num_workers);
    next_.assign(num_workers, 0);
    current_.assign(num_workers, 0);
    for (int w = 0; w < num_workers; ++w) {
      for (int i = 0; i < kStagingPerReader; ++i) {
        Staging& st = staging_[w][i];
        // cudaHostAlloc memory is page-aligned: O_DIRECT can read straight into it.
        C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&st.buffer),
                                     static_cast<size_t>(slot_bytes_), cudaHostAllocDefault));
        // Blocking sync: the reader sleeps until the copy is done instead of spinning a core.
        C10_CUDA_CHECK(cudaEventCreateWithFlags(
            &st.copied, cudaEventDisableTiming | cudaEventBlockingSync));
      }
    }
  }

  ~CudaCopyEngine() override {
    const c10::cuda::CUDAGuard guard(device_);
    // Host sync on our own streams only: staging buffers and events may be freed only after the
    // copies that use them have finished. Errors are ignored: destructors must not throw.
    for (cudaStream_t st : streams_) cudaStreamSynchronize(st);
    for (auto& buffers : staging_) {
      for (Staging& st : buffers) {
        if (st.buffer != nullptr) cudaFreeHost(st.buffer);
        if (st.copied != nullptr) cudaEventDestroy(st.copied);
      }
    }
    for (cudaEvent_t e : loaded_) cudaEventDestroy(e);
    for (cudaEvent_t e : released_) cudaEventDestroy(e);
    for (cudaStream_t st : streams_) cudaStreamDestroy(st);
  }

  at::Tensor slots() const override { return slots_; }

  uint8_t* read_target(int64_t /*slot*/, int worker) override {
    TORCH_CHECK(worker >= 0 && worker < static_cast<int>(staging_.size()),
                "SlotPool (CUDA): storage reads must run on a reader thread, got worker ", worker);
    const c10::cuda::CUDAGuard guard(device_);
    // Only reader `worker` touches its own entries: no lock.
    const int i = next_[worker];
    next_[worker] = (i + 1) % kStagingPerReader;
    current_[worker] = i;
    Staging& st = staging_[worker][i];
    // Host sync on one event (blocking, not spinning): the copy out of this buffer, two loads
    // ago, must be done before the read overwrites it. With two buffers it usually is.
    C10_CUDA_CHECK(cudaEventSynchronize(st.copied));
    return st.buffer;
  }

  int64_t commit_read(int64_t slot, int worker, int64_t nbytes) override {
    const c10::cuda::CUDAGuard guard(device_);
    Staging& st = staging_[worker][current_[worker]];
    const cudaStream_t stream = enqueue_copy(slot, st.buffer, nbytes, streams_[worker]);
    C10_CUDA_CHECK(cudaEventRecord(st.copied, stream));
    return nbytes;
  }

  int64_t copy_from_host(int64_t slot, const uint8_t* src, int64_t nbytes) override {
    const c10::cuda::CUDAGuard guard(device_);
    enqueue_copy(slot, src, nbytes, streams_[staging_.size()]);
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
    Staging& st = staging_[worker][current_[worker]];
    const cudaStream_t stream = streams_[worker];
    enqueue_dequant(slot, worker, st.buffer, nbytes, stream);
    C10_CUDA_CHECK(cudaEventRecord(st.copied, stream));
    return nbytes;
  }

  int64_t dequant_from_host(int64_t slot, const uint8_t* src, int64_t nbytes) override {
    const c10::cuda::CUDAGuard guard(device_);
    // Host-tier loads are enqueued by the acquiring threads: one at a time on the shared row.
    std::lock_guard<std::mutex> lock(host_scratch_mu_);
    const int row = static_cast<int>(staging_.size());
    enqueue_dequant(slot, row, src, nbytes, streams_[row]);
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
  struct Staging {
    uint8_t* buffer = nullptr;  // [slot_bytes] pinned
    cudaEvent_t copied = nullptr;
  };

  // True when `event` has not completed yet (an event never recorded counts as complete).
  static bool pending(cudaEvent_t event) {
    const cudaError_t state = cudaEventQuery(event);
    if (state == cudaErrorNotReady) return true;
    C10_CUDA_CHECK(state);
    return false;
  }

  // Enqueues the copy into `slot` on `ready` when nothing it must wait for is still pending,
  // else on the slot's wait lane behind those events. Returns the stream used.
  cudaStream_t enqueue_copy(int64_t slot, const uint8_t* src, int64_t nbytes, cudaStream_t ready) {
    // The slot's previous consumer must be done with it (an evicted expert is dropped, but a
    // kernel enqueued before its release may still be reading it), and the slot's previous load
    // (maybe on another stream) must have landed, or it would overwrite this one.
    const bool busy = pending(released_[slot]);
    const bool loading = pending(loaded_[slot]);
    cudaStream_t stream = ready;
    if (busy || loading) {
      stream = streams_[staging_.size() + 1 + slot % kWaitLanes];
      if (busy) C10_CUDA_CHECK(cudaStreamWaitEvent(stream, released_[slot], 0));
      if (loading) C10_CUDA_CHECK(cudaStreamWaitEvent(stream, loaded_[slot], 0));
    }
    C10_CUDA_CHECK(cudaMemcpyAsync(base_ + slot * slot_bytes_, src, static_cast<size_t>(nbytes),
                                   cudaMemcpyHostToDevice, stream));
    C10_CUDA_CHECK(cudaEventRecord(loaded_[slot], stream));
    return stream;
  }

  // On `stream`: wait for the slot's release and previous load when still pending, copy the
  // compressed blob into scratch row `row`, dequantize it into the slot, record the slot's load.
  // Always `stream`, never a wait lane: `row` is reused by the next dequant on this stream.
  void enqueue_dequant(int64_t slot, int row, const uint8_t* src, int64_t nbytes,
                       cudaStream_t stream) {
    TORCH_CHECK(scratch_.defined() && nbytes <= scratch_.size(1), "SlotPool (CUDA): ", nbytes,
                "-byte compressed blob without enable_dequant for it");
    uint8_t* scratch = scratch_.data_ptr<uint8_t>() + row * scratch_.size(1);
    if (pending(released_[slot])) C10_CUDA_CHECK(cudaStreamWaitEvent(stream, released_[slot], 0));
    if (pending(loaded_[slot])) C10_CUDA_CHECK(cudaStreamWaitEvent(stream, loaded_[slot], 0));
    C10_CUDA_CHECK(cudaMemcpyAsync(scratch, src, static_cast<size_t>(nbytes),
                                   cudaMemcpyHostToDevice, stream));
    launch_dequantize(reinterpret_cast<const DequantPart*>(parts_.data_ptr<uint8_t>()),
                      num_parts_, max_elements_, scratch, base_ + slot * slot_bytes_, dtype_,
                      stream);
    C10_CUDA_CHECK(cudaEventRecord(loaded_[slot], stream));
  }

  c10::Device device_;
  int64_t slot_bytes_;
  at::Tensor slots_;  // [num_slots, slot_bytes] uint8 on device_
  uint8_t* base_ = nullptr;
  std::vector<cudaStream_t> streams_;  // [num_workers + 1 + kWaitLanes], see the constructor
  std::vector<cudaEvent_t> loaded_;    // [num_slots]
  std::vector<cudaEvent_t> released_;  // [num_slots]
  std::vector<std::array<Staging, kStagingPerReader>> staging_;  // [num_workers]
  std::vector<int> next_, current_;    // [num_workers] staging buffer to use next / in use
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
