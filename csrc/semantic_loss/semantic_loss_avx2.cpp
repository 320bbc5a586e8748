// AVX2 + FMA pieces of the fused semantic loss (semantic_loss.cpp), compiled with -mavx2 -mfma and chosen at
// run time together with the search's micro-kernel (cpu_features.cpp).
//
//   semantic_softmax_tile_avx2: logits s = score / -tau of a 6 x 64 tile, the rows' new running max, the
//       weights exp(s - max) (a Cephes-style vector expf, ~1 ulp, exactly 0 for s = -inf) and their sums.
//   semantic_add_f32_avx2 / semantic_add_f32_to_f64_avx2: the sums of the candidate sets' rows (fp32 per
//       vocabulary group, then fp64).
//   semantic_accumulate_avx2:   acc[6, D] += weights[6, 64] x rows[64, D] (acc: 6 row pointers), the same
//       6 x 16 register tile as the distance micro-kernel (12 accumulators, 2 row loads and 6 broadcasts per
//       step) with D as the output dimension and the 64 vocabulary rows as the reduction: each output is one
//       FMA chain in ascending vocabulary row, so it does not depend on which tile or thread computes it.
#include <immintrin.h>

#include <cmath>

#include "semantic_loss/semantic_loss.h"

namespace spae {
namespace {

// exp(x) for x <= 0 (the weights exp(s - max)); x < -87.3 (including -inf) gives 0.
inline __m256 exp_ps(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.33654f);
  const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lowest);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
  return _mm256_andnot_ps(underflow, y);
}

// Lanes summed in a fixed order: ((0+4)+(2+6)) + ((1+5)+(3+7)).
inline float horizontal_sum(__m256 v) {
  const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}

inline float horizontal_max(__m256 v) {
  const __m128 quad = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
  return _mm_cvtss_f32(_mm_max_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}

}  // namespace

void semantic_softmax_tile_avx2(const float* scores, float tau, const float* max_in, float* max_out,
                                float* weights, float* sums) {
  static_assert(kSemanticGroupCols == 64 && kPanelWidth == 16, "written for 4 panels of 16 columns");
  const __m256 neg_tau = _mm256_set1_ps(-tau);
  // score / -tau; when tau is a power of two its reciprocal is exact and so is the product: the same logits
  // (tau = 1 by default) for a multiply instead of a divide.
  int exponent = 0;
  const bool exact_reciprocal = std::frexp(tau, &exponent) == 0.5f && std::isfinite(1.0f / tau);
  const __m256 neg_inv_tau = _mm256_set1_ps(-1.0f / tau);
  const auto logit = [&](const float* src) {
    const __m256 score = _mm256_loadu_ps(src);
    return exact_reciprocal ? _mm256_mul_ps(score, neg_inv_tau) : _mm256_div_ps(score, neg_tau);
  };
  for (int r = 0; r < kTileRows; ++r) {
    __m256 logits[8];
    __m256 row_max = _mm256_set1_ps(max_in[r]);
    for (int j = 0; j < kSemanticGroupPanels; ++j) {
      const float* src = scores + (j * kTileRows + r) * kPanelWidth;
      logits[2 * j] = logit(src);
      logits[2 * j + 1] = logit(src + 8);
      row_max = _mm256_max_ps(logits[2 * j], row_max);
      row_max = _mm256_max_ps(logits[2 * j + 1], row_max);
    }
    const float new_max = horizontal_max(row_max);
    max_out[r] = new_max;
    const __m256 shift = _mm256_set1_ps(new_max);
    __m256 sum = _mm256_setzero_ps();
    float* w = weights + r * kSemanticGroupCols;
    for (int v = 0; v < 8; ++v) {
      const __m256 e = exp_ps(_mm256_sub_ps(logits[v], shift));
      _mm256_storeu_ps(w + 8 * v, e);
      sum = _mm256_add_ps(sum, e);
    }
    sums[r] = horizontal_sum(sum);
  }
}

void semantic_accumulate_avx2(const float* weights, const float* rows, int64_t ld_rows, int64_t dim,
                              float* const* acc) {
  static_assert(kTileRows == 6, "written for a 6-row tile");
  constexpr int kCols = kSemanticGroupCols;
  int64_t d = 0;
#define SPAE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
  // 16 output columns per register tile: row r's accumulators c<r>_0, c<r>_1 (columns d .. d + 15).
#define SPAE_LOAD(r) __m256 c##r##_0 = _mm256_loadu_ps(acc[r] + d), c##r##_1 = _mm256_loadu_ps(acc[r] + d + 8);
#define SPAE_STEP(r)                                          \
  {                                                           \
    const __m256 w = _mm256_broadcast_ss(weights + r * kCols + c); \
    c##r##_0 = _mm256_fmadd_ps(w, e0, c##r##_0);              \
    c##r##_1 = _mm256_fmadd_ps(w, e1, c##r##_1);              \
  }
#define SPAE_STORE(r) _mm256_storeu_ps(acc[r] + d, c##r##_0), _mm256_storeu_ps(acc[r] + d + 8, c##r##_1);
  for (; d + 16 <= dim; d += 16) {
    SPAE_ROWS(SPAE_LOAD)
    const float* e = rows + d;
    for (int c = 0; c < kCols; ++c, e += ld_rows) {
      const __m256 e0 = _mm256_loadu_ps(e), e1 = _mm256_loadu_ps(e + 8);
      SPAE_ROWS(SPAE_STEP)
    }
    SPAE_ROWS(SPAE_STORE)
  }
#undef SPAE_STORE
#undef SPAE_STEP
#undef SPAE_LOAD
  if (d + 8 <= dim) {  // then 8 columns: one accumulator per row
#define SPAE_LOAD(r) __m256 c##r = _mm256_loadu_ps(acc[r] + d);
#define SPAE_STEP(r) c##r = _mm256_fmadd_ps(_mm256_broadcast_ss(weights + r * kCols + c), e0, c##r);
#define SPAE_STORE(r) _mm256_storeu_ps(acc[r] + d, c##r);
    SPAE_ROWS(SPAE_LOAD)
    const float* e = rows + d;
    for (int c = 0; c < kCols; ++c, e += ld_rows) {
      const __m256 e0 = _mm256_loadu_ps(e);
      SPAE_ROWS(SPAE_STEP)
    }
    SPAE_ROWS(SPAE_STORE)
    d += 8;
#undef SPAE_STORE
#undef SPAE_STEP
#undef SPAE_LOAD
  }
#undef SPAE_ROWS
  semantic_accumulate_columns(weights, rows, ld_rows, d, dim, acc);  // the D % 8 tail
}

void semantic_add_f32_avx2(const float* src, int64_t dim, float* dst) {
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8)
    _mm256_storeu_ps(dst + d, _mm256_add_ps(_mm256_loadu_ps(dst + d), _mm256_loadu_ps(src + d)));
  for (; d < dim; ++d) dst[d] += src[d];
}

void semantic_add_f32_to_f64_avx2(const float* src, int64_t dim, double* dst) {
  int64_t d = 0;
  for (; d + 4 <= dim; d += 4)
    _mm256_storeu_pd(dst + d, _mm256_add_pd(_mm256_loadu_pd(dst + d), _mm256_cvtps_pd(_mm_loadu_ps(src + d))));
  for (; d < dim; ++d) dst[d] += static_cast<double>(src[d]);
}

}  // namespace spae
