// Exact fp32 rescoring of a few candidate rows for one query (the certified pre-filter's last step), AVX-512F,
// compiled with -mavx512f -ffp-contract=off and used only with the AVX512-VNNI pre-filter.
//
//     score_c = bias_c + sum_d x_d p_c[d]      (fp32, one chain per candidate in ascending d, from +0)
//
// bitwise what the active fp32 micro-kernel computes for the same (x, p_c): with fused = true the AVX2 kernel's
// chain acc = fma(x_d, p_d, acc); with fused = false the portable kernel's acc = acc + round(x_d p_d). Each
// lane of a vector runs exactly one candidate's chain (IEEE operations are lane-wise and width-independent),
// so the order of candidates, the vector width and the tiling change no bit. p_c[d] = scale * row_c[d] with
// scale -2 (the l2 panels' p = -2e, exact in fp32: the same value pack_codebook stores, inf on overflow
// alike) or 1 (rows already in p form).
//
// Layout: the candidates are row-major (one contiguous row each, e.g. the user's table), the chains want
// p_c[d] for 16 candidates side by side. Sixteen rows x 16 dimensions are loaded as 16 vectors and transposed
// in registers (4 x 16 shuffles), then 16 FMAs, so each row is read once, contiguously, and the next group's
// rows are prefetched one block ahead (random table rows are DRAM reads). The old path (a scalar transposing
// copy into a [D][16] panel, then the 6 x 16 tile kernel with one live row) took ~2.7 us per 576-dim
// candidate on the SmolLM2 table; this one reads each candidate row once at memory speed.
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "nearest/nearest.h"

namespace spae {
namespace {

inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {  // r[j] = dimension j of the block, lane i = candidate i
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
  }
}

template <bool kFused>
void rescore(const float* x, int64_t dim, const float* const* rows, float scale, const float* bias, int64_t count,
             float* scores) {
  const __m512 factor = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < (count < 16 ? count : 16); ++c)  // the first group's rows; later groups one ahead
    for (int64_t d = 0; d < dim; d += 16) _mm_prefetch(reinterpret_cast<const char*>(rows[c] + d), _MM_HINT_T0);
  for (int64_t first = 0; first < count; first += 16) {
    const int live = static_cast<int>(count - first < 16 ? count - first : 16);
    const float* row[16];
    const float* next[16];
    for (int c = 0; c < 16; ++c) {  // missing lanes repeat a live row; their scores are not stored
      row[c] = rows[first + (c < live ? c : 0)];
      const int64_t ahead = first + 16 + c;
      next[c] = ahead < count ? rows[ahead] : row[c];
    }
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d0 = 0; d0 < dim; d0 += 16) {
      const int width = static_cast<int>(dim - d0 < 16 ? dim - d0 : 16);
      const __mmask16 in_row = static_cast<__mmask16>((1u << width) - 1u);  // no read past a row's end
      __m512 block[16];
      for (int c = 0; c < 16; ++c) {
        block[c] = _mm512_maskz_loadu_ps(in_row, row[c] + d0);
        _mm_prefetch(reinterpret_cast<const char*>(next[c] + d0), _MM_HINT_T0);
      }
      transpose16(block);
      for (int j = 0; j < width; ++j) {
        const __m512 p = _mm512_mul_ps(block[j], factor);  // exact: scaling by -2 or 1
        const __m512 xd = _mm512_set1_ps(x[d0 + j]);
        if constexpr (kFused)
          acc = _mm512_fmadd_ps(xd, p, acc);
        else
          acc = _mm512_add_ps(acc, _mm512_mul_ps(xd, p));
      }
    }
    const __mmask16 out = static_cast<__mmask16>((1u << live) - 1u);
    const __m512 b = _mm512_maskz_loadu_ps(out, bias + first);
    _mm512_mask_storeu_ps(scores + first, out, _mm512_add_ps(b, acc));
  }
}

}  // namespace

// l2 with an fp32 table: p = -2 e from the user's rows (one contiguous row per candidate); other metrics,
// tables, or no table: the packed column itself, widened exactly into a row (cosine's scale is not exact to
// redo).
static bool reads_table_rows(const PackedCodebookView& cb, const MatrixView& weight) {
  return cb.metric == Metric::L2 && weight.data != nullptr && weight.dtype == DType::Float32 &&
         weight.col_stride == 1;
}

void prefetch_candidates(const PackedCodebookView& cb, const MatrixView& weight, const int64_t* indices,
                         int64_t count) {
  if (!reads_table_rows(cb, weight)) return;
  for (int64_t c = 0; c < count; ++c) {
    const float* row = static_cast<const float*>(weight.data) + indices[c] * weight.row_stride;
    for (int64_t d = 0; d < cb.dim; d += 16) _mm_prefetch(reinterpret_cast<const char*>(row + d), _MM_HINT_T0);
  }
}

void rescore_candidates(const PackedCodebookView& cb, const MatrixView& weight, const float* x,
                        const int64_t* indices, int64_t count, float* scores) {
  thread_local std::vector<float> unpacked, bias;
  thread_local std::vector<const float*> rows;
  bias.resize(static_cast<size_t>(count));
  rows.resize(static_cast<size_t>(count));
  const int64_t dim = cb.dim;
  const bool table_rows = reads_table_rows(cb, weight);
  if (!table_rows) unpacked.resize(static_cast<size_t>(count * dim));
  for (int64_t c = 0; c < count; ++c) {
    bias[c] = cb.bias[indices[c]];
    if (table_rows) {
      rows[c] = static_cast<const float*>(weight.data) + indices[c] * weight.row_stride;
    } else {
      cb.unpack_row(indices[c], unpacked.data() + c * dim, 1);
      rows[c] = unpacked.data() + c * dim;
    }
  }
  const float scale = table_rows ? -2.0f : 1.0f;
  if (active_isa() == Isa::Avx2Fma)
    rescore<true>(x, dim, rows.data(), scale, bias.data(), count, scores);
  else
    rescore<false>(x, dim, rows.data(), scale, bias.data(), count, scores);
}

}  // namespace spae
