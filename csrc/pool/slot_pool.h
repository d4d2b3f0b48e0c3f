// The expert slot pool: a fixed buffer of expert slots on the compute device, a residency table
// (layer, expert) -> slot, LRU / LFU eviction, pins, loads through a reader thread pool, counters.
//
// Legend: L = MoE layers (dense index 0..L-1), E = experts per layer, S = slots, B = slot bytes.
// The policy semantics are specified in remoe_engine/pool.py (the simulator reproduces them);
// this file implements exactly that text.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../quant/dequant.h"
#include "../transfer/copy_engine.h"
#include "../transfer/reader.h"

namespace remoe {

// Per-layer counters: one row of SlotPool::stats().
enum Counter : int {
  kHits = 0,
  kMisses,
  kEvictions,
  kPrefetches,     // loads started by prefetch()
  kPrefetchHits,   // prefetched entries later hit by acquire() (at most once per load)
  kBytesRead,      // bytes read from storage
  kBytesCopied,    // bytes copied into slots from host memory (staging or host tier)
  kStallNs,        // host time blocked waiting for loads in acquire()/wait()
  kLoadFailures,
  kNumCounters,
};

enum class Policy { kLru, kLfu };

// One load into one slot. Waiters block on it; a later load into the same slot waits for it first.
struct LoadTicket {
  enum class State { kPending, kDone, kFailed };
  void finish(State s, std::string message = {});
  // Blocks until the load is done or failed; returns the final state.
  State wait();

  std::mutex mu;
  std::condition_variable cv;
  State state = State::kPending;
  std::string error;
};

// Where one piece of an expert comes from: a byte range of a file, landing at slot_offset.
struct Segment {
  int64_t file_id;
  int64_t file_offset;
  int64_t nbytes;
  int64_t slot_offset;
  int64_t label;  // index into SlotPool::labels_: the tensor or blob name for error messages
};

// One read of a load: a range of one file holding one or more of the expert's segments. On an
// O_DIRECT file it is the aligned superset of adjacent segments (a safetensors expert's gate, up
// and down tensors usually sit side by side): one read into a bounce buffer, then a memcpy per
// piece; an aligned single-piece run (a packed blob) is read straight into place.
struct ReadRun {
  struct Piece {
    int64_t run_offset, nbytes, slot_offset, label;
  };
  int64_t file_id = -1;
  int64_t begin = 0;   // file offset of the read
  int64_t length = 0;  // bytes asked for (aligned on O_DIRECT files, so maybe past the file end)
  bool direct = false;
  bool zero_copy = false;  // direct, one aligned piece filling the run: no bounce buffer
  std::vector<Piece> pieces;
};

// Element-wise dtype conversion of one tensor from the source layout into the slot layout.
struct ConvertStep {
  int64_t src_offset, dst_offset, numel;
};

// An aligned heap buffer (O_DIRECT needs kDirectIoAlign-aligned destinations).
struct AlignedBuffer {
  explicit AlignedBuffer(int64_t nbytes);
  ~AlignedBuffer();
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  uint8_t* data = nullptr;
  int64_t size = 0;
};

class SlotPool : public torch::CustomClassHolder {
 public:
  // slots_per_layer > 0: per-layer scope, layer l owns slots [l*spl, (l+1)*spl) and num_slots
  // must be L * spl. slots_per_layer == 0: one global scope over all num_slots slots.
  // direct_io: "off" (buffered reads), "on" (O_DIRECT, an error where unsupported) or "auto"
  // (O_DIRECT where the filesystem supports it, else buffered).
  SlotPool(int64_t num_layers, int64_t num_experts, int64_t slot_bytes, int64_t num_slots,
           int64_t slots_per_layer, const std::string& policy, const std::string& device,
           int64_t num_threads, const std::string& direct_io);
  ~SlotPool() override;

  // --- sources, set before the first acquire/prefetch -------------------------------------
  int64_t add_file(const std::string& path);
  // table [N, 6] int64 rows (layer, expert, file_id, file_offset, nbytes, slot_offset); labels[i]
  // names row i's tensor. Replaces any previous sources; every (layer, expert) needs >= 1 row.
  void set_file_sources(const at::Tensor& table, std::vector<std::string> labels);
  // blobs [L * E, B'] uint8 CPU, B' <= B, row l*E+e = expert (l, e) in slot layout (host tier).
  void set_host_sources(const at::Tensor& blobs);
  // File sources hold another dtype than the slots: each load lands in a per-reader buffer of
  // `src_bytes` (the source layout), then `plan` [N, 3] int64 rows (src_offset, dst_offset,
  // numel) convert each tensor from `src_dtype` into the slot ("float32" | "bfloat16" |
  // "float16"). Call before set_file_sources, whose slot offsets then refer to the source layout.
  void set_conversion(const std::string& src_dtype, const std::string& dst_dtype,
                      const at::Tensor& plan, int64_t src_bytes);
  // Sources hold compressed experts (csrc/quant/dequant.h): each load lands in a per-reader buffer
  // of `src_bytes` (the compressed blob, which is what checksums cover), then `plan` [N, 12]
  // dequantizes it into the slot in `dst_dtype` ("float32" | "bfloat16" | "float16"). Host-tier
  // rows are compressed blobs too. Call before set_file_sources / set_host_sources, whose offsets
  // then refer to the compressed blob.
  void set_dequant(const at::Tensor& plan, int64_t src_bytes, const std::string& dst_dtype);
  // Slots hold the compressed blobs themselves (the fused experts op decodes them as it reads):
  // loads copy the blob unchanged, and after its checksum each blob's scales and zero points are
  // checked to be finite (`plan` [N, 12] is the blob's dequantize plan into a `dense_bytes` slot
  // of `dense_dtype`; only its code and scale columns are used), so a corrupt scale is a load
  // error, never a wrong output. The slot size must be the blob size.
  void set_scale_check(const at::Tensor& plan, int64_t dense_bytes, const std::string& dense_dtype);
  // checks [L * E, 2] int64 rows (seed, expected): a load of expert k is accepted only if
  // crc32c(landed bytes [0, land_bytes), seed) == expected, checked by the reader before the
  // bytes can reach the slot (the seed binds a blob to its (layer, expert), so a relabelled blob
  // fails too). Covers the whole landing area: use it for sources that fill it (packed blobs).
  void set_checksums(const at::Tensor& checks);
  // Benchmarks only: skip the checksum (to measure what it costs). Default on.
  void set_verify(bool on) { verify_.store(on); }
  // Transformers layer index of each dense layer, for error messages.
  void set_layer_ids(std::vector<int64_t> ids);
  // Per added file: whether it is read with O_DIRECT.
  std::vector<bool> direct_files() const;

  // --- the hot path --------------------------------------------------------------------------
  // Pins the distinct experts of `ids` [n] int64 in `layer`, starting loads for the missing ones,
  // and returns their slots [n] int64 (duplicates share a slot). With wait=true it also waits:
  // on CPU until the bytes are in the slots; on CUDA until the copies are enqueued, then orders
  // the current stream after them. All or nothing: too few evictable slots is an error before
  // any state changes, and a failed load undoes the call's pins before raising.
  at::Tensor acquire(int64_t layer, const at::Tensor& ids, bool wait);
  // The waiting half of acquire(wait=false), for the same layer and ids.
  void wait(int64_t layer, const at::Tensor& ids);
  // Starts loads for the distinct ids not resident, without pinning; stops at the first one for
  // which no slot can be freed. Returns how many loads it started.
  int64_t prefetch(int64_t layer, const at::Tensor& ids);
  // Drops one pin per distinct id (each must be pinned). On CUDA the slot's next load waits for
  // the work enqueued so far on the current stream.
  void release(int64_t layer, const at::Tensor& ids);

  // --- inspection -----------------------------------------------------------------------------
  // How many distinct missing experts one acquire on `layer` can take now: the slots of its
  // scope that nobody pins.
  int64_t max_pinnable(int64_t layer);
  int64_t scope_slots() const { return slots_per_layer_ > 0 ? slots_per_layer_ : num_slots_; }
  at::Tensor residency(int64_t layer);  // [E] int64: slot of each expert, -1 if not resident
  at::Tensor pins(int64_t layer);       // [E] int64: pin count of each expert (0 if not resident)
  at::Tensor stats();                   // [L, kNumCounters] int64, see Counter
  // Blocks until every load started so far has finished or failed (e.g. prefetches nobody
  // waited for), so counters read afterwards include all of them.
  void drain();
  void reset_stats();
  at::Tensor buffer() const { return engine_->slots(); }  // [S, B] uint8
  int64_t num_slots() const { return num_slots_; }
  int64_t slot_bytes() const { return slot_bytes_; }

 private:
  struct Slot {
    int64_t layer = -1;  // -1: free
    int64_t expert = -1;
    int64_t pins = 0;
    int64_t last_use = 0;  // access stamp (global clock) of the last acquire or the load
    int64_t freq = 0;      // LFU: acquires since it became resident (0 for a prefetch)
    bool prefetched = false;
    std::shared_ptr<LoadTicket> load;  // last load into this slot, maybe still in flight
  };
  struct Job {
    int64_t slot, layer, expert;
    std::shared_ptr<LoadTicket> ticket, previous;
  };
  struct Pinned {
    int64_t expert, slot;
    std::shared_ptr<LoadTicket> ticket;
  };

  void check_layer(int64_t layer, const char* fn) const;
  std::vector<int64_t> distinct_ids(int64_t layer, const at::Tensor& ids, const char* fn) const;
  int64_t key(int64_t layer, int64_t expert) const { return layer * num_experts_ + expert; }
  int64_t scope_begin(int64_t layer) const { return slots_per_layer_ > 0 ? layer * slots_per_layer_ : 0; }
  int64_t scope_end(int64_t layer) const {
    return slots_per_layer_ > 0 ? (layer + 1) * slots_per_layer_ : num_slots_;
  }
  // Lowest free slot of the scope, else the unpinned entry the policy evicts, else -1; never a
  // slot in `exclude`. mu_ held.
  int64_t pick_victim_locked(int64_t layer, const std::vector<int64_t>& exclude = {}) const;
  // Takes slot for (layer, expert) (evicting its entry) and returns the load job. mu_ held.
  Job place_locked(int64_t slot, int64_t layer, int64_t expert, int64_t stamp, int64_t pins,
                   int64_t freq, bool prefetched);
  void launch(std::vector<Job>& jobs);
  void run_load(const Job& job);
  // Converts the bytes [begin, end) of the source layout in `land` into the slot layout at
  // `target` (the parts of each tensor that fall in the range).
  void convert_range(const uint8_t* land, uint8_t* target, int64_t begin, int64_t end) const;
  // A compressed blob `land` dequantized into slot `slot` (set_dequant); returns bytes copied.
  // staged: `land` is the worker's read_target (a device engine copies it from there), else host
  // memory (a host-tier row).
  int64_t dequantize_into(int64_t slot, int worker, const uint8_t* land, bool staged);
  // Reads expert `k`'s runs into `land` on reader `worker`; returns (bytes read, extent).
  std::pair<int64_t, int64_t> read_runs(int64_t k, int worker, uint8_t* land);
  bool has_sources_locked() const { return !runs_.empty() || host_blobs_.defined(); }
  int64_t layer_id(int64_t layer) const {
    return layer_ids_.empty() ? layer : layer_ids_[layer];
  }
  // Waits for the pinned loads of one acquire; on failure undoes its pins and throws.
  void finish_acquire(int64_t layer, const std::vector<Pinned>& pinned);
  void count(int64_t layer, Counter c, int64_t n) {
    counters_[layer * kNumCounters + c].fetch_add(n, std::memory_order_relaxed);
  }

  const int64_t num_layers_, num_experts_, slot_bytes_, num_slots_, slots_per_layer_;
  const Policy policy_;

  std::mutex mu_;  // guards everything below up to counters_
  std::vector<Slot> slots_;              // [S]
  std::vector<int64_t> slot_of_;         // [L * E] slot or -1
  std::vector<std::string> last_error_;  // [L * E] message of the last failed load
  int64_t clock_ = 0;                    // access stamps: one per distinct expert per call
  bool started_ = false;                 // sources are frozen after the first load

  // Sources: per (layer, expert) file reads, or one host blob row.
  FileSet files_;
  std::vector<std::vector<ReadRun>> runs_;  // [L * E]; empty until set_file_sources
  std::vector<std::string> labels_;
  std::vector<std::unique_ptr<AlignedBuffer>> bounce_;  // [threads] for unaligned direct reads
  std::vector<std::unique_ptr<AlignedBuffer>> landing_;  // [threads] source layout (conversion)
  int64_t land_bytes_;  // bytes of the source layout (== slot_bytes_ unless converting)
  int64_t dst_extent_ = 0;  // converting: slot bytes the conversion writes
  at::ScalarType src_dtype_ = at::kByte, dst_dtype_ = at::kByte;
  std::vector<ConvertStep> convert_;  // empty: no conversion
  std::vector<DequantPart> dequant_;  // empty: the sources are not compressed
  std::vector<DequantPart> scale_check_;  // compressed slots: checked after each load
  at::ScalarType dequant_dtype_ = at::kByte;
  bool device_dequant_ = false;  // the engine dequantizes on its device (CUDA)
  std::vector<uint32_t> crc_seed_, crc_expected_;  // [L * E] or empty
  std::atomic<bool> verify_{true};
  std::vector<int64_t> layer_ids_;  // [L] transformers layer index, for messages
  at::Tensor host_blobs_;  // [L * E, B'] uint8, or undefined
  int64_t host_blob_bytes_ = 0;

  std::unique_ptr<std::atomic<int64_t>[]> counters_;  // [L * kNumCounters]

  // Declared last: destroyed first, so every queued load finishes before the engine (and its
  // slot memory and staging buffers) goes away.
  std::unique_ptr<CopyEngine> engine_;
  std::unique_ptr<ReaderPool> reader_;
};

// Registers torch.classes.remoe.SlotPool; called from the TORCH_LIBRARY block in csrc/ops.cpp.
void register_slot_pool(torch::Library& m);

}  // namespace remoe
