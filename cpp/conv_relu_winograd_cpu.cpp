// Winograd convolution for the CPU's stride-1 3 x 3 layers (Lavin & Gray, "Fast Algorithms for Convolutional
// Neural Networks", 2016): F(m x m, 3 x 3) for the forward (bias + ReLU in the output transform) and for dx,
// F(3 x 3, 2 x 2) for dW.
//
// Why: VGG's 3 x 3 layers are compute-bound, and both oneDNN's direct convolution (eager PyTorch) and this
// library's shifted GEMMs ran near the FMA peak of the CPU, so the only way past eager is fewer multiplications.
// F(m x m, 3 x 3) computes an m x m output tile from an (m + 2) x (m + 2) input tile with (m + 2)^2 products instead
// of 9 m^2: 2.25x fewer for m = 2, 4x for m = 4, the products being (m + 2)^2 GEMMs over channels per block of tiles.
//
// Per (image, group, block of output tiles), with alpha = m + 2:
//   V[xi][c][t] = (B^T d_{c,t} B)[xi]       input transform of the tile's alpha x alpha patch of the padded input
//   M[xi]       = U[xi] @ V[xi]              alpha^2 GEMMs, K/G x C/G times C/G x tiles (U = G g G^T, per call)
//   y_{k,t}     = A^T M_{k,t} A              output transform, then bias, ReLU, conversion and a strided store
// Each task first copies the band of input rows under its tiles into zero-padded plane rows (m * tiles + 2
// columns), so the transforms need no bounds tests: a tile past the output's edge reads zeros there and its extra
// outputs are not stored.
//
// dx: at stride 1, dx = conv_transpose(dy', W) is a 3 x 3 convolution of dy' = dy * (y > 0) with the weight
// flipped in both spatial axes and its two channel axes swapped, at padding 2 - pad; the same code computes it.
// dW: per 2 x 2 output tile, the correlation of the 4 x 4 input patch with the tile's dy' (WinogradWgrad).
//
// Numerics: the transforms' constants are exact in binary for m = 2 (0.5, +-1) and the products are summed over
// channels by the GEMM as in a direct convolution: fp32 errors measured at ~1.5x PyTorch's. m = 4's constants
// (1/6, 1/24, 4, 8) cost about a decimal digit (~10x PyTorch's), which is one reason it is not the default.
#include "conv_relu_winograd_cpu.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <optional>
#include <string_view>
#include <type_traits>

#include "common.h"
#include "cpu_math.h"
#include "cpu_row_sources.h"
#include "cpu_tasks.h"
#include "large_block_cache.h"

namespace fcnkern {
namespace {

// The transforms: B^T (alpha x alpha), G (alpha x 3), A^T (m x alpha).
template <int M>
struct Winograd;

template <>
struct Winograd<2> {
  static constexpr int kAlpha = 4;
  static constexpr double kBT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr double kG[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  static constexpr double kAT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

template <>
struct Winograd<4> {
  static constexpr int kAlpha = 6;
  static constexpr double kBT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                       {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr double kG[6][3] = {{1.0 / 4, 0, 0},
                                      {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                      {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                      {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                      {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                      {0, 0, 1}};
  static constexpr double kAT[4][6] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};

// F(3 x 3, 2 x 2), the weight gradient's: per 2 x 2 tile of output pixels, the correlation of the tile's 4 x 4
// input patch d with its 2 x 2 block of dy' gives a 3 x 3 contribution to dW, A^T [(G dy' G^T) . (B^T d B)] A.
// The products sum over tiles (a GEMM over tiles per transform element), and A^T . A is applied once at the end.
struct WinogradWgrad {
  static constexpr double kBT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, -1, 0, 1}};
  static constexpr double kG[4][2] = {{1, 0}, {0.5, 0.5}, {0.5, -0.5}, {0, 1}};
  static constexpr double kAT[3][4] = {{1, 1, 1, 0}, {0, 1, -1, 0}, {0, 1, 1, 1}};
};

// sum_c Mat[r][c] * v[c] with the coefficients as compile-time constants: zero terms vanish, +-1 cost no multiply
// (the table read at run time costs a compare per term; the transforms were then slower than the GEMMs).
template <typename T, const auto& Mat, int R, int C>
inline __attribute__((always_inline)) void add_terms(T& sum, bool& any, const T* v) {
  if constexpr (C < static_cast<int>(std::extent_v<std::remove_reference_t<decltype(Mat)>, 1>)) {
    constexpr double coef = Mat[R][C];
    if constexpr (coef != 0) {
      T term;
      if constexpr (coef == 1) {
        term = v[C];
      } else if constexpr (coef == -1) {
        term = -v[C];
      } else {
        term = static_cast<T>(coef) * v[C];
      }
      sum = any ? sum + term : term;
      any = true;
    }
    add_terms<T, Mat, R, C + 1>(sum, any, v);
  }
}

template <typename T, const auto& Mat, int R>
inline __attribute__((always_inline)) void matrix_rows(T* out, const T* v) {
  if constexpr (R < static_cast<int>(std::extent_v<std::remove_reference_t<decltype(Mat)>, 0>)) {
    T sum = T(0);
    bool any = false;
    add_terms<T, Mat, R, 0>(sum, any, v);
    out[R] = sum;
    matrix_rows<T, Mat, R + 1>(out, v);
  }
}

// The 2-d transform Mat X Mat^T of one lane's C x C tile, for each lane i < len:
//   out[(a * R + b) * os + i] = sum_{k, l} Mat[a][k] * X[k][l] * Mat[b][l],
//   X[k][l] = in[k * sk + (l % P) * sp + (l / P) * sq + i].
// Every tile element is a unit-stride stream over the lanes (tiles) at a loop-invariant offset from one base
// pointer, so the loop vectorises across tiles with the tile in registers: one pass, no intermediate rows. (Two
// separable passes through a scratch row cost a quarter of the forward's time; an array of element pointers
// kept GCC from vectorising at all, as did inner loops it had not unrolled before vectorising, and `omp simd`,
// whose per-lane copies of the local arrays it could not vectorise: hence unroll and ivdep.)
template <typename T, const auto& Mat, int P>
inline __attribute__((always_inline)) void apply_2d(const T* __restrict__ in, int64_t sk, int64_t sp, int64_t sq,
                                                    T* __restrict__ out, int64_t os, int64_t len) {
  using Table = std::remove_reference_t<decltype(Mat)>;
  constexpr int kR = std::extent_v<Table, 0>, kC = std::extent_v<Table, 1>;
#pragma GCC ivdep
  for (int64_t i = 0; i < len; ++i) {
    T half[kR][kC];
#pragma GCC unroll 8
    for (int l = 0; l < kC; ++l) {
      T column[kC], mixed[kR];
#pragma GCC unroll 8
      for (int k = 0; k < kC; ++k) column[k] = in[k * sk + (l % P) * sp + (l / P) * sq + i];
      matrix_rows<T, Mat, 0>(mixed, column);
#pragma GCC unroll 8
      for (int a = 0; a < kR; ++a) half[a][l] = mixed[a];
    }
#pragma GCC unroll 8
    for (int a = 0; a < kR; ++a) {
      T res[kR];
      matrix_rows<T, Mat, 0>(res, half[a]);
#pragma GCC unroll 8
      for (int b = 0; b < kR; ++b) out[(a * kR + b) * os + i] = res[b];
    }
  }
}

// The convolution the code computes: `c` input channels of h x w into `k` output channels of oh x ow, 3 x 3,
// stride 1, in `groups` groups, padding (pad_h, pad_w).
struct WinogradProblem {
  int64_t c, k, groups, c_g, k_g, h, w, oh, ow, pad_h, pad_w;
};

// Output tiles of m x m, and the zero-padded input plane they read: m * tiles + 2 rows and columns. Each plane row
// is stored phase-major, column x at (x % m) * phase + x / m with phase = tiles per row + 1 slots, so that the
// transforms' taps at columns m * t + j are unit-stride runs over t (a stride-m gather vectorises poorly).
// A block of tiles reads only the band of plane rows under its tile rows, which its task fills itself: no plane of
// the whole image is ever allocated (those were the size of the input and their fresh pages' faults were 18 % of
// conv2_2's weight gradient).
template <int M>
struct TileGrid {
  int64_t rows_t, cols_t, tiles, phase, plane_cols;
  explicit TileGrid(const WinogradProblem& p)
      : rows_t((p.oh + M - 1) / M), cols_t((p.ow + M - 1) / M), tiles(rows_t * cols_t), phase(cols_t + 1),
        plane_cols(M * phase) {}
  // The band of tiles [t0, t0 + count): its first tile row and its plane rows (m per tile row, + 2 below).
  int64_t first_row(int64_t t0) const { return t0 / cols_t; }
  int64_t band_rows(int64_t t0, int64_t count) const {
    return M * ((t0 + count - 1) / cols_t - t0 / cols_t + 1) + 2;
  }
  // Calls fn(q, tile_row, first_tile_col, len) for the runs of tiles [t0, t0 + count) that lie in one tile row.
  template <typename Fn>
  void for_each_run(int64_t t0, int64_t count, Fn&& fn) const {
    for (int64_t q = 0; q < count;) {
      const int64_t t = t0 + q, row = t / cols_t, col = t % cols_t, len = std::min(cols_t - col, count - q);
      fn(q, row, col, len);
      q += len;
    }
  }
  // The most plane rows a block of `count` tiles can span.
  int64_t max_band_rows(int64_t count) const { return M * ((count + cols_t - 2) / cols_t + 1) + 2; }
};

// Tiles per block: the block's transformed input and output (alpha^2 x (C/G + K/G) x tiles) at about
// FCNKERN_WINOGRAD_BLOCK_KB (default 8192 KiB: L3-resident, with GEMMs over 128-256 tiles where oneDNN's matmul
// runs at 75-90 % of its large-matrix rate), a multiple of 16, 16..1024.
int64_t tiles_per_block(const WinogradProblem& p, int alpha, int64_t elem_bytes) {
  const char* v = std::getenv("FCNKERN_WINOGRAD_BLOCK_KB");
  const int64_t budget = std::max<int64_t>(v != nullptr ? std::atoll(v) : 8192, 16) << 10;
  const int64_t fit = budget / (int64_t{alpha} * alpha * (p.c_g + p.k_g) * elem_bytes);
  return std::clamp<int64_t>(fit / 16 * 16, 16, 1024);
}

// (G g G^T)[a][b] of `len` <= kFilterRun filters in double: filter i's 3 x 3 taps at g + i * step, rotated by 180
// degrees where `flip`, the result to dst[(a * alpha + b) * dst_stride + i]. Filter-major in the scratch so that the
// arithmetic runs across filters in vectors (one filter at a time, scalar, took a third of the GEMMs' time on a
// 512 x 512 layer at 44 x 44). Returns whether a tap was inf or NaN.
constexpr int64_t kFilterRun = 64;

template <typename T, int M, typename scalar_t>
inline __attribute__((always_inline)) bool transform_filters(const scalar_t* g, int64_t step, int64_t len, bool flip,
                                                             T* dst, int64_t dst_stride) {
  using Wg = Winograd<M>;
  constexpr int kA = Wg::kAlpha;
  double tap[9][kFilterRun];
  for (int rs = 0; rs < 9; ++rs) {
    const scalar_t* src = g + (flip ? 8 - rs : rs);
    for (int64_t i = 0; i < len; ++i) tap[rs][i] = static_cast<double>(src[i * step]);
  }
  // Per filter, not one flag: inf - inf and NaN - NaN are NaN, and an elementwise sum vectorises where a flag
  // reduction did not (its compare-and-set per tap was a third of this function's time).
  double zero_if_finite[kFilterRun] = {};
  for (int rs = 0; rs < 9; ++rs) {
    for (int64_t i = 0; i < len; ++i) zero_if_finite[i] += tap[rs][i] - tap[rs][i];
  }
  bool bad = false;
  for (int64_t i = 0; i < len; ++i) bad |= zero_if_finite[i] != 0;
  double half[kA][3][kFilterRun];  // G g
  for (int a = 0; a < kA; ++a) {
    for (int s = 0; s < 3; ++s) {
      for (int64_t i = 0; i < len; ++i) {
        half[a][s][i] = Wg::kG[a][0] * tap[s][i] + Wg::kG[a][1] * tap[3 + s][i] + Wg::kG[a][2] * tap[6 + s][i];
      }
    }
  }
  for (int a = 0; a < kA; ++a) {
    for (int b = 0; b < kA; ++b) {
      T* out = dst + (a * kA + b) * dst_stride;
      for (int64_t i = 0; i < len; ++i) {
        out[i] = static_cast<T>(half[a][0][i] * Wg::kG[b][0] + half[a][1][i] * Wg::kG[b][1] +
                                half[a][2][i] * Wg::kG[b][2]);
      }
    }
  }
  return bad;
}

// The dgrad's transform from the forward's, for F(2, 3): rotating a filter by 180 degrees reverses its taps, and G J
// = P G for the reversal J and the permutation P that swaps rows 0 and 3 of G, so G rot180(g) G^T = P (G g G^T) P^T.
// With the transpose (g'[c][k] = rot180(g[k][c])), the dgrad's U'[a][b] is the forward's U[P a][P b]^T.
constexpr int reflected_index_f2(int xi) {
  constexpr int kP[4] = {3, 1, 2, 0};
  return kP[xi / 4] * 4 + kP[xi % 4];
}

// The float ones as AVX-512 / AVX2 / baseline clones (see input_transform_f2 below).
FCNK_MULTIVERSION bool transform_filters_f2(const float* g, int64_t step, int64_t len, bool flip, float* dst,
                                            int64_t dst_stride) {
  return transform_filters<float, 2>(g, step, len, flip, dst, dst_stride);
}
FCNK_MULTIVERSION bool transform_filters_f4(const float* g, int64_t step, int64_t len, bool flip, float* dst,
                                            int64_t dst_stride) {
  return transform_filters<float, 4>(g, step, len, flip, dst, dst_stride);
}

// The forward's and dgrad's block size: at most `budget` tiles, and small enough for two tasks per thread where
// blocks of FCNKERN_WINOGRAD_MIN_TILES (default 32) allow. Fewer tasks than that run on one thread (spread_tasks),
// the transforms serial and only the GEMMs threaded: 1 x 512 x 29^2 (225 tiles) in 2 blocks of 113 took 17.2 ms
// forward, in 4 blocks of 57 14.2 (2-core Zen 4). A floor of 16 tiles was slower on 512 channels at 15^2 (8.9 vs
// 6.6 ms), one of 64 on 256 at 22^2 and 512 at 29^2. dW keeps the budget: its blocks each sum into alpha^2 x K x C
// accumulators.
int64_t spread_tiles_per_block(int64_t tiles, int64_t outer, int64_t budget) {
  const char* v = std::getenv("FCNKERN_WINOGRAD_MIN_TILES");
  const int64_t min_tiles = v != nullptr ? std::atoll(v) : 32;
  const int64_t want = (2 * at::get_num_threads() + outer - 1) / outer;  // blocks per (image, group)
  if (want <= 1) return budget;
  const int64_t even = (tiles + want - 1) / want;
  return std::min(budget, std::max(min_tiles, (even + 15) / 16 * 16));
}

// U = G g G^T per (output channel, input channel) as groups x alpha^2 x K/G x C/G, computed in double from a
// K x C/G x 3 x 3 weight. `flip_transpose`: the dgrad's weight, g'[c][k] = rot180(g[k][c]) within each group.
// Undefined where the weight holds a non-finite value (see winograd_conv). The weight is read as it is (a double
// copy and an isfinite pass, and U's fresh pages, were a fifth of conv5_1's forward, a 512 x 512 weight on a
// 44 x 44 map); U comes from the large-block cache.
template <typename T, int M, typename scalar_t>
at::Tensor transform_weight(const at::Tensor& weight, int64_t groups, bool flip_transpose) {
  constexpr int kA = Winograd<M>::kAlpha;
  const at::Tensor w = weight.contiguous();
  const int64_t k_g = weight.size(0) / groups, c_g = weight.size(1);
  const int64_t outs = flip_transpose ? c_g : k_g, ins = flip_transpose ? k_g : c_g;
  at::Tensor u = empty_large({groups, kA * kA, outs, ins}, weight.options().dtype(c10::CppTypeToScalarType<T>::value),
                             at::MemoryFormat::Contiguous);
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  T* up = u.mutable_data_ptr<T>();
  // Filter (o, i)'s taps: the weight's [k][c] with k = o, c = i, or k = i, c = o where transposed.
  const int64_t o_step = (flip_transpose ? 1 : c_g) * 9, i_step = (flip_transpose ? c_g : 1) * 9;
  const int64_t runs = (ins + kFilterRun - 1) / kFilterRun;
  std::atomic<bool> finite{true};
  at::parallel_for(0, groups * outs * runs, 1, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / (outs * runs), o = task / runs % outs, i0 = task % runs * kFilterRun;
      const int64_t len = std::min(kFilterRun, ins - i0);
      const scalar_t* g = wp + group * k_g * c_g * 9 + o * o_step + i0 * i_step;
      T* dst = up + (group * kA * kA * outs + o) * ins + i0;
      if constexpr (std::is_same_v<T, float> && std::is_same_v<scalar_t, float>) {
        bad |= (M == 2 ? transform_filters_f2 : transform_filters_f4)(g, i_step, len, flip_transpose, dst, outs * ins);
      } else {
        bad |= transform_filters<T, M>(g, i_step, len, flip_transpose, dst, outs * ins);
      }
    }
    if (bad) finite = false;
  });
  return finite ? u : at::Tensor();
}

// One input row `line` (w values) into plane row `row`, phase-major (see TileGrid), shifted right by pad_w; the
// rest of the row is zero. Returns whether a value was inf or NaN (see winograd_conv).
template <typename T, int M>
inline __attribute__((always_inline)) bool scatter_row(const T* line, int64_t w, int64_t pad_w, T* row,
                                                       int64_t phase, int64_t plane_cols) {
  bool bad = false;
  for (int64_t iw = 0; iw < w; ++iw) bad |= non_finite(line[iw]);
  std::fill(row, row + plane_cols, T(0));
  for (int64_t ph = 0; ph < M; ++ph) {
    // columns x = pad_w + iw with x % M == ph: iw = first, first + M, ...
    const int64_t first = ((ph - pad_w) % M + M) % M;
    T* dst = row + ph * phase + (pad_w + first) / M;
    const int64_t n = first < w ? (w - first + M - 1) / M : 0;
    for (int64_t i = 0; i < n; ++i) dst[i] = line[first + M * i];
  }
  return bad;
}

FCNK_MULTIVERSION bool scatter_row_f2(const float* line, int64_t w, int64_t pad_w, float* row, int64_t phase,
                                      int64_t plane_cols) {
  return scatter_row<float, 2>(line, w, pad_w, row, phase, plane_cols);
}
FCNK_MULTIVERSION bool scatter_row_f4(const float* line, int64_t w, int64_t pad_w, float* row, int64_t phase,
                                      int64_t plane_cols) {
  return scatter_row<float, 4>(line, w, pad_w, row, phase, plane_cols);
}

// The band of plane rows [m * first_row, + rows) of channels c0 .. c0 + channels - 1 (channel stride rows x
// plane_cols): plane row a holds input row a - pad_h, zeros around it. fill_row(c, ih, dst) writes the w values of
// input row ih of channel c into `line`. Returns whether every value was finite.
template <typename T, int M, typename FillRow>
bool fill_band(const WinogradProblem& p, const TileGrid<M>& grid, int64_t first_row, int64_t rows, int64_t c0,
               int64_t channels, T* band, T* line, const FillRow& fill_row) {
  bool bad = false;
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t i = 0; i < rows; ++i) {
      T* row = band + (c * rows + i) * grid.plane_cols;
      const int64_t ih = M * first_row + i - p.pad_h;
      if (ih < 0 || ih >= p.h) {
        std::fill(row, row + grid.plane_cols, T(0));
        continue;
      }
      fill_row(c0 + c, ih, line);
      if constexpr (std::is_same_v<T, float> && M == 2) {
        bad |= scatter_row_f2(line, p.w, p.pad_w, row, grid.phase, grid.plane_cols);
      } else if constexpr (std::is_same_v<T, float> && M == 4) {
        bad |= scatter_row_f4(line, p.w, p.pad_w, row, grid.phase, grid.plane_cols);
      } else {
        bad |= scatter_row<T, M>(line, p.w, p.pad_w, row, grid.phase, grid.plane_cols);
      }
    }
  }
  return !bad;
}

// V[xi][c][q] for the tiles [t0, t0 + count) of `channels` planes' band (fill_band's, from tile row
// grid.first_row(t0)), Mat d Mat^T per tile (B^T d B; the wgrad's G dy' G^T), vectorised across the tiles of each
// run within a tile row.
template <typename T, int M, const auto& Mat>
inline __attribute__((always_inline)) void input_transform(const TileGrid<M>& grid, const T* band, int64_t channels,
                                                           int64_t t0, int64_t count, T* v) {
  const int64_t first = grid.first_row(t0), stride = grid.band_rows(t0, count) * grid.plane_cols;
  // Plain loops, no lambda: a lambda would be compiled outside the caller's target clone, without AVX-512.
  for (int64_t c = 0; c < channels; ++c) {
    const T* plane = band + c * stride;
    for (int64_t q = 0; q < count;) {
      const int64_t t = t0 + q, row = t / grid.cols_t, col = t % grid.cols_t;
      const int64_t len = std::min(grid.cols_t - col, count - q);
      // plane column M * (col + lane) + j: phase j % M, slot col + lane + j / M
      const T* tile = plane + M * (row - first) * grid.plane_cols + col;
      apply_2d<T, Mat, M>(tile, grid.plane_cols, grid.phase, 1, v + c * count + q, channels * count, len);
      q += len;
    }
  }
}

// A^T M A for row r of M[xi][r][q] over a run of tiles q .. q + len - 1: tile[(a * m + l) * stride + i] is output
// pixel (a, l) of the run's tile i.
template <typename T, int M>
inline __attribute__((always_inline)) void output_tile(const T* m, int64_t rows, int64_t r, int64_t count, int64_t q,
                                                       int64_t len, T* tile, int64_t stride) {
  constexpr int kA = Winograd<M>::kAlpha;
  const int64_t element = rows * count;  // M's stride between transform elements xi
  apply_2d<T, Winograd<M>::kAT, 1>(m + r * count + q, kA * element, 0, element, tile, stride, len);
}

// The float transforms as AVX-512 / AVX2 / baseline clones chosen at load time (target_clones takes no templates);
// other types run the templates as built.
FCNK_MULTIVERSION void input_transform_f2(const TileGrid<2>& grid, const float* planes, int64_t channels, int64_t t0,
                                          int64_t count, float* v) {
  input_transform<float, 2, Winograd<2>::kBT>(grid, planes, channels, t0, count, v);
}
FCNK_MULTIVERSION void input_transform_f4(const TileGrid<4>& grid, const float* planes, int64_t channels, int64_t t0,
                                          int64_t count, float* v) {
  input_transform<float, 4, Winograd<4>::kBT>(grid, planes, channels, t0, count, v);
}
FCNK_MULTIVERSION void wgrad_x_transform_f(const TileGrid<2>& grid, const float* planes, int64_t channels, int64_t t0,
                                           int64_t count, float* v) {
  input_transform<float, 2, WinogradWgrad::kBT>(grid, planes, channels, t0, count, v);
}
FCNK_MULTIVERSION void wgrad_dy_transform_f(const TileGrid<2>& grid, const float* planes, int64_t channels, int64_t t0,
                                            int64_t count, float* v) {
  input_transform<float, 2, WinogradWgrad::kG>(grid, planes, channels, t0, count, v);
}
FCNK_MULTIVERSION void output_tile_f2(const float* m, int64_t rows, int64_t r, int64_t count, int64_t q, int64_t len,
                                      float* tile, int64_t stride) {
  output_tile<float, 2>(m, rows, r, count, q, len, tile, stride);
}
FCNK_MULTIVERSION void output_tile_f4(const float* m, int64_t rows, int64_t r, int64_t count, int64_t q, int64_t len,
                                      float* tile, int64_t stride) {
  output_tile<float, 4>(m, rows, r, count, q, len, tile, stride);
}

template <const auto& A, const auto& B>
constexpr bool kSameTable = static_cast<const void*>(&A) == static_cast<const void*>(&B);

template <typename T, int M, const auto& Mat>
void run_input_transform(const TileGrid<M>& grid, const T* planes, int64_t channels, int64_t t0, int64_t count, T* v) {
  if constexpr (std::is_same_v<T, float> && kSameTable<Mat, Winograd<2>::kBT>) {
    input_transform_f2(grid, planes, channels, t0, count, v);
  } else if constexpr (std::is_same_v<T, float> && kSameTable<Mat, Winograd<4>::kBT>) {
    input_transform_f4(grid, planes, channels, t0, count, v);
  } else if constexpr (std::is_same_v<T, float> && kSameTable<Mat, WinogradWgrad::kBT>) {
    wgrad_x_transform_f(grid, planes, channels, t0, count, v);
  } else if constexpr (std::is_same_v<T, float> && kSameTable<Mat, WinogradWgrad::kG>) {
    wgrad_dy_transform_f(grid, planes, channels, t0, count, v);
  } else {
    input_transform<T, M, Mat>(grid, planes, channels, t0, count, v);
  }
}

template <typename T, int M>
void run_output_tile(const T* m, int64_t rows, int64_t r, int64_t count, int64_t q, int64_t len, T* tile,
                     int64_t stride) {
  if constexpr (std::is_same_v<T, float> && M == 2) {
    output_tile_f2(m, rows, r, count, q, len, tile, stride);
  } else if constexpr (std::is_same_v<T, float> && M == 4) {
    output_tile_f4(m, rows, r, count, q, len, tile, stride);
  } else {
    output_tile<T, M>(m, rows, r, count, q, len, tile, stride);
  }
}

// Output channels k0 .. k0 + rows - 1 of image n from M[xi][r][q] (tiles [t0, t0 + count)): A^T M A, then bias,
// ReLU (max(v, 0) keeps NaN), conversion and the strided store of the pixels inside the output.
// `tile`: m^2 x (tiles per row).
template <typename scalar_t, typename T, int M>
void output_transform(const TileGrid<M>& grid, const WinogradProblem& p, const T* m, int64_t rows, int64_t t0,
                      int64_t count, int64_t n, int64_t k0, const T* bias, bool relu, scalar_t* out,
                      const int64_t* os, T* tile) {
  const int64_t stride = grid.cols_t;
  for (int64_t r = 0; r < rows; ++r) {
    const T add = bias != nullptr ? bias[k0 + r] : T(0);
    scalar_t* dst = out + n * os[0] + (k0 + r) * os[1];
    grid.for_each_run(t0, count, [&](int64_t q, int64_t row, int64_t col, int64_t len) {
      run_output_tile<T, M>(m, rows, r, count, q, len, tile, stride);
      for (int a = 0; a < M && M * row + a < p.oh; ++a) {
        scalar_t* line = dst + (M * row + a) * os[2];
        for (int l = 0; l < M; ++l) {
          const int64_t ow0 = M * col + l;  // the run's first pixel in this column phase
          const int64_t valid = std::clamp<int64_t>((p.ow - ow0 + M - 1) / M, 0, len);
          const T* src = tile + (a * M + l) * stride;
          for (int64_t i = 0; i < valid; ++i) {
            const T v = src[i] + add;
            line[(ow0 + M * i) * os[3]] = static_cast<scalar_t>(relu ? std::max(v, T(0)) : v);
          }
        }
      }
    });
  }
}

// The whole convolution: (image, group, block of tiles) tasks, each filling its band of the input planes,
// transforming it, running the alpha^2 GEMMs and storing its output. Returns false, the output partly written,
// where an input value is inf or NaN: the transforms' sums would turn an inf into inf - inf = NaN where the direct
// form gives inf, so such a call is left to the direct kernels.
//
// `reflected`: u is the forward's transform of a K x C/G weight, and the GEMMs read U[P xi]^T, the dgrad's transform
// of the flipped, transposed weight (see reflected_index_f2).
template <typename scalar_t, typename T, int M, typename FillRow>
bool winograd_conv(const WinogradProblem& p, int64_t images, const at::Tensor& u, bool reflected, const T* bias,
                   bool relu, const at::Tensor& out, const FillRow& fill_row) {
  constexpr int kA = Winograd<M>::kAlpha;
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const TileGrid<M> grid(p);
  const EvenBlocks blocks(grid.tiles, spread_tiles_per_block(grid.tiles, images * p.groups,
                                                             tiles_per_block(p, kA, sizeof(T))),
                          images * p.groups);
  const int64_t per_image = p.groups * blocks.count, tasks = images * per_image, most = blocks.max_size();
  const int64_t v_size = kA * kA * p.c_g * most, m_size = kA * kA * p.k_g * most, tile_size = M * M * grid.cols_t;
  const int64_t band_size = p.c_g * grid.max_band_rows(most) * grid.plane_cols;
  const ThreadScratch scratch(spread_tasks(tasks), v_size + m_size + tile_size + band_size + p.w,
                              out.options().dtype(acc));
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  std::atomic<bool> finite{true};
  run_tasks(tasks, scratch.spread, [&](int64_t begin, int64_t end) {
    T* const v = scratch.mine<T>();
    T *const m = v + v_size, *const tile = m + m_size, *const band = tile + tile_size, *const line = band + band_size;
    for (int64_t task = begin; task < end && finite; ++task) {
      const int64_t n = task / per_image, group = task % p.groups, b = task % per_image / p.groups;
      const int64_t t0 = blocks.begin(b), count = blocks.size(b);
      if (!fill_band<T, M>(p, grid, grid.first_row(t0), grid.band_rows(t0, count), group * p.c_g, p.c_g, band, line,
                           [&](int64_t c, int64_t ih, T* dst) { fill_row(n, c, ih, dst); })) {
        finite = false;
        break;
      }
      run_input_transform<T, M, Winograd<M>::kBT>(grid, band, p.c_g, t0, count, v);
      for (int xi = 0; xi < kA * kA; ++xi) {
        const at::Tensor left = M == 2 && reflected ? u[group][reflected_index_f2(xi)].t() : u[group][xi];
        mm_into(matrix(m + xi * p.k_g * count, p.k_g, count, acc), left,
                matrix(v + xi * p.c_g * count, p.c_g, count, acc), true);
      }
      output_transform<scalar_t, T, M>(grid, p, m, p.k_g, t0, count, n, group * p.k_g, bias, relu, op, os, tile);
    }
  });
  return finite;
}

// dW (K x C/G x 3 x 3) and db (K) in T by F(3 x 3, 2 x 2) over the forward's 2 x 2 output tiles: per (image,
// group, block of tiles), bands of dy' and x, both transforms and 16 GEMMs dW_xi += DY'_xi @ V_xi^T into
// per-thread accumulators (summed in thread order: deterministic), A^T . A at the end. db sums dy' rows, one
// channel per thread. Returns false where x or dy' holds a non-finite value (see winograd_conv).
template <typename T, typename XRows, typename DyRows>
bool winograd_wgrad_impl(const WinogradProblem& p, int64_t images, bool need_w, bool need_b, const XRows& x_rows,
                         const DyRows& dy_rows, const at::TensorOptions& options, at::Tensor& dw, at::Tensor& db) {
  constexpr int kA = 4, kXi = kA * kA;
  const auto acc = c10::CppTypeToScalarType<T>::value;
  at::Tensor db_acc = need_b ? at::zeros({p.k}, options.dtype(acc)) : at::Tensor();
  if (need_b) {
    T* dbp = db_acc.mutable_data_ptr<T>();
    at::parallel_for(0, p.k, 1, [&](int64_t begin, int64_t end) {
      const std::unique_ptr<T[]> line(new T[p.ow]);
      for (int64_t k = begin; k < end; ++k) {
        for (int64_t n = 0; n < images; ++n) {
          for (int64_t oh = 0; oh < p.oh; ++oh) {
            dy_rows(n, k, oh, line.get());
            dbp[k] = std::accumulate(line.get(), line.get() + p.ow, dbp[k]);
          }
        }
      }
    });
  }
  if (!need_w) {
    db = db_acc;
    return true;
  }
  const TileGrid<2> grid(p);
  const WinogradProblem dy_problem{p.k, p.k, p.groups, p.k_g, p.k_g, p.oh, p.ow, p.oh, p.ow, 0, 0};
  const EvenBlocks blocks(grid.tiles, tiles_per_block(p, kA, sizeof(T)), images * p.groups);
  const int64_t per_image = p.groups * blocks.count, tasks = images * per_image, most = blocks.max_size();
  const int64_t v_size = kXi * p.c_g * most, d_size = kXi * p.k_g * most, rows = grid.max_band_rows(most);
  const int64_t x_band = p.c_g * rows * grid.plane_cols, dy_band = p.k_g * rows * grid.plane_cols;
  const ThreadScratch scratch(spread_tasks(tasks), v_size + d_size + x_band + dy_band + std::max(p.w, p.ow),
                              options.dtype(acc));
  LazyParts parts({scratch.work.size(0), p.groups, kXi, p.k_g, p.c_g}, options.dtype(acc));
  std::atomic<bool> finite{true};
  run_tasks(tasks, scratch.spread, [&](int64_t begin, int64_t end) {
    const int64_t tid = scratch.spread ? at::get_thread_num() : 0;
    T* const v = scratch.mine<T>();
    T *const d = v + v_size, *const xb = d + d_size, *const dyb = xb + x_band, *const line = dyb + dy_band;
    for (int64_t task = begin; task < end && finite; ++task) {
      const int64_t n = task / per_image, group = task % p.groups, b = task % per_image / p.groups;
      const int64_t t0 = blocks.begin(b), count = blocks.size(b);
      const int64_t first = grid.first_row(t0), band_rows = grid.band_rows(t0, count);
      const bool ok =
          fill_band<T, 2>(dy_problem, grid, first, band_rows, group * p.k_g, p.k_g, dyb, line,
                          [&](int64_t k, int64_t oh, T* dst) { dy_rows(n, k, oh, dst); }) &&
          fill_band<T, 2>(p, grid, first, band_rows, group * p.c_g, p.c_g, xb, line,
                          [&](int64_t c, int64_t ih, T* dst) { x_rows(n, c, ih, dst); });
      if (!ok) {
        finite = false;
        break;
      }
      run_input_transform<T, 2, WinogradWgrad::kBT>(grid, xb, p.c_g, t0, count, v);
      run_input_transform<T, 2, WinogradWgrad::kG>(grid, dyb, p.k_g, t0, count, d);
      parts.accumulate(tid, group, [&](const at::Tensor& slot, bool overwrite) {
        for (int xi = 0; xi < kXi; ++xi) {
          mm_into(slot[xi], matrix(d + xi * p.k_g * count, p.k_g, count, acc),
                  matrix(v + xi * p.c_g * count, p.c_g, count, acc).t(), overwrite);
        }
      });
    }
  });
  if (!finite) return false;
  const at::Tensor total = parts.total().contiguous();  // groups x 16 x K/G x C/G
  const int64_t pairs = p.k_g * p.c_g;
  at::Tensor by_tap = at::empty({9, pairs}, options.dtype(acc));
  dw = at::empty({p.k, p.c_g, 3, 3}, options.dtype(acc));
  for (int64_t group = 0; group < p.groups; ++group) {
    apply_2d<T, WinogradWgrad::kAT, 1>(total.const_data_ptr<T>() + group * kXi * pairs, kA * pairs, 0, pairs,
                                       by_tap.mutable_data_ptr<T>(), pairs, pairs);
    transpose_into(by_tap.const_data_ptr<T>(), 9, pairs, dw.mutable_data_ptr<T>() + group * pairs * 9);
  }
  db = db_acc;
  return true;
}

// m of F(m x m, 3 x 3): FCNKERN_WINOGRAD_TILE = 2 or 4, default 2. m = 4 measured slower on the 2-core Zen 5 but
// for 128 channels (conv4_2 forward 89 vs 57 ms): its 36 GEMMs per block get few tiles within the cache budget.
int winograd_tile() {
  const char* v = std::getenv("FCNKERN_WINOGRAD_TILE");
  const std::string_view tile = v != nullptr ? v : "2";
  TORCH_CHECK(tile == "2" || tile == "4", "FCNKERN_WINOGRAD_TILE must be 2 or 4, got '", tile, "'");
  return tile == "4" ? 4 : 2;
}

template <typename Body>
void with_tile(const Body& body) {
  if (winograd_tile() == 4) {
    body(std::integral_constant<int, 4>{});
  } else {
    body(std::integral_constant<int, 2>{});
  }
}

}  // namespace

bool use_winograd(const ConvGeometry& g, WinogradPass pass) {
  // FCNKERN_CONV_WINOGRAD: "0" never; "fwd" the forward only; "dx" the forward and dx; "all" every pass on every
  // geometry it can compute (the tests reach small shapes so). Read per call, for A/B measurements in one process.
  const std::string_view mode = env_setting("FCNKERN_CONV_WINOGRAD");
  if (mode == "0" || (mode == "fwd" && pass != WinogradPass::kForward) ||
      (mode == "dx" && pass == WinogradPass::kWgrad)) {
    return false;
  }
  const bool computable = g.r == 3 && g.s == 3 && g.stride_h == 1 && g.stride_w == 1 && g.dil_h == 1 &&
                          g.dil_w == 1 && (pass != WinogradPass::kDgrad || (g.pad_h <= 2 && g.pad_w <= 2));
  if (mode == "all") return computable;
  // Thin maps (the skipped background's frame strips, 1-4 pixels wide, see fcnkern/background.py) waste most of
  // each 2 x 2 tile and pay the weight transform per piece: the direct kernels keep them.
  if (!computable || std::min(g.oh, g.ow) < 8) return false;
  // From 128 channels, once a call has about 120k pixel-channels: each pass against the direct kernels (2-core
  // Zen 4, fp32, min of two processes; forward / dx / dW time ratios): 1 x 512 x 29^2 0.64 / 0.75 / 0.86, 22^2
  // 0.80 / 0.93 / 0.70; 1 x 256 x 22^2 0.93 / 0.97 / 0.86; 128 channels at 1 x 44^2 0.90 / 0.76 / 0.85, 8 x 17^2
  // 0.91 / 0.77 / 0.64, 1 x 57^2 0.79 / 0.76 / 1.17. Below it: 512 at 15^2 0.89 / 1.10 / 1.00, 256 at 15^2
  // 1.07 / 1.32 / 1.26, 128 at 1 x 29^2 0.94 / 1.15 / 0.97, at 8 x 9^2 1.46 / 1.15 / 0.95.
  const int64_t pixels = g.n * g.oh * g.ow;
  if (g.c_g >= 128 && g.k_g >= 128 && pixels * std::min(g.c_g, g.k_g) >= 120'000) return true;
  // 64 channels: the GEMMs' reduction is short, and calls of under 1e8 multiply-adds per tap leave the 16 GEMMs
  // small and the threads short of tasks (2-core Zen 5, fp32, forward + backward, Winograd against im2col:
  // 64 channels at 1 x 66^2 8.4 vs 5.4 ms, 8 x 33^2 8.1 vs 7.7).
  const int64_t work = pixels * g.groups * g.c_g * g.k_g;
  return g.c_g >= 64 && g.k_g >= 64 && g.oh * g.ow >= 1024 && work >= 100'000'000;
}

bool winograd_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& y, const ConvGeometry& g, bool relu) {
  bool done = false;
  const WinogradProblem p{g.c, g.k, g.groups, g.c_g, g.k_g, g.h, g.w, g.oh, g.ow, g.pad_h, g.pad_w};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_relu_winograd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor bias_acc =
        bias.has_value() ? bias->to(c10::CppTypeToScalarType<acc_t>::value).contiguous() : at::Tensor();
    const acc_t* bp = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
    with_tile([&](auto tile) {
      constexpr int kM = decltype(tile)::value;
      const at::Tensor u = transform_weight<acc_t, kM, scalar_t>(weight, g.groups, false);
      done = u.defined() &&
             winograd_conv<scalar_t, acc_t, kM>(p, g.n, u, false, bp, relu, y, InputRows<scalar_t, acc_t>(x));
    });
  });
  return done;
}

bool winograd_dgrad(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& dx,
                    const ConvGeometry& g, bool relu) {
  bool done = false;
  // The transposed convolution as a convolution of dy' (K channels of OH x OW) into C channels of H x W.
  const WinogradProblem p{g.k, g.c, g.groups, g.k_g, g.c_g, g.oh, g.ow, g.h, g.w, 2 - g.pad_h, 2 - g.pad_w};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "conv2d_relu_winograd_dgrad", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    with_tile([&](auto tile) {
      constexpr int kM = decltype(tile)::value;
      // F(2, 3) reads the forward's transform reflected: transposed, its filters lie c_g * 9 apart (a cache line,
      // and a page, per filter), which took 2x the forward's transform time.
      constexpr bool kReflected = kM == 2;
      const at::Tensor u = transform_weight<acc_t, kM, scalar_t>(weight, g.groups, !kReflected);
      done = u.defined() && winograd_conv<scalar_t, acc_t, kM>(p, g.n, u, kReflected, nullptr, false, dx,
                                                                MaskedGradRows<scalar_t, acc_t>(grad, y, relu));
    });
  });
  return done;
}

bool winograd_wgrad(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& x, const ConvGeometry& g,
                    bool relu, bool need_w, bool need_b, at::Tensor& dw, at::Tensor& db) {
  const WinogradProblem p{g.c, g.k, g.groups, g.c_g, g.k_g, g.h, g.w, g.oh, g.ow, g.pad_h, g.pad_w};
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_relu_winograd_wgrad", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    done = winograd_wgrad_impl<acc_t>(p, g.n, need_w, need_b, InputRows<scalar_t, acc_t>(x),
                                      MaskedGradRows<scalar_t, acc_t>(grad, y, relu), x.options(), dw, db);
  });
  return done;
}

}  // namespace fcnkern
