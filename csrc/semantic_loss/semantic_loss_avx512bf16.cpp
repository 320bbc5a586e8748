// AVX512-BF16 pieces of the fused semantic loss at precision "bf16" (semantic_loss.cpp), compiled with
// -mavx512f -mavx512bf16 and used only where the CPU reports avx512_bf16 (cpu_features.cpp).
//
// Precision "bf16" is the loss of bf16(z) against bf16(E) (both rounded to nearest even), with every product
// exact (8-bit x 8-bit significands fit fp32) and fp32 accumulation; the softmax weights that form the
// gradient's weighted embedding sum are rounded to bf16 as well. VDPBF16PS adds two such products per fp32
// lane and instruction, twice the multiply-adds per instruction of an fp32 FMA.
//
//   semantic_scores_bf16:     scores of a 6-row tile against one group of 64 vocabulary rows,
//                             score[r][c] = ||e_c||^2 + sum_d z[r][d] * (-2 e_c[d])   (the fp32 kernel's score)
//       Operands: the tile as [D/2][6] 32-bit words, each the bf16 pair (z[2j], z[2j+1]); the group as
//       [D/2][64] words (-2 e_c[2j], -2 e_c[2j+1]) (-2e is exact in bf16). 24 accumulators (6 rows x 4
//       zmm of 16 columns), per pair step 4 loads, 24 VDPBF16PS with an embedded broadcast of the row's pair.
//       Output in the fp32 kernel's layout [panel][row][16], so the softmax tile kernels read it unchanged.
//   semantic_accumulate_bf16: acc[6][D] += w[6][64] x rows[64][D] with bf16 weights and rows (acc: 6 row
//       pointers, each round_up(D, 64) floats).
//       Operands: the weights as [6][32] words (w[r][2j], w[r][2j+1]); the group's rows as [32][Dpad] words
//       (e_{2j}[d], e_{2j+1}[d]). Per chunk of 64 output columns: 24 accumulators loaded from acc, 32 pair
//       steps of 4 loads and 24 VDPBF16PS, stored back. Each output is one chain in ascending vocabulary
//       pair, so it does not depend on the tiling or the thread.
//   semantic_round_weights_bf16: w[6][64] fp32 -> [6][32] bf16 pairs (round to nearest even).
#include <immintrin.h>

#include "semantic_loss/semantic_loss.h"

namespace spae {

#define SPAE_BF16_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
// Tile row r's 64 fp32 outputs as four named zmm (GCC 12 keeps an array of vectors partly on the stack; see the
// VNNI kernel): acc<r>_0 .. acc<r>_3 = base[0 .. 63].
#define SPAE_BF16_ACC_LOAD(r, base)                     \
  __m512 acc##r##_0 = _mm512_loadu_ps(base);            \
  __m512 acc##r##_1 = _mm512_loadu_ps((base) + 16);     \
  __m512 acc##r##_2 = _mm512_loadu_ps((base) + 32);     \
  __m512 acc##r##_3 = _mm512_loadu_ps((base) + 48);
// One pair step's 64 operand words: b0 .. b3 = words[0 .. 63].
#define SPAE_BF16_PAIRS_LOAD(words)                                              \
  const __m512bh b0 = (__m512bh)_mm512_loadu_si512(words);                       \
  const __m512bh b1 = (__m512bh)_mm512_loadu_si512((words) + 16);                \
  const __m512bh b2 = (__m512bh)_mm512_loadu_si512((words) + 32);                \
  const __m512bh b3 = (__m512bh)_mm512_loadu_si512((words) + 48);
// Row r's bf16 pair `word`, broadcast, times b0 .. b3 into its four accumulators.
#define SPAE_BF16_DOT4(r, word)                                                   \
  {                                                                               \
    const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(word));       \
    acc##r##_0 = _mm512_dpbf16_ps(acc##r##_0, a, b0);                             \
    acc##r##_1 = _mm512_dpbf16_ps(acc##r##_1, a, b1);                             \
    acc##r##_2 = _mm512_dpbf16_ps(acc##r##_2, a, b2);                             \
    acc##r##_3 = _mm512_dpbf16_ps(acc##r##_3, a, b3);                             \
  }

void semantic_scores_bf16(const uint32_t* tile_pairs, const uint32_t* group_pairs, const float* group_bias,
                          int64_t pairs, float* scores) {
  static_assert(kTileRows == 6 && kSemanticGroupCols == 64 && kPanelWidth == 16, "a 6 x 64 tile");
#define SPAE_BF16_DECLARE(r) SPAE_BF16_ACC_LOAD(r, group_bias)
#define SPAE_BF16_STEP(r) SPAE_BF16_DOT4(r, tile_pairs[r])
#define SPAE_BF16_STORE(r)                                                     \
  _mm512_storeu_ps(scores + (0 * kTileRows + r) * kPanelWidth, acc##r##_0);  \
  _mm512_storeu_ps(scores + (1 * kTileRows + r) * kPanelWidth, acc##r##_1);  \
  _mm512_storeu_ps(scores + (2 * kTileRows + r) * kPanelWidth, acc##r##_2);  \
  _mm512_storeu_ps(scores + (3 * kTileRows + r) * kPanelWidth, acc##r##_3);
  SPAE_BF16_ROWS(SPAE_BF16_DECLARE)
  for (int64_t j = 0; j < pairs; ++j, tile_pairs += kTileRows, group_pairs += kSemanticGroupCols) {
    SPAE_BF16_PAIRS_LOAD(group_pairs)
    SPAE_BF16_ROWS(SPAE_BF16_STEP)
  }
  SPAE_BF16_ROWS(SPAE_BF16_STORE)
#undef SPAE_BF16_STORE
#undef SPAE_BF16_STEP
#undef SPAE_BF16_DECLARE
}

void semantic_accumulate_bf16(const uint32_t* weight_pairs, const uint32_t* row_pairs, int64_t dim_pad,
                              float* const* acc) {
  constexpr int kPairs = kSemanticGroupCols / 2;  // 32 pair steps per group
#define SPAE_BF16_LOAD(r) SPAE_BF16_ACC_LOAD(r, acc[r] + d0)
#define SPAE_BF16_STEP(r) SPAE_BF16_DOT4(r, weight_pairs[r * kPairs + j])
#define SPAE_BF16_STORE(r)                                   \
  _mm512_storeu_ps(acc[r] + d0, acc##r##_0);      \
  _mm512_storeu_ps(acc[r] + d0 + 16, acc##r##_1); \
  _mm512_storeu_ps(acc[r] + d0 + 32, acc##r##_2); \
  _mm512_storeu_ps(acc[r] + d0 + 48, acc##r##_3);
  for (int64_t d0 = 0; d0 < dim_pad; d0 += 64) {
    SPAE_BF16_ROWS(SPAE_BF16_LOAD)
    const uint32_t* rows = row_pairs + d0;
    for (int j = 0; j < kPairs; ++j, rows += dim_pad) {
      SPAE_BF16_PAIRS_LOAD(rows)
      SPAE_BF16_ROWS(SPAE_BF16_STEP)
    }
    SPAE_BF16_ROWS(SPAE_BF16_STORE)
  }
#undef SPAE_BF16_STORE
#undef SPAE_BF16_STEP
#undef SPAE_BF16_LOAD
}

#undef SPAE_BF16_DOT4
#undef SPAE_BF16_PAIRS_LOAD
#undef SPAE_BF16_ACC_LOAD
#undef SPAE_BF16_ROWS

void semantic_round_weights_bf16(const float* weights, uint32_t* weight_pairs) {
  for (int r = 0; r < kTileRows; ++r) {
    for (int c = 0; c < kSemanticGroupCols; c += 16) {
      const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(weights + r * kSemanticGroupCols + c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(weight_pairs + (r * kSemanticGroupCols + c) / 2),
                          (__m256i)rounded);
    }
  }
}

}  // namespace spae
