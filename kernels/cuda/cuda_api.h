// Torch-free entry points of the CUDA module (compiled by nvcc, bound by bindings_cuda.cpp).
//
// Every entry point takes raw device pointers, sizes, a dtype tag, the CUDA device index and the caller's
// stream (torch.cuda.current_stream().cuda_stream), sets the device for its duration, launches
// asynchronously and returns a Status: code 0, a cudaError_t, or kBadArgument, plus a message. Python
// (spae_fast/ops/gpu_kernels.py: raise_cuda) turns non-zero codes into exceptions.
#pragma once

#include <cstdint>
#include <string>

namespace spae_cuda {

// Number of usable CUDA devices; error_code receives the cudaError_t of cudaGetDeviceCount.
int device_count(int* error_code);
const char* error_string(int error_code);
int runtime_version();

constexpr int kBadArgument = -1;

struct Status {
  int code = 0;
  std::string message;
};

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Fused nearest / top-k, see fused_search.cuh for the math and the kernel structure.
//   score[n, v] = bias[v] + col_scale[v] * (row_scale[n] *) sum_d x[n, d] e[v, d]
// x [n, d] and e [v, d] are contiguous with the same dtype and 16-byte aligned rows (d * element size a
// multiple of 16: the caller pads with zeros). fp32 operands use TF32 tensor cores when tf32 is set, an
// exact FMA kernel otherwise. k_pad = 1: keys [n] int64 (preset to INT64_MAX by the caller) receive the
// packed (score, index) by atomic min. 1 < k_pad <= 32 (a power of two): out_score / out_index
// [n, num_chunks, k_pad] receive each codebook chunk's best k_pad (unsorted; empty slots have index
// >= 2^30). num_chunks / tiles_per_chunk must come from search_plan.
struct SearchArgs {
  const void* x = nullptr;
  const void* e = nullptr;
  int64_t n = 0, v = 0, d = 0;
  int dtype = kFloat32;
  bool tf32 = false;
  const float* bias = nullptr;
  const float* col_scale = nullptr;
  const float* row_scale = nullptr;  // null: no row scale
  int k_pad = 1;
  int64_t num_chunks = 1, tiles_per_chunk = 1;
  long long* keys = nullptr;
  float* out_score = nullptr;
  int* out_index = nullptr;
  int device = 0;
  uintptr_t stream = 0;
};

struct SearchPlan {
  int64_t num_chunks = 1, tiles_per_chunk = 1;
  int64_t max_ctas = 1;  // persistent CTAs a launch uses at most (SAQ scratch size)
};

constexpr int kMaxSaqLayers = 16;

constexpr int kMaxTopk = 32;

Status search_plan(int64_t n, int64_t v, int k_pad, int device, SearchPlan* plan);  // nearest.cu
Status search(const SearchArgs& args);                                                // nearest.cu

// One SAQ / RQ layer as the SAQ kernels read it (saq.cu): latents z [B, D, g, g] (element strides), the id
// matrix [B, total] int64 with the layers above `layer` (0-based) filled in, the layers' sides and first
// columns as int32 device arrays, and the coefficient c of the layer's target
//   target[p, d] = float(c * z[b, d, y, x] - sum_{m < layer} e[ids[b, first_m + (y / t_m) s_m + x / t_m], d])
// (the sum in fp64, ascending m).
struct SaqLayer {
  const void* z = nullptr;
  int z_dtype = kFloat32;
  int64_t z_strides[4] = {0, 0, 0, 0};
  const int64_t* ids = nullptr;
  int64_t ids_stride = 0;
  const int* sides = nullptr;   // [layers] int32, device
  const int* firsts = nullptr;  // [layers] int32, device
  int grid = 1, layer = 0;
  double coefficient = 1.0;
};

// The fused search whose queries (search.x unused) are the layer's targets, formed once per work item into
// scratch (scratch_ctas x 128 rows x search.d operand elements). k_pad >= 2; bf16 operands, or fp32 with tf32.
struct SaqSearchArgs {
  SearchArgs search;
  SaqLayer saq;
  int64_t dim = 0;  // real D of z (search.d may be padded)
  void* scratch = nullptr;
  int64_t scratch_ctas = 0;
};

Status saq_search(const SaqSearchArgs& args);

// out[m, c] = sum_d a[m, d] * b[index[m, c], d] in fp64 (index < 0: 0), in the canonical order shared with
// the Triton kernel: lane l = d mod 32 accumulates with fma in ascending d, then lanes combine pairwise
// (l, l^1), (l, l^2), ..., (l, l^16). Any strides (elements), any of the three dtypes for a and b.
struct PairDotArgs {
  const void* a = nullptr;
  int a_dtype = kFloat32;
  int64_t a_stride0 = 0, a_stride1 = 1;
  const void* b = nullptr;
  int b_dtype = kFloat32;
  int64_t b_stride0 = 0, b_stride1 = 1;
  const int64_t* index = nullptr;
  int64_t index_stride0 = 0, index_stride1 = 1;
  int64_t m = 0, c = 0, d = 0;
  double* out = nullptr;  // [m, c] contiguous
  int device = 0;
  uintptr_t stream = 0;
};

Status pair_dot64(const PairDotArgs& args);  // nearest.cu

// out[m, c] = target_m . b[index[m, c]] in fp64 (canonical order as pair_dot64), target_m the fp32 SAQ target
// of row m of layer saq.layer formed from (z, ids) and b itself (the codebook, any strides / dtype).
struct SaqPairArgs {
  PairDotArgs pair;  // a / a_* unused
  SaqLayer saq;
};

Status saq_pair_dot64(const SaqPairArgs& args);  // saq.cu

}  // namespace spae_cuda
