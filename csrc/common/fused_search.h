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
// Finish: void(int64_t row, const float* values, const int64_t* indices, int64_t count, float unlisted_from,
//   const RowInfo&), called once per query with its final sorted list, from any thread: the best k (count = k
//   when V >= k), or for engines with a threshold cap and an unsplit codebook every entry under the cap (up to
//   2k). Every row outside the list that the cap let in has a value >= unlisted_from (+inf: there is none).
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
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

// A row's best k candidates so far, under ranks_before. Offers are appended to a buffer of 2k, so an offer
// costs O(1) amortised instead of a sorted insert: that matters for the pre-filter's candidate lists, where
// sorted inserts were ~20% of the search. A full buffer first drops the entries above the row's offer cap
// (Int8Engine: rows proven out of the top k since they were offered, the same test as the driver's mask, so
// NaN stays), and is cut back to the best k (nth_element) only when that frees fewer than k / 2 entries.
// The threshold is the k-th value at the last cut (+inf before), a valid upper bound on the row's final k-th
// value, so every row of the final top-k is offered whatever the cut times, and the final list (finalize:
// drop, cut and sort) is the same for any batch split, thread count or order of offers. A final list of
// fewer than k entries holds every row under the final cap: a row an earlier cut dropped ranked after k
// kept rows, whose lb is at most that cut's threshold; had all k stayed (threshold <= final cap) the list
// would hold k, so the threshold, and the dropped row's lb, lie above the final cap.
struct TopkList {
  float* values;      // capacity 2k
  int64_t* indices;   // capacity 2k
  int64_t count;
  int64_t k;
  float bound = kInf;

  float threshold() const { return bound; }

  void offer(float value, int64_t index, float cap = kInf) {
    make_room(1, cap);
    values[count] = value;
    indices[count] = index;
    ++count;
  }

  // Room for n <= k more offers.
  void make_room(int64_t n, float cap) {
    if (count + n <= 2 * k) return;
    drop_above(cap);
    if (count + n > 2 * k || count > 3 * k / 2) cut();
  }

  // Drops the entries the row's offer cap now refuses: !(value <= cap), as the driver's mask (NaN stays).
  // Branch-free: about a quarter of the entries go, in no predictable order.
  void drop_above(float cap) {
    if (!(cap < kInf)) return;
    int64_t kept = 0;
    for (int64_t j = 0; j < count; ++j) {
      const float value = values[j];
      values[kept] = value;
      indices[kept] = indices[j];
      kept += !(value > cap);
    }
    count = kept;
  }

  // Keep the best k; with sorted, also order them by ranks_before. With keep_all nothing is dropped (only
  // ordered, with sorted).
  void cut(bool sorted = false, bool keep_all = false) {
    if (!cut_by_keys(sorted, keep_all)) cut_by_pairs(sorted, keep_all);
  }

  // cut on 64-bit keys (the value's bits mapped to an unsigned order, then the index): the same order as
  // ranks_before where every value is a number other than -0 and every index fits in 32 bits (else false,
  // nothing changed); integer compares sort about twice as fast as the pair comparator's float branches.
  bool cut_by_keys(bool sorted, bool keep_all) {
    thread_local std::vector<uint64_t> keys;
    keys.resize(static_cast<size_t>(count));
    bool ordinary = true;
    for (int64_t j = 0; j < count; ++j) {
      uint32_t bits;
      std::memcpy(&bits, &values[j], sizeof bits);
      ordinary &= (bits & 0x7fffffffu) <= 0x7f800000u && bits != 0x80000000u &&
                  static_cast<uint64_t>(indices[j]) <= 0xffffffffu;
      const uint32_t order = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
      keys[j] = static_cast<uint64_t>(order) << 32 | static_cast<uint32_t>(indices[j]);
    }
    if (!ordinary) return false;
    const auto value_of = [](uint64_t key) {
      const uint32_t order = static_cast<uint32_t>(key >> 32);
      const uint32_t bits = (order & 0x80000000u) ? order & 0x7fffffffu : ~order;
      float value;
      std::memcpy(&value, &bits, sizeof value);
      return value;
    };
    select(keys, std::less<uint64_t>(), value_of, sorted, keep_all);
    for (int64_t j = 0; j < count; ++j) {
      values[j] = value_of(keys[j]);
      indices[j] = static_cast<int64_t>(keys[j] & 0xffffffffu);
    }
    return true;
  }

  void cut_by_pairs(bool sorted, bool keep_all) {
    thread_local std::vector<std::pair<float, int64_t>> scratch;
    scratch.resize(static_cast<size_t>(count));
    for (int64_t j = 0; j < count; ++j) scratch[j] = {values[j], indices[j]};
    const auto before = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return ranks_before(a.first, a.second, b.first, b.second);
    };
    select(scratch, before, [](const std::pair<float, int64_t>& item) { return item.first; }, sorted, keep_all);
    for (int64_t j = 0; j < count; ++j) {
      values[j] = scratch[j].first;
      indices[j] = scratch[j].second;
    }
  }

  // cut's selection on `items` (the list's count entries, in either representation) ordered by `before`.
  template <class Item, class Before, class ValueOf>
  void select(std::vector<Item>& items, Before before, ValueOf value_of, bool sorted, bool keep_all) {
    if (count > k && !keep_all) {
      std::nth_element(items.begin(), items.begin() + (k - 1), items.end(), before);
      bound = value_of(items[k - 1]);
      count = k;
    }
    if (sorted) std::sort(items.begin(), items.begin() + count, before);
  }

  // The final list, sorted: the best k, or with keep_all every entry under the cap (up to 2k).
  void finalize(float cap = kInf, bool keep_all = false) {
    drop_above(cap);
    cut(true, keep_all);
  }
};

// Engines may append a panel's offers to a list at once (Int8Engine, AVX-512): static constexpr bool
// kBulkOffers = true and uint32_t append_offers(const RowInfo&, const float* scores, int64_t first_column,
// uint32_t mask, float* values, int64_t* indices) const, which writes the columns of `mask` in ascending order
// (and may write up to kWidth entries: the lists keep that much room past 2k) and returns those of them that
// may lower the row's cap; threshold_cap then runs for those only, in column order.
template <class Engine, class = void>
struct HasBulkOffers : std::false_type {};
template <class Engine>
struct HasBulkOffers<Engine, std::void_t<decltype(Engine::kBulkOffers)>> : std::bool_constant<Engine::kBulkOffers> {};

// Engines may cap a row's offer threshold below its list's (Int8Engine: rows that cannot win are never
// listed): static constexpr bool kThresholdCap = true, float initial_cap(const RowInfo&) const (the cap
// before any offer) and float threshold_cap(RowInfo&, float value, int64_t column, float cap) const, called
// after each offer with the row's cap, returning its new cap.
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
  static_assert(kTile <= 32, "the offering rows of a tile are one bit each");
  const int64_t num_queries = source.rows(), dim = source.dim();
  if (num_queries == 0) return {};
  if (dim != engine.dim() || k < 1 || k > engine.rows() || engine.rows() < 1) return {Status::BadArgument, -1};

  const int threads = std::max(1, num_threads);
  const int64_t words = engine.words_per_row();
  const int64_t block_rows = query_block_rows(words, num_queries, kTile, k);
  const int64_t num_blocks = (num_queries + block_rows - 1) / block_rows;
  const int64_t num_panels = engine.num_panels();
  // Bulk appends need room for a whole panel after a cut to k.
  const bool bulk_offers = HasBulkOffers<Engine>::value && k >= kWidth;
  const int64_t list_stride = 2 * k + (bulk_offers ? kWidth : 0);

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
      list_values.resize(static_cast<size_t>(block_rows * list_stride));
      list_indices.resize(static_cast<size_t>(block_rows * list_stride));
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
        lists[r] = {list_values.data() + r * list_stride, list_indices.data() + r * list_stride, 0, k};
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
        const int64_t columns = std::min<int64_t>(kWidth, engine.rows() - first_column);
        const uint32_t valid = columns == 32 ? ~0u : (1u << columns) - 1u;
        for (int64_t tile = 0; tile < padded_rows; tile += kTile) {
          const int64_t tile_rows = std::min<int64_t>(kTile, rows - tile);
          for (int r = 0; r < kTile; ++r)
            thresholds[r] = r < tile_rows ? std::min(lists[tile + r].threshold(), caps[tile + r]) : -kInf;
          engine.tile(packed.data() + tile * words, p, thresholds, scores.data(), masks);
          // The rows with offers, found without a branch per row (the offer rate of a long list's row is far
          // from 0 or 1 for much of the scan, so a per-row test mispredicts often).
          uint32_t offering = 0;
          for (int r = 0; r < tile_rows; ++r) offering |= static_cast<uint32_t>((masks[r] & valid) != 0) << r;
          while (offering) {
            const int r = __builtin_ctz(offering);
            offering &= offering - 1;
            uint32_t mask = masks[r] & valid;
            TopkList& list = lists[tile + r];
            float& cap = caps[tile + r];
            const float* row_scores = scores.data() + r * kWidth;
            if constexpr (HasBulkOffers<Engine>::value) {
              if (bulk_offers) {
                const int count = __builtin_popcount(mask);
                list.make_room(count, cap);
                uint32_t lowering = engine.append_offers(info[tile + r], row_scores, first_column, mask,
                                                         list.values + list.count, list.indices + list.count);
                list.count += count;
                while (lowering) {
                  const int c = __builtin_ctz(lowering);
                  lowering &= lowering - 1;
                  cap = engine.threshold_cap(info[tile + r], row_scores[c], first_column + c, cap);
                }
                continue;
              }
            }
            while (mask) {
              const int c = __builtin_ctz(mask);
              mask &= mask - 1;
              const float value = row_scores[c];
              list.offer(value, first_column + c, cap);
              if constexpr (HasThresholdCap<Engine>::value)
                cap = engine.threshold_cap(info[tile + r], value, first_column + c, cap);
            }
          }
        }
      }

      // A capped engine's unsplit list keeps what it holds past the best k: the rows it could not otherwise
      // clear would take another pass over the codebook (Int8Engine).
      const bool keep_all = HasThresholdCap<Engine>::value && splits == 1;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = first_row + r;
        TopkList& list = lists[r];
        list.finalize(caps[r], keep_all);
        if (splits == 1) {
          // Outside the list, besides rows above the cap: rows refused or cut at the list's threshold, so no
          // smaller than its bound (kept-all lists) or its k-th value (cut lists; one of fewer than k lost
          // none, see TopkList).
          const float unlisted_from = keep_all ? list.bound : list.count == k ? list.values[k - 1] : kInf;
          finish(row, list.values, list.indices, list.count, k >= engine.rows() ? kInf : unlisted_from, info[r]);
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
        const float unlisted_from = merged == k && k < engine.rows() ? merged_values[k - 1] : kInf;
        finish(row, merged_values.data(), merged_indices.data(), merged, unlisted_from, partial_info[row]);
      }
    }
  }
  return {};
}

}  // namespace fused
}  // namespace spae
