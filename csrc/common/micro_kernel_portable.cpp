// Portable micro-kernel (any CPU): plain C++ the compiler vectorises for the baseline ISA.
// Built with -ffp-contract=off so each element is one rounded multiply then one rounded add per step,
// in ascending d, whatever the tile: the result of a row never depends on batch size or tiling.
#include "common/spae_native.h"

namespace spae {

void micro_kernel_portable(const float* packed_queries, const float* panel, const float* bias, int64_t dim,
                           const float* thresholds, float* scores, uint32_t* masks) {
  float acc[kTileRows][kPanelWidth] = {};
  for (int64_t d = 0; d < dim; ++d) {
    const float* a = packed_queries + d * kTileRows;  // [MR]
    const float* p = panel + d * kPanelWidth;         // [NR]
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

}  // namespace spae
