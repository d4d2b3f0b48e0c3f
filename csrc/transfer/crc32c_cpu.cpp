// remoe::crc32c on CPU tensors (schema in csrc/ops.cpp).

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "crc32c.h"

namespace remoe {

namespace {

int64_t crc32c_cpu(const at::Tensor& data, int64_t crc) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous(),
              "crc32c: data must be a contiguous uint8 tensor, got ", data.scalar_type(),
              data.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(crc >= 0 && crc <= 0xFFFFFFFFLL, "crc32c: crc must be a 32-bit CRC, got ", crc);
  return crc32c(data.data_ptr<uint8_t>(), static_cast<size_t>(data.numel()),
                static_cast<uint32_t>(crc));
}

}  // namespace

TORCH_LIBRARY_IMPL(remoe, CPU, m) { m.impl("crc32c", &crc32c_cpu); }

}  // namespace remoe
