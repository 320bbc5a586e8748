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
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <new>
#include <vector>

#include "spae_native.h"

namespace spae {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kQueryBlockBytes = 512 * 1024;  // packed query block kept in L2 while panels stream
constexpr int64_t kMaxQueryBlockRows = 240;
constexpr int64_t kMinPanelsPerSplit = 16;

// Total order on (value, index): smaller value first, NaN after every number, then lower index.
inline bool ranks_before(float value_a, int64_t index_a, float value_b, int64_t index_b) {
  if (value_a < value_b) return true;
  if (value_b < value_a) return false;
  if (value_a == value_b) return index_a < index_b;
  const bool nan_a = std::isnan(value_a), nan_b = std::isnan(value_b);
  if (nan_a != nan_b) return nan_b;
  return index_a < index_b;
}

// A row's best k candidates so far, sorted by ranks_before.
struct TopkList {
  float* values;
  int64_t* indices;
  int64_t count;
  int64_t k;

  float threshold() const { return count < k ? kInf : values[k - 1]; }

  void offer(float value, int64_t index) {
    int64_t pos = count;
    while (pos > 0 && ranks_before(value, index, values[pos - 1], indices[pos - 1])) --pos;
    if (pos >= k) return;
    const int64_t last = std::min(count, k - 1);
    for (int64_t j = last; j > pos; --j) {
      values[j] = values[j - 1];
      indices[j] = indices[j - 1];
    }
    values[pos] = value;
    indices[pos] = index;
    if (count < k) ++count;
  }
};

inline float finish_distance(Metric metric, float score, double query_norm_sq) {
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

int64_t query_block_rows(int64_t dim, int64_t num_queries) {
  int64_t rows = kQueryBlockBytes / (std::max<int64_t>(dim, 1) * static_cast<int64_t>(sizeof(float)));
  rows = std::clamp<int64_t>(rows, kTileRows, kMaxQueryBlockRows);
  rows = std::min(rows, num_queries + kTileRows - 1);
  return std::max<int64_t>(kTileRows, rows / kTileRows * kTileRows);
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

}  // namespace

StatusInfo pack_codebook(const MatrixView& e, Metric metric, float* panels, float* bias, double* max_norm,
                         int num_threads) {
  const int64_t rows = e.rows, dim = e.cols;
  const int64_t num_panels = (rows + kPanelWidth - 1) / kPanelWidth;
  std::atomic<int64_t> bad_row{-1};
  std::atomic<int> bad_status{static_cast<int>(Status::Ok)};
  double global_max = 0.0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(max : global_max)
  for (int64_t p = 0; p < num_panels; ++p) {
    float* panel = panels + p * dim * kPanelWidth;
    for (int c = 0; c < kPanelWidth; ++c) {
      const int64_t row = p * kPanelWidth + c;
      if (row >= rows) {
        for (int64_t d = 0; d < dim; ++d) panel[d * kPanelWidth + c] = 0.0f;
        bias[row] = kInf;  // pad column: never selected
        continue;
      }
      double sum = 0.0;
      bool finite = true;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = e.at(row, d);
        finite &= std::isfinite(v);
        sum += static_cast<double>(v) * v;
      }
      if (!finite || (metric == Metric::L2 && sum > std::numeric_limits<float>::max())) {
        int64_t expected = -1;
        if (bad_row.compare_exchange_strong(expected, row))
          bad_status.store(static_cast<int>(finite ? Status::Overflow : Status::NonFiniteCodebook));
        continue;
      }
      const double norm = std::sqrt(sum);
      double scale = -1.0;
      if (metric == Metric::L2) scale = -2.0;
      if (metric == Metric::Cosine) scale = -1.0 / std::max(norm, kCosineEps);
      for (int64_t d = 0; d < dim; ++d)
        panel[d * kPanelWidth + c] = static_cast<float>(scale * static_cast<double>(e.at(row, d)));
      bias[row] = metric == Metric::L2 ? static_cast<float>(sum) : 0.0f;
      const double used_norm = metric == Metric::Cosine ? norm / std::max(norm, kCosineEps) : norm;
      global_max = std::max(global_max, used_norm);
    }
  }
  if (bad_row.load() >= 0) {
    // Report the lowest offending row, independent of thread timing.
    for (int64_t row = 0; row < rows; ++row) {
      double sum = 0.0;
      bool finite = true;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = e.at(row, d);
        finite &= std::isfinite(v);
        sum += static_cast<double>(v) * v;
      }
      if (!finite) return {Status::NonFiniteCodebook, row};
      if (metric == Metric::L2 && sum > std::numeric_limits<float>::max()) return {Status::Overflow, row};
    }
  }
  *max_norm = global_max;
  return {};
}

StatusInfo search_topk(const SearchRequest& req) {
  const MatrixQuerySource source(req.queries);
  return search_topk_source(source, req.codebook, req.k, req.check_finite, req.num_threads, req.out_dist,
                            req.out_index);
}

StatusInfo search_topk_source(const QuerySource& source, const PackedCodebookView& cb, const int64_t k,
                              const bool check_finite, const int num_threads, float* const out_dist,
                              int64_t* const out_index) {
  const int64_t num_queries = source.rows(), dim = source.dim();
  if (num_queries == 0) return {};
  if (dim != cb.dim || k < 1 || k > cb.rows || cb.rows < 1) return {Status::BadArgument, -1};

  const MicroKernel kernel =
#if defined(SPAE_HAVE_AVX2_KERNEL)
      active_isa() == Isa::Avx2Fma ? micro_kernel_avx2 :
#endif
                                   micro_kernel_portable;

  const int threads = std::max(1, num_threads);
  const int64_t block_rows = query_block_rows(dim, num_queries);
  const int64_t num_blocks = (num_queries + block_rows - 1) / block_rows;
  const int64_t num_panels = cb.num_panels();

  // Split the codebook range only when there are too few query blocks to keep every thread busy.
  int64_t splits = 1;
  if (threads > 1 && num_blocks < 2 * threads) {
    splits = (4 * threads + num_blocks - 1) / num_blocks;
    splits = std::clamp<int64_t>(splits, 1, std::max<int64_t>(1, num_panels / kMinPanelsPerSplit));
  }
  const int64_t panels_per_split = (num_panels + splits - 1) / splits;
  splits = (num_panels + panels_per_split - 1) / panels_per_split;

  std::vector<float> partial_values;
  std::vector<int64_t> partial_indices, partial_counts;
  std::vector<double> partial_norm_sq;
  try {
    if (splits > 1) {
      partial_norm_sq.resize(static_cast<size_t>(num_queries));
      partial_values.resize(static_cast<size_t>(num_queries * splits * k));
      partial_indices.resize(static_cast<size_t>(num_queries * splits * k));
      partial_counts.resize(static_cast<size_t>(num_queries * splits));
    }
  } catch (const std::bad_alloc&) {
    return {Status::OutOfMemory, -1};
  }

  std::atomic<int> failed_status{static_cast<int>(Status::Ok)};
  std::atomic<int64_t> failed_detail{std::numeric_limits<int64_t>::max()};
  auto record_failure = [&](StatusInfo info) {
    // Keep the lowest row together with its own status, so the message does not depend on thread timing.
#pragma omp critical(spae_search_failure)
    if (info.detail < failed_detail.load()) {
      failed_detail.store(info.detail);
      failed_status.store(static_cast<int>(info.status));
    }
  };

  const int64_t num_items = num_blocks * splits;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> packed, row_buffer, list_values, scores(kTileRows * kPanelWidth);
    std::vector<int64_t> list_indices;
    std::vector<double> norm_sq;
    std::vector<TopkList> lists;
    bool allocated = true;
    try {
      packed.resize(static_cast<size_t>(block_rows * dim));
      row_buffer.resize(static_cast<size_t>(dim));
      list_values.resize(static_cast<size_t>(block_rows * k));
      list_indices.resize(static_cast<size_t>(block_rows * k));
      norm_sq.resize(static_cast<size_t>(block_rows));
      lists.resize(static_cast<size_t>(block_rows));
    } catch (const std::bad_alloc&) {
      allocated = false;
      record_failure({Status::OutOfMemory, -1});
    }

#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_items; ++item) {
      const int64_t block = item / splits, split = item % splits;
      const int64_t first_row = block * block_rows;
      // After a failure only blocks that may hold a lower bad row still run their checks.
      if (!allocated || failed_detail.load(std::memory_order_relaxed) < first_row) continue;
      const int64_t rows = std::min(block_rows, num_queries - first_row);
      const int64_t padded_rows = (rows + kTileRows - 1) / kTileRows * kTileRows;
      const StatusInfo packed_status =
          pack_query_block(source, cb.metric, cb, check_finite, first_row, rows, padded_rows,
                           row_buffer.data(), packed.data(), norm_sq.data());
      if (packed_status.status != Status::Ok) {
        record_failure(packed_status);
        continue;
      }
      if (failed_status.load(std::memory_order_relaxed) != static_cast<int>(Status::Ok)) continue;
      for (int64_t r = 0; r < rows; ++r) lists[r] = {list_values.data() + r * k, list_indices.data() + r * k, 0, k};

      const int64_t panel_begin = split * panels_per_split;
      const int64_t panel_end = std::min(num_panels, panel_begin + panels_per_split);
      float thresholds[kTileRows];
      uint32_t masks[kTileRows];
      for (int64_t p = panel_begin; p < panel_end; ++p) {
        const float* panel = cb.panels + p * dim * kPanelWidth;
        const float* bias = cb.bias + p * kPanelWidth;
        const int64_t first_column = p * kPanelWidth;
        for (int64_t tile = 0; tile < padded_rows; tile += kTileRows) {
          const int64_t tile_rows = std::min<int64_t>(kTileRows, rows - tile);
          for (int r = 0; r < kTileRows; ++r) thresholds[r] = r < tile_rows ? lists[tile + r].threshold() : -kInf;
          kernel(packed.data() + tile * dim, panel, bias, dim, thresholds, scores.data(), masks);
          for (int r = 0; r < tile_rows; ++r) {
            uint32_t mask = masks[r];
            while (mask) {  // ascending columns: equal scores keep the lower index first
              const int c = __builtin_ctz(mask);
              mask &= mask - 1;
              const int64_t column = first_column + c;
              if (column < cb.rows) lists[tile + r].offer(scores[r * kPanelWidth + c], column);
            }
          }
        }
      }

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = first_row + r;
        const TopkList& list = lists[r];
        if (splits == 1) {
          for (int64_t j = 0; j < k; ++j) {
            out_dist[row * k + j] = finish_distance(cb.metric, list.values[j], norm_sq[r]);
            out_index[row * k + j] = list.indices[j];
          }
        } else {
          const int64_t slot = row * splits + split;
          partial_counts[slot] = list.count;
          std::copy(list.values, list.values + list.count, partial_values.begin() + slot * k);
          std::copy(list.indices, list.indices + list.count, partial_indices.begin() + slot * k);
          if (split == 0) partial_norm_sq[row] = norm_sq[r];
        }
      }
    }
  }
  if (failed_status.load() != static_cast<int>(Status::Ok))
    return {static_cast<Status>(failed_status.load()), failed_detail.load()};

  if (splits > 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < num_queries; ++row) {
      std::vector<int64_t> heads(static_cast<size_t>(splits), 0);
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t slot = row * splits + s;
          if (heads[s] >= partial_counts[slot]) continue;
          const int64_t at = slot * k + heads[s];
          if (best < 0) {
            best = s;
            continue;
          }
          const int64_t best_at = (row * splits + best) * k + heads[best];
          if (ranks_before(partial_values[at], partial_indices[at], partial_values[best_at], partial_indices[best_at]))
            best = s;
        }
        const int64_t best_at = (row * splits + best) * k + heads[best];
        ++heads[best];
        out_dist[row * k + j] = finish_distance(cb.metric, partial_values[best_at], partial_norm_sq[row]);
        out_index[row * k + j] = partial_indices[best_at];
      }
    }
  }
  return {};
}

}  // namespace spae
