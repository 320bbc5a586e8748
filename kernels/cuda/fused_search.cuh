// The fused nearest / top-k search kernel on NVIDIA tensor cores (sm_80+: mma.sync, ldmatrix, cp.async), shared
// by the CUDA ops: nearest.cu (nearest / top-k, and the fp64 pair rescoring of exact mode) and saq.cu (each SAQ
// layer's targets formed in the kernel's prologue, SAQ = true). Torch-free. The kernel is fused_search.cu.
//
// Math (spae_fast/_ref.py is the spec; the caller folds the metric into bias / scales):
//     score[n, v] = bias[v] + col_scale[v] * (row_scale[n] *) sum_d x[n, d] * e[v, d]
//   l2: bias = ||e||^2, col_scale = -2;  ip: bias = 0, col_scale = -1;  cosine: col_scale = -1/|e|,
//   row_scale = 1/|x|. Multiplying by -2 / -1 is exact, so 16-bit operands go to the tensor cores as they
//   are (their products are exact in fp32) and no scaled copy of the codebook exists.
// Result per query: the k smallest scores in the total order (score, index), ties to the lowest index.
// NaN scores (non-finite inputs with check_finite=False) count as +inf; indices always stay in range.
//
// Kernel structure (one CTA = 256 threads = 8 warps as 2 (rows) x 4 (columns), tile 128 x 128):
//  * work item = (128 queries, one chunk of the codebook); a persistent grid walks the items in grouped
//    order (8 query blocks x all chunks, query block fastest) so concurrently running CTAs share query
//    blocks and codebook tiles in L2;
//  * per codebook tile, the K loop over D runs in 64-byte slabs (32 x 16-bit or 16 x fp32) through a
//    2..4-stage cp.async pipeline that flows from one tile into the next; shared-memory rows are padded
//    to 80 bytes so ldmatrix and the fp32 fragment loads are bank-conflict free;
//  * math: bf16/fp16 mma.sync.m16n8k16 (fp32 accumulate), fp32 operands as TF32 mma.sync.m16n8k8
//    (cvt.rna) or, for exact fp32, FMA in the same fragment layout with one fma chain per element in
//    ascending d (identical to the CPU kernel's products for l2 / ip);
//  * epilogue, k = 1: each thread keeps a running (min, argmin) for its 8 rows in registers, over its
//    columns in ascending order; at the end of the item the 16 threads sharing a row merge by shuffles and
//    shared memory, and one atomicMin on the packed int64 key (score, index) merges the chunks:
//    order-independent, so results are bitwise identical for any grid, chunking or batch size;
//  * epilogue, k > 1: per-row sorted lists in shared memory; each tile, values that beat the row's current
//    k-th entry are appended to a per-row candidate buffer (atomicAdd slot) and merged by one thread per
//    row (insertion, total order: the list is the k smallest of the set whatever the arrival order);
//    buffer overflow just takes another round. Lists are written per chunk; the host merges chunks.
// Per-element arithmetic never depends on N, k or the grid: the same inputs give the same bits.
//
// Interface: a per-op entry point checks its arguments (check_search, search_params), sets the device and
// reads its limits (DeviceGuard) and calls launch<Math, TOPK, SAQ>, which picks the pipeline
// depth, the persistent grid and runs search_kernel; fused_search.cu instantiates every variant.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda_api.h"

namespace spae_cuda {
namespace detail {

constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kThreads = 256;
constexpr int kGroupM = 8;
constexpr int kSlabBytes = 64;  // one K step of one row
constexpr int kRowPitch = 80;   // padded shared-memory row: conflict-free ldmatrix / fragment loads
constexpr int kTileBytes = kBlockM * kRowPitch;
constexpr int kStageBytes = 2 * kTileBytes;  // A tile (queries) then B tile (codebook rows)
constexpr int kCandidateCap = 16;
constexpr int kListPitch = kMaxTopk + 1;  // +1: one thread per row walks its list without bank conflicts
constexpr int kCandidatePitch = kCandidateCap + 1;
constexpr int kEmptyIndex = 1 << 30;

enum class Math { BF16, FP16, TF32, FP32 };

struct Params {
  const char* x;
  const char* e;
  const float* bias;
  const float* col_scale;
  const float* row_scale;
  long long* keys;
  float* out_score;
  int* out_index;
  int64_t n, v;
  int64_t row_bytes;  // d * element size (multiple of 16)
  int64_t num_chunks, tiles_per_chunk, num_items;
  int k_pad;
  int stages;
  // SAQ: targets of one layer, formed per work item into this CTA's scratch rows (see cuda_api.h)
  SaqLayer saq;
  int64_t dim;  // real D of z
  char* scratch;
};

// The arguments every fused search takes (x null is allowed for SAQ, whose queries are its scratch rows).
Status check_search(const SearchArgs& args, bool saq);
// Alignment of the query rows (x, or the SAQ scratch) and the codebook, the plan (num_chunks / tiles_per_chunk
// from search_plan), then the kernel parameters (SAQ fields zero).
Status search_params(const SearchArgs& args, const void* queries, Params* p);
Status device_limits(int device, int* sms, size_t* max_shared);
Status cuda_status(cudaError_t error, const char* what);

// Sets the device for its lifetime (restoring the previous one) and reads its SM count and shared-memory
// limit; status() is the first failure of the two.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    status_ = cuda_status(cudaSetDevice(device), "cudaSetDevice");
    if (!status_.code) status_ = device_limits(device, &sms_, &max_shared_);
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  const Status& status() const { return status_; }
  int sms() const { return sms_; }
  size_t max_shared() const { return max_shared_; }

 private:
  int previous_ = -1;
  Status status_;
  int sms_ = 0;
  size_t max_shared_ = 0;
};

// Launches search_kernel<M, TOPK, SAQ> on the guard's device (max_ctas > 0 caps the grid: one SAQ scratch block
// per CTA).
template <Math M, bool TOPK, bool SAQ>
Status launch(const Params& base, const DeviceGuard& gpu, cudaStream_t stream, int64_t max_ctas);

// Blocks of 256 threads (8 warps, one (row, candidate) pair per warp) of the fp64 pair kernels.
inline int64_t pair_blocks(int64_t pairs, int sms) {
  return std::max<int64_t>(1, std::min<int64_t>((pairs + 7) / 8, static_cast<int64_t>(sms) * 16));
}

struct PairParams {
  const void* a;
  const void* b;
  const int64_t* index;
  double* out;
  int64_t a0, a1, b0, b1, i0, i1;
  int64_t m, c, d;
  int a_dtype, b_dtype;
};

__device__ __forceinline__ double load_double(const void* base, int dtype, int64_t offset) {
  if (dtype == kBFloat16) return static_cast<double>(__bfloat162float(static_cast<const __nv_bfloat16*>(base)[offset]));
  if (dtype == kFloat16) return static_cast<double>(__half2float(static_cast<const __half*>(base)[offset]));
  return static_cast<double>(static_cast<const float*>(base)[offset]);
}

// Position (z offset without d) and covering tokens of raster row `row` of SAQ layer `layer`.
__device__ __forceinline__ int64_t saq_row(const int* sides, const int* firsts, const int64_t* ids,
                                           int64_t ids_stride, const int64_t (&z_stride)[4], int grid, int layer,
                                           int64_t row, int* tokens) {
  const int64_t side = sides[layer], stride = grid / side, offset = stride - (stride + 1) / 2;
  const int64_t image = row / (side * side);
  const int64_t y = stride * ((row / side) % side) + offset, x = stride * (row % side) + offset;
  for (int m = 0; m < layer; ++m) {
    const int64_t side_m = sides[m], stride_m = grid / side_m;
    tokens[m] = static_cast<int>(ids[image * ids_stride + firsts[m] + (y / stride_m) * side_m + x / stride_m]);
  }
  return image * z_stride[0] + y * z_stride[2] + x * z_stride[3];
}

// fp32 target: float(c * z - sum_m e[token_m, d]) with the sum in fp64, ascending m (c * z is exact).
__device__ __forceinline__ float saq_target(const void* z, int z_dtype, int64_t z_offset, double coefficient,
                                            const void* e, int e_dtype, int64_t e_row_stride, int64_t e_offset,
                                            const int* tokens, int layer) {
  double covering = 0.0;
  for (int m = 0; m < layer; ++m) covering += load_double(e, e_dtype, tokens[m] * e_row_stride + e_offset);
  return static_cast<float>(coefficient * load_double(z, z_dtype, z_offset) - covering);
}

}  // namespace detail
}  // namespace spae_cuda
