// The CUDA SAQ / RQ op, one launch per layer: the fused search (fused_search.cuh) with SAQ = true, whose
// prologue forms the layer's targets (saq_row, saq_target) into per-CTA scratch rows, and the fp64 dot products
// of (target, candidate) pairs that certify its exact-mode result.
#include <algorithm>
#include <cstdint>
#include <string>

#include "fused_search.cuh"

namespace spae_cuda {
namespace {

using namespace detail;

struct SaqPairParams {
  PairParams pair;
  SaqLayer saq;
};

// pair_dot64 with A = the SAQ targets (formed by every lane for its d, as the search kernel forms them).
__global__ void __launch_bounds__(256) saq_pair_dot64_kernel(SaqPairParams s) {
  const PairParams& p = s.pair;
  const int lane = threadIdx.x & 31;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  int tokens[kMaxSaqLayers];
  for (int64_t pair = first_warp; pair < p.m * p.c; pair += num_warps) {
    const int64_t row = pair / p.c, candidate = pair % p.c;
    const int64_t index = p.index[row * p.i0 + candidate * p.i1];
    const int64_t z_offset =
        saq_row(s.saq.sides, s.saq.firsts, s.saq.ids, s.saq.ids_stride, s.saq.z_strides, s.saq.grid, s.saq.layer, row,
                tokens);
    double acc = 0.0;
    if (index >= 0) {
      for (int64_t d = lane; d < p.d; d += 32) {
        const float target = saq_target(s.saq.z, s.saq.z_dtype, z_offset + d * s.saq.z_strides[1], s.saq.coefficient,
                                        p.b, p.b_dtype, p.b0, d * p.b1, tokens, s.saq.layer);
        acc = fma(static_cast<double>(target), load_double(p.b, p.b_dtype, index * p.b0 + d * p.b1), acc);
      }
    }
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) p.out[pair] = acc;
  }
}

}  // namespace

using namespace detail;

// The layer arguments both SAQ entry points check.
static bool valid_layer(const SaqLayer& saq) {
  return saq.z != nullptr && saq.ids != nullptr && saq.sides != nullptr && saq.firsts != nullptr && saq.layer >= 0 &&
         saq.layer < kMaxSaqLayers;
}

Status saq_search(const SaqSearchArgs& args) {
  const SearchArgs& search = args.search;
  Params p{};
  Status status = check_search(search, /*saq=*/true);
  if (!status.code && (!valid_layer(args.saq) || args.scratch == nullptr || args.scratch_ctas < 1 || args.dim < 1 ||
                       args.dim > search.d || search.k_pad < 2 ||
                       (search.dtype != kBFloat16 && !(search.dtype == kFloat32 && search.tf32))))
    status = {kBadArgument, "spae_fast CUDA search: invalid SAQ arguments (at most 16 layers; bf16 or tf32 operands)"};
  if (!status.code) status = search_params(search, args.scratch, &p);
  if (status.code || search.n == 0) return status;
  const DeviceGuard gpu(search.device);
  if (gpu.status().code) return gpu.status();

  p.saq = args.saq;
  p.dim = args.dim;
  p.scratch = static_cast<char*>(args.scratch);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(search.stream);
  if (search.dtype == kBFloat16) return launch<Math::BF16, true, true>(p, gpu, stream, args.scratch_ctas);
  return launch<Math::TF32, true, true>(p, gpu, stream, args.scratch_ctas);
}

Status saq_pair_dot64(const SaqPairArgs& args) {
  const PairDotArgs& pair = args.pair;
  if (pair.m < 0 || pair.c < 0 || pair.d < 1 || pair.b == nullptr || pair.index == nullptr || pair.out == nullptr ||
      pair.b_dtype < 0 || pair.b_dtype > 2 || !valid_layer(args.saq))
    return {kBadArgument, "spae_fast CUDA saq_pair_dot64: invalid arguments"};
  if (pair.m == 0 || pair.c == 0) return {};
  const DeviceGuard gpu(pair.device);
  if (gpu.status().code) return gpu.status();
  SaqPairParams s{};
  s.pair = PairParams{nullptr, pair.b, pair.index, pair.out, 0, 0, pair.b_stride0, pair.b_stride1,
                      pair.index_stride0, pair.index_stride1, pair.m, pair.c, pair.d, 0, pair.b_dtype};
  s.saq = args.saq;
  const int64_t blocks = pair_blocks(pair.m * pair.c, gpu.sms());
  saq_pair_dot64_kernel<<<static_cast<unsigned>(blocks), 256, 0, reinterpret_cast<cudaStream_t>(pair.stream)>>>(s);
  return cuda_status(cudaGetLastError(), "saq_pair_dot64 kernel launch");
}

}  // namespace spae_cuda
