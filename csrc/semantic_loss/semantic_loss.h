// spae_fast native CPU core: the fused semantic loss (SPAE-METHOD.md §4, "Semantic guidance").
//
// Torch-free like the rest of csrc/: raw pointers, sizes, element strides, dtype tags; Python
// (spae_fast/ops/semantic_loss.py) validates the arguments and raises from the Status.
#pragma once

#include <cstdint>

#include "common/spae_native.h"

namespace spae {

// Vocabulary columns handled per step of the fused loss: kSemanticGroupPanels packed panels of 16 rows. The
// softmax weights of a 6-row tile over these 64 columns are formed at once and folded into the gradient
// accumulator with one 6 x 64 x D product, so the accumulator is read and written once per 64 columns.
constexpr int kSemanticGroupPanels = 4;
constexpr int kSemanticGroupCols = kSemanticGroupPanels * kPanelWidth;  // 64

// Per position p (a row of z) with candidate set C = C(p) (a list of codebook rows, duplicates counted):
//
//     s_k(p)  = -||z_p - e_k||^2 / tau  + ||z_p||^2 / tau  = (2 z_p . e_k - ||e_k||^2) / tau
//     loss(p) = logsumexp_k s_k(p) - mean_{c in C} s_c(p)
//             = lse(p) - (2 z_p . mean_C(e) - mean_C(||e||^2)) / tau
//     dloss(p)/dz_p = (2 / tau) (sum_k softmax_k(s(p)) e_k - mean_C(e))           (the "grad direction")
//
// ||z_p||^2 / tau cancels between the two terms, so the loss equals the mean over c of
// -log softmax_k(-||z_p - e_k||^2 / tau)[c]. One streaming pass over the packed vocabulary computes lse
// with an online (running max, rescaled sum) logsumexp and, when compute_grad is set, the softmax-weighted
// embedding sum in the same pass (rescaled with the running max, as the output of flash attention), so the
// backward is O(N D). Nothing of size N x V is stored.
struct SemanticLossRequest {
  MatrixView z;                  // [N, D]
  MatrixView weight;             // [V, D] the raw table (rows e_k for the gradient and the set means)
  PackedCodebookView codebook;   // the same table packed for metric l2 (panels -2e, bias ||e||^2)
  const int64_t* candidate_index = nullptr;    // [M] codebook rows of all sets, concatenated
  int64_t num_candidates = 0;                  // M
  const int64_t* candidate_offsets = nullptr;  // [S + 1]: set s is candidate_index[offsets[s] : offsets[s+1]]
  int64_t num_sets = 0;                        // S
  const int64_t* set_of_position = nullptr;    // [N]: the set of each row, -1 for none
  double tau = 1.0;
  bool compute_grad = true;
  bool check_finite = true;
  int num_threads = 1;
  // Precision "bf16" (all three set, else fp32): the loss of bf16(z) against bf16(E), products exact, fp32
  // accumulation, the gradient's softmax weights rounded to bf16 too; see semantic_loss_avx512bf16.cpp. The
  // table packed for it (spae_fast.Codebook builds these once), G = ceil(V / 64) groups of 64 rows:
  const uint32_t* bf16_panels = nullptr;  // [G][ceil(D / 2)][64] words: bf16 pairs (-2e_c[2j], -2e_c[2j+1])
  const uint32_t* bf16_rows = nullptr;    // [G][32][round_up(D, 64)] words: bf16 pairs (e_2i[d], e_2i+1[d])
  const float* bf16_bias = nullptr;       // [G * 64]: ||bf16(e)||^2 in fp32, +inf on pad rows
  float* out_loss = nullptr;  // [N]; 0 for rows without a set or with an empty set
  float* out_grad = nullptr;  // [N, D] contiguous (only with compute_grad); 0 for such rows
};

// BadArgument details: 1 = sizes / tau, 2 = candidate id out of range, 3 = offsets not a valid CSR,
// 4 = set_of_position out of range, 5 = bf16 operands missing or no AVX512-BF16 kernel on this CPU.
// NonFiniteQuery / Overflow: detail is the lowest offending row of z.
StatusInfo semantic_loss(const SemanticLossRequest& request);

// ISA-specific pieces (semantic_loss_portable.cpp: portable; semantic_loss_avx2.cpp: AVX2 + FMA;
// semantic_loss_avx512.cpp: the 16-lane fp32 ones; semantic_loss_avx512bf16.cpp: precision "bf16").
//
// softmax tile: `scores` holds kSemanticGroupPanels micro-kernel outputs [panel][kTileRows][kPanelWidth]
// (score = ||e||^2 - 2 z.e, +inf on pad columns). For each row r: s = score / -tau, new running max
// max_out[r] = max(max_in[r], max_c s), weights[r][c] = exp(s - max_out[r]) (0 for s = -inf), and
// sums[r] = sum_c weights[r][c] in a fixed order.
using SemanticSoftmaxTile = void (*)(const float* scores, float tau, const float* max_in, float* max_out,
                                     float* weights, float* sums);
// accumulate: acc[r][d] += sum_{c < kSemanticGroupCols} weights[r][c] * rows[c * ld_rows + d] for
// r < kTileRows, d < dim (acc: one pointer per row); each (r, d) is one chain in ascending c started from
// acc[r][d] (independent of the tiling and of the ISA's vector width).
using SemanticAccumulate = void (*)(const float* weights, const float* rows, int64_t ld_rows, int64_t dim,
                                    float* const* acc);

#if defined(SPAE_HAVE_AVX512BF16_KERNEL)
// Precision "bf16" pieces (semantic_loss_avx512bf16.cpp; only where cpu_supports_avx512_bf16()).
void semantic_scores_bf16(const uint32_t* tile_pairs, const uint32_t* group_pairs, const float* group_bias,
                          int64_t pairs, float* scores);
void semantic_accumulate_bf16(const uint32_t* weight_pairs, const uint32_t* row_pairs, int64_t dim_pad,
                              float* const* acc);
void semantic_round_weights_bf16(const float* weights, uint32_t* weight_pairs);
#endif
bool cpu_supports_avx512_bf16();
#if defined(SPAE_HAVE_AVX512F_KERNEL)
// fp32 pieces at 16 lanes (semantic_loss_avx512.cpp), bitwise the AVX2 ones; only where cpu_supports_avx512f().
void semantic_scores_avx512(const float* tile_queries, const float* group_panels, const float* group_bias,
                            int64_t dim, float* scores);
void semantic_accumulate_avx512(const float* weights, const float* rows, int64_t ld_rows, int64_t dim,
                                float* const* acc);
#endif
inline int64_t semantic_bf16_dim_pad(int64_t dim) { return (dim + 63) / 64 * 64; }

// For the candidate sets' means: a row added to a set's fp32 partial sum of one vocabulary group
// (dst[d] += src[d]), and the partial added to the set's fp64 sum (dst[d] += double(src[d])), d < dim.
using SemanticAddF32 = void (*)(const float* src, int64_t dim, float* dst);
using SemanticAddF32ToF64 = void (*)(const float* src, int64_t dim, double* dst);
void semantic_add_f32_portable(const float* src, int64_t dim, float* dst);
void semantic_add_f32_to_f64_portable(const float* src, int64_t dim, double* dst);
#if defined(SPAE_HAVE_AVX2_KERNEL)
void semantic_add_f32_avx2(const float* src, int64_t dim, float* dst);
void semantic_add_f32_to_f64_avx2(const float* src, int64_t dim, double* dst);
#endif

// The FMA chains of an accumulate (fused multiply-adds, as the AVX2 / AVX-512 kernels), one output at a time,
// for the columns begin .. end - 1: the tails of the vector kernels.
void semantic_accumulate_columns(const float* weights, const float* rows, int64_t ld_rows, int64_t begin,
                                 int64_t end, float* const* acc);
void semantic_softmax_tile_portable(const float* scores, float tau, const float* max_in, float* max_out,
                                    float* weights, float* sums);
void semantic_accumulate_portable(const float* weights, const float* rows, int64_t ld_rows, int64_t dim,
                                  float* const* acc);
#if defined(SPAE_HAVE_AVX2_KERNEL)
void semantic_softmax_tile_avx2(const float* scores, float tau, const float* max_in, float* max_out,
                                float* weights, float* sums);
void semantic_accumulate_avx2(const float* weights, const float* rows, int64_t ld_rows, int64_t dim,
                              float* const* acc);
#endif

}  // namespace spae
