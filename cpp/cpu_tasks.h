// Task running and GEMM helpers shared by the CPU kernels that block their work and call ATen's BLAS GEMM.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "large_block_cache.h"

namespace fcnkern {

// Runs body(begin, end) over [0, tasks): spread across threads when there are enough tasks to go round, else on
// this thread, so that the GEMMs inside get ATen's threads instead (fc6 / fc7 have one or two pixel blocks).
inline bool spread_tasks(int64_t tasks) { return tasks >= 2 * at::get_num_threads(); }

template <typename Body>
void run_tasks(int64_t tasks, bool spread, const Body& body) {
  if (spread) {
    at::parallel_for(0, tasks, 1, body);
  } else {
    body(0, tasks);
  }
}

// Each thread's scratch for run_tasks: one block of the large-block cache for all threads, uninitialised (fresh
// pages per call were 7 % of conv3_2's Winograd forward in page faults; std::vector's zeroed ones, with the heap
// trimmed and regrown around them, a sixth of a 64-channel im2col forward).
struct ThreadScratch {
  at::Tensor work;
  bool spread;
  // spread: whether run_tasks spreads the tasks over threads (spread_tasks(tasks) unless the caller decides).
  ThreadScratch(bool spread_over_threads, int64_t per_thread, const at::TensorOptions& options)
      : spread(spread_over_threads) {
    const int64_t threads = spread ? at::get_num_threads() : 1;
    work = empty_scratch({threads, per_thread}, options);
  }
  template <typename T>
  T* mine() const {  // every element must be written before it is read
    return work.data_ptr<T>() + (spread ? at::get_thread_num() : 0) * work.size(1);
  }
};

// `total` columns cut into `count` near-equal blocks of about `max_block` at most, each starting on a multiple of 16
// columns (so block widths, the GEMM output's row stride, stay multiples of 16 but for the last; unaligned widths
// cost a few percent). Where `outer` x count tasks are spread over threads, the count is rounded up to make that a
// multiple of the thread count.
// Before, full blocks and a short last one left threads unevenly loaded (conv5_1's forward, 6 blocks on 2 threads:
// 1152 vs 872 columns; conv4_2's 21 blocks: 11 vs 10); evened, the deep 3x3 layers' forward took 2-7 % less time
// and their forward + backward 0-4 % (A/B interleaved in one process).
struct EvenBlocks {
  int64_t total, count;
  EvenBlocks(int64_t total_columns, int64_t max_block, int64_t outer)
      : total(total_columns), count(std::max<int64_t>(1, (total_columns + max_block - 1) / max_block)) {
    // Only where the tasks are spread anyway: a cut into more blocks would spread fc7's backward, with a 64 MB
    // weight-gradient accumulator per thread (peak 213 MB against 80).
    if (!spread_tasks(outer * count)) return;
    const int64_t threads = at::get_num_threads();
    while ((outer * count) % threads != 0 && (count + 1) * 16 <= total) ++count;
  }
  int64_t begin(int64_t b) const { return b >= count ? total : total * b / count / 16 * 16; }
  int64_t size(int64_t b) const { return begin(b + 1) - begin(b); }
  // Blocks start at most 15 columns before their even share, so none is wider than the share + 16.
  int64_t max_size() const { return std::min(total, (total + count - 1) / count + 16); }
};

// A contiguous rows x cols acc_t matrix over a raw buffer, for at::mm_out / addmm_.
inline at::Tensor matrix(void* data, int64_t rows, int64_t cols, at::ScalarType acc) {
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(acc));
}

// Which GEMM library the CPU kernels' fp32 GEMMs go to. Both are linked by ATen: MKL through at::mm, oneDNN through
// its matmul primitive (the op mkldnn::_linear_pointwise, reached through the dispatcher since oneDNN's own symbols
// are not exported). Measured on a 2-core AMD EPYC (Zen 5, AVX-512): MKL 100 GFLOP/s per core on the conv GEMMs
// (it takes its AVX2 path on AMD), oneDNN 150-236, the rate of ATen's own oneDNN convolution. On the Intel Xeon of
// earlier sessions MKL ran within ~10 % of oneDNN's convolution; oneDNN's matmul was not measured there.
// FCNKERN_CPU_GEMM=mkl or =onednn chooses; by default oneDNN where this torch has the op, else MKL.
enum class GemmLibrary { kMkl, kOneDnn };

inline const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op = []() -> std::optional<c10::OperatorHandle> {
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value() || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    return handle;
  }();
  return op.has_value() ? &*op : nullptr;
}

inline GemmLibrary gemm_library() {
  static const GemmLibrary library = [] {
    const char* env = std::getenv("FCNKERN_CPU_GEMM");
    const std::string choice = env != nullptr ? env : "";
    TORCH_CHECK(choice.empty() || choice == "mkl" || choice == "onednn",
                "FCNKERN_CPU_GEMM must be 'mkl' or 'onednn', got '", choice, "'");
    TORCH_CHECK(choice != "onednn" || onednn_linear_op() != nullptr,
                "FCNKERN_CPU_GEMM=onednn: this torch has no oneDNN matmul (mkldnn::_linear_pointwise on CPU)");
    if (choice == "mkl" || onednn_linear_op() == nullptr) return GemmLibrary::kMkl;
    return GemmLibrary::kOneDnn;
  }();
  return library;
}

inline const char* gemm_library_name() { return gemm_library() == GemmLibrary::kOneDnn ? "onednn" : "mkl"; }

inline bool dense_rows(const at::Tensor& m) { return m.stride(1) == 1 && m.stride(0) == m.size(1); }

// a @ b through oneDNN's inner product, which computes X @ W^T: X = a, W = b^T (a view of b). Both must be dense
// row-major: with a row stride past the width (the shifted GEMMs' views) oneDNN falls back to its reference kernel,
// 1000x slower, so such an operand is copied first (use_onednn bounds what that costs).
inline at::Tensor onednn_mm(const at::Tensor& a, const at::Tensor& b) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(dense_rows(a) ? a : a.contiguous());
  stack.emplace_back((dense_rows(b) ? b : b.contiguous()).t());
  stack.emplace_back(c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  onednn_linear_op()->callBoxed(&stack);
  return std::move(stack[0]).toTensor();
}

// at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha): result = beta * result + alpha * mat1 @ mat2 through
// oneDNN, written in place (its sum post-op does the accumulation). ATen exports it but ships no header, so it is
// looked up at run time: a torch without it, with another signature (older ones took a non-const result) or a CPU
// it refuses fp32 on (it wants AVX-512 BW/VL/DQ) gets nullptr, and onednn_mm's fresh product serves instead. In
// place saves the product's copy or add into the block: 129 + 74 ms of a 1.44 s FCN-8s CPU training step.
using MatmulInto = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float, float);

inline MatmulInto onednn_matmul_into() {
  static const MatmulInto fn = []() -> MatmulInto {
    const char* env = std::getenv("FCNKERN_ONEDNN_IN_PLACE");  // "0": the fresh-product path (tests reach it so)
    if (env != nullptr && std::string(env) == "0") return nullptr;
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    void* sym = lib != nullptr ? dlsym(lib, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff") : nullptr;
    if (sym == nullptr) return nullptr;
    const auto candidate = reinterpret_cast<MatmulInto>(sym);
    try {  // one small product, accumulated, to prove it runs here and means what the comment says
      const at::Tensor a = at::arange(6, at::kFloat).view({2, 3}), b = at::arange(12, at::kFloat).view({3, 4});
      at::Tensor out = at::ones({2, 4}, at::kFloat);
      candidate(a, b, out, 1.f, 1.f);
      if (!at::equal(out, at::mm(a, b) + 1)) return nullptr;
    } catch (const std::exception&) {
      return nullptr;
    }
    return candidate;
  }();
  return fn;
}

// Where oneDNN pays (measured per layer, fp32, the 2-core Zen 5). Without the in-place matmul, its op returns a
// fresh product that is then copied or added into `out`. That is cheap where the inner dimension is long (a pass
// over the output per 2 x inner flops) or the product fits in L2 (kOneDnnCachedOutput floats); the left operand
// must be row-major or be copied into rows at most once per kOneDnnMinInner output columns. What stays on MKL on
// that path: fc6's and fc7's weight gradient (81 pixels at 256 x 256, a 411 MB product) and dx (a 411 MB transposed
// weight over 81 columns), 1.8-2.1x slower through oneDNN, and conv1_2's dx GEMMs (inner dimension 64, product
// 576 x 2k): 250 vs 215 ms backward.
constexpr int64_t kOneDnnMinInner = 128;
constexpr int64_t kOneDnnCachedOutput = int64_t{1} << 18;

// Row-major, or the transpose of a row-major matrix: the two layouts oneDNN's matmul reads without a copy.
inline bool dense_either_way(const at::Tensor& m) {
  return dense_rows(m) || (m.stride(0) == 1 && m.stride(1) == m.size(0));
}

inline bool use_onednn(const at::Tensor& out, const at::Tensor& a) {
  if (gemm_library() != GemmLibrary::kOneDnn || out.scalar_type() != at::kFloat) return false;
  // One-row products stay on MKL: the in-place matmul corrupts the heap on them (with a transposed right operand,
  // beta = 1, an inner dimension from about 1100 and 64 or more columns; torch 2.14.1 on a 2-core Xeon),
  // while every other shape of M in {1, 2, 3, 8, 17} x N in {1, 2, 64, 300} x K in {100, 1500, 5000}, in both
  // operand layouts and both betas, gave the right product. A conv with one output channel per group reached it
  // through its weight gradient (tests/test_conv_relu.py::test_cpu_one_output_channel_weight_gradient).
  if (out.size(0) == 1) return false;
  // In place, every GEMM pays (FCN layers at 256 x 256, backward ms, the rules below -> all, transposed left
  // operands read as they lie: conv1_2 182 -> 140, fc6 323 -> 209, fc7 52 -> 36, the rest within noise); only a
  // strided left operand over few columns, which would be copied per call, stays on MKL.
  if (onednn_matmul_into() != nullptr) return dense_either_way(a) || out.size(1) >= kOneDnnMinInner;
  const bool cheap_output = a.size(1) >= kOneDnnMinInner || out.numel() <= kOneDnnCachedOutput;
  return cheap_output && (dense_rows(a) || out.size(1) >= kOneDnnMinInner);
}

// A weight that is the left operand of many GEMMs over `columns` output columns in all, in the layout the chosen
// library reads fastest: MKL, and oneDNN's in-place matmul, read a transposed view as it is; for the fresh-product
// path it is made row-major once, where the GEMMs are wide enough to repay that copy (not fc6's 411 MB weight over
// 81 pixels).
inline at::Tensor gemm_left(const at::Tensor& a, int64_t columns) {
  const bool onednn = gemm_library() == GemmLibrary::kOneDnn && a.scalar_type() == at::kFloat;
  if (!onednn || onednn_matmul_into() != nullptr) return a;
  return a.size(-1) >= kOneDnnMinInner && columns >= 256 ? a.contiguous() : a;
}

// out = a @ b when `overwrite`, else out += a @ b: the first of a run of GEMMs accumulating into one block.
inline void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool overwrite) {
  if (use_onednn(out, a)) {
    if (const MatmulInto into = onednn_matmul_into(); into != nullptr) {
      into(dense_either_way(a) ? a : a.contiguous(), b, out, overwrite ? 0.f : 1.f, 1.f);
      return;
    }
    const at::Tensor product = onednn_mm(a, b);
    if (overwrite) {
      out.copy_(product);
    } else {
      out.add_(product);
    }
  } else if (overwrite) {
    at::mm_out(out, a, b);
  } else {
    out.addmm_(a, b);
  }
}

// dst[c * rows + r] = src[r * cols + c], in 32 x 32 tiles spread over threads. The conv kernels move weights
// between K x C x taps and taps x K x C with it: ATen's copy of the permuted view ran at ~2 GB/s (4.7 ms per 512 x
// 512 x 3 x 3 weight, 47 ms of an FCN-8s training step).
template <typename T>
void transpose_into(const T* src, int64_t rows, int64_t cols, T* dst) {
  constexpr int64_t kTile = 32;
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  at::parallel_for(0, row_tiles * col_tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile / col_tiles * kTile, c0 = tile % col_tiles * kTile;
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
      }
    }
  });
}

// Per-thread, per-group gradient accumulators (threads x groups x ...) that start uninitialised: the first GEMM of
// a thread into its group's slot overwrites it (beta = 0), later ones add. Zero-filling them up front cost a pass over
// threads x the weight's size per layer, page faults included (fc6's 411 MB at a 256 x 256 input: ~100 ms of a
// 2.2 s FCN-8s training step). A slot is written only by its own thread, so the flags need no lock.
// The block comes from the large-block cache, resident: a fresh weight-sized block per call paid a page fault per
// 4 KiB on its first write (fc6's 411 MB at a 256 x 256 input: dW 191 -> 89 ms; a register-blocked outer-product
// kernel in place of the GEMM, tried on the way, was no faster than MKL once the faults were gone: 93 ms).
class LazyParts {
 public:
  // sizes: threads x groups x the slot's shape.
  LazyParts(at::IntArrayRef sizes, const at::TensorOptions& options)
      : parts_(empty_large(sizes, options, at::MemoryFormat::Contiguous)),
        started_(parts_.size(0) * parts_.size(1), 0) {}

  // Runs gemms(slot, overwrite) on thread tid's slot for `group`, overwrite being true on the slot's first use.
  template <typename Gemms>
  void accumulate(int64_t tid, int64_t group, const Gemms& gemms) {
    gemms(parts_[tid][group], first_use(tid, group));
    started_[tid * parts_.size(1) + group] = 1;
  }

  // The sum over threads (in thread order, so deterministic), slots that no task reached counting as zero.
  at::Tensor total() {
    for (int64_t t = 0; t < parts_.size(0); ++t) {
      for (int64_t gi = 0; gi < parts_.size(1); ++gi) {
        if (first_use(t, gi)) parts_[t][gi].zero_();
      }
    }
    // Summed into the first thread's slot: no third weight-sized buffer at the backward's peak.
    at::Tensor sum = parts_[0];
    for (int64_t t = 1; t < parts_.size(0); ++t) sum.add_(parts_[t]);
    return sum;
  }

 private:
  bool first_use(int64_t tid, int64_t group) const { return started_[tid * parts_.size(1) + group] == 0; }

  at::Tensor parts_;
  std::vector<uint8_t> started_;
};

}  // namespace fcnkern
