// The fused nearest / top-k search kernel and its launch; math, structure and interface: fused_search.cuh.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

#include "fused_search.cuh"

namespace spae_cuda {
namespace detail {
namespace {

// ---- PTX wrappers ----------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void cp_async16(uint32_t destination, const void* source, bool valid) {
  const int bytes = valid ? 16 : 0;  // 0: zero-fill, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(source), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

__device__ __forceinline__ void cp_async_wait(int pending) {
  // The operand must be an immediate: stages is 2, 3 or 4, so at most 2 groups stay in flight.
  if (pending <= 0) {
    asm volatile("cp.async.wait_group 0;\n" ::);
  } else if (pending == 1) {
    asm volatile("cp.async.wait_group 1;\n" ::);
  } else {
    asm volatile("cp.async.wait_group 2;\n" ::);
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t address, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                            uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(address));
}

template <Math M>
__device__ __forceinline__ void mma_16bit(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (M == Math::BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t to_tf32(float value) {
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(out) : "f"(value));
  return out;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- selection helpers -----------------------------------------------------------------------------------

// Total order (score, index); scores are never NaN here (mapped to +inf).
__device__ __forceinline__ bool ranks_before(float score_a, int index_a, float score_b, int index_b) {
  return score_a < score_b || (score_a == score_b && index_a < index_b);
}

// int64 whose signed order is the order (score, index), NaN last: the atomicMin merge key.
__device__ __forceinline__ long long pack_key(float score, int index) {
  const int bits = __float_as_int(score);
  int key32 = bits ^ ((bits >> 31) & 0x7FFFFFFF);
  if (score == 0.0f) key32 = 0;
  if (score != score) key32 = 0x7FFFFFFF;
  const unsigned long long high = static_cast<unsigned long long>(static_cast<long long>(key32)) << 32;
  return static_cast<long long>(high | static_cast<unsigned long long>(static_cast<unsigned>(index)));
}

// ---- one 64-byte K slab of the 128 x 128 tile: acc[m tile][n tile][fragment] ------------------------------
// Fragment element (i, j, c) is row warp_m*64 + i*16 + lane/4 + 8*(c/2), column warp_n*32 + j*8 + 2*(lane%4) + c%2.

// Calls f(i, j, c) for each of a thread's 64 accumulator elements, in that order, unrolled (so acc stays in
// registers): the one walk over the fragment for the fp32 FMAs, the score epilogue and the reset.
template <class F>
__device__ __forceinline__ void for_each_element(F&& f) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) f(i, j, c);
}

__device__ __forceinline__ void clear(float (&acc)[4][4][4]) {
  for_each_element([&](int i, int j, int c) { acc[i][j][c] = 0.0f; });
}

template <Math M>
__device__ __forceinline__ void compute_slab(const char* a_tile, const char* b_tile, float (&acc)[4][4][4],
                                             int warp_m, int warp_n, int lane) {
  if constexpr (M == Math::BF16 || M == Math::FP16) {
    const uint32_t a_base = smem_address(a_tile), b_base = smem_address(b_tile);
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {  // two k16 steps of 16-bit elements
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = warp_m * 64 + i * 16 + (lane & 15);
        const int column = kk * 16 + (lane >> 4) * 8;
        ldmatrix_x4(a_base + row * kRowPitch + column * 2, a[i][0], a[i][1], a[i][2], a[i][3]);
      }
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int row = warp_n * 32 + p * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int column = kk * 16 + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(b_base + row * kRowPitch + column * 2, b[2 * p][0], b[2 * p][1], b[2 * p + 1][0],
                    b[2 * p + 1][1]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16bit<M>(acc[i][j], a[i], b[j]);
    }
  } else {
    const float* a_rows = reinterpret_cast<const float*>(a_tile);
    const float* b_rows = reinterpret_cast<const float*>(b_tile);
    constexpr int kPitch = kRowPitch / 4;  // floats
    const int group = lane >> 2, thread_in_group = lane & 3;
    if constexpr (M == Math::TF32) {
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {  // two k8 steps of fp32 elements
        uint32_t a[4][4], b[4][2];
        const int column = kk * 8 + thread_in_group;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = warp_m * 64 + i * 16 + group;
          a[i][0] = to_tf32(a_rows[row * kPitch + column]);
          a[i][1] = to_tf32(a_rows[(row + 8) * kPitch + column]);
          a[i][2] = to_tf32(a_rows[row * kPitch + column + 4]);
          a[i][3] = to_tf32(a_rows[(row + 8) * kPitch + column + 4]);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int row = warp_n * 32 + j * 8 + group;
          b[j][0] = to_tf32(b_rows[row * kPitch + column]);
          b[j][1] = to_tf32(b_rows[row * kPitch + column + 4]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) mma_tf32(acc[i][j], a[i], b[j]);
      }
    } else {  // exact fp32: one fma chain per element, ascending d
#pragma unroll 4
      for (int kk = 0; kk < 16; ++kk) {
        float a[4][2], b[4][2];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) a[i][h] = a_rows[(warp_m * 64 + i * 16 + group + 8 * h) * kPitch + kk];
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int q = 0; q < 2; ++q) b[j][q] = b_rows[(warp_n * 32 + j * 8 + 2 * thread_in_group + q) * kPitch + kk];
        for_each_element([&](int i, int j, int c) { acc[i][j][c] = fmaf(a[i][c >> 1], b[j][c & 1], acc[i][j][c]); });
      }
    }
  }
}

// Issues the cp.async copies of one slab: 128 query rows (rows row0.. of `queries`, valid below
// query_limit) and 128 codebook rows, 4 x 16 bytes each.
__device__ __forceinline__ void load_slab(char* stage, const Params& p, const char* queries, int64_t row0,
                                          int64_t query_limit, int64_t column0, int64_t byte0, int tid) {
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int chunk = tid + it * kThreads;
    const int row = chunk >> 2, part = chunk & 3;
    const int64_t byte = byte0 + part * 16;
    const int64_t query = row0 + row, code = column0 + row;
    const bool query_ok = query < query_limit && byte < p.row_bytes;
    const bool code_ok = code < p.v && byte < p.row_bytes;
    cp_async16(smem_address(stage + row * kRowPitch + part * 16),
               query_ok ? queries + query * p.row_bytes + byte : queries, query_ok);
    cp_async16(smem_address(stage + kTileBytes + row * kRowPitch + part * 16),
               code_ok ? p.e + code * p.row_bytes + byte : p.e, code_ok);
  }
}

__device__ __forceinline__ float finish_score(float acc, float row_scale, bool has_row_scale, float bias,
                                              float col_scale) {
  if (has_row_scale) acc = __fmul_rn(acc, row_scale);
  const float score = __fadd_rn(bias, __fmul_rn(acc, col_scale));
  return score != score ? __int_as_float(0x7f800000) : score;
}

template <Math M, bool TOPK, bool SAQ>
__global__ void __launch_bounds__(kThreads, 1) search_kernel(Params p) {
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;
  const int group = lane >> 2, thread_in_group = lane & 3;
  const int64_t row_blocks = (p.n + kBlockM - 1) / kBlockM;
  const int64_t column_tiles = (p.v + kBlockN - 1) / kBlockN;
  const int64_t slabs = (p.row_bytes + kSlabBytes - 1) / kSlabBytes;
  const bool has_row_scale = p.row_scale != nullptr;

  char* after_stages = smem + p.stages * kStageBytes;
  // k = 1: cross-warp reduction buffers. k > 1: per-row lists and candidate buffers.
  float* reduce_score = reinterpret_cast<float*>(after_stages);        // [4][128]
  int* reduce_index = reinterpret_cast<int*>(reduce_score + 4 * kBlockM);  // [4][128]
  float* list_score = reinterpret_cast<float*>(after_stages);          // [128][kListPitch]
  int* list_index = reinterpret_cast<int*>(list_score + kBlockM * kListPitch);
  float* candidate_score = reinterpret_cast<float*>(list_index + kBlockM * kListPitch);  // [128][kCandidatePitch]
  int* candidate_index = reinterpret_cast<int*>(candidate_score + kBlockM * kCandidatePitch);
  int* candidate_count = candidate_index + kBlockM * kCandidatePitch;  // [128]
  int* list_count = candidate_count + kBlockM;                         // [128]
  float* threshold_score = reinterpret_cast<float*>(list_count + kBlockM);  // [128]
  int* threshold_index = reinterpret_cast<int*>(threshold_score + kBlockM);  // [128]
  // SAQ: per-row z offset and covering tokens, after the k = 1 or k > 1 region.
  char* saq_region = after_stages + (TOPK ? kBlockM * (2 * kListPitch + 2 * kCandidatePitch + 4) * 4 : 4 * kBlockM * 8);
  int64_t* saq_z_offset = reinterpret_cast<int64_t*>(saq_region);      // [128]
  int* saq_tokens = reinterpret_cast<int*>(saq_z_offset + kBlockM);    // [128][kMaxSaqLayers]
  constexpr int kElement = (M == Math::BF16 || M == Math::FP16) ? 2 : 4;
  const int e_dtype = M == Math::BF16 ? kBFloat16 : (M == Math::FP16 ? kFloat16 : kFloat32);
  const char* queries = p.x;
  int64_t query_row0 = 0, query_limit = p.n;

  const float kInf = __int_as_float(0x7f800000);

  for (int64_t item = blockIdx.x; item < p.num_items; item += gridDim.x) {
    // Grouped rasterisation: kGroupM query blocks x all chunks, query block fastest.
    const int64_t group_items = static_cast<int64_t>(kGroupM) * p.num_chunks;
    const int64_t first_block = item / group_items * kGroupM;
    const int64_t group_rows = min64(row_blocks - first_block, kGroupM);
    const int64_t row_block = first_block + (item % group_items) % group_rows;
    const int64_t chunk = (item % group_items) / group_rows;
    const int64_t row0 = row_block * kBlockM;
    const int64_t tile_begin = chunk * p.tiles_per_chunk;
    const int64_t tile_end = min64(tile_begin + p.tiles_per_chunk, column_tiles);
    const int64_t iterations = (tile_end - tile_begin) * slabs;
    query_row0 = row0;
    if constexpr (SAQ) {
      // Form this block's targets once: 128 rows x D operand elements in this CTA's scratch rows.
      char* scratch = p.scratch + static_cast<int64_t>(blockIdx.x) * kBlockM * p.row_bytes;
      if (tid < kBlockM && row0 + tid < p.n)
        saq_z_offset[tid] = saq_row(p.saq.sides, p.saq.firsts, p.saq.ids, p.saq.ids_stride, p.saq.z_strides,
                                    p.saq.grid, p.saq.layer, row0 + tid, saq_tokens + tid * kMaxSaqLayers);
      __syncthreads();
      const int64_t columns = p.row_bytes / kElement;  // padded D
      for (int64_t element = tid; element < kBlockM * columns; element += kThreads) {
        const int row = static_cast<int>(element / columns);
        const int64_t d = element % columns;
        float target = 0.0f;
        if (row0 + row < p.n && d < p.dim)
          target = saq_target(p.saq.z, p.saq.z_dtype, saq_z_offset[row] + d * p.saq.z_strides[1], p.saq.coefficient,
                              p.e, e_dtype, columns, d, saq_tokens + row * kMaxSaqLayers, p.saq.layer);
        if constexpr (kElement == 2) {
          reinterpret_cast<__nv_bfloat16*>(scratch)[element] = __float2bfloat16_rn(target);
        } else {
          reinterpret_cast<float*>(scratch)[element] = target;
        }
      }
      __syncthreads();  // the targets are visible to the cp.async copies below
      queries = scratch;
      query_row0 = 0;
      query_limit = kBlockM;
    }

    float row_scale[4][2];
    float best_score[4][2];
    int best_index[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + warp_m * 64 + i * 16 + group + 8 * h;
        row_scale[i][h] = has_row_scale && row < p.n ? p.row_scale[row] : 1.0f;
        best_score[i][h] = kInf;
        best_index[i][h] = -1;
      }
    if constexpr (TOPK) {
      if (tid < kBlockM) {
        list_count[tid] = 0;
        candidate_count[tid] = 0;
        threshold_score[tid] = kInf;
        threshold_index[tid] = INT_MAX;  // list not full: every value passes
      }
      __syncthreads();
    }

    float acc[4][4][4];
    clear(acc);

    // Pipeline prologue: stages - 1 slabs in flight (one commit group per slab, empty groups included).
    for (int s = 0; s < p.stages - 1; ++s) {
      if (s < iterations) {
        const int64_t tile = tile_begin + s / slabs;
        load_slab(smem + s * kStageBytes, p, queries, query_row0, query_limit, tile * kBlockN, (s % slabs) * kSlabBytes,
                  tid);
      }
      cp_async_commit();
    }

    for (int64_t it = 0; it < iterations; ++it) {
      cp_async_wait(p.stages - 2);
      __syncthreads();  // slab `it` visible to all; everyone is done with the stage reloaded below
      const int64_t next = it + p.stages - 1;
      if (next < iterations) {
        const int64_t tile = tile_begin + next / slabs;
        load_slab(smem + (next % p.stages) * kStageBytes, p, queries, query_row0, query_limit, tile * kBlockN,
                  (next % slabs) * kSlabBytes, tid);
      }
      cp_async_commit();
      const char* stage = smem + (it % p.stages) * kStageBytes;
      compute_slab<M>(stage, stage + kTileBytes, acc, warp_m, warp_n, lane);

      if (it % slabs != slabs - 1) continue;
      // ---- epilogue of codebook tile `tile` ----
      const int64_t column0 = (tile_begin + it / slabs) * kBlockN + warp_n * 32 + 2 * thread_in_group;
      float bias[4][2], col_scale[4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int64_t column = column0 + j * 8 + q;
          bias[j][q] = column < p.v ? __ldg(p.bias + column) : 0.0f;
          col_scale[j][q] = column < p.v ? __ldg(p.col_scale + column) : 0.0f;
        }
      if constexpr (!TOPK) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
              for (int q = 0; q < 2; ++q) {  // ascending columns: an equal score never replaces the best
                const int64_t column = column0 + j * 8 + q;
                if (column < p.v) {
                  const float score =
                      finish_score(acc[i][j][2 * h + q], row_scale[i][h], has_row_scale, bias[j][q], col_scale[j][q]);
                  if (best_index[i][h] < 0 || score < best_score[i][h]) {
                    best_score[i][h] = score;
                    best_index[i][h] = static_cast<int>(column);
                  }
                }
              }
      } else {
        // Scores in place of the accumulators; bit b = (i*4 + j)*4 + c marks a value still to offer.
        unsigned long long pending = 0;
        for_each_element([&](int i, int j, int c) {
          const int h = c >> 1, q = c & 1;
          acc[i][j][c] = finish_score(acc[i][j][c], row_scale[i][h], has_row_scale, bias[j][q], col_scale[j][q]);
          if (column0 + j * 8 + q < p.v) pending |= 1ull << ((i * 4 + j) * 4 + c);
        });
        while (true) {
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int local_row = warp_m * 64 + i * 16 + group + 8 * h;
              const float limit_score = threshold_score[local_row];
              const int limit_index = threshold_index[local_row];
#pragma unroll
              for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                  const int c = 2 * h + q;
                  const unsigned long long bit = 1ull << ((i * 4 + j) * 4 + c);
                  if (!(pending & bit)) continue;
                  const int column = static_cast<int>(column0 + j * 8 + q);
                  if (ranks_before(acc[i][j][c], column, limit_score, limit_index)) {
                    const int slot = atomicAdd(candidate_count + local_row, 1);
                    if (slot < kCandidateCap) {
                      candidate_score[local_row * kCandidatePitch + slot] = acc[i][j][c];
                      candidate_index[local_row * kCandidatePitch + slot] = column;
                      pending &= ~bit;
                    }
                  } else {
                    pending &= ~bit;
                  }
                }
            }
          __syncthreads();
          if (tid < kBlockM) {  // one thread per row merges its candidates into the sorted list
            const int row = tid;
            const int offered = min(candidate_count[row], kCandidateCap);
            candidate_count[row] = 0;
            int count = list_count[row];
            float* scores = list_score + row * kListPitch;
            int* indices = list_index + row * kListPitch;
            for (int c = 0; c < offered; ++c) {
              const float score = candidate_score[row * kCandidatePitch + c];
              const int index = candidate_index[row * kCandidatePitch + c];
              int position = count;
              while (position > 0 && ranks_before(score, index, scores[position - 1], indices[position - 1]))
                --position;
              if (position >= p.k_pad) continue;
              for (int m = min(count, p.k_pad - 1); m > position; --m) {
                scores[m] = scores[m - 1];
                indices[m] = indices[m - 1];
              }
              scores[position] = score;
              indices[position] = index;
              if (count < p.k_pad) ++count;
            }
            list_count[row] = count;
            threshold_score[row] = count < p.k_pad ? kInf : scores[p.k_pad - 1];
            threshold_index[row] = count < p.k_pad ? INT_MAX : indices[p.k_pad - 1];
          }
          if (!__syncthreads_or(pending != 0)) break;  // also publishes the merged lists
        }
      }
      clear(acc);
    }
    cp_async_wait(0);

    // ---- end of the work item: merge and write ----
    if constexpr (!TOPK) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float score = best_score[i][h];
          int index = best_index[i][h];
#pragma unroll
          for (int offset = 1; offset <= 2; offset <<= 1) {  // the 4 lanes of a quad share the row
            const float other_score = __shfl_xor_sync(0xffffffffu, score, offset);
            const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
            if (other_index >= 0 && (index < 0 || ranks_before(other_score, other_index, score, index))) {
              score = other_score;
              index = other_index;
            }
          }
          if (thread_in_group == 0) {
            const int local_row = warp_m * 64 + i * 16 + group + 8 * h;
            reduce_score[warp_n * kBlockM + local_row] = score;
            reduce_index[warp_n * kBlockM + local_row] = index;
          }
        }
      __syncthreads();
      if (tid < kBlockM) {
        float score = reduce_score[tid];
        int index = reduce_index[tid];
        for (int w = 1; w < 4; ++w) {
          const float other_score = reduce_score[w * kBlockM + tid];
          const int other_index = reduce_index[w * kBlockM + tid];
          if (other_index >= 0 && (index < 0 || ranks_before(other_score, other_index, score, index))) {
            score = other_score;
            index = other_index;
          }
        }
        const int64_t row = row0 + tid;
        if (row < p.n && index >= 0) atomicMin(p.keys + row, pack_key(score, index));
      }
    } else {
      if (tid < kBlockM) {
        const int64_t row = row0 + tid;
        if (row < p.n) {
          const int count = list_count[tid];
          const int64_t out = (row * p.num_chunks + chunk) * p.k_pad;
          for (int s = 0; s < p.k_pad; ++s) {
            p.out_score[out + s] = s < count ? list_score[tid * kListPitch + s] : kInf;
            p.out_index[out + s] = s < count ? list_index[tid * kListPitch + s] : kEmptyIndex + s;
          }
        }
      }
    }
    __syncthreads();  // shared buffers and pipeline stages are reused by the next item
  }
}

size_t shared_bytes(int stages, bool topk, bool saq) {
  const size_t extra = topk ? static_cast<size_t>(kBlockM) * (2 * kListPitch + 2 * kCandidatePitch + 4) * 4
                            : static_cast<size_t>(4) * kBlockM * 8;
  const size_t saq_extra = saq ? static_cast<size_t>(kBlockM) * (8 + 4 * kMaxSaqLayers) : 0;
  return static_cast<size_t>(stages) * kStageBytes + extra + saq_extra;
}

}  // namespace

template <Math M, bool TOPK, bool SAQ>
Status launch(const Params& base, const DeviceGuard& gpu, cudaStream_t stream, int64_t max_ctas) {
  const int sms = gpu.sms();
  const size_t max_shared = gpu.max_shared();
  Params p = base;
  p.stages = 4;
  while (p.stages > 2 && shared_bytes(p.stages, TOPK, SAQ) > max_shared) --p.stages;
  const size_t shared = shared_bytes(p.stages, TOPK, SAQ);
  if (shared > max_shared)
    return {kBadArgument, "spae_fast search kernel needs " + std::to_string(shared) + " bytes of shared memory, device offers " +
                              std::to_string(max_shared)};
  auto kernel = search_kernel<M, TOPK, SAQ>;
  Status status = cuda_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(shared)),
                              "cudaFuncSetAttribute");
  if (status.code) return status;
  int per_sm = 0;
  status = cuda_status(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shared),
                       "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (status.code) return status;
  int64_t grid = std::max<int64_t>(1, std::min<int64_t>(p.num_items, static_cast<int64_t>(sms) * std::max(per_sm, 1)));
  if (max_ctas > 0) grid = std::min(grid, max_ctas);  // SAQ: one scratch block per CTA
  kernel<<<static_cast<unsigned>(grid), kThreads, shared, stream>>>(p);
  return cuda_status(cudaGetLastError(), "search kernel launch");
}

// The variants the ops launch: nearest.cu (every Math, k = 1 and k > 1), saq.cu (bf16 / tf32, k > 1).
template Status launch<Math::BF16, false, false>(const Params&, const DeviceGuard&, cudaStream_t, int64_t);
template Status launch<Math::BF16, true, false>(const Params&, const DeviceGuard&, cudaStream_t, int64_t);
template Status launch<Math::FP16, false, false>(const Params&, const DeviceGuard&, cudaStream_t, int64_t);
template Status launch<Math::FP16, true, false>(const Params&, const DeviceGuard&, cudaStream_t, int64_t);
template Status launch<Math::TF32, false, false>(const Params&, const DeviceGuard&, cudaStream_t, int64_t);
template Status launch<Math::TF32, true, false>(const Params&, const DeviceGuard&, cudaStream_t, int64_t);
template Status launch<Math::FP32, false, false>(const Params&, const DeviceGuard&, cudaStream_t, int64_t);
template Status launch<Math::FP32, true, false>(const Params&, const DeviceGuard&, cudaStream_t, int64_t);
template Status launch<Math::BF16, true, true>(const Params&, const DeviceGuard&, cudaStream_t, int64_t);
template Status launch<Math::TF32, true, true>(const Params&, const DeviceGuard&, cudaStream_t, int64_t);

Status check_search(const SearchArgs& args, bool saq) {
  if (args.n < 0 || args.v < 1 || args.d < 1 || args.k_pad < 1 || args.k_pad > kMaxTopk ||
      (args.k_pad & (args.k_pad - 1)) != 0 || (args.x == nullptr && !saq) || args.e == nullptr || args.bias == nullptr ||
      args.col_scale == nullptr || args.v >= kEmptyIndex || args.num_chunks < 1 || args.tiles_per_chunk < 1)
    return {kBadArgument, "spae_fast CUDA search: invalid arguments"};
  if ((args.k_pad == 1 && args.keys == nullptr) || (args.k_pad > 1 && (args.out_score == nullptr || args.out_index == nullptr)))
    return {kBadArgument, "spae_fast CUDA search: missing output buffers"};
  return {};
}

Status search_params(const SearchArgs& args, const void* queries, Params* p) {
  const int element = args.dtype == kFloat32 ? 4 : 2;
  const int64_t row_bytes = args.d * element;
  if (row_bytes % 16 != 0 || reinterpret_cast<uintptr_t>(queries) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(args.e) % 16 != 0)
    return {kBadArgument, "spae_fast CUDA search: rows must be contiguous and 16-byte aligned (pad D)"};
  const int64_t column_tiles = (args.v + kBlockN - 1) / kBlockN;
  if (args.num_chunks * args.tiles_per_chunk < column_tiles || (args.num_chunks - 1) * args.tiles_per_chunk >= column_tiles)
    return {kBadArgument, "spae_fast CUDA search: num_chunks / tiles_per_chunk do not come from search_plan"};
  *p = Params{};
  p->x = static_cast<const char*>(args.x);
  p->e = static_cast<const char*>(args.e);
  p->bias = args.bias;
  p->col_scale = args.col_scale;
  p->row_scale = args.row_scale;
  p->keys = args.keys;
  p->out_score = args.out_score;
  p->out_index = args.out_index;
  p->n = args.n;
  p->v = args.v;
  p->row_bytes = row_bytes;
  p->num_chunks = args.num_chunks;
  p->tiles_per_chunk = args.tiles_per_chunk;
  p->num_items = (args.n + kBlockM - 1) / kBlockM * args.num_chunks;
  p->k_pad = args.k_pad;
  return {};
}

Status device_limits(int device, int* sms, size_t* max_shared) {
  int value = 0;
  Status status = cuda_status(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device), "SM count");
  if (status.code) return status;
  *sms = value;
  status = cuda_status(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                       "shared memory limit");
  *max_shared = static_cast<size_t>(value);
  return status;
}

Status cuda_status(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return {};
  return {static_cast<int>(error), std::string(what) + ": " + cudaGetErrorString(error)};
}

}  // namespace detail
}  // namespace spae_cuda
