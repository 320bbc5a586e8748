// The codebook packed once for the micro-kernels of every op (spae_native.h, PackedCodebookView): panels
// of 16 rows [D][16] with the metric folded in (l2: p = -2e, bias ||e||^2; ip: p = -e; cosine: p = -e/|e|),
// stored in fp32 or, for bf16 / fp16 tables with metric l2 / ip, in the table's own dtype (PanelFormat: the
// kernels widen them to the same fp32 p exactly); and the micro-kernel of the active ISA.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/fused_search.h"
#include "common/spae_native.h"

namespace spae {

using fused::kInf;

MicroKernel active_micro_kernel(PanelFormat format) {
#if defined(SPAE_HAVE_AVX2_KERNEL)
  if (active_isa() == Isa::Avx2Fma) return avx2_micro_kernel(format);
#endif
  return portable_micro_kernel(format);
}

namespace {

int widest_packing_lanes() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 8;
  if (__builtin_cpu_supports("avx2")) return 4;
#endif
  return 2;
}

std::atomic<int>& packing_lanes_slot() {
  static std::atomic<int> slot{widest_packing_lanes()};
  return slot;
}

}  // namespace

int packing_lanes() { return packing_lanes_slot().load(std::memory_order_relaxed); }

bool set_packing_lanes(int lanes) {
  if (lanes == 0) lanes = widest_packing_lanes();
  if (lanes != 2 && lanes != 4 && lanes != 8) return false;
  if (lanes > widest_packing_lanes()) return false;
  packing_lanes_slot().store(lanes, std::memory_order_relaxed);
  return true;
}

namespace {

// Loads rows [first, first + count) of `e` (count <= 16) into tile[d][c] as fp32 (exact for bf16 / fp16), pad
// columns zero: the panel's rows transposed once, read along each row (contiguous for a row-major table).
void load_panel_rows(const MatrixView& e, int64_t first, int count, float* tile) {
  const int64_t dim = e.cols;
  if (count < kPanelWidth) std::fill(tile, tile + dim * kPanelWidth, 0.0f);
  if (e.dtype == DType::Float32 && e.col_stride == 1) {
    // 16-column blocks: the 16 source rows stream forward while the tile's 16 lines stay in L1.
    constexpr int64_t kBlock = 16;
    const float* base = static_cast<const float*>(e.data);
    for (int64_t d0 = 0; d0 < dim; d0 += kBlock) {
      const int64_t d1 = std::min(dim, d0 + kBlock);
      for (int c = 0; c < count; ++c) {
        const float* row = base + (first + c) * e.row_stride;
        for (int64_t d = d0; d < d1; ++d) tile[d * kPanelWidth + c] = row[d];
      }
    }
    return;
  }
  for (int c = 0; c < count; ++c)
    for (int64_t d = 0; d < dim; ++d) tile[d * kPanelWidth + c] = e.at(first + c, d);
}

// Packs panel rows [first, first + count) into `out` and their bias; returns the largest norm it used
// (metric-adjusted) and sets *bad for a non-finite or (l2) overflowing row, whose values are then left
// unspecified. One panel: the rows transposed into the fp32 `tile` [D][16] (one read of the table), the 16
// sums ||e||^2 in fp64 as 16 independent chains in vectors of N lanes (each in d order, so every row's sum is
// a row-by-row loop's), then the panel p = (float)(scale * e) (one fp64 product rounded once, as the
// reference) written contiguously from the tile. A row is finite iff its fp64 sum of squares is (a finite
// float squares to at most 1.2e77).
template <int N>
[[gnu::always_inline]] inline double pack_panel(const MatrixView& e, int64_t first, int count, Metric metric,
                                                PanelFormat format, float* tile, void* out, float* bias, bool* bad) {
  using Floats = Lanes<float, N>;
  using Doubles = Lanes<double, N>;
  constexpr int kGroups = kPanelWidth / N;
  const int64_t dim = e.cols;
  load_panel_rows(e, first, count, tile);
  Doubles sums[kGroups] = {};
  for (int64_t d = 0; d < dim; ++d) {
#pragma GCC unroll 8
    for (int g = 0; g < kGroups; ++g) {
      Doubles x;
      load_widened<N>(tile + d * kPanelWidth + g * N, x);
      sums[g] += x * x;
    }
  }
  double sum[kPanelWidth], scale_of[kPanelWidth], largest = 0.0;
  std::memcpy(sum, sums, sizeof sum);
  for (int c = 0; c < kPanelWidth; ++c) {
    scale_of[c] = 0.0;  // pad column: zero panel values
    if (c >= count) {
      bias[first + c] = kInf;  // never selected
      continue;
    }
    if (!std::isfinite(sum[c]) || (metric == Metric::L2 && sum[c] > std::numeric_limits<float>::max())) {
      *bad = true;
      continue;
    }
    const double norm = std::sqrt(sum[c]);
    scale_of[c] = -1.0;
    if (metric == Metric::L2) scale_of[c] = -2.0;
    if (metric == Metric::Cosine) scale_of[c] = -1.0 / std::max(norm, kCosineEps);
    bias[first + c] = metric == Metric::L2 ? static_cast<float>(sum[c]) : 0.0f;
    largest = std::max(largest, metric == Metric::Cosine ? norm / std::max(norm, kCosineEps) : norm);
  }
  Doubles scale[kGroups];
  std::memcpy(scale, scale_of, sizeof scale);
  for (int64_t d = 0; d < dim; ++d) {
    float p[kPanelWidth];
#pragma GCC unroll 8
    for (int g = 0; g < kGroups; ++g) {
      Doubles x;
      load_widened<N>(tile + d * kPanelWidth + g * N, x);
      const Floats scaled = __builtin_convertvector(scale[g] * x, Floats);
      std::memcpy(p + g * N, &scaled, sizeof scaled);
    }
    if (format == PanelFormat::Float32) {
      std::memcpy(static_cast<float*>(out) + d * kPanelWidth, p, sizeof p);
      continue;
    }
    uint16_t* narrow = static_cast<uint16_t*>(out) + d * kPanelWidth;
    for (int c = 0; c < kPanelWidth; ++c) {
      if (format == PanelFormat::BFloat16) narrow[c] = float_to_bf16(p[c]);
      if (format == PanelFormat::Float16) narrow[c] = float_to_half(p[c]);
      if (format == PanelFormat::Float16Doubled) narrow[c] = float_to_half(0.5f * p[c]);  // the load doubles it
    }
  }
  return largest;
}

#define SPAE_PACK_PANEL_ARGS                                                                                  \
  const MatrixView &e, int64_t first, int count, Metric metric, PanelFormat format, float *tile, void *out, \
      float *bias, bool *bad
SPAE_TARGET("avx512f") double pack_panel_avx512(SPAE_PACK_PANEL_ARGS) {
  return pack_panel<8>(e, first, count, metric, format, tile, out, bias, bad);
}
SPAE_TARGET("avx2") double pack_panel_avx2(SPAE_PACK_PANEL_ARGS) {
  return pack_panel<4>(e, first, count, metric, format, tile, out, bias, bad);
}
double pack_panel_baseline(SPAE_PACK_PANEL_ARGS) {
  return pack_panel<2>(e, first, count, metric, format, tile, out, bias, bad);
}
#undef SPAE_PACK_PANEL_ARGS

}  // namespace

StatusInfo pack_codebook(const MatrixView& e, Metric metric, DType panel_dtype, void* panels_out, float* bias,
                         double* max_norm, int num_threads) {
  const int64_t rows = e.rows, dim = e.cols;
  PackedCodebookView layout;  // only for the panel format
  layout.metric = metric;
  layout.panel_dtype = panel_dtype;
  const PanelFormat format = layout.format();
  if (panel_dtype != DType::Float32 && (panel_dtype != e.dtype || metric == Metric::Cosine))
    return {Status::BadArgument, 0};
  const int64_t num_panels = (rows + kPanelWidth - 1) / kPanelWidth;
  const int64_t element_bytes = panel_dtype == DType::Float32 ? 4 : 2;
  const int lanes = packing_lanes();
  const auto pack_one = lanes == 8 ? pack_panel_avx512 : lanes == 4 ? pack_panel_avx2 : pack_panel_baseline;
  bool any_bad = false;
  double global_max = 0.0;
#pragma omp parallel num_threads(num_threads) reduction(max : global_max) reduction(|| : any_bad)
  {
    std::vector<float> tile(static_cast<size_t>(dim * kPanelWidth));
#pragma omp for schedule(static)
    for (int64_t p = 0; p < num_panels; ++p) {
      const int64_t first = p * kPanelWidth;
      const int count = static_cast<int>(std::min<int64_t>(kPanelWidth, rows - first));
      bool bad = false;
      global_max = std::max(global_max, pack_one(e, first, count, metric, format, tile.data(),
                                                   static_cast<char*>(panels_out) + first * dim * element_bytes,
                                                   bias, &bad));
      any_bad = any_bad || bad;
    }
  }
  if (any_bad) {
    // Report the lowest offending row, independent of thread timing.
    for (int64_t row = 0; row < rows; ++row) {
      double sum = 0.0;
      bool finite = true;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = e.at(row, d);
        finite &= std::isfinite(v);
        sum += static_cast<double>(v) * v;
      }
      if (!finite) return {Status::NonFiniteCodebook, row};
      if (metric == Metric::L2 && sum > std::numeric_limits<float>::max()) return {Status::Overflow, row};
    }
  }
  *max_norm = global_max;
  return {};
}

}  // namespace spae
