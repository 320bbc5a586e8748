// The codebook packed once for the micro-kernels of every op (spae_native.h, PackedCodebookView): panels
// of 16 rows [D][16] with the metric folded in (l2: p = -2e, bias ||e||^2; ip: p = -e; cosine: p = -e/|e|),
// stored in fp32 or, for bf16 / fp16 tables with metric l2 / ip, in the table's own dtype (PanelFormat: the
// kernels widen them to the same fp32 p exactly); and the micro-kernel of the active ISA.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

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

// Writes panel element `offset` from its fp32 value p (exact in the narrow formats: see PanelFormat).
inline void store_panel_value(void* panels, PanelFormat format, int64_t offset, float p) {
  switch (format) {
    case PanelFormat::Float32:
      static_cast<float*>(panels)[offset] = p;
      return;
    case PanelFormat::BFloat16:
      static_cast<uint16_t*>(panels)[offset] = float_to_bf16(p);
      return;
    case PanelFormat::Float16:
      static_cast<uint16_t*>(panels)[offset] = float_to_half(p);
      return;
    case PanelFormat::Float16Doubled:
      static_cast<uint16_t*>(panels)[offset] = float_to_half(0.5f * p);  // -e: the load doubles it
      return;
  }
}

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
  std::atomic<int64_t> bad_row{-1};
  std::atomic<int> bad_status{static_cast<int>(Status::Ok)};
  double global_max = 0.0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(max : global_max)
  for (int64_t p = 0; p < num_panels; ++p) {
    const int64_t panel = p * dim * kPanelWidth;
    for (int c = 0; c < kPanelWidth; ++c) {
      const int64_t row = p * kPanelWidth + c;
      if (row >= rows) {
        for (int64_t d = 0; d < dim; ++d) store_panel_value(panels_out, format, panel + d * kPanelWidth + c, 0.0f);
        bias[row] = kInf;  // pad column: never selected
        continue;
      }
      double sum = 0.0;
      bool finite = true;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = e.at(row, d);
        finite &= std::isfinite(v);
        sum += static_cast<double>(v) * v;
      }
      if (!finite || (metric == Metric::L2 && sum > std::numeric_limits<float>::max())) {
        int64_t expected = -1;
        if (bad_row.compare_exchange_strong(expected, row))
          bad_status.store(static_cast<int>(finite ? Status::Overflow : Status::NonFiniteCodebook));
        continue;
      }
      const double norm = std::sqrt(sum);
      double scale = -1.0;
      if (metric == Metric::L2) scale = -2.0;
      if (metric == Metric::Cosine) scale = -1.0 / std::max(norm, kCosineEps);
      for (int64_t d = 0; d < dim; ++d)
        store_panel_value(panels_out, format, panel + d * kPanelWidth + c,
                          static_cast<float>(scale * static_cast<double>(e.at(row, d))));
      bias[row] = metric == Metric::L2 ? static_cast<float>(sum) : 0.0f;
      const double used_norm = metric == Metric::Cosine ? norm / std::max(norm, kCosineEps) : norm;
      global_max = std::max(global_max, used_norm);
    }
  }
  if (bad_row.load() >= 0) {
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
