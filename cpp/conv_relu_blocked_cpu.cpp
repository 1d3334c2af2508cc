// Register-blocked direct convolution for the CPU's small stride-1 layers: see conv_relu_blocked_cpu.h.
//
// Layout: each task, (image, group, block of output rows), copies the input rows its outputs read into fp32 planes
// zero-padded to wp = w + 2 pad_w columns, one plane per input channel. On that "wide" grid output (oh, ow) is
// column q = oh * wp + ow and reads tap (i, j) at column q + i * wp + j, so a run of wide columns spanning several
// rows is one unit-stride stream per tap (only the s - 1 pad columns of each row are computed and dropped), which
// keeps the vectors full on maps as narrow as 17 columns. The micro-kernel (conv_relu_blocked_kernel.inc) holds
// 8 output channels x 48 columns (AVX-512) in registers through the whole (c, i, j) reduction; the weights are packed
// per block of 8 output channels as [c][i][j][8] so that each tap's eight broadcasts are adjacent.
//
// dx at stride 1 and dilation 1 is the same convolution: input dy' = dy * (y > 0) (K/G channels of the output map),
// weight W'[c][k][i][j] = W[k][c][r-1-i][s-1-j], padding r-1-pad_h, s-1-pad_w; so dx reuses the engine with a
// masked-gradient row source.
#include "conv_relu_blocked_cpu.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu_math.h"
#include "cpu_row_sources.h"
#include "cpu_tasks.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FCNK_BLOCKED_KERNELS 1
#include <immintrin.h>
// Two builds of the micro-kernel, AVX-512 and AVX2 + FMA, chosen at run time. fp-contract=fast makes a * b + c one
// FMA (ISO C++ mode leaves them separate: half the rate).
namespace fcnkern::blocked_avx512 {
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#pragma GCC optimize("fp-contract=fast")
constexpr int kLanes = 16;
#include "conv_relu_blocked_kernel.inc"
#pragma GCC pop_options
}  // namespace fcnkern::blocked_avx512
// The bf16 kernels need AVX512-BF16 on top (Zen 4, Sapphire Rapids and later): a build of their own, so that the
// fp32 kernels above keep running on AVX-512 CPUs without it.
namespace fcnkern::blocked_avx512_bf16 {
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512bf16")
#pragma GCC optimize("fp-contract=fast")
constexpr int kLanes = 16;
#include "conv_relu_blocked_kernel.inc"
#include "conv_relu_blocked_bf16_kernel.inc"
#pragma GCC pop_options
}  // namespace fcnkern::blocked_avx512_bf16
namespace fcnkern::blocked_avx2 {
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#pragma GCC optimize("fp-contract=fast")
constexpr int kLanes = 8;
#include "conv_relu_blocked_kernel.inc"
#pragma GCC pop_options
}  // namespace fcnkern::blocked_avx2
#endif

namespace fcnkern {
namespace {

using BlockFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                         int64_t);
using WgradFn = void (*)(const float*, int64_t, const float*, const int64_t*, int64_t, float*);
using BlockBf16Fn = void (*)(const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, int64_t, int64_t, int64_t,
                             float*, int64_t);
using WgradBf16Fn = void (*)(const uint16_t*, int64_t, const uint16_t*, const int64_t*, int64_t, float*);
struct Kernel {
  BlockFn block = nullptr;
  WgradFn wgrad = nullptr;
  BlockBf16Fn block_bf16 = nullptr;  // where the CPU has AVX512-BF16 (same kBlock, kChunk and kLanes as block)
  WgradBf16Fn wgrad_bf16 = nullptr;
  int64_t channels = 0;  // output channels per block
  int64_t chunk = 0;     // wide columns per step
  int64_t lanes = 0;     // floats per vector
  int64_t wgrad_rows = 0;  // output channels per wgrad call (x kWgradTaps taps)
};
constexpr int64_t kWgradTaps = 3;  // the wgrad micro-kernel's taps per call (both builds)

const Kernel& kernel() {
  static const Kernel k = [] {
#ifdef FCNK_BLOCKED_KERNELS
    static_assert(blocked_avx512::kWgradTaps == kWgradTaps && blocked_avx2::kWgradTaps == kWgradTaps);
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) {
      namespace bf = blocked_avx512_bf16;
      static_assert(bf::kBlock == blocked_avx512::kBlock && bf::kChunk == blocked_avx512::kChunk &&
                    bf::kWgradRows == blocked_avx512::kWgradRows && bf::kWgradTaps == kWgradTaps);
      const bool bf16 = __builtin_cpu_supports("avx512bf16");
      return Kernel{blocked_avx512::block,
                    blocked_avx512::wgrad_block,
                    bf16 ? bf::block_bf16 : nullptr,
                    bf16 ? bf::wgrad_block_bf16 : nullptr,
                    blocked_avx512::kBlock,
                    blocked_avx512::kChunk,
                    blocked_avx512::kLanes,
                    blocked_avx512::kWgradRows};
    }
    if (__builtin_cpu_supports("x86-64-v3")) {
      return Kernel{blocked_avx2::block,  blocked_avx2::wgrad_block, nullptr, nullptr, blocked_avx2::kBlock,
                    blocked_avx2::kChunk, blocked_avx2::kLanes,      blocked_avx2::kWgradRows};
    }
#endif
    return Kernel{};
  }();
  return k;
}

// One stride-1, dilation-1 convolution on the wide grid: `in_c` channels per group of an h x w map in, `out_c` per
// group of an oh x ow map out.
struct Problem {
  int64_t images, groups, in_c, out_c, h, w, oh, ow, r, s, pad_h, pad_w;
  int64_t wp() const { return w + 2 * pad_w; }
};

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Output rows per task: the input planes (plus extra_channels rows of the output map: wgrad's dy') at about 256 KiB,
// L2-resident with the output block, then fewer rows until every thread has two tasks or more.
int64_t rows_per_task(const Problem& p, int64_t extra_channels = 0) {
  const int64_t budget = int64_t(256) << 10;
  int64_t rows = std::clamp<int64_t>(budget / (4 * (p.in_c + extra_channels) * p.wp()) - (p.r - 1), 1, p.oh);
  const int64_t want = 2 * at::get_num_threads();
  while (rows > 1 && p.images * p.groups * ((p.oh + rows - 1) / rows) < want) rows = (rows + 1) / 2;
  return rows;
}

// Calls fn(g, o, c, i, j) for every weight of the problem's groups, the (group, output) pairs spread over threads
// (a forward or dx packs its weights per call: on one thread, the other waiting, that was 3 % of a 64-channel
// 17 x 17 layer's backward).
template <typename Fn>
void for_each_weight(const Problem& p, const Fn& fn) {
  at::parallel_for(0, p.groups * p.out_c, 8, [&](int64_t begin, int64_t end) {
    for (int64_t go = begin; go < end; ++go) {
      const int64_t g = go / p.out_c, o = go % p.out_c;
      for (int64_t c = 0; c < p.in_c; ++c) {
        for (int64_t i = 0; i < p.r; ++i) {
          for (int64_t j = 0; j < p.s; ++j) fn(g, o, c, i, j);
        }
      }
    }
  });
}

// Weights packed per block of kernel().channels outputs: [group][block][c][i][j][o], zero past out_c.
// weight_of(g, o, c, i, j) gives the weight of output o, input c, tap (i, j) of group g.
template <typename WeightOf>
at::Tensor pack_weights(const Problem& p, const at::TensorOptions& options, const WeightOf& weight_of) {
  const int64_t kb = kernel().channels, blocks = (p.out_c + kb - 1) / kb;
  at::Tensor packed = at::zeros({p.groups, blocks, p.in_c, p.r, p.s, kb}, options.dtype(at::kFloat));
  float* dst = packed.mutable_data_ptr<float>();
  for_each_weight(p, [&](int64_t g, int64_t o, int64_t c, int64_t i, int64_t j) {
    dst[((((g * blocks + o / kb) * p.in_c + c) * p.r + i) * p.s + j) * kb + o % kb] = weight_of(g, o, c, i, j);
  });
  return packed;
}

// The bf16 kernels' weights (block_bf16): [group][block][c / 2][i][j][o] as int32, each the bf16 bits of input
// channels c (low half) and c + 1 (high half), zero past in_c and out_c. weight_of must give bf16 values.
template <typename WeightOf>
at::Tensor pack_weight_pairs(const Problem& p, const at::TensorOptions& options, const WeightOf& weight_of) {
  const int64_t kb = kernel().channels, blocks = (p.out_c + kb - 1) / kb, pairs = (p.in_c + 1) / 2;
  at::Tensor packed = at::zeros({p.groups, blocks, pairs, p.r, p.s, kb}, options.dtype(at::kInt));
  auto* dst = reinterpret_cast<uint32_t*>(packed.mutable_data_ptr<int32_t>());
  for_each_weight(p, [&](int64_t g, int64_t o, int64_t c, int64_t i, int64_t j) {
    dst[((((g * blocks + o / kb) * pairs + c / 2) * p.r + i) * p.s + j) * kb + o % kb] |=
        bf16_bits(weight_of(g, o, c, i, j)) << (16 * (c % 2));
  });
  return packed;
}

// Row ih of input channel c into the wp floats at dst: fill_row's w values between the zero padding (c is the
// problem's, within the group).
template <typename FillRow>
void stage_row(const Problem& p, int64_t n, int64_t group, int64_t c, int64_t ih, float* dst, const FillRow& fill_row) {
  std::fill(dst, dst + p.pad_w, 0.f);
  fill_row(n, group * p.in_c + c, ih, dst + p.pad_w);
  std::fill(dst + p.pad_w + p.w, dst + p.wp(), 0.f);
}

// The input rows [oh0, oh0 + plane_rows) - pad_h of the group's channels, zero-padded to wp columns, one plane of
// plane_len elements per channel (zero past its rows): floats, or (T = uint16_t, for the bf16 kernels) bf16 bit
// patterns, each row then staged as floats in `row` (wp floats) first.
template <typename T, typename FillRow>
void stage_planes(const Problem& p, int64_t n, int64_t group, int64_t oh0, int64_t plane_rows, T* planes,
                  int64_t plane_len, float* row, const FillRow& fill_row) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, uint16_t>);
  const int64_t wp = p.wp();
  for (int64_t c = 0; c < p.in_c; ++c) {
    T* plane = planes + c * plane_len;
    for (int64_t t = 0; t < plane_rows; ++t) {
      T* dst = plane + t * wp;
      const int64_t ih = oh0 + t - p.pad_h;
      if (ih < 0 || ih >= p.h) {
        std::fill(dst, dst + wp, T(0));
      } else if constexpr (std::is_same_v<T, float>) {
        stage_row(p, n, group, c, ih, dst, fill_row);
      } else {
        stage_row(p, n, group, c, ih, row, fill_row);
        f_row_to_bf16_bits(row, wp, dst);
      }
    }
    std::fill(plane + plane_rows * wp, plane + plane_len, T(0));
  }
}

// stage_planes for block_bf16: one plane per pair of channels, each column the bf16 bits of channel 2 cp (low half)
// and 2 cp + 1 (high half; zero past in_c), the two rows staged as floats in rows[0, 2 wp) first.
template <typename FillRow>
void stage_pair_planes(const Problem& p, int64_t n, int64_t group, int64_t oh0, int64_t plane_rows, uint32_t* planes,
                       int64_t plane_len, float* rows, const FillRow& fill_row) {
  const int64_t wp = p.wp();
  float* const lo = rows;
  float* const hi = rows + wp;
  for (int64_t cp = 0; cp < (p.in_c + 1) / 2; ++cp) {
    uint32_t* plane = planes + cp * plane_len;
    for (int64_t t = 0; t < plane_rows; ++t) {
      uint32_t* dst = plane + t * wp;
      const int64_t ih = oh0 + t - p.pad_h;
      if (ih < 0 || ih >= p.h) {
        std::fill(dst, dst + wp, 0u);
        continue;
      }
      stage_row(p, n, group, 2 * cp, ih, lo, fill_row);
      if (2 * cp + 1 < p.in_c) {
        stage_row(p, n, group, 2 * cp + 1, ih, hi, fill_row);
      } else {
        std::fill(hi, hi + wp, 0.f);
      }
      bf16_pair_row(lo, hi, wp, dst);
    }
    std::fill(plane + plane_rows * wp, plane + plane_len, 0u);
  }
}

// The engine: fill_row(n, c, ih, dst) writes the w values of input row ih of channel c (of the whole tensor) of image
// n into dst as float; store_row(n, o, oh, src) stores the ow values at src as output row oh of channel o.
// kBf16: the inputs and the packed weights (pack_weight_pairs) hold bf16 values, computed by block_bf16.
template <bool kBf16, typename FillRow, typename StoreRow>
void run(const Problem& p, const at::Tensor& packed, const FillRow& fill_row, const StoreRow& store_row) {
  const Kernel& kern = kernel();
  const int64_t wp = p.wp(), rows = rows_per_task(p), bands = (p.oh + rows - 1) / rows;
  const int64_t columns_max = round_up(rows * wp, kern.chunk);
  const int64_t plane_len = round_up(columns_max + (p.r - 1) * wp + p.s - 1, 16);
  const int64_t blocks = (p.out_c + kern.channels - 1) / kern.channels;
  const int64_t tasks = p.images * p.groups * bands;
  // Per thread, in 4-byte words: the planes (fp32: one per channel; bf16: one per channel pair), the two float rows
  // the bf16 planes are staged through, the output block.
  const int64_t plane_count = kBf16 ? (p.in_c + 1) / 2 : p.in_c, staging = kBf16 ? 2 * wp : 0;
  const ThreadScratch scratch(spread_tasks(tasks), plane_count * plane_len + staging + kern.channels * columns_max,
                              packed.options().dtype(at::kFloat));
  const int64_t block_size = plane_count * p.r * p.s * kern.channels;
  run_tasks(tasks, scratch.spread, [&](int64_t begin, int64_t end) {
    float* const planes = scratch.mine<float>();
    float* const rows_f = planes + plane_count * plane_len;
    float* const out = rows_f + staging;
    auto* const pairs = reinterpret_cast<uint32_t*>(planes);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / (p.groups * bands), group = task / bands % p.groups, band = task % bands;
      const int64_t oh0 = band * rows, count = std::min(rows, p.oh - oh0);
      const int64_t plane_rows = count + p.r - 1, columns = count * wp;
      if constexpr (kBf16) {
        stage_pair_planes(p, n, group, oh0, plane_rows, pairs, plane_len, rows_f, fill_row);
      } else {
        stage_planes(p, n, group, oh0, plane_rows, planes, plane_len, rows_f, fill_row);
      }
      for (int64_t b = 0; b < blocks; ++b) {
        if constexpr (kBf16) {
          const auto* wpk = reinterpret_cast<const uint32_t*>(packed.const_data_ptr<int32_t>());
          kern.block_bf16(pairs, plane_len, plane_count, wpk + (group * blocks + b) * block_size, p.r, p.s, wp,
                          columns, out, columns_max);
        } else {
          kern.block(planes, plane_len, p.in_c, packed.const_data_ptr<float>() + (group * blocks + b) * block_size,
                     p.r, p.s, wp, columns, out, columns_max);
        }
        for (int64_t o = 0; o < kern.channels && b * kern.channels + o < p.out_c; ++o) {
          for (int64_t t = 0; t < count; ++t) {
            store_row(n, group * p.out_c + b * kern.channels + o, oh0 + t, out + o * columns_max + t * wp);
          }
        }
      }
    }
  });
}

// Packs the weights for the fp32 or the bf16 kernels and runs the engine on them.
template <typename WeightOf, typename FillRow, typename StoreRow>
void pack_and_run(const Problem& p, bool bf16, const at::TensorOptions& options, const WeightOf& weight_of,
                  const FillRow& fill_row, const StoreRow& store_row) {
  if (bf16) return run<true>(p, pack_weight_pairs(p, options, weight_of), fill_row, store_row);
  run<false>(p, pack_weights(p, options, weight_of), fill_row, store_row);
}

// Stores float rows into a 4-d tensor (y, dx: any strides, any dtype), adding `add` and applying the ReLU on the way.
template <typename scalar_t>
struct OutputRows {
  scalar_t* data;
  std::array<int64_t, 4> strides;
  int64_t width;
  explicit OutputRows(const at::Tensor& t)
      : data(t.mutable_data_ptr<scalar_t>()), strides{t.stride(0), t.stride(1), t.stride(2), t.stride(3)},
        width(t.size(3)) {}
  void operator()(int64_t n, int64_t c, int64_t r, const float* src, float add, bool relu) const {
    scalar_t* dst = data + n * strides[0] + c * strides[1] + r * strides[2];
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (strides[3] == 1) return bias_relu_row_f(src, add, relu, width, dst);
    }
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (strides[3] == 1) return bias_relu_row_bf16(src, add, relu, width, reinterpret_cast<uint16_t*>(dst));
    }
    for (int64_t i = 0; i < width; ++i) {
      const float v = src[i] + add;
      dst[i * strides[3]] = static_cast<scalar_t>(relu ? std::max(v, 0.f) : v);
    }
  }
};

// The sum of a dy' row in double (a row of a 700-wide map in one float sum would lose ~1e-5 of it), over four
// independent accumulators (one chain of dependent adds runs at the adder's latency, not its throughput).
inline double row_sum(const float* row, int64_t count) {
  double acc[4] = {0, 0, 0, 0};
  int64_t q = 0;
  for (; q + 4 <= count; q += 4) {
    for (int u = 0; u < 4; ++u) acc[u] += row[q + u];
  }
  for (; q < count; ++q) acc[0] += row[q];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// dW[k][c][i][j] = sum over pixels of dy'[k][oh][ow] x[c][oh + i - pad_h][ow + j - pad_w], and db[k] = sum of dy'[k],
// on the wide grid: per task the x planes as in the forward and dy' as wide rows (zero in the s - 1 pad columns of
// each row), then for each input channel, block of 8 output channels (4 with AVX2) and group of 3 taps one
// micro-kernel call over all the task's columns, which adds its 24 (12) sums into the thread's partial sums. Each
// thread's partials are added in thread order at the end (results are the same run to run).
// The wide grid's s - 1 extra columns per row multiply a zero dy' by real x values: an inf in x would turn a dW that
// PyTorch gives as +-inf into NaN (0 * inf). So each task checks the x planes it staged, and the call returns false
// (its sums dropped) when x holds an inf or NaN, for the caller's GEMM path, whose products are exactly the conv's.
// kBf16 (x and dy both bf16): the planes and dy' rows hold bf16 bit patterns for wgrad_block_bf16, which takes 2 kLanes
// columns a step; dy' is staged as floats first (its bias-gradient sum is taken there).
template <typename scalar_t, bool kBf16>
bool wgrad(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& y, const at::Tensor& x, bool relu,
           const at::Tensor& dw, const at::Tensor& db) {
  const Kernel& kern = kernel();
  const Problem p{g.n, g.groups, g.c_g, g.k_g, g.h, g.w, g.oh, g.ow, g.r, g.s, g.pad_h, g.pad_w};
  using Elem = std::conditional_t<kBf16, uint16_t, float>;
  const int64_t wp = p.wp(), k_pad = round_up(g.k_g, kern.wgrad_rows), granule = kBf16 ? 2 * kern.lanes : kern.lanes;
  const int64_t rows = rows_per_task(p, k_pad), bands = (g.oh + rows - 1) / rows;
  const int64_t columns_max = round_up(rows * wp, granule);
  const int64_t plane_len = round_up(columns_max + (g.r - 1) * wp + g.s - 1, 16);
  const int64_t taps = g.r * g.s, tap_groups = (taps + kWgradTaps - 1) / kWgradTaps;
  std::vector<int64_t> offsets(tap_groups * kWgradTaps, 0);  // past the last tap: a dummy tap whose sums are dropped
  for (int64_t t = 0; t < taps; ++t) offsets[t] = (t / g.s) * wp + t % g.s;
  const int64_t tasks = g.n * g.groups * bands;
  // Per thread: its partial sums, [group][k_pad / rows per call][c_g][tap_groups][rows per call][3] (one call's sums
  // adjacent) then [K], then the x planes and the dy' rows. Each thread zeroes its own partials when it starts (in
  // parallel, and they stay in its cache) and, when done, writes them into its row of `sums` ([K][c_g][taps] then
  // [K]), the rows of threads that got no task staying zero. kBf16: then a float row of columns_max to stage through.
  const int64_t call_sums = kern.wgrad_rows * kWgradTaps, per_block = g.c_g * tap_groups * call_sums;
  const int64_t part_w = g.groups * (k_pad / kern.wgrad_rows) * per_block;
  const int64_t parts_size = part_w + g.k, sums_w = g.k * g.c_g * taps + g.k;
  const int64_t operands = round_up((g.c_g * plane_len + k_pad * columns_max) * int64_t(sizeof(Elem)), 4) / 4;
  const int64_t staging = kBf16 ? columns_max : 0;
  const ThreadScratch scratch(spread_tasks(tasks), parts_size + operands + staging, x.options().dtype(at::kFloat));
  const at::Tensor sums = at::zeros({scratch.work.size(0), sums_w}, x.options().dtype(at::kFloat));
  std::vector<uint8_t> started(scratch.work.size(0), 0);  // one slot per thread: written by that thread only
  const InputRows<scalar_t, float> x_rows(x);
  const MaskedGradRows<scalar_t, float> dy_rows(grad, y, relu);
  std::atomic<bool> finite{true};
  run_tasks(tasks, scratch.spread, [&](int64_t begin, int64_t end) {
    const int64_t tid = scratch.spread ? at::get_thread_num() : 0;
    float* const part = scratch.mine<float>();
    float* const db_part = part + part_w;
    Elem* const planes = reinterpret_cast<Elem*>(part + parts_size);
    Elem* const dyw = planes + g.c_g * plane_len;
    float* const staged = part + parts_size + operands;  // kBf16 only
    if (started[tid] == 0) std::fill(part, part + parts_size, 0.f);
    started[tid] = 1;
    for (int64_t task = begin; task < end && finite; ++task) {
      const int64_t n = task / (g.groups * bands), group = task / bands % g.groups, band = task % bands;
      const int64_t oh0 = band * rows, count = std::min(rows, g.oh - oh0);
      const int64_t columns = round_up(count * wp, granule);
      stage_planes(p, n, group, oh0, count + g.r - 1, planes, plane_len, staged, x_rows);
      bool bad = false;
      if constexpr (kBf16) {
        bad = any_non_finite_bf16(planes, g.c_g * plane_len);
      } else {
        for (int64_t q = 0; q < g.c_g * plane_len; ++q) bad |= non_finite(planes[q]);
      }
      if (bad) {
        finite = false;
        break;
      }
      for (int64_t kk = 0; kk < k_pad; ++kk) {
        Elem* const dst = dyw + kk * columns_max;
        if (kk >= g.k_g) {
          std::fill(dst, dst + columns, Elem(0));
          continue;
        }
        float* const row = kBf16 ? staged : reinterpret_cast<float*>(dst);
        const int64_t k = group * g.k_g + kk;
        for (int64_t t = 0; t < count; ++t) {
          dy_rows(n, k, oh0 + t, row + t * wp);
          std::fill(row + t * wp + g.ow, row + (t + 1) * wp, 0.f);
        }
        std::fill(row + count * wp, row + columns, 0.f);
        db_part[k] += static_cast<float>(row_sum(row, count * wp));
        if constexpr (kBf16) f_row_to_bf16_bits(row, columns, dst);
      }
      float* const group_part = part + group * (k_pad / kern.wgrad_rows) * per_block;
      for (int64_t c = 0; c < g.c_g; ++c) {
        for (int64_t kb = 0; kb < k_pad; kb += kern.wgrad_rows) {
          float* const acc = group_part + (kb / kern.wgrad_rows) * per_block + c * tap_groups * call_sums;
          for (int64_t tg = 0; tg < tap_groups; ++tg) {
            const int64_t* const taps_of = offsets.data() + tg * kWgradTaps;
            if constexpr (kBf16) {
              kern.wgrad_bf16(dyw + kb * columns_max, columns_max, planes + c * plane_len, taps_of, columns,
                              acc + tg * call_sums);
            } else {
              kern.wgrad(dyw + kb * columns_max, columns_max, planes + c * plane_len, taps_of, columns,
                         acc + tg * call_sums);
            }
          }
        }
      }
    }
    float* const out = sums.data_ptr<float>() + tid * sums_w;
    for (int64_t k = 0; k < g.k; ++k) {
      const int64_t group = k / g.k_g, kk = k % g.k_g;
      const float* block = part + (group * (k_pad / kern.wgrad_rows) + kk / kern.wgrad_rows) * per_block;
      for (int64_t c = 0; c < g.c_g; ++c) {
        for (int64_t t = 0; t < taps; ++t) {
          out[(k * g.c_g + c) * taps + t] =
              block[(c * tap_groups + t / kWgradTaps) * call_sums + kk % kern.wgrad_rows * kWgradTaps + t % kWgradTaps];
        }
      }
      out[g.k * g.c_g * taps + k] = db_part[k];
    }
  });
  if (!finite) return false;
  const at::Tensor total = sums.sum(0);
  if (dw.defined()) dw.copy_(total.narrow(0, 0, g.k * g.c_g * taps).view({g.k, g.c_g, g.r, g.s}));
  if (db.defined()) db.copy_(total.narrow(0, g.k * g.c_g * taps, g.k));
  return true;
}

// The kernels' rows run along a map's width: each output row is one wide row of ow + s - 1 columns, chunked into
// vectors. A map much taller than wide (the frame strips of fcnkern.background: 8 x 8 x 260 x 1, 8 x 64 x 23 x 5)
// computes mostly padding columns that way, and is computed as its transpose instead: H and W swapped in the
// geometry, the weight a transposed view, x, y and dy transposed copies, y and dx written transposed and copied back.
// Measured (2-core Xeon, fp32, batch 8, 3 x 3, forward + backward as it is -> transposed): 8 ch 260 x 1 0.92 -> 0.40
// ms, 16 ch 127 x 2 1.03 -> 0.64, 32 ch 58 x 4 1.75 -> 1.22, 64 ch 23 x 5 2.67 -> 2.27, 64 ch 17 x 7 2.40 -> 2.10
// (bench/blocked_orientation.py), but 32 ch 38 x 10 1.38 -> 1.44, 16 ch 58 x 12 0.87 -> 0.91 and 64 ch 35 x 17
// 5.4 -> 7.9: from ten outputs a row, the copies and the shorter rows cost more than the columns saved.
// FCNKERN_CONV_BLOCKED_TRANSPOSE: "0" keeps every map as it is, "all" transposes every map taller than wide (the
// tests reach the transposed path on small shapes so). Read per call, for A/B measurements in one process.
bool runs_transposed(const ConvGeometry& g) {
  const std::string_view mode = env_setting("FCNKERN_CONV_BLOCKED_TRANSPOSE");
  if (mode == "0") return false;
  return g.ow < g.oh && (mode == "all" || g.ow < 10);
}

ConvGeometry transposed(const ConvGeometry& g) {
  ConvGeometry t = g;
  std::swap(t.h, t.w);
  std::swap(t.r, t.s);
  std::swap(t.oh, t.ow);
  std::swap(t.stride_h, t.stride_w);
  std::swap(t.pad_h, t.pad_w);
  std::swap(t.dil_h, t.dil_w);
  return t;
}

at::Tensor hw_swapped(const at::Tensor& t) { return t.transpose(2, 3); }

// The transposed map as a contiguous copy: the row loaders and stores take a transposed view element by element with
// a stride, and on views 8 x 32 x 56 x 5's dx and dW took 440 us, on copies 325-365 (on a 7 x 56 map as it is: 220).
at::Tensor hw_swapped_copy(const at::Tensor& t) { return t.transpose(2, 3).contiguous(); }

}  // namespace

bool bf16_dot_products(std::initializer_list<at::ScalarType> operands) {
  for (const at::ScalarType t : operands) {
    if (t != at::kBFloat16) return false;
  }
  return kernel().block_bf16 != nullptr && env_setting("FCNKERN_CONV_BF16_DOT") != "0";
}

at::Tensor pack_bf16_left(const at::Tensor& a) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kBFloat16, "pack_bf16_left: a 2-d bf16 matrix");
  const int64_t rows = a.size(0), depth = a.size(1), kb = kernel().channels;
  const int64_t blocks = (rows + kb - 1) / kb, pairs = (depth + 1) / 2;
  at::Tensor packed = at::zeros({blocks, pairs, kb}, a.options().dtype(at::kInt));
  auto* const dst = reinterpret_cast<uint32_t*>(packed.mutable_data_ptr<int32_t>());
  const auto* const src = reinterpret_cast<const uint16_t*>(a.const_data_ptr<at::BFloat16>());
  const int64_t s0 = a.stride(0), s1 = a.stride(1);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t valid = std::min(kb, rows - b * kb);
      uint32_t* const out = dst + b * pairs * kb;
      if (s1 == 1) {  // rows along K: a row's pair is two adjacent values
        for (int64_t r = 0; r < valid; ++r) {
          const uint16_t* row = src + (b * kb + r) * s0;
          for (int64_t p = 0; p < depth / 2; ++p) out[p * kb + r] = row[2 * p] | uint32_t(row[2 * p + 1]) << 16;
          if (depth % 2 != 0) out[depth / 2 * kb + r] = row[depth - 1];
        }
      } else {  // columns along M (a transposed weight): a block's 8 values of a pair's two rows are runs of s0
        for (int64_t p = 0; p < pairs; ++p) {
          const uint16_t* lo = src + b * kb * s0 + 2 * p * s1;
          const uint16_t* hi = lo + s1;
          const bool has_hi = 2 * p + 1 < depth;
          for (int64_t r = 0; r < valid; ++r) out[p * kb + r] = lo[r * s0] | (has_hi ? uint32_t(hi[r * s0]) << 16 : 0u);
        }
      }
    }
  });
  return packed;
}

at::Tensor pack_bf16_right(const at::Tensor& b) {
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kBFloat16, "pack_bf16_right: a 2-d bf16 matrix");
  const int64_t depth = b.size(0), n = b.size(1), pairs = (depth + 1) / 2, n_pad = round_up(n, kernel().chunk);
  at::Tensor packed = at::empty({pairs, n_pad}, b.options().dtype(at::kInt));
  auto* const dst = reinterpret_cast<uint32_t*>(packed.mutable_data_ptr<int32_t>());
  const auto* const src = reinterpret_cast<const uint16_t*>(b.const_data_ptr<at::BFloat16>());
  const int64_t s0 = b.stride(0), s1 = b.stride(1);
  if (s1 == 1 || s0 != 1) {  // rows along N (im2col columns, dy): a pair is the same column of two rows
    at::parallel_for(0, pairs, 8, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const uint16_t* lo = src + 2 * p * s0;
        uint32_t* out = dst + p * n_pad;
        if (2 * p + 1 < depth) {
          const uint16_t* hi = lo + s0;
          for (int64_t c = 0; c < n; ++c) out[c] = lo[c * s1] | uint32_t(hi[c * s1]) << 16;
        } else {
          for (int64_t c = 0; c < n; ++c) out[c] = lo[c * s1];
        }
        std::fill(out + n, out + n_pad, 0u);
      }
    });
  } else {  // columns along K (im2col columns transposed, for dW): a pair is two adjacent values of a column
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const uint16_t* col = src + c * s1;
        for (int64_t p = 0; p < depth / 2; ++p) dst[p * n_pad + c] = col[2 * p] | uint32_t(col[2 * p + 1]) << 16;
        if (depth % 2 != 0) dst[depth / 2 * n_pad + c] = col[depth - 1];
      }
    });
    at::parallel_for(0, pairs, 8, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) std::fill(dst + p * n_pad + n, dst + (p + 1) * n_pad, 0u);
    });
  }
  return packed;
}

void gemm_bf16(const at::Tensor& out, const at::Tensor& left, const at::Tensor& right, int64_t depth,
               bool overwrite) {
  const Kernel& kern = kernel();
  TORCH_CHECK(kern.block_bf16 != nullptr, "gemm_bf16: this CPU has no AVX512-BF16");
  const int64_t m = out.size(0), n = out.size(1), kb = kern.channels, pairs = (depth + 1) / 2;
  const int64_t blocks = (m + kb - 1) / kb, n_pad = round_up(n, kern.chunk);
  TORCH_CHECK(out.scalar_type() == at::kFloat && left.size(0) == blocks && left.size(1) == pairs &&
                  right.size(0) == pairs && right.size(1) == n_pad,
              "gemm_bf16: operands packed for another shape");
  if (m == 0 || n == 0) return;
  // Tasks: (panel of columns, block of kb rows), a panel's blocks adjacent so that a thread's run of tasks reads the
  // same columns of the right operand; each computes a kb x panel tile and stores its valid part.
  const int64_t panel = std::min<int64_t>(n_pad, 4 * kern.chunk), panels = (n_pad + panel - 1) / panel;
  const auto* const lp = reinterpret_cast<const uint32_t*>(left.const_data_ptr<int32_t>());
  const auto* const rp = reinterpret_cast<const uint32_t*>(right.const_data_ptr<int32_t>());
  float* const op = out.mutable_data_ptr<float>();
  const int64_t o0 = out.stride(0), o1 = out.stride(1);
  at::parallel_for(0, panels * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(kb * panel);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t q0 = task / blocks * panel, blk = task % blocks;
      const int64_t width = std::min(panel, n_pad - q0), valid = std::min(width, n - q0);
      kern.block_bf16(rp + q0, n_pad, pairs, lp + blk * pairs * kb, 1, 1, 0, width, tile.data(), panel);
      for (int64_t r = 0; r < kb && blk * kb + r < m; ++r) {
        float* dst = op + (blk * kb + r) * o0 + q0 * o1;
        const float* row = tile.data() + r * panel;
        if (overwrite) {
          for (int64_t c = 0; c < valid; ++c) dst[c * o1] = row[c];
        } else {
          for (int64_t c = 0; c < valid; ++c) dst[c * o1] += row[c];
        }
      }
    }
  });
}

bool use_blocked(const ConvGeometry& g, BlockedPass pass) {
  // FCNKERN_CONV_BLOCKED: "0" never; "fwd" the forward only; "all" both passes on every geometry they can compute
  // (the tests reach them so). Read per call, for A/B measurements in one process.
  const std::string_view mode = env_setting("FCNKERN_CONV_BLOCKED");
  if (mode == "0" || (mode == "fwd" && pass != BlockedPass::kForward) || kernel().block == nullptr) return false;
  const bool computable = g.stride_h == 1 && g.stride_w == 1 && g.dil_h == 1 && g.dil_w == 1 &&
                          (pass != BlockedPass::kDgrad || (g.pad_h < g.r && g.pad_w < g.s));
  if (mode == "all") return computable;
  // Up to 64 channels reduced (x's per group forward, dy's for dx) the weights of a block of outputs stay in L1 and a
  // task's input rows in L2; there it ran at 1.0-1.6x oneDNN's convolution where im2col + GEMM ran at 0.55-0.85x
  // (2-core Zen 5, fp32, forward, VGG 3 x 3 layers at 1/8 width). From 128 channels on its blocks hold few rows and
  // it lost to im2col (1 x 256 x 29^2: 3.2 vs 3.1 ms; 1 x 512 x 29^2: 16.5 vs 12.5).
  // The forward also needs at most 64 outputs: the GEMM's N grows with them while the blocked kernel's rate does not,
  // and fc6 at 1/8 width (64 -> 512, 7 x 7 on 9^2) ran at 3.5 ms blocked vs 1.6 ms im2col (64 -> 128: 0.86 vs
  // 0.60; at 64 outputs they are even). dx has no such limit on its outputs (x's channels): im2col's dx pays the
  // col2im scatter, and the blocked dx was 1.3-1.7x faster up to 512 of them (8 x 512 x 9^2 from 64).
  // dW likewise from 8 to 64 channels in and up to 64 out (forward + backward at 1/8 width: 0.66-1.0x im2col's
  // time). An RGB layer's dW is a 27-deep reduction that im2col's one GEMM does better (conv1_1, 8 x 3 x 64^2 with
  // padding 100, forward + backward: 13.4 vs 5.9 ms). A 1 x 1 kernel keeps the shifted GEMMs, which have no taps to
  // share.
  if (g.r * g.s == 1) return false;
  if (pass == BlockedPass::kWgrad) return computable && g.c_g >= 8 && g.c_g <= 64 && g.k_g <= 64;
  if (pass == BlockedPass::kForward) return computable && g.c_g <= 64 && g.k_g <= 64;
  return computable && g.k_g <= 64;
}

void blocked_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& y, const ConvGeometry& g, bool relu) {
  if (runs_transposed(g)) {
    const at::Tensor yt = at::empty_like(hw_swapped(y), at::MemoryFormat::Contiguous);
    blocked_forward(hw_swapped_copy(x), hw_swapped(weight), bias, yt, transposed(g), relu);
    hw_swapped(y).copy_(yt);
    return;
  }
  const Problem p{g.n, g.groups, g.c_g, g.k_g, g.h, g.w, g.oh, g.ow, g.r, g.s, g.pad_h, g.pad_w};
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* wd = w.const_data_ptr<float>();
  const float* bd = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const auto weight_of = [&](int64_t grp, int64_t o, int64_t c, int64_t i, int64_t j) {
    return wd[(((grp * g.k_g + o) * g.c_g + c) * g.r + i) * g.s + j];
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_relu_blocked", [&] {
    const OutputRows<scalar_t> out(y);
    pack_and_run(p, bf16_dot_products({x.scalar_type(), weight.scalar_type()}), x.options(), weight_of,
                 InputRows<scalar_t, float>(x), [&](int64_t n, int64_t k, int64_t oh, const float* src) {
                   out(n, k, oh, src, bd != nullptr ? bd[k] : 0.f, relu);
                 });
  });
}

void blocked_dgrad(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& dx,
                  const ConvGeometry& g, bool relu) {
  if (runs_transposed(g)) {
    const at::Tensor dxt = at::empty_like(hw_swapped(dx), at::MemoryFormat::Contiguous);
    blocked_dgrad(hw_swapped_copy(grad), hw_swapped_copy(y), hw_swapped(weight), dxt, transposed(g), relu);
    hw_swapped(dx).copy_(dxt);
    return;
  }
  const Problem p{g.n, g.groups, g.k_g, g.c_g, g.oh, g.ow, g.h, g.w, g.r, g.s, g.r - 1 - g.pad_h, g.s - 1 - g.pad_w};
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const float* wd = w.const_data_ptr<float>();
  // dx's output c reads dy' channel k through W[k][c] flipped in both axes.
  const auto weight_of = [&](int64_t grp, int64_t c, int64_t k, int64_t i, int64_t j) {
    return wd[(((grp * g.k_g + k) * g.c_g + c) * g.r + (g.r - 1 - i)) * g.s + (g.s - 1 - j)];
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "conv2d_relu_blocked_dgrad", [&] {
    const OutputRows<scalar_t> out(dx);
    pack_and_run(p, bf16_dot_products({grad.scalar_type(), weight.scalar_type()}), dx.options(), weight_of,
                 MaskedGradRows<scalar_t, float>(grad, y, relu),
                 [&](int64_t n, int64_t c, int64_t ih, const float* src) { out(n, c, ih, src, 0.f, false); });
  });
}

bool blocked_wgrad(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& x, const ConvGeometry& g, bool relu,
                   bool need_w, bool need_b, at::Tensor& dw, at::Tensor& db) {
  if (runs_transposed(g)) {
    const bool done = blocked_wgrad(hw_swapped_copy(grad), hw_swapped_copy(y), hw_swapped_copy(x), transposed(g),
                                    relu, need_w, need_b, dw, db);
    if (dw.defined()) dw = hw_swapped(dw).contiguous();
    return done;
  }
  dw = need_w ? at::empty({g.k, g.c_g, g.r, g.s}, x.options().dtype(at::kFloat)) : at::Tensor();
  db = need_b ? at::empty({g.k}, x.options().dtype(at::kFloat)) : at::Tensor();
  bool done = false;
  const bool bf16 = bf16_dot_products({x.scalar_type(), grad.scalar_type()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_relu_blocked_wgrad", [&] {
    done = bf16 ? wgrad<scalar_t, true>(g, grad, y, x, relu, dw, db) : wgrad<scalar_t, false>(g, grad, y, x, relu, dw, db);
  });
  if (!done) dw = db = at::Tensor();
  return done;
}

}  // namespace fcnkern
