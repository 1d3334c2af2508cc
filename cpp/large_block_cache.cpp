#include "large_block_cache.h"

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

}  // namespace fcnkern
