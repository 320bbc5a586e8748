// The nearest / top-k op of the CPU core: the exact fused search (search.cpp) and its certified int8
// pre-filter (nearest_exact.cpp), which the SAQ op runs once per layer.
#pragma once

#include <cstdint>

#include "common/spae_native.h"

namespace spae {

// Exact fused top-k of every query of `source` (shared by search_topk and saq): block packing from the
// source, the micro-kernel with the threshold pre-filter, per-row top-k lists, the split-V merge.
// On NonFiniteQuery / Overflow, detail is the lowest offending query row.
StatusInfo search_topk_source(const QuerySource& source, const PackedCodebookView& codebook, int64_t k,
                              bool check_finite, int num_threads, float* out_dist, int64_t* out_index);

// The codebook quantized to int8 per row for the certified pre-filter (nearest and SAQ), from the packed fp32
// panels p and bias of any metric: ceil(V / 16) panels of [quads][16] words, [4][16] fp32 column data and [16] int32 offsets
// per panel (pads: zero rows, bias +inf), and the maxima over rows of ||p||, ||p - p~||, ||p~|| and |bias|.
struct PackedInt8CodebookView {
  const uint32_t* panels = nullptr;
  const float* columns = nullptr;
  const int32_t* offsets = nullptr;
  int64_t rows = 0, dim = 0;
  double max_norm = 0.0, max_rounding = 0.0, max_rounded_norm = 0.0, max_abs_bias = 0.0;
  int64_t quads() const { return (dim + 3) / 4; }
  int64_t num_panels() const { return (rows + kInt8PanelWidth - 1) / kInt8PanelWidth; }
};

// Packs the int8 copy; writes the four maxima to bounds[0..3].
void pack_codebook_int8(const PackedCodebookView& fp32, uint32_t* panels, float* columns, int32_t* offsets,
                        double* bounds, int num_threads);

// The largest k the certified int8 pre-filter serves (topk_exact); larger k take the fp32 search.
constexpr int64_t kMaxPrefilterK = 16;

// Exact k nearest rows (k <= kMaxPrefilterK; dist / index [N, k]) of every query of `source`, with the same
// certified pre-filter as nearest_exact (its certificate generalised from the winner to the k best).
StatusInfo topk_exact(const QuerySource& source, const PackedCodebookView& codebook, const MatrixView& weight,
                      const PackedInt8CodebookView& prefilter, int64_t k, bool check_finite, int num_threads,
                      float* out_dist, int64_t* out_index, int64_t* full_search_rows);

// Exact nearest row (k = 1) of every query of `source` (nearest_exact.cpp): where `prefilter` is set and the
// CPU has AVX512-VNNI, an int8 search keeps 64 candidates (512 in a second pass for the rows the first cannot
// settle), a rigorous bound proves the exact fp32 winner is among them and the fp32 micro-kernel rescores the
// few that can still win; other rows (and everything without the pre-filter) take the full fp32 search.
// dist / index are bitwise the full search's. `weight` ([V, D] raw table, may be empty) speeds up the l2
// rescoring. Adds the rows sent to the full search to *full_search_rows.
StatusInfo nearest_exact(const QuerySource& source, const PackedCodebookView& codebook, const MatrixView& weight,
                         const PackedInt8CodebookView& prefilter, bool check_finite, int num_threads,
                         float* out_dist, int64_t* out_index, int64_t* full_search_rows);

// Pieces of the fp32 search (search.cpp) the certified rescoring reuses so its arithmetic is the same:
// packs queries [first, first + count) into [padded_count / 6][D][6] (cosine: normalised) with ||x||^2 in
// fp64, with the search's checks when `check`; and the reported distance from a score.
StatusInfo pack_query_block(const QuerySource& source, Metric metric, const PackedCodebookView& codebook,
                            bool check, int64_t first, int64_t count, int64_t padded_count, float* row_buffer,
                            float* packed, double* norm_sq);
float finish_distance(Metric metric, float score, double query_norm_sq);

// Exact fp32 scores bias_c + x . p_c of the table rows indices[0 .. count) for one packed query x
// (rescore_avx512.cpp), bitwise the active micro-kernel's. Needs AVX-512F (the int8 pre-filter's CPUs).
void rescore_candidates(const PackedCodebookView& codebook, const MatrixView& weight, const float* x,
                        const int64_t* indices, int64_t count, float* scores);

// Prefetches the table rows rescore_candidates will read for these candidates (l2 fp32 tables; else nothing).
void prefetch_candidates(const PackedCodebookView& codebook, const MatrixView& weight, const int64_t* indices,
                         int64_t count);

struct SearchRequest {
  MatrixView queries;  // [N, D]
  PackedCodebookView codebook;
  int64_t k = 1;
  bool check_finite = true;
  int num_threads = 1;
  float* out_dist = nullptr;    // [N, k] contiguous
  int64_t* out_index = nullptr;  // [N, k] contiguous
  // Optional, k <= kMaxPrefilterK (panels == nullptr: off): the certified int8 pre-filter (topk_exact).
  MatrixView weight;  // [V, D] raw table (l2 rescoring reads candidate rows from it)
  PackedInt8CodebookView prefilter;
  bool prefilter_adaptive = false;  // probe the first rows, skip the pre-filter when it rarely certifies
  int64_t* out_full_search_rows = nullptr;  // optional: queries that took the full fp32 search
};

// Exact fused top-k (k = 1 is the nearest search). Never materialises N x V.
StatusInfo search_topk(const SearchRequest& request);

}  // namespace spae
