// Grid-stride launches, shared by the CUDA kernels that give each thread one element at a time.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace fcnkern {

// Blocks of `threads` for a grid-stride loop over `items`: enough resident blocks to hide latency (blocks_per_sm
// per SM of the current device), the loop covers the rest; at least one.
inline int64_t grid_blocks(int64_t items, int64_t threads, int64_t blocks_per_sm) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((items + threads - 1) / threads, sms * blocks_per_sm));
}

}  // namespace fcnkern

#define FCNK_GRID_STRIDE(i, total) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (total); i += int64_t(gridDim.x) * blockDim.x)
