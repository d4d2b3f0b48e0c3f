// SlotPool: residency, eviction, pins, loads and counters. See slot_pool.h and the policy
// specification in remoe_engine/pool.py.

#include "slot_pool.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <new>
#include <sstream>
#include <tuple>
#include <unordered_set>

#include "../transfer/crc32c.h"

namespace remoe {

void LoadTicket::finish(State s, std::string message) {
  {
    std::lock_guard<std::mutex> lock(mu);
    state = s;
    error = std::move(message);
  }
  cv.notify_all();
}

LoadTicket::State LoadTicket::wait() {
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [this] { return state != State::kPending; });
  return state;
}

AlignedBuffer::AlignedBuffer(int64_t nbytes) : size(nbytes) {
  void* p = nullptr;
  if (posix_memalign(&p, kDirectIoAlign, static_cast<size_t>(std::max<int64_t>(nbytes, 1))) != 0) {
    throw std::bad_alloc();
  }
  data = static_cast<uint8_t*>(p);
}

AlignedBuffer::~AlignedBuffer() { std::free(data); }

namespace {

// Chunk size of a checksummed O_DIRECT blob read (read_direct_chunked): ~10 chunks for an
// expert of Qwen3-30B-A3B's size, each still a large request.
constexpr int64_t kChecksumChunk = 1 << 20;

int64_t align_down(int64_t v) { return v / kDirectIoAlign * kDirectIoAlign; }
int64_t align_up(int64_t v) { return (v + kDirectIoAlign - 1) / kDirectIoAlign * kDirectIoAlign; }

DirectIo parse_direct_io(const std::string& mode) {
  if (mode == "off") return DirectIo::kOff;
  if (mode == "on") return DirectIo::kOn;
  if (mode == "auto") return DirectIo::kAuto;
  TORCH_CHECK(false, "SlotPool: direct_io must be 'off', 'on' or 'auto', got '", mode, "'");
}

at::ScalarType parse_float_dtype(const std::string& name, const char* what) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK(false, "SlotPool.set_conversion: ", what, " must be float32, bfloat16 or float16, "
              "got '", name, "'");
}

template <typename From, typename To>
void convert_n(const uint8_t* src, uint8_t* dst, int64_t n) {
  From* in = reinterpret_cast<From*>(const_cast<uint8_t*>(src));
  To* out = reinterpret_cast<To*>(dst);
  // Through float: exact for widening; bf16/fp16 narrowing rounds to nearest even, as torch's
  // own .to(dtype) does.
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<To>(static_cast<float>(in[i]));
}

template <typename From>
void convert_from(at::ScalarType to, const uint8_t* src, uint8_t* dst, int64_t n) {
  switch (to) {
    case at::kFloat: return convert_n<From, float>(src, dst, n);
    case at::kBFloat16: return convert_n<From, c10::BFloat16>(src, dst, n);
    case at::kHalf: return convert_n<From, c10::Half>(src, dst, n);
    default: TORCH_INTERNAL_ASSERT(false, "unsupported conversion target");
  }
}

// bf16 <-> fp32 as plain integer loops the compiler vectorizes (the c10 element conversions go
// through memcpy per element and did not: ~2.7 GB/s, slower than the disk it follows).
void bf16_to_fp32(const uint8_t* src, uint8_t* dst, int64_t n) {
  const uint16_t* in = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(in[i]) << 16;
}

void fp32_to_bf16(const uint8_t* src, uint8_t* dst, int64_t n) {
  const uint32_t* in = reinterpret_cast<const uint32_t*>(src);
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t x = in[i];
    // Round to nearest even, as c10::BFloat16 does; a NaN stays a (quiet) NaN.
    const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
    const bool nan = (x & 0x7FFFFFFFu) > 0x7F800000u;
    out[i] = static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
  }
}

void convert(at::ScalarType from, at::ScalarType to, const uint8_t* src, uint8_t* dst, int64_t n) {
  if (from == at::kBFloat16 && to == at::kFloat) return bf16_to_fp32(src, dst, n);
  if (from == at::kFloat && to == at::kBFloat16) return fp32_to_bf16(src, dst, n);
  switch (from) {
    case at::kFloat: return convert_from<float>(to, src, dst, n);
    case at::kBFloat16: return convert_from<c10::BFloat16>(to, src, dst, n);
    case at::kHalf: return convert_from<c10::Half>(to, src, dst, n);
    default: TORCH_INTERNAL_ASSERT(false, "unsupported conversion source");
  }
}

Policy parse_policy(const std::string& policy) {
  if (policy == "lru") return Policy::kLru;
  if (policy == "lfu") return Policy::kLfu;
  TORCH_CHECK(false, "SlotPool: policy must be 'lru' or 'lfu', got '", policy, "'");
}

}  // namespace

SlotPool::SlotPool(int64_t num_layers, int64_t num_experts, int64_t slot_bytes, int64_t num_slots,
                   int64_t slots_per_layer, const std::string& policy, const std::string& device,
                   int64_t num_threads, const std::string& direct_io)
    : num_layers_(num_layers),
      num_experts_(num_experts),
      slot_bytes_(slot_bytes),
      num_slots_(num_slots),
      slots_per_layer_(slots_per_layer),
      policy_(parse_policy(policy)),
      files_(parse_direct_io(direct_io)),
      land_bytes_(slot_bytes) {
  TORCH_CHECK(num_layers >= 1 && num_experts >= 1, "SlotPool: need at least one layer and one "
              "expert, got num_layers=", num_layers, ", num_experts=", num_experts);
  TORCH_CHECK(slot_bytes > 0 && slot_bytes % kDirectIoAlign == 0, "SlotPool: slot_bytes must be "
              "a positive multiple of ", kDirectIoAlign, ", got ", slot_bytes);
  TORCH_CHECK(num_slots >= 1, "SlotPool: need at least one slot, got num_slots=", num_slots);
  TORCH_CHECK(slots_per_layer >= 0, "SlotPool: slots_per_layer must be >= 0 (0 = one global "
              "pool), got ", slots_per_layer);
  TORCH_CHECK(slots_per_layer == 0 || num_slots == slots_per_layer * num_layers,
              "SlotPool: per-layer scope needs num_slots = slots_per_layer * num_layers = ",
              slots_per_layer, " * ", num_layers, ", got ", num_slots);
  TORCH_CHECK(num_threads >= 1 && num_threads <= 256, "SlotPool: num_threads must be in [1, 256], "
              "got ", num_threads);
  slots_.resize(num_slots);
  slot_of_.assign(num_layers * num_experts, -1);
  last_error_.resize(num_layers * num_experts);
  counters_ = std::make_unique<std::atomic<int64_t>[]>(num_layers * kNumCounters);
  for (int64_t i = 0; i < num_layers * kNumCounters; ++i) counters_[i].store(0);
  engine_ = make_copy_engine(c10::Device(device), num_slots, slot_bytes,
                             static_cast<int>(num_threads));
  reader_ = std::make_unique<ReaderPool>(static_cast<int>(num_threads));
}

SlotPool::~SlotPool() {
  // Finish every queued load before the engine frees slot memory and staging buffers.
  reader_.reset();
}

int64_t SlotPool::add_file(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(!started_, "SlotPool.add_file: sources are frozen after the first acquire/prefetch");
  try {
    return files_.add(path);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "SlotPool: ", e.what());
  }
}

void SlotPool::set_file_sources(const at::Tensor& table, std::vector<std::string> labels) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == 6 && table.scalar_type() == at::kLong &&
                  table.device().is_cpu(),
              "SlotPool.set_file_sources: table must be a CPU int64 [N, 6] tensor, got ",
              table.scalar_type(), " ", table.sizes(), " on ", table.device());
  TORCH_CHECK(static_cast<int64_t>(labels.size()) == table.size(0), "SlotPool.set_file_sources: ",
              table.size(0), " rows but ", labels.size(), " labels");
  const at::Tensor t = table.contiguous();
  const int64_t* row = t.data_ptr<int64_t>();
  std::vector<std::vector<Segment>> segments(num_layers_ * num_experts_);
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(!started_, "SlotPool.set_file_sources: sources are frozen after the first "
              "acquire/prefetch");
  for (int64_t i = 0; i < t.size(0); ++i, row += 6) {
    const int64_t layer = row[0], expert = row[1], file = row[2], offset = row[3], n = row[4],
                  at_ = row[5];
    TORCH_CHECK(layer >= 0 && layer < num_layers_ && expert >= 0 && expert < num_experts_,
                "SlotPool.set_file_sources: row ", i, " ('", labels[i], "') names layer ", layer,
                " expert ", expert, " outside [0, ", num_layers_, ") x [0, ", num_experts_, ")");
    TORCH_CHECK(file >= 0 && file < files_.size(), "SlotPool.set_file_sources: row ", i, " ('",
                labels[i], "') names file ", file, " but ", files_.size(), " files were added");
    TORCH_CHECK(offset >= 0 && n > 0 && at_ >= 0 && at_ + n <= land_bytes_,
                "SlotPool.set_file_sources: row ", i, " ('", labels[i], "') puts ", n,
                " bytes at slot offset ", at_, ", outside the ", land_bytes_, "-byte slot");
    segments[key(layer, expert)].push_back(Segment{file, offset, n, at_, i});
  }
  for (int64_t k = 0; k < num_layers_ * num_experts_; ++k) {
    TORCH_CHECK(!segments[k].empty(), "SlotPool.set_file_sources: no source for layer ",
                k / num_experts_, " expert ", k % num_experts_);
  }
  // Group each expert's segments into reads: sorted by file and offset, adjacent ones on an
  // O_DIRECT file merged into one aligned read.
  std::vector<std::vector<ReadRun>> runs(segments.size());
  int64_t bounce_bytes = 0;
  for (size_t k = 0; k < segments.size(); ++k) {
    std::vector<Segment>& segs = segments[k];
    std::sort(segs.begin(), segs.end(), [](const Segment& a, const Segment& b) {
      return a.file_id != b.file_id ? a.file_id < b.file_id : a.file_offset < b.file_offset;
    });
    std::vector<ReadRun>& out = runs[k];
    int64_t data_end = 0;  // file offset where the last run's data ends
    for (const Segment& seg : segs) {
      const bool direct = files_.direct(seg.file_id);
      // Merge when the segment starts inside (or right after) the aligned blocks the run already
      // reads: one request instead of two, and never a byte more than separate reads would take.
      if (direct && !out.empty() && out.back().file_id == seg.file_id &&
          seg.file_offset >= data_end && align_down(seg.file_offset) <= align_up(data_end)) {
        ReadRun& run = out.back();
        run.pieces.push_back({seg.file_offset - run.begin, seg.nbytes, seg.slot_offset, seg.label});
        data_end = seg.file_offset + seg.nbytes;
        run.length = align_up(data_end) - run.begin;
        continue;
      }
      ReadRun run;
      run.file_id = seg.file_id;
      run.direct = direct;
      run.begin = direct ? align_down(seg.file_offset) : seg.file_offset;
      data_end = seg.file_offset + seg.nbytes;
      run.length = direct ? align_up(data_end) - run.begin : data_end - run.begin;
      run.pieces.push_back({seg.file_offset - run.begin, seg.nbytes, seg.slot_offset, seg.label});
      out.push_back(std::move(run));
    }
    for (ReadRun& run : out) {
      const ReadRun::Piece& p = run.pieces.front();
      run.zero_copy = run.direct && run.pieces.size() == 1 && p.run_offset == 0 &&
                      p.nbytes == run.length && p.slot_offset % kDirectIoAlign == 0;
      if (run.direct && !run.zero_copy) bounce_bytes = std::max(bounce_bytes, run.length);
    }
  }
  std::vector<std::unique_ptr<AlignedBuffer>> bounce;
  if (bounce_bytes > 0) {
    for (int w = 0; w < reader_->size(); ++w) {
      bounce.push_back(std::make_unique<AlignedBuffer>(bounce_bytes));
    }
  }
  runs_ = std::move(runs);
  bounce_ = std::move(bounce);
  labels_ = std::move(labels);
  host_blobs_ = at::Tensor();
}

void SlotPool::set_conversion(const std::string& src_dtype, const std::string& dst_dtype,
                              const at::Tensor& plan, int64_t src_bytes) {
  const at::ScalarType from = parse_float_dtype(src_dtype, "src_dtype");
  const at::ScalarType to = parse_float_dtype(dst_dtype, "dst_dtype");
  TORCH_CHECK(plan.dim() == 2 && plan.size(1) == 3 && plan.scalar_type() == at::kLong &&
                  plan.device().is_cpu() && plan.size(0) >= 1,
              "SlotPool.set_conversion: plan must be a CPU int64 [N >= 1, 3] tensor, got ",
              plan.scalar_type(), " ", plan.sizes());
  TORCH_CHECK(src_bytes > 0 && src_bytes % kDirectIoAlign == 0, "SlotPool.set_conversion: "
              "src_bytes must be a positive multiple of ", kDirectIoAlign, ", got ", src_bytes);
  const at::Tensor t = plan.contiguous();
  const int64_t* row = t.data_ptr<int64_t>();
  std::vector<ConvertStep> steps;
  int64_t extent = 0;
  const int64_t in_size = c10::elementSize(from), out_size = c10::elementSize(to);
  for (int64_t i = 0; i < t.size(0); ++i, row += 3) {
    const ConvertStep step{row[0], row[1], row[2]};
    TORCH_CHECK(step.numel > 0 && step.src_offset >= 0 && step.dst_offset >= 0 &&
                    step.src_offset + step.numel * in_size <= src_bytes &&
                    step.dst_offset + step.numel * out_size <= slot_bytes_,
                "SlotPool.set_conversion: step ", i, " (", step.src_offset, ", ", step.dst_offset,
                ", ", step.numel, ") falls outside the ", src_bytes, "-byte source or the ",
                slot_bytes_, "-byte slot");
    extent = std::max(extent, step.dst_offset + step.numel * out_size);
    steps.push_back(step);
  }
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(!started_ && runs_.empty(), "SlotPool.set_conversion: call it before "
              "set_file_sources and the first acquire/prefetch");
  std::vector<std::unique_ptr<AlignedBuffer>> landing;
  for (int w = 0; w < reader_->size(); ++w) {
    landing.push_back(std::make_unique<AlignedBuffer>(src_bytes));
  }
  src_dtype_ = from;
  dst_dtype_ = to;
  convert_ = std::move(steps);
  land_bytes_ = src_bytes;
  dst_extent_ = extent;
  landing_ = std::move(landing);
}

void SlotPool::set_dequant(const at::Tensor& plan, int64_t src_bytes,
                           const std::string& dst_dtype) {
  const at::ScalarType to = parse_float_dtype(dst_dtype, "dst_dtype");
  TORCH_CHECK(src_bytes > 0 && src_bytes % kDirectIoAlign == 0, "SlotPool.set_dequant: "
              "src_bytes must be a positive multiple of ", kDirectIoAlign, ", got ", src_bytes);
  int64_t extent = 0;
  std::vector<DequantPart> parts = parse_dequant_plan(plan, src_bytes, slot_bytes_, to, &extent);
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(!started_ && runs_.empty() && !host_blobs_.defined() && convert_.empty(),
              "SlotPool.set_dequant: call it before the sources and the first acquire/prefetch, "
              "and not with set_conversion");
  // On a GPU the compressed blob crosses the bus and the engine dequantizes it there; else it
  // lands in a per-reader buffer and is dequantized on this host.
  device_dequant_ = engine_->enable_dequant(parts, to, src_bytes);
  std::vector<std::unique_ptr<AlignedBuffer>> landing;
  for (int w = 0; w < reader_->size() && !device_dequant_; ++w) {
    landing.push_back(std::make_unique<AlignedBuffer>(src_bytes));
  }
  dequant_ = std::move(parts);
  dequant_dtype_ = to;
  land_bytes_ = src_bytes;
  dst_extent_ = extent;
  landing_ = std::move(landing);
}

void SlotPool::set_scale_check(const at::Tensor& plan, int64_t dense_bytes,
                               const std::string& dense_dtype) {
  const at::ScalarType dtype = parse_float_dtype(dense_dtype, "dense_dtype");
  std::vector<DequantPart> parts = parse_dequant_plan(plan, slot_bytes_, dense_bytes, dtype, nullptr);
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(!started_ && convert_.empty() && dequant_.empty(), "SlotPool.set_scale_check: call "
              "it before the first acquire/prefetch, and not with set_conversion or set_dequant");
  scale_check_ = std::move(parts);
}

int64_t SlotPool::dequantize_into(int64_t slot, int worker, const uint8_t* land, bool staged) {
  if (device_dequant_) {
    check_scales_host(dequant_, land);  // the kernel cannot refuse a corrupt scale
    return staged ? engine_->commit_dequant(slot, worker, land_bytes_)
                  : engine_->dequant_from_host(slot, land, land_bytes_);
  }
  uint8_t* target = engine_->read_target(slot, worker);
  dequantize_host(dequant_, land, target, dequant_dtype_);
  return engine_->commit_read(slot, worker, dst_extent_);
}

void SlotPool::set_checksums(const at::Tensor& checks) {
  TORCH_CHECK(checks.dim() == 2 && checks.size(0) == num_layers_ * num_experts_ &&
                  checks.size(1) == 2 && checks.scalar_type() == at::kLong &&
                  checks.device().is_cpu(),
              "SlotPool.set_checksums: checks must be a CPU int64 [", num_layers_ * num_experts_,
              ", 2] tensor, got ", checks.scalar_type(), " ", checks.sizes());
  const at::Tensor t = checks.contiguous();
  const int64_t* row = t.data_ptr<int64_t>();
  std::vector<uint32_t> seed(t.size(0)), expected(t.size(0));
  for (int64_t i = 0; i < t.size(0); ++i) {
    TORCH_CHECK(row[2 * i] >= 0 && row[2 * i] <= 0xFFFFFFFFLL && row[2 * i + 1] >= 0 &&
                    row[2 * i + 1] <= 0xFFFFFFFFLL,
                "SlotPool.set_checksums: row ", i, " is not a pair of 32-bit CRCs");
    seed[i] = static_cast<uint32_t>(row[2 * i]);
    expected[i] = static_cast<uint32_t>(row[2 * i + 1]);
  }
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(!started_, "SlotPool.set_checksums: sources are frozen after the first "
              "acquire/prefetch");
  crc_seed_ = std::move(seed);
  crc_expected_ = std::move(expected);
}

void SlotPool::set_layer_ids(std::vector<int64_t> ids) {
  TORCH_CHECK(static_cast<int64_t>(ids.size()) == num_layers_, "SlotPool.set_layer_ids: ",
              ids.size(), " ids for ", num_layers_, " layers");
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(!started_, "SlotPool.set_layer_ids: call it before the first acquire/prefetch");
  layer_ids_ = std::move(ids);
}

std::vector<bool> SlotPool::direct_files() const {
  std::vector<bool> out;
  for (int64_t i = 0; i < files_.size(); ++i) out.push_back(files_.direct(i));
  return out;
}

void SlotPool::set_host_sources(const at::Tensor& blobs) {
  TORCH_CHECK(blobs.dim() == 2 && blobs.size(0) == num_layers_ * num_experts_ &&
                  blobs.size(1) <= slot_bytes_ && blobs.scalar_type() == at::kByte &&
                  blobs.device().is_cpu() && blobs.is_contiguous(),
              "SlotPool.set_host_sources: blobs must be a contiguous CPU uint8 [", num_layers_,
              " * ", num_experts_, ", <= ", slot_bytes_, "] tensor, got ", blobs.scalar_type(),
              " ", blobs.sizes(), " on ", blobs.device());
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(!started_, "SlotPool.set_host_sources: sources are frozen after the first "
              "acquire/prefetch");
  TORCH_CHECK(dequant_.empty() || blobs.size(1) == land_bytes_, "SlotPool.set_host_sources: "
              "compressed rows must be the ", land_bytes_, "-byte blobs set_dequant describes, "
              "got ", blobs.size(1));
  host_blobs_ = blobs;
  host_blob_bytes_ = blobs.size(1);
  runs_.clear();
}

void SlotPool::check_layer(int64_t layer, const char* fn) const {
  TORCH_CHECK(layer >= 0 && layer < num_layers_, "SlotPool.", fn, ": layer must be in [0, ",
              num_layers_, "), got ", layer);
}

std::vector<int64_t> SlotPool::distinct_ids(int64_t layer, const at::Tensor& ids,
                                            const char* fn) const {
  check_layer(layer, fn);
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.device().is_cpu(),
              "SlotPool.", fn, ": ids must be a 1-D CPU int64 tensor, got ", ids.scalar_type(),
              " ", ids.sizes(), " on ", ids.device());
  const at::Tensor c = ids.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<int64_t> out;
  out.reserve(c.numel());
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < num_experts_, "SlotPool.", fn, ": expert id ", p[i],
                " at position ", i, " is outside [0, ", num_experts_, ")");
    // First-occurrence order; K is small, a linear scan beats a hash set.
    if (std::find(out.begin(), out.end(), p[i]) == out.end()) out.push_back(p[i]);
  }
  return out;
}

int64_t SlotPool::pick_victim_locked(int64_t layer, const std::vector<int64_t>& exclude) const {
  int64_t best = -1;
  for (int64_t s = scope_begin(layer); s < scope_end(layer); ++s) {
    const Slot& slot = slots_[s];
    if (!exclude.empty() && std::find(exclude.begin(), exclude.end(), s) != exclude.end()) continue;
    if (slot.layer < 0) return s;  // free slots are used first, lowest index first
    if (slot.pins > 0) continue;
    if (best < 0) {
      best = s;
      continue;
    }
    const Slot& b = slots_[best];
    // LRU: oldest stamp. LFU: lowest frequency, ties -> oldest stamp. Stamps are unique.
    const bool better = policy_ == Policy::kLfu && slot.freq != b.freq ? slot.freq < b.freq
                                                                       : slot.last_use < b.last_use;
    if (better) best = s;
  }
  return best;
}

SlotPool::Job SlotPool::place_locked(int64_t s, int64_t layer, int64_t expert, int64_t stamp,
                                     int64_t pins, int64_t freq, bool prefetched) {
  Slot& slot = slots_[s];
  if (slot.layer >= 0) {
    slot_of_[key(slot.layer, slot.expert)] = -1;
    count(slot.layer, kEvictions, 1);  // charged to the layer that loses the expert
  }
  Job job{s, layer, expert, std::make_shared<LoadTicket>(), slot.load};
  slot.layer = layer;
  slot.expert = expert;
  slot.pins = pins;
  slot.last_use = stamp;
  slot.freq = freq;
  slot.prefetched = prefetched;
  slot.load = job.ticket;
  slot_of_[key(layer, expert)] = s;
  return job;
}

at::Tensor SlotPool::acquire(int64_t layer, const at::Tensor& ids, bool wait) {
  const std::vector<int64_t> distinct = distinct_ids(layer, ids, "acquire");
  std::vector<Pinned> pinned;
  std::vector<Job> jobs;
  pinned.reserve(distinct.size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    TORCH_CHECK(has_sources_locked(),
                "SlotPool.acquire: no sources set (call set_file_sources or set_host_sources)");
    // 1. Classify against the residency at call time, and check capacity before changing
    //    anything: the call's hits are pinned by it, so they cannot be victims.
    std::vector<int64_t> misses;
    for (int64_t e : distinct) {
      if (slot_of_[key(layer, e)] < 0) misses.push_back(e);
    }
    if (!misses.empty()) {
      int64_t takeable = 0, pinned_by_others = 0;
      for (int64_t s = scope_begin(layer); s < scope_end(layer); ++s) {
        const Slot& slot = slots_[s];
        const bool own_hit = slot.layer == layer &&
                             std::find(distinct.begin(), distinct.end(), slot.expert) != distinct.end();
        if (slot.pins > 0) {
          ++pinned_by_others;
        } else if (!own_hit) {
          ++takeable;
        }
      }
      TORCH_CHECK(static_cast<int64_t>(misses.size()) <= takeable, "SlotPool.acquire: layer ",
                  layer, " asks for ", distinct.size(), " distinct experts, ", misses.size(),
                  " of them not resident, but only ", takeable, " of the ", scope_end(layer) -
                  scope_begin(layer), " slots in its scope can be taken now (", pinned_by_others,
                  " pinned, ", distinct.size() - misses.size(), " hits of this call); acquire in "
                  "waves of at most max_pinnable(layer) distinct experts");
    }
    started_ = true;
    // 2. Every distinct id gets the next stamp, in first-occurrence order, hit or miss.
    const int64_t stamp0 = clock_;
    clock_ += static_cast<int64_t>(distinct.size());
    for (size_t i = 0; i < distinct.size(); ++i) {
      const int64_t s = slot_of_[key(layer, distinct[i])];
      if (s < 0) continue;
      Slot& slot = slots_[s];
      slot.pins += 1;
      slot.last_use = stamp0 + static_cast<int64_t>(i);
      slot.freq += 1;
      if (slot.prefetched) {
        slot.prefetched = false;
        count(layer, kPrefetchHits, 1);
      }
      count(layer, kHits, 1);
      pinned.push_back(Pinned{distinct[i], s, slot.load});
    }
    // 3. Misses, in order, each into the lowest free slot or the policy's victim.
    for (size_t i = 0; i < distinct.size(); ++i) {
      const int64_t e = distinct[i];
      if (slot_of_[key(layer, e)] >= 0) continue;
      const int64_t s = pick_victim_locked(layer);
      TORCH_INTERNAL_ASSERT(s >= 0, "capacity was checked above");
      jobs.push_back(place_locked(s, layer, e, stamp0 + static_cast<int64_t>(i), /*pins=*/1,
                                  /*freq=*/1, /*prefetched=*/false));
      count(layer, kMisses, 1);
      pinned.push_back(Pinned{e, s, jobs.back().ticket});
    }
  }
  launch(jobs);
  if (wait) finish_acquire(layer, pinned);

  at::Tensor out = at::empty({ids.numel()}, ids.options());
  const at::Tensor c = ids.contiguous();
  const int64_t* in = c.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    for (const Pinned& p : pinned) {
      if (p.expert == in[i]) o[i] = p.slot;
    }
  }
  return out;
}

void SlotPool::wait(int64_t layer, const at::Tensor& ids) {
  const std::vector<int64_t> distinct = distinct_ids(layer, ids, "wait");
  std::vector<Pinned> pinned;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int64_t e : distinct) {
      const int64_t s = slot_of_[key(layer, e)];
      if (s >= 0 && slots_[s].pins > 0) {
        pinned.push_back(Pinned{e, s, slots_[s].load});
        continue;
      }
      // Not pinned: either never acquired, or its load failed and was undone. Undo the rest of
      // this call's pins too, so the caller is left with nothing pinned, as documented.
      std::string why = last_error_[key(layer, e)];
      for (int64_t other : distinct) {
        const int64_t so = slot_of_[key(layer, other)];
        if (so >= 0 && slots_[so].pins > 0) slots_[so].pins -= 1;
      }
      TORCH_CHECK(false, "SlotPool.wait: layer ", layer, " expert ", e, " is not pinned",
                  why.empty() ? std::string(" (acquire it first)") : ": its load failed: " + why);
    }
  }
  finish_acquire(layer, pinned);
}

void SlotPool::finish_acquire(int64_t layer, const std::vector<Pinned>& pinned) {
  // Python calls reach here through torch::class_, which releases the GIL around the whole
  // method call (runAndInsertCall in torch/csrc/jit/python/pybind_utils.h): blocking here never
  // blocks other Python threads.
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::string> errors;
  for (const Pinned& p : pinned) {
    if (p.ticket->wait() == LoadTicket::State::kFailed) errors.push_back(p.ticket->error);
  }
  count(layer, kStallNs, std::chrono::duration_cast<std::chrono::nanoseconds>(
                             std::chrono::steady_clock::now() - t0).count());
  if (errors.empty()) {
    for (const Pinned& p : pinned) engine_->wait_loaded(p.slot);
    return;
  }
  {
    // The failed entries were already removed by their load (run_load); drop this call's pins
    // on the others so the caller holds nothing.
    std::lock_guard<std::mutex> lock(mu_);
    for (const Pinned& p : pinned) {
      Slot& slot = slots_[p.slot];
      if (slot.load == p.ticket && slot.layer == layer && slot.expert == p.expert && slot.pins > 0) {
        slot.pins -= 1;
      }
    }
  }
  std::ostringstream msg;
  msg << "SlotPool: " << errors.size() << " expert load(s) of layer " << layer
      << " failed; the pool is unchanged apart from dropping them:";
  for (const std::string& e : errors) msg << "\n  " << e;
  TORCH_CHECK(false, msg.str());
}

int64_t SlotPool::prefetch(int64_t layer, const at::Tensor& ids) {
  const std::vector<int64_t> distinct = distinct_ids(layer, ids, "prefetch");
  std::vector<Job> jobs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    TORCH_CHECK(has_sources_locked(),
                "SlotPool.prefetch: no sources set (call set_file_sources or set_host_sources)");
    started_ = true;
    for (int64_t e : distinct) {
      if (slot_of_[key(layer, e)] >= 0) continue;  // resident: recency and frequency unchanged
      // Never one of this call's own loads: a prefetch must not evict what it just fetched.
      std::vector<int64_t> own;
      for (const Job& j : jobs) own.push_back(j.slot);
      const int64_t s = pick_victim_locked(layer, own);
      if (s < 0) break;
      jobs.push_back(place_locked(s, layer, e, clock_++, /*pins=*/0, /*freq=*/0,
                                  /*prefetched=*/true));
      count(layer, kPrefetches, 1);
    }
  }
  launch(jobs);
  return static_cast<int64_t>(jobs.size());
}

void SlotPool::release(int64_t layer, const at::Tensor& ids) {
  const std::vector<int64_t> distinct = distinct_ids(layer, ids, "release");
  std::lock_guard<std::mutex> lock(mu_);
  for (int64_t e : distinct) {
    const int64_t s = slot_of_[key(layer, e)];
    TORCH_CHECK(s >= 0 && slots_[s].pins > 0, "SlotPool.release: layer ", layer, " expert ", e,
                " is not pinned", s < 0 ? " (not resident)" : "");
  }
  for (int64_t e : distinct) {
    const int64_t s = slot_of_[key(layer, e)];
    // Fence first, then unpin: once unpinned the slot may be chosen for the next load, which
    // must see this fence.
    engine_->mark_released(s);
    slots_[s].pins -= 1;
  }
}

void SlotPool::launch(std::vector<Job>& jobs) {
  for (Job& job : jobs) {
    if (host_blobs_.defined() && engine_->host_copy_is_async() &&
        (dequant_.empty() || device_dequant_)) {
      run_load(job);  // only enqueues a copy: cheaper on this thread than a hand-off
    } else {
      reader_->submit([this, job = std::move(job)] { run_load(job); });
    }
  }
}

void SlotPool::run_load(const Job& job) {
  // The slot's previous load (of the expert just evicted, e.g. a prefetch nobody used) may still
  // be writing it; FIFO order guarantees it was dequeued before this one, so waiting is safe.
  if (job.previous) job.previous->wait();
  try {
    if (host_blobs_.defined()) {
      const uint8_t* src = host_blobs_.data_ptr<uint8_t>() + key(job.layer, job.expert) * host_blob_bytes_;
      if (!scale_check_.empty()) check_scales_host(scale_check_, src);
      if (!dequant_.empty()) {
        // A compressed host row: dequantized on this reader thread, straight from host memory.
        count(job.layer, kBytesCopied,
              dequantize_into(job.slot, ReaderPool::current_worker(), src, /*staged=*/false));
      } else {
        count(job.layer, kBytesCopied, engine_->copy_from_host(job.slot, src, host_blob_bytes_));
      }
    } else {
      const int64_t k = key(job.layer, job.expert);
      const int worker = ReaderPool::current_worker();
      uint8_t* target = engine_->read_target(job.slot, worker);
      // Bytes land in the slot itself (CPU) or the reader's staging buffer (CUDA), unless they
      // need a dtype conversion first.
      uint8_t* land = convert_.empty() && (dequant_.empty() || device_dequant_)
                          ? target : landing_[worker]->data;
      const bool check = !crc_expected_.empty() && verify_.load(std::memory_order_relaxed);
      bool converted = false;
      uint32_t crc = check ? crc_seed_[k] : 0;
      int64_t nread = 0, extent = 0;
      const ReadRun& first = runs_[k].front();
      const ReadRun::Piece& piece = first.pieces.front();
      if (check && runs_[k].size() == 1 && first.zero_copy && piece.slot_offset == 0 &&
          first.length == land_bytes_) {
        // A packed blob on an O_DIRECT file: read it as concurrent chunks and checksum (and
        // convert) each one as it arrives, so only the last chunk's work adds to the latency.
        // Converted bytes may land in the slot before the whole blob is verified: a failed
        // check frees the slot, so they never become resident.
        nread = files_.read_direct_chunked(
            first.file_id, first.begin, first.length, land, labels_[piece.label],
            kChecksumChunk, [&](const uint8_t* p, int64_t n) {
              crc = crc32c(p, static_cast<size_t>(n), crc);
              if (!convert_.empty()) convert_range(land, target, p - land, p - land + n);
            });
        converted = !convert_.empty();
        if (nread < first.length) {
          files_.throw_truncated(first.file_id, labels_[piece.label], first.begin,
                                 first.begin + first.length);
        }
        files_.check_unchanged(first.file_id);
        extent = first.length;
      } else {
        std::tie(nread, extent) = read_runs(k, worker, land);
        if (check) crc = crc32c(land, static_cast<size_t>(land_bytes_), crc);
      }
      count(job.layer, kBytesRead, nread);
      if (check && crc != crc_expected_[k]) {
        std::ostringstream msg;
        msg << std::hex << std::setfill('0') << "'" << files_.path(first.file_id) << "': "
            << labels_[piece.label] << " fails its CRC32C check (read " << std::setw(8) << crc
            << ", the header says " << std::setw(8) << crc_expected_[k]
            << "): the file is corrupt or was changed after packing; run `remoe pack` again";
        throw std::runtime_error(msg.str());
      }
      // After the checksum: scales are only trusted once the whole blob is verified.
      if (!scale_check_.empty()) check_scales_host(scale_check_, land);
      if (!dequant_.empty()) {
        count(job.layer, kBytesCopied, dequantize_into(job.slot, worker, land, /*staged=*/true));
        job.ticket->finish(LoadTicket::State::kDone);
        return;
      }
      if (!convert_.empty()) {
        if (!converted) convert_range(land, target, 0, land_bytes_);
        extent = dst_extent_;
      }
      count(job.layer, kBytesCopied, engine_->commit_read(job.slot, worker, extent));
    }
    job.ticket->finish(LoadTicket::State::kDone);
  } catch (const std::exception& e) {
    std::ostringstream msg;
    msg << "layer " << layer_id(job.layer) << " expert " << job.expert << ": " << e.what();
    {
      // Undo the entry before waking waiters, so no one sees a half-resident expert. Its pins go
      // with it; finish_acquire drops the failing call's other pins.
      std::lock_guard<std::mutex> lock(mu_);
      Slot& slot = slots_[job.slot];
      if (slot.load == job.ticket) {
        slot_of_[key(job.layer, job.expert)] = -1;
        slot.layer = slot.expert = -1;
        slot.pins = slot.freq = 0;
        slot.prefetched = false;
      }
      last_error_[key(job.layer, job.expert)] = msg.str();
      count(job.layer, kLoadFailures, 1);
    }
    job.ticket->finish(LoadTicket::State::kFailed, msg.str());
  }
}

void SlotPool::convert_range(const uint8_t* land, uint8_t* target, int64_t begin,
                             int64_t end) const {
  const int64_t in = c10::elementSize(src_dtype_), out = c10::elementSize(dst_dtype_);
  for (const ConvertStep& step : convert_) {
    // The part of this tensor inside [begin, end) of the source layout. Chunk bounds are
    // multiples of 4 KiB and tensors start 256-aligned, so both ends fall on whole elements.
    const int64_t lo = std::max(begin, step.src_offset);
    const int64_t hi = std::min(end, step.src_offset + step.numel * in);
    if (lo >= hi) continue;
    const int64_t first = (lo - step.src_offset) / in, count = (hi - lo) / in;
    convert(src_dtype_, dst_dtype_, land + lo, target + step.dst_offset + first * out, count);
  }
}

std::pair<int64_t, int64_t> SlotPool::read_runs(int64_t k, int worker, uint8_t* land) {
  int64_t nread = 0, extent = 0;
  for (const ReadRun& run : runs_[k]) {
    if (!run.direct) {
      for (const ReadRun::Piece& p : run.pieces) {
        files_.read_exact(run.file_id, run.begin + p.run_offset, p.nbytes, land + p.slot_offset,
                          labels_[p.label]);
        nread += p.nbytes;
      }
    } else {
      const ReadRun::Piece& first = run.pieces.front();
      uint8_t* dst = run.zero_copy ? land + first.slot_offset : bounce_[worker]->data;
      const int64_t got = files_.read_direct(run.file_id, run.begin, run.length, dst,
                                             labels_[first.label]);
      for (const ReadRun::Piece& p : run.pieces) {
        if (p.run_offset + p.nbytes > got) {
          files_.throw_truncated(run.file_id, labels_[p.label], run.begin + p.run_offset,
                                 run.begin + p.run_offset + p.nbytes);
        }
        if (!run.zero_copy) {
          std::memcpy(land + p.slot_offset, dst + p.run_offset, static_cast<size_t>(p.nbytes));
        }
      }
      nread += got;
    }
    // After the read: a change that finished before this check is caught; one that starts later
    // does not touch the bytes already read.
    files_.check_unchanged(run.file_id);
    for (const ReadRun::Piece& p : run.pieces) extent = std::max(extent, p.slot_offset + p.nbytes);
  }
  return {nread, extent};
}

int64_t SlotPool::max_pinnable(int64_t layer) {
  check_layer(layer, "max_pinnable");
  std::lock_guard<std::mutex> lock(mu_);
  int64_t n = 0;
  for (int64_t s = scope_begin(layer); s < scope_end(layer); ++s) n += slots_[s].pins == 0;
  return n;
}

at::Tensor SlotPool::residency(int64_t layer) {
  check_layer(layer, "residency");
  at::Tensor out = at::empty({num_experts_}, at::TensorOptions().dtype(at::kLong));
  std::lock_guard<std::mutex> lock(mu_);
  std::copy_n(slot_of_.begin() + key(layer, 0), num_experts_, out.data_ptr<int64_t>());
  return out;
}

at::Tensor SlotPool::pins(int64_t layer) {
  check_layer(layer, "pins");
  at::Tensor out = at::zeros({num_experts_}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  std::lock_guard<std::mutex> lock(mu_);
  for (int64_t e = 0; e < num_experts_; ++e) {
    const int64_t s = slot_of_[key(layer, e)];
    if (s >= 0) o[e] = slots_[s].pins;
  }
  return out;
}

at::Tensor SlotPool::stats() {
  at::Tensor out = at::empty({num_layers_, kNumCounters}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_layers_ * kNumCounters; ++i) o[i] = counters_[i].load();
  return out;
}

void SlotPool::drain() {
  std::vector<std::shared_ptr<LoadTicket>> pending;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Slot& slot : slots_) {
      if (slot.load) pending.push_back(slot.load);
    }
  }
  for (const auto& ticket : pending) ticket->wait();  // outside the lock: loads take it
}

void SlotPool::reset_stats() {
  for (int64_t i = 0; i < num_layers_ * kNumCounters; ++i) counters_[i].store(0);
}

void register_slot_pool(torch::Library& m) {
  m.class_<SlotPool>("SlotPool")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, std::string, std::string,
                       int64_t, std::string>())
      .def("add_file", &SlotPool::add_file)
      .def("set_file_sources", &SlotPool::set_file_sources)
      .def("set_host_sources", &SlotPool::set_host_sources)
      .def("set_conversion", &SlotPool::set_conversion)
      .def("set_dequant", &SlotPool::set_dequant)
      .def("set_scale_check", &SlotPool::set_scale_check)
      .def("set_checksums", &SlotPool::set_checksums)
      .def("set_verify", &SlotPool::set_verify)
      .def("set_layer_ids", &SlotPool::set_layer_ids)
      .def("direct_files", [](const c10::intrusive_ptr<SlotPool>& self) {
        c10::List<bool> out;
        for (bool d : self->direct_files()) out.push_back(d);
        return out;
      })
      .def("acquire", &SlotPool::acquire)
      .def("wait", &SlotPool::wait)
      .def("prefetch", &SlotPool::prefetch)
      .def("release", &SlotPool::release)
      .def("max_pinnable", &SlotPool::max_pinnable)
      .def("scope_slots", &SlotPool::scope_slots)
      .def("residency", &SlotPool::residency)
      .def("pins", &SlotPool::pins)
      .def("stats", &SlotPool::stats)
      .def("reset_stats", &SlotPool::reset_stats)
      .def("drain", &SlotPool::drain)
      .def("buffer", &SlotPool::buffer)
      .def("num_slots", &SlotPool::num_slots)
      .def("slot_bytes", &SlotPool::slot_bytes);
}

}  // namespace remoe
