// The fused GEMM + top-k driver shared by every CPU search (nearest / top-k, and each SAQ layer).
//
// An Engine supplies the arithmetic: how a block of queries is packed (from a QuerySource, the pluggable
// prologue), which register tile scores a packed query tile against one packed codebook panel, and what
// each query keeps for the end (its ||x||^2, error bounds, ...). The driver owns everything else and is the
// same for all engines: query blocks sized for L2, OpenMP over (query block x codebook range) items, the
// threshold pre-filter masks, per-row top-k lists under the total order (value, index), the merge of the
// codebook-range splits, and the lowest-row error report. Every value a row sees depends only on that row,
// so results are bitwise identical for any batch size, split and thread count.
//
// Engine interface (see Fp32Engine in nearest/search.cpp, Int8Engine in nearest/nearest_exact.cpp):
//   static constexpr int kTile;     rows of a register tile (MR)
//   static constexpr int kWidth;    codebook rows per packed panel (NR <= 32: one bit each in a mask)
//   using Word = ...;               4-byte element of a packed query block (float, or 4 int8 of one row)
//   using RowInfo = ...;            what a query keeps for its Finish
//   int64_t dim(), rows() (V), num_panels(), words_per_row()   (Words per packed query row)
//   StatusInfo pack(source, check, first, count, padded_count, float* row_buffer, Word* packed,
//                   RowInfo* info)   packed layout: [padded_count / kTile][words_per_row][kTile] Words
//   void tile(const Word* packed_tile, int64_t panel, const float* thresholds, float* scores,
//             uint32_t* masks)       scores [kTile][kWidth]; mask bit c: !(score > threshold[r])
// Finish: void(int64_t row, const float* values, const int64_t* indices, int64_t count, const RowInfo&),
//   called once per query with its final sorted list (count = k when V >= k), from any thread.
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/spae_native.h"

namespace spae {
namespace fused {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kQueryBlockBytes = 512 * 1024;  // packed query block kept in L2 while panels stream
constexpr int64_t kMaxQueryBlockRows = 240;
constexpr int64_t kListBlockBytes = 1 << 20;  // the block's top-k buffers, per thread
constexpr int64_t kMinPanelsPerSplit = 16;
constexpr int64_t kMaxSplitListBytes = int64_t{32} << 20;  // partial top-k lists of the codebook splits

// Total order on (value, index): smaller value first, NaN after every number, then lower index.
inline bool ranks_before(float value_a, int64_t index_a, float value_b, int64_t index_b) {
  if (value_a < value_b) return true;
  if (value_b < value_a) return false;
  if (value_a == value_b) return index_a < index_b;
  const bool nan_a = std::isnan(value_a), nan_b = std::isnan(value_b);
  if (nan_a != nan_b) return nan_b;
  return index_a < index_b;
}

// A row's best k candidates so far, under ranks_before. Offers are appended to a buffer of 2k, cut back to
// the best k (nth_element) when it is full, so an offer costs O(1) amortised instead of a sorted insert:
// that matters for the pre-filter's 64-candidate lists, where sorted inserts were ~20% of the search. The
// threshold is the k-th value at the last cut (+inf before), a valid upper bound on the row's final k-th
// value, so every row of the final top-k is offered whatever the cut times, and the final list (finalize:
// cut and sort) is the same for any batch split, thread count or order of offers.
struct TopkList {
  float* values;      // capacity 2k
  int64_t* indices;   // capacity 2k
  int64_t count;
  int64_t k;
  float bound = kInf;

  float threshold() const { return bound; }

  void offer(float value, int64_t index) {
    if (count == 2 * k) cut();
    values[count] = value;
    indices[count] = index;
    ++count;
  }

  // Keep the best k; with sorted, also order them by ranks_before.
  void cut(bool sorted = false) {
    thread_local std::vector<std::pair<float, int64_t>> scratch;
    scratch.resize(static_cast<size_t>(count));
    for (int64_t j = 0; j < count; ++j) scratch[j] = {values[j], indices[j]};
    const auto before = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return ranks_before(a.first, a.second, b.first, b.second);
    };
    if (count > k) {
      std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), before);
      bound = scratch[k - 1].first;
      count = k;
    }
    if (sorted) std::sort(scratch.begin(), scratch.begin() + count, before);
    for (int64_t j = 0; j < count; ++j) {
      values[j] = scratch[j].first;
      indices[j] = scratch[j].second;
    }
  }

  void finalize() { cut(true); }
};

// Engines may cap a row's offer threshold below its list's (Int8Engine: rows that cannot win are never
// listed): static constexpr bool kThresholdCap = true, float initial_cap(const RowInfo&) const (the cap
// before any offer) and float threshold_cap(RowInfo&, float value, int64_t column) const, called after each
// offer, returning the row's new cap.
template <class Engine, class = void>
struct HasThresholdCap : std::false_type {};
template <class Engine>
struct HasThresholdCap<Engine, std::void_t<decltype(Engine::kThresholdCap)>>
    : std::bool_constant<Engine::kThresholdCap> {};

inline int64_t query_block_rows(int64_t words_per_row, int64_t num_queries, int64_t tile, int64_t k) {
  int64_t rows = kQueryBlockBytes / (std::max<int64_t>(words_per_row, 1) * static_cast<int64_t>(sizeof(float)));
  // Long lists (the pre-filter's 512-candidate second pass) also bound the rows: 2k entries per row.
  rows = std::min(rows, kListBlockBytes / (2 * k * static_cast<int64_t>(sizeof(float) + sizeof(int64_t))));
  rows = std::clamp<int64_t>(rows, tile, kMaxQueryBlockRows);
  rows = std::min(rows, num_queries + tile - 1);
  return std::max<int64_t>(tile, rows / tile * tile);
}

template <class Engine, class Finish>
StatusInfo run(const QuerySource& source, const Engine& engine, const int64_t k, const bool check_finite,
               const int num_threads, Finish&& finish) {
  using RowInfo = typename Engine::RowInfo;
  using Word = typename Engine::Word;
  static_assert(sizeof(Word) == 4, "packed query words are 4 bytes");
  constexpr int kTile = Engine::kTile;
  constexpr int kWidth = Engine::kWidth;
  static_assert(kWidth <= 32, "masks hold one bit per panel column");
  const int64_t num_queries = source.rows(), dim = source.dim();
  if (num_queries == 0) return {};
  if (dim != engine.dim() || k < 1 || k > engine.rows() || engine.rows() < 1) return {Status::BadArgument, -1};

  const int threads = std::max(1, num_threads);
  const int64_t words = engine.words_per_row();
  const int64_t block_rows = query_block_rows(words, num_queries, kTile, k);
  const int64_t num_blocks = (num_queries + block_rows - 1) / block_rows;
  const int64_t num_panels = engine.num_panels();

  // Split the codebook range only when there are too few query blocks to keep every thread busy.
  int64_t splits = 1;
  if (threads > 1 && num_blocks < 2 * threads) {
    splits = (4 * threads + num_blocks - 1) / num_blocks;
    splits = std::clamp<int64_t>(splits, 1, std::max<int64_t>(1, num_panels / kMinPanelsPerSplit));
    // The split lists are kept until the merge: cap them (long lists, many threads, few queries).
    const int64_t bytes_per_split = num_queries * k * static_cast<int64_t>(sizeof(float) + sizeof(int64_t));
    splits = std::clamp<int64_t>(kMaxSplitListBytes / std::max<int64_t>(bytes_per_split, 1), 1, splits);
  }
  const int64_t panels_per_split = (num_panels + splits - 1) / splits;
  splits = (num_panels + panels_per_split - 1) / panels_per_split;

  std::vector<float> partial_values;
  std::vector<int64_t> partial_indices, partial_counts;
  std::vector<RowInfo> partial_info;
  try {
    if (splits > 1) {
      partial_info.resize(static_cast<size_t>(num_queries));
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
    std::vector<Word> packed;
    std::vector<float> row_buffer, list_values, caps, scores(kTile * kWidth);
    std::vector<int64_t> list_indices;
    std::vector<RowInfo> info;
    std::vector<TopkList> lists;
    bool allocated = true;
    try {
      packed.resize(static_cast<size_t>(block_rows * words));
      row_buffer.resize(static_cast<size_t>(dim));
      list_values.resize(static_cast<size_t>(block_rows * 2 * k));
      list_indices.resize(static_cast<size_t>(block_rows * 2 * k));
      info.resize(static_cast<size_t>(block_rows));
      lists.resize(static_cast<size_t>(block_rows));
      caps.resize(static_cast<size_t>(block_rows));
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
      const int64_t padded_rows = (rows + kTile - 1) / kTile * kTile;
      const StatusInfo packed_status = engine.pack(source, check_finite, first_row, rows, padded_rows,
                                                   row_buffer.data(), packed.data(), info.data());
      if (packed_status.status != Status::Ok) {
        record_failure(packed_status);
        continue;
      }
      if (failed_status.load(std::memory_order_relaxed) != static_cast<int>(Status::Ok)) continue;
      for (int64_t r = 0; r < rows; ++r) {
        lists[r] = {list_values.data() + r * 2 * k, list_indices.data() + r * 2 * k, 0, k};
        if constexpr (HasThresholdCap<Engine>::value)
          caps[r] = engine.initial_cap(info[r]);
        else
          caps[r] = kInf;
      }

      const int64_t panel_begin = split * panels_per_split;
      const int64_t panel_end = std::min(num_panels, panel_begin + panels_per_split);
      float thresholds[kTile];
      uint32_t masks[kTile];
      for (int64_t p = panel_begin; p < panel_end; ++p) {
        const int64_t first_column = p * kWidth;
        for (int64_t tile = 0; tile < padded_rows; tile += kTile) {
          const int64_t tile_rows = std::min<int64_t>(kTile, rows - tile);
          for (int r = 0; r < kTile; ++r)
            thresholds[r] = r < tile_rows ? std::min(lists[tile + r].threshold(), caps[tile + r]) : -kInf;
          engine.tile(packed.data() + tile * words, p, thresholds, scores.data(), masks);
          for (int r = 0; r < tile_rows; ++r) {
            uint32_t mask = masks[r];
            while (mask) {
              const int c = __builtin_ctz(mask);
              mask &= mask - 1;
              const int64_t column = first_column + c;
              if (column >= engine.rows()) continue;
              const float value = scores[r * kWidth + c];
              lists[tile + r].offer(value, column);
              if constexpr (HasThresholdCap<Engine>::value)
                caps[tile + r] = engine.threshold_cap(info[tile + r], value, column);
            }
          }
        }
      }

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = first_row + r;
        TopkList& list = lists[r];
        list.finalize();
        if (splits == 1) {
          finish(row, list.values, list.indices, list.count, info[r]);
        } else {
          const int64_t slot = row * splits + split;
          partial_counts[slot] = list.count;
          std::copy(list.values, list.values + list.count, partial_values.begin() + slot * k);
          std::copy(list.indices, list.indices + list.count, partial_indices.begin() + slot * k);
          if (split == 0) partial_info[row] = info[r];
        }
      }
    }
  }
  if (failed_status.load() != static_cast<int>(Status::Ok))
    return {static_cast<Status>(failed_status.load()), failed_detail.load()};

  if (splits > 1) {
#pragma omp parallel num_threads(threads)
    {
      std::vector<int64_t> heads(static_cast<size_t>(splits));
      std::vector<float> merged_values(static_cast<size_t>(k));
      std::vector<int64_t> merged_indices(static_cast<size_t>(k));
#pragma omp for schedule(static)
      for (int64_t row = 0; row < num_queries; ++row) {
        std::fill(heads.begin(), heads.end(), 0);
        int64_t merged = 0;
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
            if (ranks_before(partial_values[at], partial_indices[at], partial_values[best_at],
                             partial_indices[best_at]))
              best = s;
          }
          if (best < 0) break;
          const int64_t best_at = (row * splits + best) * k + heads[best];
          ++heads[best];
          merged_values[j] = partial_values[best_at];
          merged_indices[j] = partial_indices[best_at];
          ++merged;
        }
        finish(row, merged_values.data(), merged_indices.data(), merged, partial_info[row]);
      }
    }
  }
  return {};
}

}  // namespace fused
}  // namespace spae
