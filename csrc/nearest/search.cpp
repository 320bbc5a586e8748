// Exact fused nearest / top-k search on the CPU.
//
// Math (SPAE-METHOD.md §3, the argmin of every SAQ layer):   k*(x) = argmin_j ||x - e_j||^2
//                                                                   = argmin_j ( ||e_j||^2 - 2 x . e_j )
// The codebook is packed once into panels of 16 rows (p = -2e for l2, with bias ||e||^2), so every score is
// bias_j + x . p_j: one GEMM-shaped contraction over D whose 6 x 16 register tile is consumed at once by
// the selection, never stored as an N x V matrix. Work is split over (query block x codebook range) items
// with OpenMP; partial top-k lists of codebook ranges are merged under the total order (value, index), so
// the answer (lowest index among equal values) is the same for every batch size, split and thread count.
//
// Extra memory: per thread one packed query block (<= 512 KiB) and its top-k lists; plus N x S x k partial
// lists when the codebook range is split (only for small N, S <= 4 x threads). Independent of V.
// The block / split / top-k / merge driver is common/fused_search.h, shared with the SAQ op; this file holds
// the fp32 engine (the 6 x 16 micro-kernels); the codebook packing is common/pack_codebook.cpp.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <new>
#include <vector>

#include "common/fused_search.h"
#include "common/spae_native.h"
#include "nearest/nearest.h"

namespace spae {

float finish_distance(Metric metric, float score, double query_norm_sq) {
  switch (metric) {
    case Metric::L2:
      return static_cast<float>(std::max(0.0, static_cast<double>(score) + query_norm_sq));
    case Metric::InnerProduct:
      return score;
    case Metric::Cosine:
      return std::max(0.0f, 1.0f + score);
  }
  return score;
}

// Packs queries [first, first + count) of the source into micro-panels [count/6][D][6] (zero-padded),
// computing ||x||^2 in fp64 and normalising for cosine. The source writes each row to `row_buffer` ([D]
// fp32) first: this is the pluggable prologue (a plain strided read, or the SAQ target of a layer).
StatusInfo pack_query_block(const QuerySource& source, Metric metric, const PackedCodebookView& codebook,
                            bool check, int64_t first, int64_t count, int64_t padded_count, float* row_buffer,
                            float* packed, double* norm_sq) {
  const int64_t dim = source.dim();
  std::fill(packed, packed + padded_count * dim, 0.0f);
  for (int64_t r = 0; r < count; ++r) {
    const int64_t row = first + r;
    source.load_row(row, row_buffer);
    double sum = 0.0;
    bool finite = true;
    for (int64_t d = 0; d < dim; ++d) {
      const float v = row_buffer[d];
      finite &= std::isfinite(v);
      sum += static_cast<double>(v) * v;
    }
    if (check && !finite) return {Status::NonFiniteQuery, row};
    if (check && metric != Metric::Cosine && std::sqrt(sum) * codebook.max_norm * 2.0 > kMaxNormProduct)
      return {Status::Overflow, row};
    float scale = 1.0f;
    if (metric == Metric::Cosine) scale = static_cast<float>(1.0 / std::max(std::sqrt(sum), kCosineEps));
    norm_sq[r] = sum;
    float* dst = packed + (r / kTileRows) * dim * kTileRows + (r % kTileRows);
    for (int64_t d = 0; d < dim; ++d) dst[d * kTileRows] = row_buffer[d] * scale;
  }
  return {};
}

namespace {

// fp32 scores bias_j + x . p_j with the active 6 x 16 micro-kernel (AVX2 FMA chain or portable mul + add) of
// the panels' format (fp32, or bf16 / fp16 widened exactly in the load).
struct Fp32Engine {
  static constexpr int kTile = kTileRows;
  static constexpr int kWidth = kPanelWidth;
  using Word = float;
  using RowInfo = double;  // ||x||^2 in fp64, for the reported l2 distance

  const PackedCodebookView& cb;
  MicroKernel kernel;

  int64_t dim() const { return cb.dim; }
  int64_t rows() const { return cb.rows; }
  int64_t num_panels() const { return cb.num_panels(); }
  int64_t words_per_row() const { return cb.dim; }
  StatusInfo pack(const QuerySource& source, bool check, int64_t first, int64_t count, int64_t padded_count,
                  float* row_buffer, float* packed, double* norm_sq) const {
    return pack_query_block(source, cb.metric, cb, check, first, count, padded_count, row_buffer, packed, norm_sq);
  }
  void tile(const float* packed_tile, int64_t panel, const float* thresholds, float* scores, uint32_t* masks) const {
    kernel(packed_tile, cb.panel(panel), cb.bias + panel * kPanelWidth, cb.dim, thresholds, scores, masks);
  }
};

}  // namespace

// Rows [first, first + count) of another source.
class RangeSource final : public QuerySource {
 public:
  RangeSource(const QuerySource& base, int64_t first, int64_t count) : base_(base), first_(first), count_(count) {}
  int64_t rows() const override { return count_; }
  int64_t dim() const override { return base_.dim(); }
  void load_row(int64_t row, float* out) const override { base_.load_row(first_ + row, out); }

 private:
  const QuerySource& base_;
  int64_t first_, count_;
};

// Nearest / top-k (k <= kMaxPrefilterK) with the certified pre-filter. Adaptive: the first 1/32 of the queries (>= 16) probes how many
// rows the certificate settles; when more than a quarter of them need the full search anyway (queries far
// from every row, e.g. random ones in high D, where the int8 pass is mostly wasted) the rest go straight to
// the fp32 search. Either way every row's dist / index is the exact fp32 answer, so this changes only speed.
StatusInfo prefiltered_search(const QuerySource& source, const SearchRequest& req, int64_t* full_search_rows) {
  const int64_t num_queries = source.rows();
  // A small probe keeps the cost of a failed probe low (one int8 pass over its rows); 16 rows already tell
  // random high-D queries (nearly all uncertified) from queries near the table's rows (~1% uncertified).
  const int64_t probe = std::max<int64_t>(16, num_queries / 32);
  if (!req.prefilter_adaptive || num_queries < 2 * probe)
    return topk_exact(source, req.codebook, req.weight, req.prefilter, req.k, req.check_finite, req.num_threads,
                         req.out_dist, req.out_index, full_search_rows);
  const RangeSource head(source, 0, probe), tail(source, probe, num_queries - probe);
  int64_t head_full = 0;
  StatusInfo info = topk_exact(head, req.codebook, req.weight, req.prefilter, req.k, req.check_finite,
                               req.num_threads, req.out_dist, req.out_index, &head_full);
  *full_search_rows += head_full;
  if (info.status != Status::Ok) return info;
  if (4 * head_full > probe) {
    info = search_topk_source(tail, req.codebook, req.k, req.check_finite, req.num_threads,
                              req.out_dist + probe * req.k, req.out_index + probe * req.k);
    *full_search_rows += num_queries - probe;
  } else {
    info = topk_exact(tail, req.codebook, req.weight, req.prefilter, req.k, req.check_finite, req.num_threads,
                      req.out_dist + probe * req.k, req.out_index + probe * req.k, full_search_rows);
  }
  if (info.status != Status::Ok && info.detail >= 0) info.detail += probe;
  return info;
}

StatusInfo search_topk(const SearchRequest& req) {
  const MatrixQuerySource source(req.queries);
  if (req.k <= kMaxPrefilterK && req.prefilter.panels != nullptr) {  // certified int8 pre-filter (nearest_exact.cpp)
    int64_t full_search_rows = 0;
    const StatusInfo info = prefiltered_search(source, req, &full_search_rows);
    if (req.out_full_search_rows != nullptr) *req.out_full_search_rows = full_search_rows;
    return info;
  }
  if (req.out_full_search_rows != nullptr) *req.out_full_search_rows = req.queries.rows;
  return search_topk_source(source, req.codebook, req.k, req.check_finite, req.num_threads, req.out_dist,
                            req.out_index);
}

StatusInfo search_topk_source(const QuerySource& source, const PackedCodebookView& cb, const int64_t k,
                              const bool check_finite, const int num_threads, float* const out_dist,
                              int64_t* const out_index) {
  const Fp32Engine engine{cb, active_micro_kernel(cb.format())};
  return fused::run(source, engine, k, check_finite, num_threads,
                    [&](int64_t row, const float* values, const int64_t* indices, int64_t, float, double norm_sq) {
                      for (int64_t j = 0; j < k; ++j) {
                        out_dist[row * k + j] = finish_distance(cb.metric, values[j], norm_sq);
                        out_index[row * k + j] = indices[j];
                      }
                    });
}

}  // namespace spae
