// AVX-512 pieces of the fused semantic loss at precision fp32 (semantic_loss.cpp), compiled with -mavx512f and
// used only where the CPU reports avx512f (cpu_features.cpp) and the AVX2 + FMA kernels are active.
//
// They compute bitwise what the AVX2 pieces compute - every value is the same FMA chain in the same order, only
// 16 lanes wide instead of 8 - with a 6 x 64 register tile (24 zmm accumulators, 4 loads and 6 broadcasts per
// step instead of 2 and 6 per 12 ymm FMAs): half the instructions and half the loads per multiply-add.
//
//   semantic_scores_avx512:     score[j][r][c] = bias_j[c] + sum_d a[d][r] * p_j[d][c] for the 4 consecutive
//       fp32 panels j of one vocabulary group (one chain per score in ascending d from 0, then the bias: the
//       6 x 16 micro-kernel's value), in the [panel][row][16] layout of the softmax tile kernels.
//   semantic_accumulate_avx512: acc_r[d] += sum_c w[r][c] * rows[c][d] (the AVX2 kernel's chains: ascending c,
//       one FMA each, from acc_r[d]), 64 output columns per register tile, then 16, then single FMAs
//       (semantic_accumulate_columns).
#include <immintrin.h>

#include "semantic_loss/semantic_loss.h"

namespace spae {

#define SPAE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

void semantic_scores_avx512(const float* tile_queries, const float* group_panels, const float* group_bias,
                            int64_t dim, float* scores) {
  static_assert(kTileRows == 6 && kSemanticGroupPanels == 4 && kPanelWidth == 16, "a 6 x 64 tile");
  const int64_t panel_floats = dim * kPanelWidth;
#define SPAE_ZERO(r)                                                                        \
  __m512 acc##r##_0 = _mm512_setzero_ps(), acc##r##_1 = _mm512_setzero_ps(),               \
         acc##r##_2 = _mm512_setzero_ps(), acc##r##_3 = _mm512_setzero_ps();
#define SPAE_STEP(r)                                      \
  {                                                       \
    const __m512 a = _mm512_set1_ps(tile_queries[r]);     \
    acc##r##_0 = _mm512_fmadd_ps(a, p0, acc##r##_0);      \
    acc##r##_1 = _mm512_fmadd_ps(a, p1, acc##r##_1);      \
    acc##r##_2 = _mm512_fmadd_ps(a, p2, acc##r##_2);      \
    acc##r##_3 = _mm512_fmadd_ps(a, p3, acc##r##_3);      \
  }
#define SPAE_STORE(r)                                                                                   \
  _mm512_storeu_ps(scores + (0 * kTileRows + r) * kPanelWidth, _mm512_add_ps(b0, acc##r##_0));        \
  _mm512_storeu_ps(scores + (1 * kTileRows + r) * kPanelWidth, _mm512_add_ps(b1, acc##r##_1));        \
  _mm512_storeu_ps(scores + (2 * kTileRows + r) * kPanelWidth, _mm512_add_ps(b2, acc##r##_2));        \
  _mm512_storeu_ps(scores + (3 * kTileRows + r) * kPanelWidth, _mm512_add_ps(b3, acc##r##_3));
  SPAE_ROWS(SPAE_ZERO)
  const float* p = group_panels;
  for (int64_t d = 0; d < dim; ++d, p += kPanelWidth, tile_queries += kTileRows) {
    const __m512 p0 = _mm512_loadu_ps(p);
    const __m512 p1 = _mm512_loadu_ps(p + panel_floats);
    const __m512 p2 = _mm512_loadu_ps(p + 2 * panel_floats);
    const __m512 p3 = _mm512_loadu_ps(p + 3 * panel_floats);
    SPAE_ROWS(SPAE_STEP)
  }
  const __m512 b0 = _mm512_loadu_ps(group_bias), b1 = _mm512_loadu_ps(group_bias + 16);
  const __m512 b2 = _mm512_loadu_ps(group_bias + 32), b3 = _mm512_loadu_ps(group_bias + 48);
  SPAE_ROWS(SPAE_STORE)
#undef SPAE_STORE
#undef SPAE_STEP
#undef SPAE_ZERO
}

void semantic_accumulate_avx512(const float* weights, const float* rows, int64_t ld_rows, int64_t dim,
                                float* const* acc) {
  static_assert(kTileRows == 6, "written for a 6-row tile");
  constexpr int kCols = kSemanticGroupCols;
  int64_t d = 0;
#define SPAE_LOAD(r)                                                                              \
  __m512 acc##r##_0 = _mm512_loadu_ps(acc[r] + d), acc##r##_1 = _mm512_loadu_ps(acc[r] + d + 16), \
         acc##r##_2 = _mm512_loadu_ps(acc[r] + d + 32), acc##r##_3 = _mm512_loadu_ps(acc[r] + d + 48);
#define SPAE_STEP(r)                                           \
  {                                                            \
    const __m512 w = _mm512_set1_ps(weights[r * kCols + c]);   \
    acc##r##_0 = _mm512_fmadd_ps(w, e0, acc##r##_0);           \
    acc##r##_1 = _mm512_fmadd_ps(w, e1, acc##r##_1);           \
    acc##r##_2 = _mm512_fmadd_ps(w, e2, acc##r##_2);           \
    acc##r##_3 = _mm512_fmadd_ps(w, e3, acc##r##_3);           \
  }
#define SPAE_STORE(r)                                                                           \
  _mm512_storeu_ps(acc[r] + d, acc##r##_0), _mm512_storeu_ps(acc[r] + d + 16, acc##r##_1),     \
      _mm512_storeu_ps(acc[r] + d + 32, acc##r##_2), _mm512_storeu_ps(acc[r] + d + 48, acc##r##_3);
  for (; d + 64 <= dim; d += 64) {
    SPAE_ROWS(SPAE_LOAD)
    const float* e = rows + d;
    for (int c = 0; c < kCols; ++c, e += ld_rows) {
      const __m512 e0 = _mm512_loadu_ps(e), e1 = _mm512_loadu_ps(e + 16);
      const __m512 e2 = _mm512_loadu_ps(e + 32), e3 = _mm512_loadu_ps(e + 48);
      SPAE_ROWS(SPAE_STEP)
    }
    SPAE_ROWS(SPAE_STORE)
  }
#undef SPAE_STORE
#undef SPAE_STEP
#undef SPAE_LOAD
#define SPAE_LOAD(r) __m512 acc##r = _mm512_loadu_ps(acc[r] + d);
#define SPAE_STEP(r) acc##r = _mm512_fmadd_ps(_mm512_set1_ps(weights[r * kCols + c]), e0, acc##r);
#define SPAE_STORE(r) _mm512_storeu_ps(acc[r] + d, acc##r);
  for (; d + 16 <= dim; d += 16) {
    SPAE_ROWS(SPAE_LOAD)
    const float* e = rows + d;
    for (int c = 0; c < kCols; ++c, e += ld_rows) {
      const __m512 e0 = _mm512_loadu_ps(e);
      SPAE_ROWS(SPAE_STEP)
    }
    SPAE_ROWS(SPAE_STORE)
  }
#undef SPAE_STORE
#undef SPAE_STEP
#undef SPAE_LOAD
  semantic_accumulate_columns(weights, rows, ld_rows, d, dim, acc);  // the D % 16 tail
}

#undef SPAE_ROWS

}  // namespace spae
