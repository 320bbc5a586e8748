// Portable micro-kernel (any CPU): plain C++ the compiler vectorises for the baseline ISA.
// Built with -ffp-contract=off so each element is one rounded multiply then one rounded add per step,
// in ascending d, whatever the tile: the result of a row never depends on batch size or tiling. Narrow
// panels are widened exactly to the fp32 p first (spae_native.h, PanelFormat), so every format gives the
// same bits.
#include "common/spae_native.h"

namespace spae {
namespace {

template <PanelFormat F>
inline void load_panel_row(const void* panel, int64_t d, float* p) {
  if constexpr (F == PanelFormat::Float32) {
    const float* src = static_cast<const float*>(panel) + d * kPanelWidth;
    for (int c = 0; c < kPanelWidth; ++c) p[c] = src[c];
  } else if constexpr (F == PanelFormat::BFloat16) {
    const uint16_t* src = static_cast<const uint16_t*>(panel) + d * kPanelWidth;
    for (int c = 0; c < kPanelWidth; ++c) p[c] = bf16_to_float(src[c]);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(panel) + d * kPanelWidth;
    const float scale = F == PanelFormat::Float16Doubled ? 2.0f : 1.0f;  // 2 * (-e) = -2e exactly
    for (int c = 0; c < kPanelWidth; ++c) p[c] = scale * half_to_float(src[c]);
  }
}

template <PanelFormat F>
void micro_kernel(const float* packed_queries, const void* panel, const float* bias, int64_t dim,
                  const float* thresholds, float* scores, uint32_t* masks) {
  float acc[kTileRows][kPanelWidth] = {};
  float p[kPanelWidth];
  for (int64_t d = 0; d < dim; ++d) {
    const float* a = packed_queries + d * kTileRows;  // [MR]
    load_panel_row<F>(panel, d, p);                  // [NR]
    for (int r = 0; r < kTileRows; ++r) {
      const float ar = a[r];
      for (int c = 0; c < kPanelWidth; ++c) acc[r][c] += ar * p[c];
    }
  }
  for (int r = 0; r < kTileRows; ++r) {
    uint32_t mask = 0;
    for (int c = 0; c < kPanelWidth; ++c) {
      const float s = bias[c] + acc[r][c];
      scores[r * kPanelWidth + c] = s;
      if (!(s > thresholds[r])) mask |= 1u << c;
    }
    masks[r] = mask;
  }
}

}  // namespace

MicroKernel portable_micro_kernel(PanelFormat format) {
  return micro_kernel_for(format, [](auto f) -> MicroKernel { return micro_kernel<decltype(f)::value>; });
}

}  // namespace spae
