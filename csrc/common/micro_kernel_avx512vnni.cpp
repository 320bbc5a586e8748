// AVX512-VNNI micro-kernel of the certified int8 pre-filter of the nearest and SAQ searches, compiled with -mavx512f -mavx512vnni
// and used only where the CPU reports avx512_vnni (cpu_features.cpp).
//
// 24 queries x 16 codebook rows per register tile. Queries are int8 per row (x ~ s_x q_x) stored shifted to
// u8 (q_x + 128); codebook rows are int8 per row (p ~ s_k q_k). Per step j (dimensions 4j .. 4j + 3) one
// 64-byte load of the panel and 24 broadcasts feed 24 VPDPBUSD (4 u8 x s8 products per lane, exact int32):
//     acc[r][c] = sum_d (q_x[r][d] + 128) q_k[c][d]        (exact: |acc| < 2^31)
// Epilogue per row: dot = acc - 128 sum_d q_k[c][d] (exact, |dot| < 2^24 so exact in fp32), then
//     s~ = bias_c + (dot * s_k) * s_x        (the approximate score, ~ x~ . p~ + ||e||^2)
//     lb = s~ - (a_r P_c + n_r b_c)          (a lower bound of the exact score, nearest/nearest_exact.cpp derives the bound)
// with the row's a_r = ||x - x~||, n_r = ||x~|| and the column's P_c = ||p||, b_c = ||p - p~|| (all rounded
// up). The tile's lb values are the ranking key of the candidate lists; only the rescoring with the exact
// fp32 kernel decides the answer.
#include <immintrin.h>

#include <cmath>

#include "common/spae_native.h"

namespace spae {

void micro_kernel_avx512vnni(const uint32_t* packed_queries, const uint32_t* panel, const float* columns,
                             const int32_t* offsets, int64_t quads, const float* thresholds, float* scores,
                             uint32_t* masks) {
  static_assert(kInt8TileRows == 24 && kInt8PanelWidth == 16, "the kernel is written for a 24 x 16 tile");
  constexpr int R = kInt8TileRows;
  // 24 named accumulators, not an array: GCC 12 keeps an array of __m512i partly on the stack and copies it
  // every step (measured: ~4x slower); named variables stay in zmm registers (24 + panel + broadcast <= 32).
#define SPAE_VNNI_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) \
  X(12) X(13) X(14) X(15) X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23)
#define SPAE_VNNI_DECLARE(r) __m512i acc##r = _mm512_setzero_si512();
#define SPAE_VNNI_STEP(r) asm("vpdpbusd %1, %2, %0" : "+v"(acc##r) : "v"(pj), "v"(_mm512_set1_epi32(static_cast<int>(a[r]))));
#define SPAE_VNNI_STORE(r) acc[r] = acc##r;
  SPAE_VNNI_ROWS(SPAE_VNNI_DECLARE)
  const uint32_t* a = packed_queries;
  const uint32_t* p = panel;
  for (int64_t j = 0; j < quads; ++j, a += R, p += kInt8PanelWidth) {
    const __m512i pj = _mm512_loadu_si512(p);
    SPAE_VNNI_ROWS(SPAE_VNNI_STEP)
  }
  __m512i acc[R];
  SPAE_VNNI_ROWS(SPAE_VNNI_STORE)
#undef SPAE_VNNI_STORE
#undef SPAE_VNNI_STEP
#undef SPAE_VNNI_DECLARE
#undef SPAE_VNNI_ROWS
  // Per-row parameters follow the quads in the packed tile: s_x, a_r, n_r (fp32 bits), R each.
  const float* row_params = reinterpret_cast<const float*>(packed_queries + quads * R);
  const __m512i offset = _mm512_loadu_si512(offsets);
  const __m512 scale = _mm512_loadu_ps(columns);
  const __m512 norm = _mm512_loadu_ps(columns + kInt8PanelWidth);
  const __m512 rounding = _mm512_loadu_ps(columns + 2 * kInt8PanelWidth);
  const __m512 bias = _mm512_loadu_ps(columns + 3 * kInt8PanelWidth);
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], offset));
    const __m512 approx = _mm512_add_ps(bias, _mm512_mul_ps(_mm512_mul_ps(dot, scale), _mm512_set1_ps(row_params[r])));
    const __m512 error = _mm512_fmadd_ps(_mm512_set1_ps(row_params[R + r]), norm,
                                         _mm512_mul_ps(_mm512_set1_ps(row_params[2 * R + r]), rounding));
    const __m512 lower = _mm512_sub_ps(approx, error);
    _mm512_storeu_ps(scores + r * kInt8PanelWidth, lower);
    masks[r] = _mm512_cmp_ps_mask(lower, _mm512_set1_ps(thresholds[r]), _CMP_NGT_UQ);  // !(lb > t), NaN too
  }
}

// The candidate-list append of the int8 driver (fused_search.h, Int8Engine::append_offers): lanes c of `mask`
// in ascending c, lbs[c] to values and first_column + c to indices (register compress, then a full-width
// store: the lists keep 16 entries of room past their capacity; a compress to memory is slow on Zen 4).
// Returns the lanes of `mask` that may lower the certificate's U: upper bound lb + 2 (a P_c + n b_c) (fp64, as
// Int8Engine::upper_bound; `columns` is the panel's [4][16] column data) below U, with a 2^-40 relative margin
// so that a contracted FMA here never drops a lane the exact test keeps.
uint32_t append_offers_avx512(const float* lbs, int64_t first_column, uint32_t mask, const float* columns,
                              float rounding, float rounded_norm, double kth_upper, float* values,
                              int64_t* indices) {
  const __m512 lb = _mm512_loadu_ps(lbs);
  _mm512_storeu_ps(values, _mm512_maskz_compress_ps(static_cast<__mmask16>(mask), lb));
  const __m512i column = _mm512_add_epi64(_mm512_set1_epi64(first_column), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  const auto low = static_cast<__mmask8>(mask), high = static_cast<__mmask8>(mask >> 8);
  _mm512_storeu_si512(indices, _mm512_maskz_compress_epi64(low, column));
  _mm512_storeu_si512(indices + __builtin_popcount(low),
                      _mm512_maskz_compress_epi64(high, _mm512_add_epi64(column, _mm512_set1_epi64(8))));
  const double limit = kth_upper + std::abs(kth_upper) * 0x1p-40;
  const __m512d a = _mm512_set1_pd(rounding), n = _mm512_set1_pd(rounded_norm), below = _mm512_set1_pd(limit);
  uint32_t lowering = 0;
  for (int half = 0; half < 2; ++half) {
    const __mmask8 lanes = half == 0 ? low : high;
    if (!lanes) continue;
    const int at = 8 * half;
    const __m512d norm = _mm512_cvtps_pd(_mm256_loadu_ps(columns + kInt8PanelWidth + at));
    const __m512d residual = _mm512_cvtps_pd(_mm256_loadu_ps(columns + 2 * kInt8PanelWidth + at));
    const __m512d error = _mm512_add_pd(_mm512_mul_pd(a, norm), _mm512_mul_pd(n, residual));
    const __m512d upper = _mm512_add_pd(_mm512_cvtps_pd(_mm256_loadu_ps(lbs + at)), _mm512_add_pd(error, error));
    lowering |= static_cast<uint32_t>(_mm512_mask_cmp_pd_mask(lanes, upper, below, _CMP_LT_OQ)) << at;
  }
  return lowering;
}

}  // namespace spae
