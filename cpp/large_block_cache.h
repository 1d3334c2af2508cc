// A small cache of large, 2 MiB-aligned host blocks for the CPU kernels' big outputs.
//
// PyTorch's CPU allocator hands large blocks straight back to the OS, so a training loop that produces a fresh
// N x C x H x W gradient each step pays for first-touch page faults every time. Blocks released here are kept
// (up to FCNKERN_CPU_CACHE_MB, default 1024) and handed out again for the same rounded size, resident already.
// fcnkern.empty_cache() returns them to the OS.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstddef>
#include <cstdlib>
#include <map>
#include <mutex>

namespace fcnkern {

class LargeBlockCache {
 public:
  static constexpr size_t kHuge = size_t(2) << 20;
  static constexpr size_t kMinBytes = 4 * kHuge;
  static size_t round(size_t bytes) { return (bytes + kHuge - 1) / kHuge * kHuge; }

  // A block of exactly `bytes` (a multiple of kHuge), or nullptr if the system has none.
  void* take(size_t bytes);
  // Keep a block from take() for reuse, or free it when the cache is full.
  void give(void* ptr, size_t bytes);
  // Free every cached block; returns the bytes released.
  size_t clear();
  size_t cached_bytes();

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

LargeBlockCache& large_block_cache();

// at::empty_like(t) (same layout rules), from this cache when the output is large: the CPU kernels' big outputs.
at::Tensor empty_like_large(const at::Tensor& t);
// at::empty(sizes, options) in the given memory format, likewise.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format);
// A contiguous work buffer for one kernel call (freed when the call ends): from kScratchMinBytes up, one kept block
// (within FCNKERN_CPU_CACHE_MB), grown to the largest request; at::empty's below that or while another call holds it.
constexpr size_t kScratchMinBytes = size_t(256) << 10;
at::Tensor empty_scratch(at::IntArrayRef sizes, const at::TensorOptions& options);
// Frees that block unless a call holds it; returns the bytes released.
size_t release_scratch();

}  // namespace fcnkern
