// CPU copy engine: the slot buffer lives in RAM and a miss reads straight into its slot (the
// Jetson / phone situation: storage is the slow tier, there is no second copy).

#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#include "copy_engine.h"
#include "reader.h"

namespace remoe {

namespace {

class CpuCopyEngine final : public CopyEngine {
 public:
  CpuCopyEngine(int64_t num_slots, int64_t slot_bytes) : slot_bytes_(slot_bytes) {
    // posix_memalign rather than at::empty: torch's CPU allocator aligns to 64 bytes, and
    // O_DIRECT reads into a slot need 4 KiB.
    void* ptr = nullptr;
    const size_t total = static_cast<size_t>(num_slots * slot_bytes);
    const int err = posix_memalign(&ptr, kDirectIoAlign, total == 0 ? kDirectIoAlign : total);
    TORCH_CHECK(err == 0, "SlotPool: cannot allocate ", num_slots, " x ", slot_bytes,
                " bytes of slot memory: ", std::strerror(err));
    slots_ = at::from_blob(
        ptr, {num_slots, slot_bytes}, [](void* p) { std::free(p); },
        at::TensorOptions().dtype(at::kByte));
    base_ = static_cast<uint8_t*>(ptr);
  }

  at::Tensor slots() const override { return slots_; }
  uint8_t* read_target(int64_t slot, int /*worker*/) override { return base_ + slot * slot_bytes_; }
  int64_t commit_read(int64_t, int, int64_t) override { return 0; }  // already in the slot
  int64_t copy_from_host(int64_t slot, const uint8_t* src, int64_t nbytes) override {
    std::memcpy(base_ + slot * slot_bytes_, src, static_cast<size_t>(nbytes));
    return nbytes;
  }
  bool host_copy_is_async() const override { return false; }
  void wait_loaded(int64_t) override {}
  void mark_released(int64_t) override {}

 private:
  int64_t slot_bytes_;
  at::Tensor slots_;  // [num_slots, slot_bytes] uint8, owns the memory
  uint8_t* base_ = nullptr;
};

std::unique_ptr<CopyEngine> make_cpu_engine(const c10::Device& /*device*/, int64_t num_slots,
                                            int64_t slot_bytes, int /*num_workers*/) {
  return std::make_unique<CpuCopyEngine>(num_slots, slot_bytes);
}

const bool kRegistered = register_copy_engine(c10::DeviceType::CPU, &make_cpu_engine);

}  // namespace

}  // namespace remoe
