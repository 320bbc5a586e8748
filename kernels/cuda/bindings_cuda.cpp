// pybind11 module spae_fast._cuda. Importable on machines without a GPU or driver: the device query
// reports zero devices and the reason instead of failing. Torch-free: raw pointers (ints), sizes, dtype
// tags and the caller's stream in, (status code, message) out; spae_fast/_gpu.py raises on non-zero codes.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cuda_api.h"

namespace py = pybind11;

namespace {

py::tuple status_tuple(const spae_cuda::Status& status) { return py::make_tuple(status.code, status.message); }

py::tuple search_plan(int64_t n, int64_t v, int k_pad, int device) {
  spae_cuda::SearchPlan plan;
  spae_cuda::Status status;
  {
    py::gil_scoped_release release;
    status = spae_cuda::search_plan(n, v, k_pad, device, &plan);
  }
  return py::make_tuple(status.code, status.message, plan.num_chunks, plan.tiles_per_chunk, plan.max_ctas);
}

py::tuple search(uintptr_t x, uintptr_t e, int64_t n, int64_t v, int64_t d, int dtype, bool tf32, uintptr_t bias,
                 uintptr_t col_scale, uintptr_t row_scale, int k_pad, int64_t num_chunks, int64_t tiles_per_chunk,
                 uintptr_t keys, uintptr_t out_score, uintptr_t out_index, int device, uintptr_t stream) {
  spae_cuda::SearchArgs args;
  args.x = reinterpret_cast<const void*>(x);
  args.e = reinterpret_cast<const void*>(e);
  args.n = n;
  args.v = v;
  args.d = d;
  args.dtype = dtype;
  args.tf32 = tf32;
  args.bias = reinterpret_cast<const float*>(bias);
  args.col_scale = reinterpret_cast<const float*>(col_scale);
  args.row_scale = reinterpret_cast<const float*>(row_scale);
  args.k_pad = k_pad;
  args.num_chunks = num_chunks;
  args.tiles_per_chunk = tiles_per_chunk;
  args.keys = reinterpret_cast<long long*>(keys);
  args.out_score = reinterpret_cast<float*>(out_score);
  args.out_index = reinterpret_cast<int*>(out_index);
  args.device = device;
  args.stream = stream;
  spae_cuda::Status status;
  {
    py::gil_scoped_release release;
    status = spae_cuda::search(args);
  }
  return status_tuple(status);
}

// SAQ layer search: the query rows are the layer's targets (see cuda_api.h); saq = (z, z_dtype, z strides
// (4), ids, ids stride, sides, firsts, grid, layer, real dim, coefficient, scratch, scratch CTAs).
py::tuple saq_search(uintptr_t e, int64_t n, int64_t v, int64_t d, int dtype, bool tf32, uintptr_t bias,
                     uintptr_t col_scale, int k_pad, int64_t num_chunks, int64_t tiles_per_chunk, uintptr_t out_score,
                     uintptr_t out_index, uintptr_t z, int z_dtype, py::tuple z_strides, uintptr_t ids,
                     int64_t ids_stride, uintptr_t sides, uintptr_t firsts, int grid, int layer, int64_t dim,
                     double coefficient, uintptr_t scratch, int64_t scratch_ctas, int device, uintptr_t stream) {
  spae_cuda::SaqSearchArgs saq;
  spae_cuda::SearchArgs& args = saq.search;
  args.e = reinterpret_cast<const void*>(e);
  args.n = n;
  args.v = v;
  args.d = d;
  args.dtype = dtype;
  args.tf32 = tf32;
  args.bias = reinterpret_cast<const float*>(bias);
  args.col_scale = reinterpret_cast<const float*>(col_scale);
  args.k_pad = k_pad;
  args.num_chunks = num_chunks;
  args.tiles_per_chunk = tiles_per_chunk;
  args.out_score = reinterpret_cast<float*>(out_score);
  args.out_index = reinterpret_cast<int*>(out_index);
  args.device = device;
  args.stream = stream;
  saq.z = reinterpret_cast<const void*>(z);
  saq.z_dtype = z_dtype;
  for (int i = 0; i < 4; ++i) saq.z_strides[i] = z_strides[i].cast<int64_t>();
  saq.ids = reinterpret_cast<const int64_t*>(ids);
  saq.ids_stride = ids_stride;
  saq.sides = reinterpret_cast<const int*>(sides);
  saq.firsts = reinterpret_cast<const int*>(firsts);
  saq.grid = grid;
  saq.layer = layer;
  saq.dim = dim;
  saq.coefficient = coefficient;
  saq.scratch = reinterpret_cast<void*>(scratch);
  saq.scratch_ctas = scratch_ctas;
  spae_cuda::Status status;
  {
    py::gil_scoped_release release;
    status = spae_cuda::saq_search(saq);
  }
  return status_tuple(status);
}

py::tuple saq_pair_dot64(uintptr_t b, int b_dtype, int64_t b_stride0, int64_t b_stride1, uintptr_t index,
                         int64_t index_stride0, int64_t index_stride1, int64_t m, int64_t c, int64_t d, uintptr_t out,
                         uintptr_t z, int z_dtype, py::tuple z_strides, uintptr_t ids, int64_t ids_stride,
                         uintptr_t sides, uintptr_t firsts, int grid, int layer, double coefficient, int device,
                         uintptr_t stream) {
  spae_cuda::SaqPairArgs args;
  args.pair.b = reinterpret_cast<const void*>(b);
  args.pair.b_dtype = b_dtype;
  args.pair.b_stride0 = b_stride0;
  args.pair.b_stride1 = b_stride1;
  args.pair.index = reinterpret_cast<const int64_t*>(index);
  args.pair.index_stride0 = index_stride0;
  args.pair.index_stride1 = index_stride1;
  args.pair.m = m;
  args.pair.c = c;
  args.pair.d = d;
  args.pair.out = reinterpret_cast<double*>(out);
  args.pair.device = device;
  args.pair.stream = stream;
  args.z = reinterpret_cast<const void*>(z);
  args.z_dtype = z_dtype;
  for (int i = 0; i < 4; ++i) args.z_strides[i] = z_strides[i].cast<int64_t>();
  args.ids = reinterpret_cast<const int64_t*>(ids);
  args.ids_stride = ids_stride;
  args.sides = reinterpret_cast<const int*>(sides);
  args.firsts = reinterpret_cast<const int*>(firsts);
  args.grid = grid;
  args.layer = layer;
  args.coefficient = coefficient;
  spae_cuda::Status status;
  {
    py::gil_scoped_release release;
    status = spae_cuda::saq_pair_dot64(args);
  }
  return status_tuple(status);
}

py::tuple pair_dot64(uintptr_t a, int a_dtype, int64_t a_stride0, int64_t a_stride1, uintptr_t b, int b_dtype,
                     int64_t b_stride0, int64_t b_stride1, uintptr_t index, int64_t index_stride0,
                     int64_t index_stride1, int64_t m, int64_t c, int64_t d, uintptr_t out, int device,
                     uintptr_t stream) {
  spae_cuda::PairDotArgs args;
  args.a = reinterpret_cast<const void*>(a);
  args.a_dtype = a_dtype;
  args.a_stride0 = a_stride0;
  args.a_stride1 = a_stride1;
  args.b = reinterpret_cast<const void*>(b);
  args.b_dtype = b_dtype;
  args.b_stride0 = b_stride0;
  args.b_stride1 = b_stride1;
  args.index = reinterpret_cast<const int64_t*>(index);
  args.index_stride0 = index_stride0;
  args.index_stride1 = index_stride1;
  args.m = m;
  args.c = c;
  args.d = d;
  args.out = reinterpret_cast<double*>(out);
  args.device = device;
  args.stream = stream;
  spae_cuda::Status status;
  {
    py::gil_scoped_release release;
    status = spae_cuda::pair_dot64(args);
  }
  return status_tuple(status);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "spae_fast CUDA module (torch-free): fused nearest / top-k on tensor cores, fp64 pair rescoring";
  m.def("device_count", [] {
    int error_code = 0;
    const int count = spae_cuda::device_count(&error_code);
    return py::make_tuple(count, error_code == 0 ? std::string() : std::string(spae_cuda::error_string(error_code)));
  }, "(number of usable CUDA devices, reason when zero)");
  m.def("runtime_version", &spae_cuda::runtime_version);
  m.def("search_plan", &search_plan, "(code, message, num_chunks, tiles_per_chunk) for a search of n x v, k_pad");
  m.def("search", &search, "Fused search; see kernels/cuda/cuda_api.h. Returns (code, message).");
  m.def("pair_dot64", &pair_dot64, "fp64 dot products of (row, candidate) pairs. Returns (code, message).");
  m.def("saq_search", &saq_search, "Fused search of one SAQ / RQ layer's targets. Returns (code, message).");
  m.def("saq_pair_dot64", &saq_pair_dot64, "fp64 (SAQ target, candidate) dot products. Returns (code, message).");
  m.attr("MAX_SAQ_LAYERS") = spae_cuda::kMaxSaqLayers;
  m.attr("ARCHITECTURES") = SPAE_CUDA_ARCHITECTURES;
  m.attr("MAX_TOPK") = spae_cuda::kMaxTopk;
}
