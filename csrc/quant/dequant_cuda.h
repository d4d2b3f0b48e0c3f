// Launcher of the device dequantization kernel (dequant_cuda.cu), for the CUDA copy engine.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "dequant.h"

namespace remoe {

// Dequantizes blob `src` (device memory) into slot `dst` (device memory) on `stream`, one grid
// row per part; `parts` [num_parts] lives in device memory; max_elements = the largest part's
// rows * cols (max_part_elements).
void launch_dequantize(const DequantPart* parts, int64_t num_parts, int64_t max_elements,
                       const uint8_t* src, uint8_t* dst, at::ScalarType dtype, cudaStream_t stream);

int64_t max_part_elements(const std::vector<DequantPart>& parts);

}  // namespace remoe
