// Division by a runtime-constant divisor as a multiply-high, add and shift (Granlund & Montgomery, "Division by
// Invariant Integers using Multiplication", 1994), for the index arithmetic of the CUDA element kernels.
//
// Why: a GPU has no integer divider. nvcc compiles a 64-bit `/` or `%` into a test of whether both operands fit
// in 32 bits, then a ~20-instruction emulation (or a subroutine call for wide values); a 32-bit one is the
// emulation alone. The bilinear forward's seven index divisions per output element were 14 integer div/rem in its
// PTX (both forms of each); with these dividers there are none (166 PTX instructions per kernel instead of 226,
// sm_90). Each division here is ~4 instructions.
//
// Valid for divisors in [1, 2^31) and dividends in [0, 2^31): with s = ceil(log2 d) and m = 2^32 + magic,
// floor(n / d) = floor(m n / 2^(32 + s)), and t + n below stays under 2^32. Host and device code: tests call it on
// the CPU (tests/test_upsample_cuda_elements.py checks it against `/` and `%`).
#pragma once

#include <cstdint>

#include "common.h"

namespace fcnkern {

// Signed interface over unsigned maths: callers pass n >= 0 (indices), d >= 1.
struct FastDiv32 {
  int32_t d = 1;
  uint32_t magic = 1, shift = 0;

  FastDiv32() = default;
  explicit FastDiv32(int32_t divisor) : d(divisor) {
    while ((int64_t(1) << shift) < d) ++shift;
    magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }

  FCNK_HD int32_t div(int32_t n) const {
    const uint32_t un = static_cast<uint32_t>(n);
#ifdef __CUDA_ARCH__
    const uint32_t t = __umulhi(un, magic);
#else
    const uint32_t t = static_cast<uint32_t>((uint64_t(un) * magic) >> 32);
#endif
    return static_cast<int32_t>((t + un) >> shift);
  }
};

// The same interface with the hardware's (or the compiler's) division, for 64-bit index maths.
struct PlainDiv64 {
  int64_t d = 1;

  PlainDiv64() = default;
  explicit PlainDiv64(int64_t divisor) : d(divisor) {}
  FCNK_HD int64_t div(int64_t n) const { return n / d; }
};

}  // namespace fcnkern
