// AVX2 + FMA micro-kernel, compiled with -mavx2 -mfma -mf16c and chosen at run time (cpu_features.cpp).
//
// Outer-product form of the distance GEMM: per step d, two 8-wide loads of the packed codebook panel
// p[d][0:16] and six broadcasts of the packed queries a[d][0:6] feed 12 fused multiply-adds into 12
// accumulators (6 x 16 scores). Each score is one FMA chain in ascending d, so it is bitwise independent
// of which tile or thread computes it. The epilogue adds the bias (||e||^2 for l2) and compares with the
// row's current selection threshold, so the caller only touches the rare columns that can enter its top-k.
// Narrow panels (spae_native.h, PanelFormat) are widened in the load, exactly: bf16 -> fp32 is a 16-bit
// shift, fp16 -> fp32 is F16C's vcvtph2ps (subnormals included), and fp16 l2 panels (-e) are doubled, which is
// exact in fp32; so the FMA chains, and the scores, are bitwise those of the fp32 panels. A bf16 panel row is
// one 32-byte load whose 32-bit words hold columns (2i, 2i + 1): a shift gives the even columns and a mask
// the odd ones, so the accumulators hold even / odd columns, put back in order once per tile (the lane
// of a chain does not change its value).
#include <immintrin.h>

#include "common/spae_native.h"

namespace spae {
namespace {

// Columns 8 h .. 8 h + 7 of panel row d as fp32 (bf16: the even columns for h = 0, the odd ones for h = 1).
template <PanelFormat F>
inline __m256 load_panel(const void* panel, int64_t d, int h) {
  if constexpr (F == PanelFormat::BFloat16) {
    const __m256i words =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(panel) + d * kPanelWidth));
    if (h == 0) return _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
    return _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  } else if constexpr (F == PanelFormat::Float32) {
    return _mm256_loadu_ps(static_cast<const float*>(panel) + d * kPanelWidth + 8 * h);
  } else {
    const __m128i bits = _mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(panel) + d * kPanelWidth + 8 * h));
    if constexpr (F == PanelFormat::Float16) {
      return _mm256_cvtph_ps(bits);
    } else {
      const __m256 v = _mm256_cvtph_ps(bits);
      return _mm256_add_ps(v, v);  // 2 * (-e) = -2e, exact
    }
  }
}

template <PanelFormat F>
void micro_kernel(const float* packed_queries, const void* panel, const float* bias, int64_t dim,
                  const float* thresholds, float* scores, uint32_t* masks) {
  static_assert(kTileRows == 6 && kPanelWidth == 16, "the AVX2 kernel is written for a 6 x 16 tile");
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  const float* a = packed_queries;
  for (int64_t d = 0; d < dim; ++d, a += kTileRows) {
    const __m256 p0 = load_panel<F>(panel, d, 0);
    const __m256 p1 = load_panel<F>(panel, d, 1);
    // Row r's two chains, on named accumulators (registers; an array may be kept on the stack).
    const auto row = [&](int r, __m256& low, __m256& high) {
      const __m256 ar = _mm256_broadcast_ss(a + r);
      low = _mm256_fmadd_ps(ar, p0, low);
      high = _mm256_fmadd_ps(ar, p1, high);
    };
    row(0, c00, c01);
    row(1, c10, c11);
    row(2, c20, c21);
    row(3, c30, c31);
    row(4, c40, c41);
    row(5, c50, c51);
  }
  const __m256 b0 = _mm256_loadu_ps(bias);
  const __m256 b1 = _mm256_loadu_ps(bias + 8);
  __m256 acc[kTileRows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if constexpr (F == PanelFormat::BFloat16) {  // even / odd columns -> columns 0..7 / 8..15
    for (int r = 0; r < kTileRows; ++r) {
      const __m256 low = _mm256_unpacklo_ps(acc[r][0], acc[r][1]);   // 0 1 2 3 | 8 9 10 11
      const __m256 high = _mm256_unpackhi_ps(acc[r][0], acc[r][1]);  // 4 5 6 7 | 12 13 14 15
      acc[r][0] = _mm256_permute2f128_ps(low, high, 0x20);
      acc[r][1] = _mm256_permute2f128_ps(low, high, 0x31);
    }
  }
  for (int r = 0; r < kTileRows; ++r) {
    const __m256 s0 = _mm256_add_ps(b0, acc[r][0]);
    const __m256 s1 = _mm256_add_ps(b1, acc[r][1]);
    _mm256_storeu_ps(scores + r * kPanelWidth, s0);
    _mm256_storeu_ps(scores + r * kPanelWidth + 8, s1);
    const __m256 t = _mm256_broadcast_ss(thresholds + r);
    // NGT_UQ: true where !(s > t), NaN included.
    const uint32_t m0 = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s0, t, _CMP_NGT_UQ)));
    const uint32_t m1 = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s1, t, _CMP_NGT_UQ)));
    masks[r] = m0 | (m1 << 8);
  }
}

}  // namespace

MicroKernel avx2_micro_kernel(PanelFormat format) {
  return micro_kernel_for(format, [](auto f) -> MicroKernel { return micro_kernel<decltype(f)::value>; });
}

}  // namespace spae
