// Exact top-k search (k <= kMaxPrefilterK) with the certified int8 pre-filter, shared by `search` (nearest and
// topk) and the SAQ op (k = 1).
//
// nearest_exact runs on any QuerySource (a plain strided query matrix, or the targets of one SAQ layer) and
// any metric: the int8 copy is built from the packed fp32 panels p and bias the exact search scores with
// (l2: p = -2e, bias ||e||^2; ip: p = -e, bias 0; cosine: p = -e/|e|, bias 0), and the query side quantizes
// exactly the vector the fp32 kernel multiplies (for cosine the normalised x / max(|x|, eps), rounded to fp32
// as pack_query_block does). The bound below is stated in those operands only, so it holds for every metric.
// Certified rows are rescored with the fp32 micro-kernel on the query packed by the fp32 search's own
// pack_query_block: scores, ||x||^2 and the reported distance are bitwise the full search's.
// Compiled with -ffp-contract=off (CMakeLists.txt) so the fp64 bookkeeping of the bound is not contracted.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "common/fused_search.h"
#include "nearest/nearest.h"

namespace spae {
namespace {

// ---- certified int8 pre-filter --------------------------------------------------------------------------
//
// Exact answer, low-precision work. Let s_k be the fp32 score the exact search computes for row k (one fp32
// chain bias_k + sum_d x_d p_kd over the packed operands: l2 p = -2e, bias ||e||^2; ip p = -e, bias 0; cosine
// p = -e/|e|, bias 0 and x the fp32 normalised query, the vector pack_query_block hands the kernel, which is
// also what Int8Engine::pack quantizes) and S~_k = bias_k + x~ . p~_k with x~ = s_x q_x and p~_k = s_k q_k
// the int8 quantizations (per query / per row, round to nearest, |q| <= 127). Nothing below depends on the
// metric, only on these operands, so the certificate holds for all three. By Cauchy-Schwarz
//
//     |S~_k - (bias_k + x . p_k)| <= E_k = a P_k + n b_k,    a = ||x - x~||, n = ||x~||, P_k = ||p_k||,
//                                                            b_k = ||p_k - p~_k||
//
// The int8 dot products are exact (int32); the kernel's fp32 epilogue (two products, one sum, the subtraction
// of E_k) and the exact search's fp32 chain add at most G = g (||x|| P + n P~ + 2 B + a P + n b) with
// g = 1.01 (D + 8) 2^-24 and the maxima P, b, P~, B of ||p_k||, b_k, ||p~_k||, |bias_k| (plus 1e-30 D for
// underflow). So the kernel's key lb_k = s~_k - E_k satisfies  lb_k - G <= s_k <= lb_k + 2 E_k + G.
// Keep the m rows with the smallest (lb, index) and let U be the k-th smallest (lb_c + 2E_c) over the rows
// offered to the list (for k = 1 the minimum). A row with lb_j - G > U + G has an exact score above those of
// k offered rows (each s_c <= lb_c + 2E_c + G <= U + G < lb_j - G <= s_j), so it is not among the k best.
// Likewise with U* = the k-th smallest exact score of any k rescored rows: a row with lb_j - G > U* ranks
// after those k rows. Either test excludes a listed row and every later one (the list is sorted by lb); if it
// excludes the lb from which rows were cut from the list (unlisted_from), it excludes every row outside it.
//
// The list need not hold rows that cannot rank: every offer may lower the row's U and the offer threshold is
// capped at U + 2G (Int8Engine::threshold_cap), so a list that never fills holds every row that can rank
// (the rows never offered are excluded by the U of their time, which is no smaller), and a full buffer
// first drops its entries above the cap of its time (TopkList::drop_above). This keeps the lists short
// (measured: the search 9-10% faster than with the top-m threshold alone). The driver hands over the whole
// buffer under the cap, up to 2m rows, not just the best m (fused_search.h, keep_all): a query whose
// window holds more than m rows is then often still settled in this pass.
//
// Rescoring (rescore_avx512.cpp, bitwise the fp32 micro-kernel's chains): the listed rows in lb order, 16 at
// a time, keeping U* = the k-th smallest exact score so far, until the next listed row is excluded by U + G
// or U*; the k smallest (s, index) of the rescored rows are then exactly the full search's answer. If the
// list runs out first, it is certified when no row was cut from it (every row outside was never offered or
// dropped for the cap) or unlisted_from is excluded; otherwise the query goes on with its U*. For k = 1 U
// settles nearly every query after a row or two; for k > 1 U sits among the many rows at about the k-th
// distance (the int8 bounds overlap, ~2E wide) and U*, ~G above the k-th score, does the excluding
// (realistic SmolLM2 queries, k = 16: ~134 of ~305 listed rows rescored per query).
//
// Two passes: m = max(64, 16 k) for every query, then m = 512 for the few it could not certify
// (high-D queries far from every row, dense neighbourhoods), whose offers are capped from the start at
// U* + G with the first pass's U* (Int8Engine::initial_cap), so the second list holds little more than the
// rows that can rank. Rows neither certifies (more near-ties than m, duplicated rows, NaN) run the full fp32
// search. Measured on a 2-core Zen 4 (N = 4096): random 32000 x 1024 tables, m = 16 certified 37% of the
// queries, m = 64 94%, then the second pass 100%; a single pass with m = 128 certifies as much but its longer
// lists cost ~10% more on every query.

constexpr int64_t kCandidates = 64;        // first pass: list length per query (at least)
constexpr int64_t kCandidatesPerK = 16;    // ... and 16 k for top-k: measured on SmolLM2 with realistic queries,
                                           // k = 16 leaves 71% of the rows unsettled with 64, 9% with 256 (2.6%
                                           // since the buffer's rows past the best 256 are kept)
constexpr int64_t kLongCandidates = 512;   // second pass, on the rows the first could not certify

inline float round_up(double value) {
  const float rounded = static_cast<float>(value);
  return static_cast<double>(rounded) >= value ? rounded : std::nextafter(rounded, fused::kInf);
}

// Keeps `list` (ascending, `count` of at most k values) the k smallest values offered: inserts `value` if it is
// below the k-th (any value while fewer than k are held; NaN never). Returns whether it was inserted.
template <class T>
bool keep_smallest(T* list, int64_t& count, int64_t k, T value) {
  if (!(count < k ? value == value : value < list[k - 1])) return false;
  int64_t at = std::min(count, k - 1);
  for (; at > 0 && list[at - 1] > value; --at) list[at] = list[at - 1];
  list[at] = value;
  count = std::min(count + 1, k);
  return true;
}

struct Int8RowInfo {
  double norm_sq = 0.0;  // ||x||^2
  float rounding = 0.0f;  // ||x - x~|| rounded up
  float rounded_norm = 0.0f;  // ||x~|| rounded up
  double slack = 0.0;  // G, the fp32 rounding allowance of the certificate
  int64_t k = 1;  // the search's k
  // U* of an earlier pass: the k-th smallest exact score of k distinct rows it rescored (+inf: none).
  double known_kth = std::numeric_limits<double>::infinity();
  // The k smallest (lb + 2E) over the rows offered so far, ascending; U is the k-th (infinite until k offers).
  double uppers[kMaxPrefilterK];
  int64_t num_uppers = 0;

  double kth_upper() const { return num_uppers < k ? std::numeric_limits<double>::infinity() : uppers[k - 1]; }
  // Whether `upper` lowered U (+inf and NaN never do).
  bool offer_upper(double upper) { return upper < kth_upper() && keep_smallest(uppers, num_uppers, k, upper); }
};

#if defined(SPAE_HAVE_AVX512VNNI_KERNEL)
struct Int8Engine {
  static constexpr int kTile = kInt8TileRows;
  static constexpr int kWidth = kInt8PanelWidth;
  using Word = uint32_t;
  using RowInfo = Int8RowInfo;

  const PackedInt8CodebookView& cb;
  double fp32_max_norm;  // the fp32 codebook's max |e|: the same overflow check as the fp32 search
  Metric metric;         // cosine: quantize x / max(|x|, eps), the vector the fp32 kernel multiplies
  int64_t k;             // the search's k: the certificate's U is the k-th smallest upper bound
  const float* known_kth;  // per query row, an earlier pass's U* (nullptr: none)

  int64_t dim() const { return cb.dim; }
  int64_t rows() const { return cb.rows; }
  int64_t num_panels() const { return cb.num_panels(); }
  int64_t words_per_row() const { return cb.quads() + 3; }  // u8 quads, then s_x, a, n

  // lb_k + 2 E_k = lb_k + 2 (a P_k + n b_k): the upper bound of row k's exact score (up to G).
  double upper_bound(const Int8RowInfo& info, float lower, int64_t column) const {
    const float* data = cb.columns + (column / kWidth) * 4 * kWidth + column % kWidth;
    return static_cast<double>(lower) + 2.0 * (static_cast<double>(info.rounding) * data[kWidth] +
                                               static_cast<double>(info.rounded_norm) * data[2 * kWidth]);
  }

  // The offer threshold cap of the driver (fused_search.h): after row `info` was offered column j with lower
  // bound lb, U = the k-th smallest of the offered rows' lb + 2 E_j, and every row with lb > U + 2G (+ the
  // 1e-6 G guard of `excluded`) is out of the top k whatever else is offered, so it need not enter the
  // candidate list at all. This keeps the lists short (a handful of offers per row instead of
  // ~m log(V / m)); rounded up to fp32, so the cap never excludes a row the certificate keeps.
  // An earlier pass's U* caps it from the start: k rows score at most U*, and a row with lb > U* + G has
  // s >= lb - G > U*, so it ranks after them (rounded up to fp32 like the cap below, +inf without one).
  static constexpr bool kThresholdCap = true;
  float initial_cap(const Int8RowInfo& info) const {
    return round_up(info.known_kth + info.slack * (1.0 + 2e-6));
  }
  float threshold_cap(Int8RowInfo& info, float lower, int64_t column, float cap) const {
    // lb + 2E >= lb: an offer whose lb is not below U leaves U, and so the cap, as they are (most offers of a
    // long list: they come in under the list's own threshold).
    if (!(static_cast<double>(lower) < info.kth_upper())) return cap;
    if (!info.offer_upper(upper_bound(info, lower, column))) return cap;
    return std::min(initial_cap(info), round_up(info.kth_upper() + 2.0 * info.slack * (1.0 + 2e-6)));
  }

  static constexpr bool kBulkOffers = true;
  uint32_t append_offers(const Int8RowInfo& info, const float* lbs, int64_t first_column, uint32_t mask,
                         float* values, int64_t* indices) const {
    return append_offers_avx512(lbs, first_column, mask, cb.columns + (first_column / kWidth) * 4 * kWidth,
                                info.rounding, info.rounded_norm, info.kth_upper(), values, indices);
  }

  StatusInfo pack(const QuerySource& source, bool check, int64_t first, int64_t count, int64_t padded_count,
                  float* row_buffer, uint32_t* packed, Int8RowInfo* info) const {
    const int64_t dim = cb.dim, quads = cb.quads(), words = quads + 3;
    for (int64_t t = 0; t < padded_count / kTile; ++t) {  // padding rows: q = 0 (u8 128), parameters 0
      uint32_t* tile = packed + t * words * kTile;
      std::fill(tile, tile + quads * kTile, 0x80808080u);
      std::fill(tile + quads * kTile, tile + words * kTile, 0u);
    }
    for (int64_t r = 0; r < count; ++r) {
      const int64_t row = first + r;
      source.load_row(row, row_buffer);
      double sum = 0.0, largest = 0.0;
      bool finite = true;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = row_buffer[d];
        finite &= std::isfinite(v);
        sum += static_cast<double>(v) * v;
        largest = std::max(largest, std::abs(static_cast<double>(v)));
      }
      // The same checks, in the same order, as the fp32 search (same exceptions on either path).
      if (check && !finite) return {Status::NonFiniteQuery, row};
      if (check && metric != Metric::Cosine && std::sqrt(sum) * fp32_max_norm * 2.0 > kMaxNormProduct)
        return {Status::Overflow, row};
      if (metric == Metric::Cosine) {  // normalise exactly as pack_query_block (search.cpp), then re-measure
        const float unit = static_cast<float>(1.0 / std::max(std::sqrt(sum), kCosineEps));
        sum = 0.0;
        largest = 0.0;
        for (int64_t d = 0; d < dim; ++d) {
          const float v = row_buffer[d] * unit;
          row_buffer[d] = v;
          sum += static_cast<double>(v) * v;
          largest = std::max(largest, std::abs(static_cast<double>(v)));
        }
      }
      float scale = static_cast<float>(largest / 127.0);
      if (!(scale > 0.0f) || !std::isfinite(scale)) scale = 1.0f;  // zero row (or NaN: never certified)
      uint32_t* tile = packed + (r / kTile) * words * kTile;
      const int64_t lane = r % kTile;
      double rounding = 0.0, rounded = 0.0;
      for (int64_t j = 0; j < quads; ++j) {
        uint32_t word = 0x80808080u;
        for (int64_t h = 0; h < 4 && 4 * j + h < dim; ++h) {
          const double v = row_buffer[4 * j + h];
          const double q = std::isfinite(v) ? std::clamp(std::nearbyint(v / scale), -127.0, 127.0) : 0.0;
          const double back = static_cast<double>(scale) * q;  // exact
          rounding += (v - back) * (v - back);
          rounded += back * back;
          word = (word & ~(0xffu << (8 * h))) | (static_cast<uint32_t>(static_cast<int>(q) + 128) << (8 * h));
        }
        tile[j * kTile + lane] = word;
      }
      const float a = round_up(std::sqrt(rounding)), n = round_up(std::sqrt(rounded));
      float* params = reinterpret_cast<float*>(tile + quads * kTile);
      params[lane] = scale;
      params[kTile + lane] = a;
      params[2 * kTile + lane] = n;
      const double gamma = 1.01 * static_cast<double>(dim + 8) * 0x1p-24;
      const double slack = gamma * (std::sqrt(sum) * cb.max_norm + n * cb.max_rounded_norm + 2.0 * cb.max_abs_bias +
                                    a * cb.max_norm + n * cb.max_rounding) +
                           1e-30 * static_cast<double>(dim + 8);
      info[r] = Int8RowInfo{};
      info[r].norm_sq = sum;
      info[r].rounding = a;
      info[r].rounded_norm = n;
      info[r].slack = slack;
      info[r].k = k;
      if (known_kth != nullptr) info[r].known_kth = known_kth[row];
    }
    return {};
  }

  void tile(const uint32_t* packed_tile, int64_t panel, const float* thresholds, float* scores,
            uint32_t* masks) const {
    micro_kernel_avx512vnni(packed_tile, cb.panels + panel * cb.quads() * kWidth, cb.columns + panel * 4 * kWidth,
                            cb.offsets + panel * kWidth, cb.quads(), thresholds, scores, masks);
  }
};
#endif

// The query rows `rows` of another source (the rows the certificate could not settle).
class SubsetSource final : public QuerySource {
 public:
  SubsetSource(const QuerySource& base, const std::vector<int64_t>& rows) : base_(base), rows_(rows) {}
  int64_t rows() const override { return static_cast<int64_t>(rows_.size()); }
  int64_t dim() const override { return base_.dim(); }
  void load_row(int64_t row, float* out) const override { base_.load_row(rows_[row], out); }

 private:
  const QuerySource& base_;
  const std::vector<int64_t>& rows_;
};

}  // namespace

#if defined(SPAE_HAVE_AVX512VNNI_KERNEL)
// One certified int8 pass over `source` keeping `candidates` rows per query: settles (sets settled[row] and
// writes the k distances / indices of the row) every row whose certificate holds; leaves the others untouched
// and writes to kth_exact[row] the k-th smallest exact score it found (+inf if none), a bound the next pass
// starts from. known_kth (nullptr: none) holds such a bound per row from an earlier pass.
static StatusInfo certified_int8_pass(const QuerySource& source, const PackedCodebookView& cb,
                                      const MatrixView& weight, const PackedInt8CodebookView& prefilter, int64_t k,
                                      bool check_finite, int num_threads, int64_t candidates, const float* known_kth,
                                      float* distances, int64_t* out_index, std::vector<uint8_t>& settled,
                                      float* kth_exact) {
  const int64_t dim = cb.dim;
  const Int8Engine engine{prefilter, cb.max_norm, cb.metric, k, known_kth};
  return fused::run(
      source, engine, candidates, check_finite, num_threads,
      [&](int64_t row, const float* values, const int64_t* indices, int64_t count, float unlisted_from,
          const Int8RowInfo& x) {
        kth_exact[row] = fused::kInf;
        if (count < 1 || !std::isfinite(values[0]) || !std::isfinite(values[count - 1])) return;
        if (count < k) return;  // cannot happen with V >= k (a list holds every row that can rank)
        const double slack = x.slack;
        // Row c (and every later one: the list is sorted by lb) ranks after k rows if its lb - G exceeds
        // U + G (U: the k-th smallest upper bound lb + 2E of the rows offered, listed or not, in this codebook
        // range; each of those k rows has s <= U + G) or U* (the k-th smallest exact score of k rescored rows:
        // an earlier pass's, or of the listed rows rescored so far).
        const double kth_upper = x.kth_upper();
        const auto excluded_from = [&](double lower, double exact_kth) {
          const double limit = std::min(kth_upper + slack, exact_kth);
          const double margin = lower - slack - limit;
          return std::isfinite(margin) && margin > 1e-6 * slack;
        };
        const auto excluded = [&](int64_t c, double exact_kth) { return excluded_from(values[c], exact_kth); };
        // Rows outside the list: never offered or dropped for the driver's cap (lb above min(U' + 2G, U*' + G)
        // for some U' >= U and an earlier pass's U*', Int8Engine::threshold_cap: excluded), or cut from it
        // with lb >= unlisted_from (no smaller than any listed row's). So with m rows rescored, the answer is
        // certified once row m is excluded (then every row after it is), or once m = count and either there
        // is no unlisted row (unlisted_from = +inf) or unlisted_from is excluded. Rows past the bound test's
        // prefix are never rescored.
        const bool complete = !(unlisted_from < fused::kInf);
        int64_t by_bounds = k;  // the k listed rows whose upper bounds define U are never excluded by it
        while (by_bounds < count && !excluded(by_bounds, x.known_kth)) ++by_bounds;
        // Rescore in list order, 16 rows at a time, keeping the k smallest exact scores (ascending) for U*.
        thread_local std::vector<float> query, row_buffer, rescored;
        query.resize(static_cast<size_t>(dim * kTileRows));
        row_buffer.resize(static_cast<size_t>(dim));
        rescored.resize(static_cast<size_t>(count));
        // Rows [from, chunk_end(from)) are rescored together: 16, and the first chunk at least k.
        const auto chunk_end = [&](int64_t from) { return std::min(by_bounds, std::max(from + kPanelWidth, k)); };
        // The first rows stream in from DRAM while the query is packed (random table rows).
        prefetch_candidates(cb, weight, indices, chunk_end(0));
        double norm_sq = 0.0;  // the query exactly as the fp32 search packs it (cosine normalisation, ||x||^2)
        pack_query_block(source, cb.metric, cb, false, row, 1, kTileRows, row_buffer.data(), query.data(), &norm_sq);
        for (int64_t d = 0; d < dim; ++d) row_buffer[d] = query[d * kTileRows];  // tile row 0: the packed x
        float best[kMaxPrefilterK];
        int64_t num_best = 0, rescored_rows = 0;
        bool certified = false;
        while (!certified) {
          const int64_t end = chunk_end(rescored_rows);
          // The next chunk's rows stream in while this one is scored (random table rows: DRAM reads).
          prefetch_candidates(cb, weight, indices + end, chunk_end(end) - end);
          rescore_candidates(cb, weight, row_buffer.data(), indices + rescored_rows, end - rescored_rows,
                             rescored.data() + rescored_rows);
          for (; rescored_rows < end; ++rescored_rows)  // NaN never enters best: it cannot certify
            keep_smallest(best, num_best, k, rescored[rescored_rows]);
          const double exact_kth = std::min<double>(x.known_kth, num_best < k ? fused::kInf : best[k - 1]);
          if (rescored_rows < by_bounds) {
            certified = excluded(rescored_rows, exact_kth);
          } else {
            certified = by_bounds < count || complete || excluded_from(unlisted_from, exact_kth);
            if (!certified) {
              kth_exact[row] = static_cast<float>(exact_kth);
              return;
            }
          }
        }
        thread_local std::vector<int64_t> order;
        order.resize(static_cast<size_t>(rescored_rows));
        for (int64_t c = 0; c < rescored_rows; ++c) order[c] = c;
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
          return fused::ranks_before(rescored[a], indices[a], rescored[b], indices[b]);
        });
        for (int64_t j = 0; j < k; ++j) {
          out_index[row * k + j] = indices[order[j]];
          distances[row * k + j] = finish_distance(cb.metric, rescored[order[j]], norm_sq);
        }
        settled[row] = 1;
      });
}
#endif

StatusInfo topk_exact(const QuerySource& source, const PackedCodebookView& cb, const MatrixView& weight,
                      const PackedInt8CodebookView& prefilter, int64_t k, bool check_finite, int num_threads,
                      float* distances, int64_t* out_index, int64_t* full_search_rows) {
  const int64_t num_queries = source.rows();
#if defined(SPAE_HAVE_AVX512VNNI_KERNEL)
  if (prefilter.panels != nullptr && num_queries > 0 && k <= kMaxPrefilterK && cpu_supports_avx512_vnni()) {
    std::vector<uint8_t> settled(static_cast<size_t>(num_queries), 0);
    const int64_t first_pass = std::max(kCandidates, kCandidatesPerK * k);
    std::vector<float> kth_exact(static_cast<size_t>(num_queries));
    const StatusInfo info = certified_int8_pass(source, cb, weight, prefilter, k, check_finite, num_threads,
                                                std::min<int64_t>(first_pass, cb.rows), nullptr, distances,
                                                out_index, settled, kth_exact.data());
    if (info.status != Status::Ok) return info;
    std::vector<int64_t> rest;
    for (int64_t row = 0; row < num_queries; ++row)
      if (!settled[row]) rest.push_back(row);
    if (rest.empty()) return {};
    // Second tier: the rows the short list could not settle, again in int8 with a long list (a few % of the
    // rows at 1/4 the cost of the fp32 search each), before the fp32 search takes what is left.
    std::vector<int64_t> rest_index(rest.size() * k);
    std::vector<float> rest_dist(rest.size() * k);
    const auto scatter = [&](size_t i) {  // rest row i's k results into place
      std::copy_n(rest_index.begin() + i * k, k, out_index + rest[i] * k);
      std::copy_n(rest_dist.begin() + i * k, k, distances + rest[i] * k);
    };
    if (cb.rows > first_pass) {
      const SubsetSource subset(source, rest);
      std::vector<uint8_t> rest_settled(rest.size(), 0);
      std::vector<float> known_kth(rest.size()), rest_kth(rest.size());
      for (size_t i = 0; i < rest.size(); ++i) known_kth[i] = kth_exact[rest[i]];
      const StatusInfo second = certified_int8_pass(subset, cb, weight, prefilter, k, false, num_threads,
                                                    std::min<int64_t>(kLongCandidates, cb.rows), known_kth.data(),
                                                    rest_dist.data(), rest_index.data(), rest_settled,
                                                    rest_kth.data());
      if (second.status != Status::Ok) return {second.status, second.detail >= 0 ? rest[second.detail] : -1};
      std::vector<int64_t> still;
      for (size_t i = 0; i < rest.size(); ++i) {
        if (rest_settled[i])
          scatter(i);
        else
          still.push_back(rest[i]);
      }
      rest.swap(still);
      if (rest.empty()) return {};
    }
    *full_search_rows += static_cast<int64_t>(rest.size());
    const SubsetSource subset(source, rest);
    const StatusInfo full = search_topk_source(subset, cb, k, check_finite, num_threads, rest_dist.data(),
                                               rest_index.data());
    if (full.status != Status::Ok) return {full.status, full.detail >= 0 ? rest[full.detail] : full.detail};
    for (size_t i = 0; i < rest.size(); ++i) scatter(i);
    return {};
  }
#endif
  *full_search_rows += num_queries;
  return search_topk_source(source, cb, k, check_finite, num_threads, distances, out_index);
}

StatusInfo nearest_exact(const QuerySource& source, const PackedCodebookView& cb, const MatrixView& weight,
                         const PackedInt8CodebookView& prefilter, bool check_finite, int num_threads,
                         float* distances, int64_t* out_index, int64_t* full_search_rows) {
  return topk_exact(source, cb, weight, prefilter, 1, check_finite, num_threads, distances, out_index,
                    full_search_rows);
}

namespace {

// Panel p's fp32 values [D][16] (exact for every panel format): the panel itself for fp32 panels, else widened
// into `buffer`.
const float* panel_values(const PackedCodebookView& fp32, int64_t p, std::vector<float>& buffer) {
  const int64_t count = fp32.dim * kPanelWidth;
  const PanelFormat format = fp32.format();
  if (format == PanelFormat::Float32) return static_cast<const float*>(fp32.panel(p));
  buffer.resize(static_cast<size_t>(count));
  const uint16_t* narrow = static_cast<const uint16_t*>(fp32.panel(p));
  if (format == PanelFormat::BFloat16) {
    for (int64_t i = 0; i < count; ++i) buffer[i] = bf16_to_float(narrow[i]);
  } else {
    const float scale = format == PanelFormat::Float16Doubled ? 2.0f : 1.0f;
    for (int64_t i = 0; i < count; ++i) buffer[i] = scale * half_to_float(narrow[i]);
  }
  return buffer.data();
}

// (x + kRoundShift) - kRoundShift is nearbyint(x) for |x| <= 2^51 in the default round-to-nearest-even mode, as
// two fp64 additions that vectorise: the sum's ulp is 1, so the addition rounds x to an integer (ties to even:
// kRoundShift is even) and the subtraction is exact.
constexpr double kRoundShift = 6755399441055744.0;  // 1.5 * 2^52

// Per-column results of one panel's quantisation.
struct PanelSums {
  double scale[kPanelWidth];  // the fp32 scale, widened
  double norm[kPanelWidth], rounding[kPanelWidth], rounded[kPanelWidth];
  int64_t sum_q[kPanelWidth];
};

// Quantises one panel's fp32 values [D][16] into its int8 words [quads][16] (`quantised`: [4 * quads][16]
// int32 scratch whose rows past D are zero), the 16 columns as 16 / N vectors of N lanes (Lanes: lane c runs
// exactly column c's scalar arithmetic; this file is built without FMA contraction).
template <int N>
[[gnu::always_inline]] inline void quantise_panel(const float* values, int64_t dim, int32_t* quantised,
                                                  uint32_t* panel, PanelSums& sums) {
  using Doubles = Lanes<double, N>;
  using Ints = Lanes<int32_t, N>;
  using Longs = Lanes<int64_t, N>;
  constexpr int kGroups = kPanelWidth / N;
  const Doubles zero = {};
  Doubles largest[kGroups] = {}, norm[kGroups] = {};
  for (int64_t d = 0; d < dim; ++d) {
#pragma GCC unroll 8
    for (int g = 0; g < kGroups; ++g) {
      Doubles x;
      load_widened<N>(values + d * kPanelWidth + g * N, x);
      const Doubles magnitude = x < zero ? -x : x;
      largest[g] = largest[g] < magnitude ? magnitude : largest[g];  // std::max(largest, |x|)
      norm[g] += x * x;
    }
  }
  double largest_of[kPanelWidth];
  std::memcpy(largest_of, largest, sizeof largest_of);
  for (int c = 0; c < kPanelWidth; ++c) {
    float s = static_cast<float>(largest_of[c] / 127.0);
    if (!(s > 0.0f)) s = 1.0f;
    sums.scale[c] = s;
  }
  Doubles scale[kGroups], rounding[kGroups] = {}, rounded[kGroups] = {};
  Longs sum_q[kGroups] = {};
  std::memcpy(scale, sums.scale, sizeof scale);
  const Doubles low = zero - 127.0, high = zero + 127.0;
  for (int64_t d = 0; d < dim; ++d) {
#pragma GCC unroll 8
    for (int g = 0; g < kGroups; ++g) {
      Doubles x;
      load_widened<N>(values + d * kPanelWidth + g * N, x);
      Doubles ratio = x / scale[g];  // clamped before rounding: the same q as clamping after
      ratio = ratio < low ? low : ratio;
      ratio = ratio > high ? high : ratio;
      const Doubles q = (ratio + kRoundShift) - kRoundShift, back = scale[g] * q, error = x - back;
      rounding[g] += error * error;
      rounded[g] += back * back;
      const Ints qi = __builtin_convertvector(q, Ints);
      sum_q[g] += __builtin_convertvector(qi, Longs);
      std::memcpy(quantised + d * kPanelWidth + g * N, &qi, sizeof qi);
    }
  }
  std::memcpy(sums.norm, norm, sizeof norm);
  std::memcpy(sums.rounding, rounding, sizeof rounding);
  std::memcpy(sums.rounded, rounded, sizeof rounded);
  std::memcpy(sums.sum_q, sum_q, sizeof sum_q);
  const int64_t quads = (dim + 3) / 4;
  for (int64_t j = 0; j < quads; ++j) {
    const int32_t* q = quantised + 4 * j * kPanelWidth;
    for (int c = 0; c < kPanelWidth; ++c)  // four int8 in a word, d ascending from the low byte
      panel[j * kPanelWidth + c] = (static_cast<uint32_t>(q[c]) & 0xffu) |
                                   (static_cast<uint32_t>(q[kPanelWidth + c]) & 0xffu) << 8 |
                                   (static_cast<uint32_t>(q[2 * kPanelWidth + c]) & 0xffu) << 16 |
                                   (static_cast<uint32_t>(q[3 * kPanelWidth + c]) & 0xffu) << 24;
  }
}

SPAE_TARGET("avx512f") void quantise_panel_avx512(const float* values, int64_t dim, int32_t* quantised,
                                                  uint32_t* panel, PanelSums& sums) {
  quantise_panel<8>(values, dim, quantised, panel, sums);
}
SPAE_TARGET("avx2") void quantise_panel_avx2(const float* values, int64_t dim, int32_t* quantised, uint32_t* panel,
                                             PanelSums& sums) {
  quantise_panel<4>(values, dim, quantised, panel, sums);
}
void quantise_panel_baseline(const float* values, int64_t dim, int32_t* quantised, uint32_t* panel,
                             PanelSums& sums) {
  quantise_panel<2>(values, dim, quantised, panel, sums);
}

}  // namespace

// One panel at a time, each step over the 16 columns as independent lanes (fp64 sums in d order per column,
// so every column's arithmetic is a row-by-row loop's): max |p| and ||p||^2, then per element
// q = clamp(round(p / scale), -127, 127) with the same fp64 division and round-half-even (clamping first
// changes no result and bounds the rounding trick's input), the rounding error, ||p~||^2 and sum q.
void pack_codebook_int8(const PackedCodebookView& fp32, uint32_t* panels, float* columns, int32_t* offsets,
                        double* bounds, int num_threads) {
  static_assert(kInt8PanelWidth == kPanelWidth, "the int8 copy quantises one fp32 panel into one int8 panel");
  const int64_t rows = fp32.rows, dim = fp32.dim, quads = (dim + 3) / 4;
  constexpr int64_t W = kInt8PanelWidth;
  const int64_t num_panels = (rows + W - 1) / W;
  double max_norm = 0.0, max_rounding = 0.0, max_rounded = 0.0, max_bias = 0.0;
#pragma omp parallel num_threads(std::max(1, num_threads)) \
    reduction(max : max_norm, max_rounding, max_rounded, max_bias)
  {
    const int lanes = packing_lanes();
    const auto quantise = lanes == 8   ? quantise_panel_avx512
                          : lanes == 4 ? quantise_panel_avx2
                                       : quantise_panel_baseline;
    std::vector<float> widened;
    std::vector<int32_t> quantised(static_cast<size_t>(quads * 4 * W), 0);  // [4 * quads][16]; pad d stay 0
#pragma omp for schedule(static)
    for (int64_t p = 0; p < num_panels; ++p) {
      const float* values = panel_values(fp32, p, widened);
      PanelSums sums;
      quantise(values, dim, quantised.data(), panels + p * quads * W, sums);
      float* column_data = columns + p * 4 * W;
      for (int64_t c = 0; c < W; ++c) {
        const int64_t row = p * W + c;
        if (row >= rows) {  // pad column: zero row, bias +inf, never selected
          for (int64_t j = 0; j < quads; ++j) panels[(p * quads + j) * W + c] = 0u;
          column_data[c] = 0.0f;
          column_data[W + c] = 0.0f;
          column_data[2 * W + c] = 0.0f;
          column_data[3 * W + c] = fused::kInf;
          offsets[row] = 0;
          continue;
        }
        column_data[c] = static_cast<float>(sums.scale[c]);
        column_data[W + c] = round_up(std::sqrt(sums.norm[c]));
        column_data[2 * W + c] = round_up(std::sqrt(sums.rounding[c]));
        column_data[3 * W + c] = fp32.bias[row];
        offsets[row] = static_cast<int32_t>(128 * sums.sum_q[c]);
        max_norm = std::max(max_norm, std::sqrt(sums.norm[c]));
        max_rounding = std::max(max_rounding, std::sqrt(sums.rounding[c]));
        max_rounded = std::max(max_rounded, std::sqrt(sums.rounded[c]));
        max_bias = std::max(max_bias, std::abs(static_cast<double>(fp32.bias[row])));
      }
    }
  }
  bounds[0] = max_norm;
  bounds[1] = max_rounding;
  bounds[2] = max_rounded;
  bounds[3] = max_bias;
}

}  // namespace spae
