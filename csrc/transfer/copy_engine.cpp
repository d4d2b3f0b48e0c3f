// The copy-engine registry.

#include "copy_engine.h"

#include <c10/util/Exception.h>

#include <map>
#include <mutex>

namespace remoe {

namespace {

std::map<c10::DeviceType, CopyEngineFactory>& registry() {
  // Function-local static: safe to use from other files' static initializers.
  static std::map<c10::DeviceType, CopyEngineFactory> factories;
  return factories;
}

std::mutex& registry_mutex() {
  static std::mutex mu;
  return mu;
}

}  // namespace

bool register_copy_engine(c10::DeviceType type, CopyEngineFactory factory) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry()[type] = factory;
  return true;
}

std::unique_ptr<CopyEngine> make_copy_engine(const c10::Device& device, int64_t num_slots,
                                             int64_t slot_bytes, int num_workers) {
  CopyEngineFactory factory = nullptr;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    const auto it = registry().find(device.type());
    if (it != registry().end()) factory = it->second;
  }
  TORCH_CHECK(factory != nullptr, "SlotPool: no copy engine for device ", device,
              " in this build of remoe_engine._C (a CPU-only build has only 'cpu'; rebuild with "
              "REMOE_BUILD_CUDA=1 for CUDA)");
  return factory(device, num_slots, slot_bytes, num_workers);
}

int64_t CopyEngine::commit_dequant(int64_t /*slot*/, int /*worker*/, int64_t /*nbytes*/) {
  TORCH_CHECK(false, "SlotPool: this copy engine does not dequantize on its device");
}

int64_t CopyEngine::dequant_from_host(int64_t /*slot*/, const uint8_t* /*src*/, int64_t /*nbytes*/) {
  TORCH_CHECK(false, "SlotPool: this copy engine does not dequantize on its device");
}

}  // namespace remoe
