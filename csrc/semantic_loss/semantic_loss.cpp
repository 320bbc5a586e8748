// Fused semantic loss on the CPU (SPAE-METHOD.md §4): a linear cross-entropy over the whole frozen vocabulary
// with soft targets uniform on a candidate set, forward and gradient in one streaming pass, no N x V logits.
//
// Math (see semantic_loss.h). With the l2 packing of the codebook (panels p = -2e, bias ||e||^2), the shared
// 6 x 16 micro-kernel of the search (active_micro_kernel of the panels' format, used unchanged) yields
// score = ||e||^2 - 2 z.e, and the logit is s = score / -tau. Per row of z:
//
//   lse    = m + log(l)              running max m and sum l = sum_k exp(s_k - m), rescaled when m grows
//   mu     = (sum_k exp(s_k - m) e_k) / l = sum_k softmax_k e_k     (only with compute_grad)
//   loss   = lse - (2 z . mean_C(e) - mean_C(||e||^2)) / tau
//   grad   = (2 / tau) (mu - mean_C(e))                              = d loss / d z
//
// Structure. Rows with a non-empty set are taken in order and cut into blocks of 6-row tiles (blocks are
// spread over OpenMP threads; nothing else is split, so every row is computed by one thread in one fixed
// order). Per block the vocabulary streams in groups of 64 rows (4 packed panels): for every tile, the
// micro-kernel forms 4 panels of scores (with AVX-512: one 6 x 64 kernel over the 4 fp32 panels, the same
// chains), the softmax-tile kernel turns them into logits, updates the running max and sum and writes the
// 6 x 64 weights exp(s - m), and the accumulate kernel adds weights x rows (64 x D: the group's codebook rows,
// read in place from an fp32 table, else converted to fp32 once per block and group) into the tile's rows of
// out_grad (the output is the accumulator: no per-thread copy). The candidate term and the gradient's set
// part are applied once every block is done.
//
// Candidate sets. mean_C(e) is summed in one fixed order, whoever sums it: the set's rows in ascending row
// (duplicates repeated), in fp32 within a vocabulary group of 64 rows, the groups' partials added in fp64 in
// ascending group. Sets of at most kGatheredSetRows candidates (singleton targets, SPAE's small sets) are
// summed per row of z when it is finished, from the table (at most 64 x D reads against the V x D of the
// row's streaming pass, and no storage). Larger sets are summed inside the streaming pass, where each group's
// rows are already in cache (a separate pass would read the table again: SPAE's sets of one batch hold ~3x
// the table's rows): each block owns a range of them and adds the group's rows they hold.
//
// Determinism: the value of every row depends only on that row, the codebook and the set: each score is one
// FMA chain over d, the groups are visited in ascending order, the softmax sums and the accumulation chains
// have a fixed order - bitwise identical for any thread count, batch split or block size (for a given ISA;
// the AVX-512 pieces compute bitwise what the AVX2 ones compute).
//
// Precision "bf16" (the three bf16 operands set; AVX512-BF16 CPUs only): z is rounded to bf16 as it is packed,
// the scores of a tile and group come from semantic_scores_bf16 (the same [panel][row][16] layout, so the
// softmax tile kernel is shared), and the weights are rounded to bf16 pairs for semantic_accumulate_bf16. The
// set means use the bf16-rounded rows and the candidate term the rounded z, so the loss is exactly that of
// bf16(z) against bf16(E) up to fp32 accumulation. Same determinism guarantees, for the bf16 kernel.
//
// Extra memory: per thread one packed block of z (<= 512 KiB), 6 pad accumulator rows (or, at precision bf16
// when D is not a multiple of 64, a block accumulator with rows padded to 64 columns), the group's rows
// (64 x D fp32) only for a table that is not fp32 or not a multiple of 64 rows, and the fp32 partials of the
// large sets one group touches; plus S_large x D fp64 sums of the large sets and their transposed candidate
// list (V + 1 offsets), N fp64 logsumexps and N row ids. No N x V buffer, nothing per set for small sets.

#include "semantic_loss/semantic_loss.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

namespace spae {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Packed z block per thread. Every block streams the whole table once, so blocks are as large as the L2
// allows: at N = 336, 2 threads, blocks of 28 tiles instead of 14 made the op ~4-5% faster (bf16 and fp32) by
// halving the table's trips from memory.
constexpr int64_t kBlockBytes = 512 * 1024;
constexpr int64_t kMaxBlockTiles = 32;  // 192 rows
// Candidate sets of at most this many rows are summed when their rows of z are finished (see the top).
constexpr int64_t kGatheredSetRows = kSemanticGroupCols;

// Row `row` of a strided [rows, cols] matrix as fp32 (exact for bf16 / fp16).
void load_row(const MatrixView& m, int64_t row, float* out) {
  const int64_t base = row * m.row_stride;
  if (m.dtype == DType::Float32) {
    const float* src = static_cast<const float*>(m.data) + base;
    if (m.col_stride == 1) {
      std::memcpy(out, src, static_cast<size_t>(m.cols) * sizeof(float));
    } else {
      for (int64_t d = 0; d < m.cols; ++d) out[d] = src[d * m.col_stride];
    }
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(m.data) + base;
  if (m.dtype == DType::BFloat16) {
    for (int64_t d = 0; d < m.cols; ++d) out[d] = bf16_to_float(src[d * m.col_stride]);
  } else {
    for (int64_t d = 0; d < m.cols; ++d) out[d] = half_to_float(src[d * m.col_stride]);
  }
}

// Codebook row k as the set sums read it: e_k in fp32 (bf16(e_k) at precision bf16); `buffer` holds D floats.
const float* set_row(const SemanticLossRequest& req, bool bf16, int64_t k, float* buffer) {
  const MatrixView& w = req.weight;
  if (!bf16 && w.dtype == DType::Float32 && w.col_stride == 1) return static_cast<const float*>(w.data) + k * w.row_stride;
  load_row(w, k, buffer);
  if (bf16)
    for (int64_t d = 0; d < w.cols; ++d) buffer[d] = round_to_bf16(buffer[d]);
  return buffer;
}

// The sets summed in the streaming pass (more than kGatheredSetRows candidates, needed by some row), by slot
// (slots in ascending set order), with the candidate list transposed: row k's slots, ascending.
struct StreamedSets {
  std::vector<int32_t> slot_of_set;  // [S]: -1 for a set summed when its rows are finished
  std::vector<int32_t> set_of_slot;
  std::vector<int64_t> row_offsets;  // [V + 1] (empty without slots): row k's slots are
  std::vector<int32_t> entry_slots;  //   entry_slots[row_offsets[k] : row_offsets[k + 1]]
  std::vector<int32_t> owned;        // [num_blocks + 1]: block b sums slots [owned[b], owned[b + 1])
  std::vector<double> sums;          // [slots][D]: fp64 sums, then the means
  int64_t max_group_slots = 0;       // most slots one block adds to in one group
  int64_t slots() const { return static_cast<int64_t>(set_of_slot.size()); }
};

// Throws std::bad_alloc.
void build_streamed_sets(const SemanticLossRequest& req, const std::vector<char>& set_needed, int64_t num_blocks,
                         StreamedSets& out) {
  const int64_t* offsets = req.candidate_offsets;
  const int64_t vocab = req.weight.rows, dim = req.weight.cols;
  out.slot_of_set.assign(static_cast<size_t>(req.num_sets), -1);
  std::vector<int64_t> candidates_before{0};  // candidates of the slots < j
  for (int64_t s = 0; s < req.num_sets; ++s) {
    if (!set_needed[s] || offsets[s + 1] - offsets[s] <= kGatheredSetRows) continue;
    out.slot_of_set[s] = static_cast<int32_t>(out.slots());
    out.set_of_slot.push_back(static_cast<int32_t>(s));
    candidates_before.push_back(candidates_before.back() + offsets[s + 1] - offsets[s]);
  }
  const int64_t slots = out.slots();
  out.owned.assign(static_cast<size_t>(num_blocks + 1), static_cast<int32_t>(slots));
  if (slots == 0) return;
  out.row_offsets.assign(static_cast<size_t>(vocab + 1), 0);
  for (int32_t set : out.set_of_slot)
    for (int64_t i = offsets[set]; i < offsets[set + 1]; ++i) ++out.row_offsets[req.candidate_index[i] + 1];
  for (int64_t k = 0; k < vocab; ++k) out.row_offsets[k + 1] += out.row_offsets[k];
  out.entry_slots.resize(static_cast<size_t>(out.row_offsets[vocab]));
  std::vector<int64_t> fill(out.row_offsets.begin(), out.row_offsets.end() - 1);
  for (int64_t j = 0; j < slots; ++j) {
    const int32_t set = out.set_of_slot[j];
    for (int64_t i = offsets[set]; i < offsets[set + 1]; ++i)
      out.entry_slots[fill[req.candidate_index[i]]++] = static_cast<int32_t>(j);
  }
  int64_t max_row_slots = 0;
  for (int64_t k = 0; k < vocab; ++k)
    max_row_slots = std::max(max_row_slots, out.row_offsets[k + 1] - out.row_offsets[k]);
  for (int64_t b = 0; b < num_blocks; ++b)  // about 1/num_blocks of the candidates each
    out.owned[b] = static_cast<int32_t>(std::lower_bound(candidates_before.begin(), candidates_before.end() - 1,
                                                         candidates_before[slots] * b / num_blocks) -
                                        candidates_before.begin());
  for (int64_t b = 0; b < num_blocks; ++b)
    out.max_group_slots = std::max<int64_t>(out.max_group_slots, out.owned[b + 1] - out.owned[b]);
  out.max_group_slots = std::min(out.max_group_slots, kSemanticGroupCols * max_row_slots);
  out.sums.assign(static_cast<size_t>(slots * dim), 0.0);
}

// mean_C(e) of a set of at most kGatheredSetRows candidates in the order of the streamed sums (see the top):
// `partial` and `buffer` hold D floats.
void gathered_set_mean(const SemanticLossRequest& req, bool bf16, int64_t set, SemanticAddF32 add_f32,
                       SemanticAddF32ToF64 add_f32_to_f64, float* partial, float* buffer, double* mean) {
  const int64_t dim = req.weight.cols, begin = req.candidate_offsets[set], end = req.candidate_offsets[set + 1];
  int64_t rows[kGatheredSetRows];
  std::copy(req.candidate_index + begin, req.candidate_index + end, rows);
  std::sort(rows, rows + (end - begin));
  std::fill(mean, mean + dim, 0.0);
  int64_t group = -1;
  for (int64_t i = 0; i < end - begin; ++i) {
    const float* values = set_row(req, bf16, rows[i], buffer);
    if (rows[i] / kSemanticGroupCols != group) {  // the set's first row in this group starts its partial
      if (group >= 0) add_f32_to_f64(partial, dim, mean);
      std::memcpy(partial, values, static_cast<size_t>(dim) * sizeof(float));
      group = rows[i] / kSemanticGroupCols;
    } else {
      add_f32(values, dim, partial);
    }
  }
  add_f32_to_f64(partial, dim, mean);
  const double count = static_cast<double>(end - begin);
  for (int64_t d = 0; d < dim; ++d) mean[d] /= count;
}

}  // namespace

// ---- the op ----

// The AVX2 + FMA piece `name`_avx2 where that micro-kernel is active, else `name`_portable.
#if defined(SPAE_HAVE_AVX2_KERNEL)
#define SPAE_BY_ISA(name) (active_isa() == Isa::Avx2Fma ? name##_avx2 : name##_portable)
#else
#define SPAE_BY_ISA(name) (name##_portable)
#endif

// Whether the fp32 pieces run at 16 lanes: the AVX2 kernels are active, the CPU has avx512f, and
// SPAE_FAST_SEMANTIC_AVX512=0 is not set (read per call: the tests compare both widths bitwise).
static bool use_avx512_pieces() {
#if defined(SPAE_HAVE_AVX512F_KERNEL) && (defined(__GNUC__) || defined(__clang__))
  if (active_isa() != Isa::Avx2Fma || !__builtin_cpu_supports("avx512f")) return false;
  const char* setting = std::getenv("SPAE_FAST_SEMANTIC_AVX512");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
#else
  return false;
#endif
}

StatusInfo semantic_loss(const SemanticLossRequest& req) {
  const int64_t num_rows = req.z.rows, dim = req.z.cols, vocab = req.codebook.rows;
  const int64_t num_sets = req.num_sets, num_candidates = req.num_candidates;
  if (dim < 1 || vocab < 1 || dim != req.codebook.dim || dim != req.weight.cols || vocab != req.weight.rows ||
      num_rows < 0 || num_sets < 0 || num_candidates < 0 || !(req.tau > 0.0) || !std::isfinite(req.tau) ||
      (req.compute_grad && req.out_grad == nullptr && num_rows > 0) || req.candidate_offsets == nullptr)
    return {Status::BadArgument, 1};
  if (num_sets > std::numeric_limits<int32_t>::max()) return {Status::BadArgument, 1};
  const int64_t* offsets = req.candidate_offsets;
  if (offsets[0] != 0 || offsets[num_sets] != num_candidates) return {Status::BadArgument, 3};
  for (int64_t s = 0; s < num_sets; ++s)
    if (offsets[s + 1] < offsets[s]) return {Status::BadArgument, 3};
  for (int64_t i = 0; i < num_candidates; ++i)
    if (req.candidate_index[i] < 0 || req.candidate_index[i] >= vocab) return {Status::BadArgument, 2};
  for (int64_t p = 0; p < num_rows; ++p)
    if (req.set_of_position[p] < -1 || req.set_of_position[p] >= num_sets) return {Status::BadArgument, 4};
  const bool bf16 = req.bf16_panels != nullptr;
#if defined(SPAE_HAVE_AVX512BF16_KERNEL)
  const bool bf16_available = cpu_supports_avx512_bf16();
#else
  const bool bf16_available = false;
#endif
  if (bf16 && (!bf16_available || req.bf16_bias == nullptr || (req.compute_grad && req.bf16_rows == nullptr)))
    return {Status::BadArgument, 5};

  std::fill(req.out_loss, req.out_loss + num_rows, 0.0f);
  if (req.compute_grad) std::fill(req.out_grad, req.out_grad + num_rows * dim, 0.0f);

  // Rows that take part: a set with at least one candidate, in ascending order; only their sets' means are needed.
  std::vector<int64_t> active;
  std::vector<char> set_needed;
  try {
    active.reserve(static_cast<size_t>(num_rows));
    set_needed.assign(static_cast<size_t>(num_sets), 0);
    for (int64_t p = 0; p < num_rows; ++p) {
      const int64_t s = req.set_of_position[p];
      if (s >= 0 && offsets[s + 1] > offsets[s]) {
        active.push_back(p);
        set_needed[s] = 1;
      }
    }
  } catch (const std::bad_alloc&) {
    return {Status::OutOfMemory, -1};
  }
  if (active.empty()) return {};
  const int threads = std::max(1, req.num_threads);
  const MicroKernel score_kernel = active_micro_kernel(req.codebook.format());  // fp32 or bf16 / fp16 panels
  const SemanticSoftmaxTile softmax_tile = SPAE_BY_ISA(semantic_softmax_tile);
  const SemanticAccumulate accumulate = SPAE_BY_ISA(semantic_accumulate);
  const SemanticAddF32 add_f32 = SPAE_BY_ISA(semantic_add_f32);
  const SemanticAddF32ToF64 add_f32_to_f64 = SPAE_BY_ISA(semantic_add_f32_to_f64);
  const bool wide = !bf16 && use_avx512_pieces();  // 16-lane fp32 pieces (the panels' 6 x 64 kernel: fp32 only)
  const bool wide_scores = wide && req.codebook.format() == PanelFormat::Float32;

  // Blocks of whole tiles; as many blocks as needed to bound the per-thread buffers, rounded up to a
  // multiple of the thread count, the tiles spread evenly (block b: tiles [b T / B, (b + 1) T / B)) so the
  // threads get equal shares (results do not depend on the blocking).
  const int64_t num_active = static_cast<int64_t>(active.size());
  const int64_t num_tiles = (num_active + kTileRows - 1) / kTileRows;
  const int64_t max_block_tiles =
      std::clamp<int64_t>(kBlockBytes / (dim * kTileRows * static_cast<int64_t>(sizeof(float))), 1, kMaxBlockTiles);
  int64_t num_blocks = (num_tiles + max_block_tiles - 1) / max_block_tiles;
  if (threads > 1) num_blocks = std::min(num_tiles, (num_blocks + threads - 1) / threads * threads);
  const int64_t block_tiles = (num_tiles + num_blocks - 1) / num_blocks;  // the most tiles of a block
  const int64_t block_rows = block_tiles * kTileRows;
  const int64_t num_panels = req.codebook.num_panels();
  const int64_t num_groups = (num_panels + kSemanticGroupPanels - 1) / kSemanticGroupPanels;
  const float tau_f = static_cast<float>(req.tau);
  const double max_norm = req.codebook.max_norm;
  // Precision "bf16": the tile as bf16 pairs [D/2][6] beside the fp32 copy, and accumulator rows of whole
  // 64-column chunks for the bf16 accumulate kernel; the rows of out_grad are the accumulator unless that needs
  // padding.
  const int64_t dim_pairs = (dim + 1) / 2;
  const int64_t acc_stride = bf16 ? semantic_bf16_dim_pad(dim) : dim;
  const bool acc_in_output = acc_stride == dim;
  const bool direct_rows =
      req.weight.dtype == DType::Float32 && req.weight.col_stride == 1 && req.weight.row_stride >= dim;
  const bool copy_rows = !bf16 && req.compute_grad && !(direct_rows && vocab % kSemanticGroupCols == 0);

  StreamedSets streamed;
  std::vector<double> row_lse;
  try {
    build_streamed_sets(req, set_needed, num_blocks, streamed);
    row_lse.resize(static_cast<size_t>(num_active));
  } catch (const std::bad_alloc&) {
    return {Status::OutOfMemory, -1};
  }

  std::atomic<int> failed_status{static_cast<int>(Status::Ok)};
  std::atomic<int64_t> failed_detail{std::numeric_limits<int64_t>::max()};
  auto record_failure = [&](StatusInfo info) {
#pragma omp critical(spae_semantic_failure)
    if (info.detail < failed_detail.load()) {
      failed_detail.store(info.detail);
      failed_status.store(static_cast<int>(info.status));
    }
  };

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> packed, acc, group_rows, row_buffer, run_max, scores, weights, partial;
    std::vector<uint32_t> packed_pairs, weight_pairs;
    std::vector<double> run_sum, mean_buffer;
    std::vector<float> set_partial;      // [slot][D]: the fp32 sums of the streamed sets touched in this group
    std::vector<int32_t> group_slot_of, touched;  // streamed slot -> its partial (-1: none yet); partial -> slot
    bool allocated = true;
    try {
      packed.resize(static_cast<size_t>(block_rows * dim));
      row_buffer.resize(static_cast<size_t>(dim));
      partial.resize(static_cast<size_t>(dim));
      mean_buffer.resize(static_cast<size_t>(dim));
      set_partial.resize(static_cast<size_t>(streamed.max_group_slots * dim));
      group_slot_of.assign(static_cast<size_t>(streamed.slots()), -1);
      touched.reserve(static_cast<size_t>(streamed.max_group_slots));
      run_max.resize(static_cast<size_t>(block_rows));
      run_sum.resize(static_cast<size_t>(block_rows));
      scores.resize(static_cast<size_t>(kSemanticGroupPanels * kTileRows * kPanelWidth));
      weights.resize(static_cast<size_t>(kTileRows * kSemanticGroupCols));
      if (req.compute_grad)  // the pad rows of a block's last tile, or the whole block's accumulator
        acc.resize(static_cast<size_t>((acc_in_output ? kTileRows : block_rows) * acc_stride));
      if (copy_rows) group_rows.resize(static_cast<size_t>(kSemanticGroupCols * dim));
      if (bf16) {
        packed_pairs.resize(static_cast<size_t>(block_tiles * dim_pairs * kTileRows));
        weight_pairs.resize(static_cast<size_t>(kTileRows * kSemanticGroupCols / 2));
      }
    } catch (const std::bad_alloc&) {
      allocated = false;
      record_failure({Status::OutOfMemory, -1});
    }
    float thresholds[kTileRows], new_max[kTileRows], sums[kTileRows];
    uint32_t masks[kTileRows];
    for (int r = 0; r < kTileRows; ++r) thresholds[r] = kInf;

#pragma omp for schedule(dynamic, 1)
    for (int64_t block = 0; block < num_blocks; ++block) {
      const int64_t first = block * num_tiles / num_blocks * kTileRows;
      if (!allocated || failed_detail.load(std::memory_order_relaxed) < active[first]) continue;
      const int64_t rows = std::min((block + 1) * num_tiles / num_blocks * kTileRows, num_active) - first;
      const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
      // The accumulator row of block row r: its row of out_grad, a pad row, or the block accumulator's.
      const auto acc_row = [&](int64_t r) -> float* {
        if (!acc_in_output) return acc.data() + r * acc_stride;
        return r < rows ? req.out_grad + active[first + r] * dim : acc.data() + (r % kTileRows) * acc_stride;
      };

      // Pack the block's rows as [tile][d][6] (zero pad rows), checking them as the search does.
      std::fill(packed.begin(), packed.begin() + tiles * kTileRows * dim, 0.0f);
      if (bf16) std::fill(packed_pairs.begin(), packed_pairs.begin() + tiles * dim_pairs * kTileRows, 0u);
      bool block_ok = true;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = active[first + r];
        load_row(req.z, row, row_buffer.data());
        if (req.check_finite) {
          double norm_sq = 0.0;
          bool finite = true;
          for (int64_t d = 0; d < dim; ++d) {
            finite &= std::isfinite(row_buffer[d]);
            norm_sq += static_cast<double>(row_buffer[d]) * row_buffer[d];
          }
          const double norm = std::sqrt(norm_sq);
          if (!finite) {
            record_failure({Status::NonFiniteQuery, row});
            block_ok = false;
            break;
          }
          // Scores and logits stay finite in fp32 (Cauchy-Schwarz bounds every partial sum).
          if (norm * max_norm * 2.0 > kMaxNormProduct ||
              (max_norm * max_norm + 2.0 * norm * max_norm) / req.tau > kMaxNormProduct) {
            record_failure({Status::Overflow, row});
            block_ok = false;
            break;
          }
        }
        float* dst = packed.data() + (r / kTileRows) * dim * kTileRows + (r % kTileRows);
        if (bf16) {  // bf16(z): the pairs for the kernel, the rounded values for the candidate term
          uint32_t* pairs = packed_pairs.data() + (r / kTileRows) * dim_pairs * kTileRows + (r % kTileRows);
          for (int64_t d = 0; d < dim; ++d) {
            const uint16_t rounded = float_to_bf16(row_buffer[d]);
            row_buffer[d] = bf16_to_float(rounded);
            pairs[(d / 2) * kTileRows] |= static_cast<uint32_t>(rounded) << (16 * (d % 2));
          }
        }
        for (int64_t d = 0; d < dim; ++d) dst[d * kTileRows] = row_buffer[d];
      }
      if (!block_ok || failed_status.load(std::memory_order_relaxed) != static_cast<int>(Status::Ok)) continue;

      std::fill(run_max.begin(), run_max.end(), -kInf);
      std::fill(run_sum.begin(), run_sum.end(), 0.0);
      if (req.compute_grad)
        std::fill(acc.begin(), acc.begin() + (acc_in_output ? kTileRows : tiles * kTileRows) * acc_stride, 0.0f);

      for (int64_t group = 0; group < num_groups; ++group) {
        // The group's 64 codebook rows as fp32 [64][ld]: the table itself when it is fp32 with unit column
        // stride (and the group is whole), else a converted copy. (Precision "bf16" reads req.bf16_rows.)
        const bool whole_group = (group + 1) * kSemanticGroupCols <= vocab;
        const float* rows_ptr = group_rows.data();
        int64_t rows_ld = dim;
        if (!bf16 && req.compute_grad && direct_rows && whole_group) {
          rows_ptr = static_cast<const float*>(req.weight.data) + group * kSemanticGroupCols * req.weight.row_stride;
          rows_ld = req.weight.row_stride;
        } else if (!bf16 && req.compute_grad) {
          for (int c = 0; c < kSemanticGroupCols; ++c) {
            const int64_t k = group * kSemanticGroupCols + c;
            float* dst = group_rows.data() + c * dim;
            if (k < vocab) {
              load_row(req.weight, k, dst);
            } else {
              std::fill(dst, dst + dim, 0.0f);
            }
          }
        }
        for (int64_t tile = 0; tile < tiles; ++tile) {
          const float* tile_queries = packed.data() + tile * kTileRows * dim;
#if defined(SPAE_HAVE_AVX512BF16_KERNEL)
          if (bf16)
            semantic_scores_bf16(packed_pairs.data() + tile * dim_pairs * kTileRows,
                                 req.bf16_panels + group * dim_pairs * kSemanticGroupCols,
                                 req.bf16_bias + group * kSemanticGroupCols, dim_pairs, scores.data());
#endif
#if defined(SPAE_HAVE_AVX512F_KERNEL)
          const bool four_panels = wide_scores && (group + 1) * kSemanticGroupPanels <= num_panels;
          if (four_panels)
            semantic_scores_avx512(tile_queries,
                                   static_cast<const float*>(req.codebook.panel(group * kSemanticGroupPanels)),
                                   req.codebook.bias + group * kSemanticGroupCols, dim, scores.data());
#else
          const bool four_panels = false;
#endif
          for (int j = 0; j < kSemanticGroupPanels && !bf16 && !four_panels; ++j) {
            const int64_t panel = group * kSemanticGroupPanels + j;
            float* out = scores.data() + j * kTileRows * kPanelWidth;
            if (panel < num_panels) {
              score_kernel(tile_queries, req.codebook.panel(panel), req.codebook.bias + panel * kPanelWidth, dim,
                           thresholds, out, masks);
            } else {
              std::fill(out, out + kTileRows * kPanelWidth, kInf);  // columns past V: logit -inf
            }
          }
          float* tile_max = run_max.data() + tile * kTileRows;
          float* tile_acc[kTileRows];
          for (int r = 0; r < kTileRows; ++r) tile_acc[r] = req.compute_grad ? acc_row(tile * kTileRows + r) : nullptr;
          softmax_tile(scores.data(), tau_f, tile_max, new_max, weights.data(), sums);
          for (int r = 0; r < kTileRows; ++r) {
            const int64_t slot = tile * kTileRows + r;
            if (new_max[r] > tile_max[r]) {  // the running max grew: rescale the sum and the accumulator
              const double scale = tile_max[r] == -kInf ? 0.0 : std::exp(static_cast<double>(tile_max[r]) - new_max[r]);
              run_sum[slot] *= scale;
              if (req.compute_grad) {
                const float scale_f = static_cast<float>(scale);
                for (int64_t d = 0; d < dim; ++d) tile_acc[r][d] *= scale_f;
              }
              tile_max[r] = new_max[r];
            }
            run_sum[slot] += static_cast<double>(sums[r]);
          }
          if (!req.compute_grad) continue;
#if defined(SPAE_HAVE_AVX512BF16_KERNEL)
          if (bf16) {
            semantic_round_weights_bf16(weights.data(), weight_pairs.data());
            semantic_accumulate_bf16(weight_pairs.data(),
                                     req.bf16_rows + group * (kSemanticGroupCols / 2) * acc_stride, acc_stride,
                                     tile_acc);
            continue;
          }
#endif
#if defined(SPAE_HAVE_AVX512F_KERNEL)
          if (wide) {
            semantic_accumulate_avx512(weights.data(), rows_ptr, rows_ld, dim, tile_acc);
            continue;
          }
#endif
          accumulate(weights.data(), rows_ptr, rows_ld, dim, tile_acc);
        }

        // This block's streamed sets: add the group's rows that they hold (from the operand the kernels just
        // read) to fp32 partials of the group, then the partials to the sets' fp64 sums.
        const int32_t slot_begin = streamed.owned[block], slot_end = streamed.owned[block + 1];
        for (int c = 0; c < kSemanticGroupCols && slot_begin < slot_end; ++c) {
          const int64_t k = group * kSemanticGroupCols + c;
          if (k >= vocab) break;
          const int32_t* row_begin = streamed.entry_slots.data() + streamed.row_offsets[k];
          const int32_t* row_end = streamed.entry_slots.data() + streamed.row_offsets[k + 1];
          const int32_t* first_slot = std::lower_bound(row_begin, row_end, slot_begin);
          const int32_t* last_slot = std::lower_bound(first_slot, row_end, slot_end);
          if (first_slot == last_slot) continue;
          const float* values = row_buffer.data();
          if (bf16 && req.compute_grad) {  // bf16(e_k): half c % 2 of the pair words (e_2i[d], e_2i+1[d])
            const uint32_t* pairs = req.bf16_rows + (group * (kSemanticGroupCols / 2) + c / 2) * acc_stride;
            // A bf16 is the top half of its fp32: the low word shifted up, or the high word with the low cleared.
            const uint32_t low_mask = c % 2 == 0 ? 0x0000FFFFu : 0xFFFF0000u;
            const int shift = c % 2 == 0 ? 16 : 0;
            for (int64_t d = 0; d < dim; ++d) {
              const uint32_t bits = (pairs[d] & low_mask) << shift;
              std::memcpy(&row_buffer[d], &bits, sizeof bits);
            }
          } else if (req.compute_grad) {
            values = rows_ptr + c * rows_ld;
          } else {
            values = set_row(req, bf16, k, row_buffer.data());
          }
          for (const int32_t* it = first_slot; it != last_slot; ++it) {
            int32_t& slot = group_slot_of[*it];
            if (slot < 0) {  // the set's first row in this group starts its partial
              slot = static_cast<int32_t>(touched.size());
              touched.push_back(*it);
              std::memcpy(set_partial.data() + slot * dim, values, static_cast<size_t>(dim) * sizeof(float));
            } else {
              add_f32(values, dim, set_partial.data() + slot * dim);
            }
          }
        }
        for (size_t slot = 0; slot < touched.size(); ++slot) {
          add_f32_to_f64(set_partial.data() + slot * dim, dim, streamed.sums.data() + touched[slot] * dim);
          group_slot_of[touched[slot]] = -1;
        }
        touched.clear();
      }

      // The parts of every row that need no set mean: lse and the softmax-weighted embedding sum.
      for (int64_t r = 0; r < rows; ++r) {
        row_lse[first + r] = static_cast<double>(run_max[r]) + std::log(run_sum[r]);
        if (req.compute_grad) {
          const double inv_sum = 1.0 / run_sum[r];
          const float* row_acc = acc_row(r);
          float* out = req.out_grad + active[first + r] * dim;
          for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<float>(static_cast<double>(row_acc[d]) * inv_sum);
        }
      }
    }  // (the loop's barrier: every streamed set sum is complete)

    const bool ok = failed_status.load() == static_cast<int>(Status::Ok);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < streamed.slots(); ++j) {
      if (!ok) continue;
      const int32_t set = streamed.set_of_slot[j];
      const double count = static_cast<double>(offsets[set + 1] - offsets[set]);
      double* mean = streamed.sums.data() + j * dim;
      for (int64_t d = 0; d < dim; ++d) mean[d] /= count;
    }

    // Finish every row: the candidate term from its set's mean embedding, and the gradient
    // (2 / tau) (mu - mean_C(e)) with mu the softmax-weighted embedding sum left in out_grad.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < num_active; ++i) {
      if (!ok || !allocated) continue;
      const int64_t row = active[i];
      const int64_t s = req.set_of_position[row];
      const int32_t slot = streamed.slot_of_set[s];
      const double* mean = mean_buffer.data();
      if (slot >= 0) {
        mean = streamed.sums.data() + slot * dim;
      } else {
        gathered_set_mean(req, bf16, s, add_f32, add_f32_to_f64, partial.data(), row_buffer.data(),
                          mean_buffer.data());
      }
      double norm = 0.0;  // mean_C(||e||^2), in list order
      for (int64_t c = offsets[s]; c < offsets[s + 1]; ++c)
        norm += static_cast<double>((bf16 ? req.bf16_bias : req.codebook.bias)[req.candidate_index[c]]);
      norm /= static_cast<double>(offsets[s + 1] - offsets[s]);
      load_row(req.z, row, row_buffer.data());
      double dot = 0.0;
      for (int64_t d = 0; d < dim; ++d) {
        const float z_value = bf16 ? round_to_bf16(row_buffer[d]) : row_buffer[d];
        dot += static_cast<double>(z_value) * mean[d];
      }
      req.out_loss[row] = static_cast<float>(row_lse[i] - (2.0 * dot - norm) / req.tau);
      if (req.compute_grad) {
        const double scale = 2.0 / req.tau;
        float* out = req.out_grad + row * dim;
        for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<float>(scale * (static_cast<double>(out[d]) - mean[d]));
      }
    }
  }
  if (failed_status.load() != static_cast<int>(Status::Ok))
    return {static_cast<Status>(failed_status.load()), failed_detail.load()};
  return {};
}

}  // namespace spae
