#include "large_block_cache.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/accumulate.h>
#include <sys/mman.h>

#include <cstring>
#include <string>

namespace fcnkern {

namespace {
size_t capacity_bytes() {
  static const size_t cap = [] {
    const char* v = std::getenv("FCNKERN_CPU_CACHE_MB");
    return (v != nullptr ? std::strtoull(v, nullptr, 10) : size_t(1024)) << 20;
  }();
  return cap;
}
}  // namespace

void* LargeBlockCache::take(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it != free_.end()) {
      void* ptr = it->second;
      free_.erase(it);
      cached_ -= bytes;
      return ptr;
    }
  }
  void* ptr = nullptr;
  if (posix_memalign(&ptr, kHuge, bytes) != 0) return nullptr;
  madvise(ptr, bytes, MADV_HUGEPAGE);  // advisory: ignored where transparent huge pages are off
  return ptr;
}

void LargeBlockCache::give(void* ptr, size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cached_ + bytes <= capacity_bytes()) {
      free_.emplace(bytes, ptr);
      cached_ += bytes;
      return;
    }
  }
  std::free(ptr);
}

size_t LargeBlockCache::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [size, ptr] : free_) std::free(ptr);
  free_.clear();
  const size_t released = cached_;
  cached_ = 0;
  return released;
}

size_t LargeBlockCache::cached_bytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  return cached_;
}

LargeBlockCache& large_block_cache() {
  // Leaked on purpose: tensors holding cached blocks may outlive static destruction at exit.
  static auto* cache = new LargeBlockCache();
  return *cache;
}

namespace {
at::Tensor from_cache(const at::Tensor& layout, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(layout.numel()) * layout.element_size();
  if (bytes < LargeBlockCache::kMinBytes) return at::Tensor();
  const size_t rounded = LargeBlockCache::round(bytes);
  void* ptr = large_block_cache().take(rounded);
  if (ptr == nullptr) return at::Tensor();
  return at::from_blob(
      ptr, layout.sizes(), layout.strides(), [rounded](void* p) { large_block_cache().give(p, rounded); }, options);
}
}  // namespace

// Large outputs come from 2 MiB-aligned blocks advised for transparent huge pages and recycled here: a fresh
// N x C x H x W output is otherwise first-touched page by page on every call; measured at 8x21x512x512 fp32:
// allocate+fill 36 ms vs 10 ms into a resident buffer, and with huge pages but no reuse the time swung 44-142 ms.
at::Tensor empty_like_large(const at::Tensor& t) {
  at::Tensor out = from_cache(at::empty_like(t, t.options().device(at::kMeta)), t.options());
  return out.defined() ? out : at::empty_like(t);
}

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  at::Tensor out = from_cache(at::empty(sizes, options.device(at::kMeta).memory_format(format)), options);
  return out.defined() ? out : at::empty(sizes, options.memory_format(format));
}

// Kernel scratch of a few hundred KiB and up, released when the call ends. From at::empty, glibc served such blocks
// by growing the heap and trimmed it again on free, so every call page-faulted its scratch afresh (a sixth of a
// 64-channel im2col forward); from the block cache, each size a network's layers asked for stayed cached at once
// (a training step's peak rose by 70 MB). One block instead, grown to the largest request and lent to one call at
// a time: another call while it is lent (a second thread) gets at::empty's. Kept only within FCNKERN_CPU_CACHE_MB.
namespace {
struct ScratchBlock {
  std::mutex mutex;
  void* ptr = nullptr;
  size_t bytes = 0;
  bool lent = false;
};
ScratchBlock& scratch_block() {
  static auto* block = new ScratchBlock();  // leaked on purpose, like the cache
  return *block;
}
}  // namespace

at::Tensor empty_scratch(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kScratchMinBytes) return at::empty(sizes, options);
  ScratchBlock& block = scratch_block();
  void* ptr = nullptr;
  {
    std::lock_guard<std::mutex> lock(block.mutex);
    if (block.lent) return at::empty(sizes, options);
    if (block.bytes < bytes) {
      std::free(block.ptr);
      block.ptr = nullptr, block.bytes = 0;
      const size_t rounded = LargeBlockCache::round(bytes);
      if (posix_memalign(&block.ptr, LargeBlockCache::kHuge, rounded) != 0) return at::empty(sizes, options);
      madvise(block.ptr, rounded, MADV_HUGEPAGE);
      block.bytes = rounded;
    }
    block.lent = true;
    ptr = block.ptr;
  }
  return at::from_blob(
      ptr, sizes,
      [](void*) {
        ScratchBlock& held = scratch_block();
        std::lock_guard<std::mutex> lock(held.mutex);
        held.lent = false;
        if (held.bytes > capacity_bytes()) {  // FCNKERN_CPU_CACHE_MB bounds this block too (0: none kept)
          std::free(held.ptr);
          held.ptr = nullptr, held.bytes = 0;
        }
      },
      options);
}

size_t release_scratch() {
  ScratchBlock& block = scratch_block();
  std::lock_guard<std::mutex> lock(block.mutex);
  if (block.lent || block.ptr == nullptr) return 0;
  std::free(block.ptr);
  const size_t released = block.bytes;
  block.ptr = nullptr, block.bytes = 0;
  return released;
}

}  // namespace fcnkern
