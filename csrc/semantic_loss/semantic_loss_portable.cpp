// Portable pieces of the fused semantic loss (semantic_loss.cpp), for CPUs without the AVX2 + FMA kernels (and
// the tests' "portable" ISA); compiled with -ffp-contract=off, so every product and sum rounds as written.
#include <cmath>
#include <limits>

#include "semantic_loss/semantic_loss.h"

namespace spae {
namespace {
constexpr float kInf = std::numeric_limits<float>::infinity();
}  // namespace

void semantic_softmax_tile_portable(const float* scores, float tau, const float* max_in, float* max_out,
                                    float* weights, float* sums) {
  const float neg_tau = -tau;
  for (int r = 0; r < kTileRows; ++r) {
    float logits[kSemanticGroupCols];
    float row_max = max_in[r];
    for (int j = 0; j < kSemanticGroupPanels; ++j) {
      const float* src = scores + (j * kTileRows + r) * kPanelWidth;
      for (int c = 0; c < kPanelWidth; ++c) {
        const float s = src[c] / neg_tau;
        logits[j * kPanelWidth + c] = s;
        row_max = s > row_max ? s : row_max;
      }
    }
    max_out[r] = row_max;
    float sum = 0.0f;
    float* w = weights + r * kSemanticGroupCols;
    for (int c = 0; c < kSemanticGroupCols; ++c) {
      w[c] = logits[c] == -kInf ? 0.0f : std::exp(logits[c] - row_max);
      sum += w[c];
    }
    sums[r] = sum;
  }
}

void semantic_accumulate_portable(const float* weights, const float* rows, int64_t ld_rows, int64_t dim,
                                  float* const* acc) {
  for (int r = 0; r < kTileRows; ++r) {
    float* out = acc[r];
    const float* w = weights + r * kSemanticGroupCols;
    for (int c = 0; c < kSemanticGroupCols; ++c) {
      const float wc = w[c];
      const float* e = rows + c * ld_rows;
      for (int64_t d = 0; d < dim; ++d) out[d] += wc * e[d];
    }
  }
}

void semantic_accumulate_columns(const float* weights, const float* rows, int64_t ld_rows, int64_t begin,
                                 int64_t end, float* const* acc) {
  for (int64_t d = begin; d < end; ++d) {
    for (int r = 0; r < kTileRows; ++r) {
      float value = acc[r][d];
      const float* w = weights + r * kSemanticGroupCols;
      for (int c = 0; c < kSemanticGroupCols; ++c) value = std::fma(w[c], rows[c * ld_rows + d], value);
      acc[r][d] = value;
    }
  }
}

void semantic_add_f32_portable(const float* src, int64_t dim, float* dst) {
  for (int64_t d = 0; d < dim; ++d) dst[d] += src[d];
}

void semantic_add_f32_to_f64_portable(const float* src, int64_t dim, double* dst) {
  for (int64_t d = 0; d < dim; ++d) dst[d] += static_cast<double>(src[d]);
}

}  // namespace spae
