// The CUDA nearest / top-k op: the fused search (fused_search.cuh) over plain query rows, its plan, and the
// fp64 pair dot products of exact mode's rescoring (canonical order shared with the Triton kernel).
#include <algorithm>
#include <cstdint>
#include <string>

#include "fused_search.cuh"

namespace spae_cuda {
namespace {

using namespace detail;

__global__ void __launch_bounds__(256) pair_dot64_kernel(PairParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t pair = first_warp; pair < p.m * p.c; pair += num_warps) {
    const int64_t row = pair / p.c, candidate = pair % p.c;
    const int64_t index = p.index[row * p.i0 + candidate * p.i1];
    double acc = 0.0;
    if (index >= 0) {
      for (int64_t d = lane; d < p.d; d += 32)
        acc = fma(load_double(p.a, p.a_dtype, row * p.a0 + d * p.a1), load_double(p.b, p.b_dtype, index * p.b0 + d * p.b1),
                  acc);
    }
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) p.out[pair] = acc;
  }
}

}  // namespace

using namespace detail;

Status search_plan(int64_t n, int64_t v, int k_pad, int device, SearchPlan* plan) {
  const DeviceGuard gpu(device);
  if (gpu.status().code) return gpu.status();
  // Split the codebook so small batches still fill the GPU (split-V) and large ones keep a few chunks
  // for L2 reuse; k > 1 caps chunks x k_pad to bound the partial lists (O(N) memory).
  const int64_t row_blocks = std::max<int64_t>(1, (n + kBlockM - 1) / kBlockM);
  const int64_t column_tiles = (v + kBlockN - 1) / kBlockN;
  int64_t chunks = std::max<int64_t>((4 * static_cast<int64_t>(gpu.sms()) + row_blocks - 1) / row_blocks, 8);
  if (k_pad > 1) chunks = std::min<int64_t>(chunks, std::max(1, 256 / k_pad));
  chunks = std::max<int64_t>(1, std::min(chunks, column_tiles));
  plan->tiles_per_chunk = (column_tiles + chunks - 1) / chunks;
  plan->num_chunks = (column_tiles + plan->tiles_per_chunk - 1) / plan->tiles_per_chunk;
  plan->max_ctas = std::min<int64_t>(row_blocks * plan->num_chunks, 2 * static_cast<int64_t>(gpu.sms()));
  return {};
}

Status search(const SearchArgs& args) {
  Params p{};
  Status status = check_search(args, /*saq=*/false);
  if (!status.code) status = search_params(args, args.x, &p);
  if (status.code || args.n == 0) return status;
  const DeviceGuard gpu(args.device);
  if (gpu.status().code) return gpu.status();

  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(args.stream);
  const bool topk = args.k_pad > 1;
  switch (args.dtype) {
    case kBFloat16:
      return topk ? launch<Math::BF16, true, false>(p, gpu, stream, 0) : launch<Math::BF16, false, false>(p, gpu, stream, 0);
    case kFloat16:
      return topk ? launch<Math::FP16, true, false>(p, gpu, stream, 0) : launch<Math::FP16, false, false>(p, gpu, stream, 0);
    case kFloat32:
      if (args.tf32)
        return topk ? launch<Math::TF32, true, false>(p, gpu, stream, 0) : launch<Math::TF32, false, false>(p, gpu, stream, 0);
      return topk ? launch<Math::FP32, true, false>(p, gpu, stream, 0) : launch<Math::FP32, false, false>(p, gpu, stream, 0);
    default:
      return {kBadArgument, "spae_fast CUDA search: unknown dtype tag"};
  }
}

Status pair_dot64(const PairDotArgs& args) {
  if (args.m < 0 || args.c < 0 || args.d < 1 || args.a == nullptr || args.b == nullptr || args.index == nullptr ||
      args.out == nullptr || args.a_dtype < 0 || args.a_dtype > 2 || args.b_dtype < 0 || args.b_dtype > 2)
    return {kBadArgument, "spae_fast CUDA pair_dot64: invalid arguments"};
  if (args.m == 0 || args.c == 0) return {};
  const DeviceGuard gpu(args.device);
  if (gpu.status().code) return gpu.status();
  PairParams p{args.a, args.b, args.index, args.out, args.a_stride0, args.a_stride1, args.b_stride0, args.b_stride1,
               args.index_stride0, args.index_stride1, args.m, args.c, args.d, args.a_dtype, args.b_dtype};
  const int64_t blocks = pair_blocks(args.m * args.c, gpu.sms());
  pair_dot64_kernel<<<static_cast<unsigned>(blocks), 256, 0, reinterpret_cast<cudaStream_t>(args.stream)>>>(p);
  return cuda_status(cudaGetLastError(), "pair_dot64 kernel launch");
}

}  // namespace spae_cuda
