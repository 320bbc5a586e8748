// pybind11 module spae_fast._cuda. Importable on machines without a GPU or driver: the device query
// reports zero devices and the reason instead of failing. Torch-free: raw pointers (ints), sizes, dtype
// tags and the caller's stream in, (status code, message) out; spae_fast/ops/gpu_kernels.py raises on non-zero codes.
// Entry points take keyword arguments only, each checked once here (csrc/common/keyword_args.h) before the
// kernels' own checks: a swapped or missing argument raises a TypeError / ValueError that names it.
#include <pybind11/pybind11.h>

#include <cfloat>
#include <cstdint>
#include <string>
#include <vector>

#include "common/keyword_args.h"
#include "cuda_api.h"

namespace py = pybind11;

namespace {

using spae_boundary::def_keywords;
using spae_boundary::KeywordArgs;

py::tuple status_tuple(const spae_cuda::Status& status) { return py::make_tuple(status.code, status.message); }

constexpr const char* kModule = "spae_fast._cuda";

int device_arg(KeywordArgs& args) { return static_cast<int>(args.integer("device", 0, INT32_MAX)); }
uintptr_t stream_arg(KeywordArgs& args) { return args.pointer("stream", false); }  // 0: the default stream

// k_pad: 1 (nearest) or a power of two up to MAX_TOPK (top-k lists); at least `low`.
int k_pad_arg(KeywordArgs& args, int low) {
  const int k_pad = static_cast<int>(args.integer("k_pad", low, spae_cuda::kMaxTopk));
  if ((k_pad & (k_pad - 1)) != 0) args.fail_value("k_pad", "must be a power of two, got " + std::to_string(k_pad));
  return k_pad;
}

// The arguments of the fused search shared by nearest and SAQ (x, keys, row_scale: nearest only).
void search_args(KeywordArgs& args, spae_cuda::SearchArgs* search, int min_k_pad) {
  search->n = args.queries("n");
  search->v = args.rows("v");
  search->d = args.dim("d");
  search->dtype = args.dtype("dtype");
  search->tf32 = args.flag("tf32");
  search->e = reinterpret_cast<const void*>(args.pointer("e", true));
  search->bias = reinterpret_cast<const float*>(args.pointer("bias", true));
  search->col_scale = reinterpret_cast<const float*>(args.pointer("col_scale", true));
  search->k_pad = k_pad_arg(args, min_k_pad);
  search->num_chunks = args.integer("num_chunks", 1);
  search->tiles_per_chunk = args.integer("tiles_per_chunk", 1);
  const bool lists = search->k_pad > 1 && search->n > 0;
  search->out_score = reinterpret_cast<float*>(args.pointer("out_score", lists));
  search->out_index = reinterpret_cast<int*>(args.pointer("out_index", lists));
  search->device = device_arg(args);
  search->stream = stream_arg(args);
}

py::tuple search_plan(KeywordArgs& args) {
  const int64_t n = args.queries("n"), v = args.rows("v");
  const int k_pad = k_pad_arg(args, 1);
  const int device = device_arg(args);
  spae_cuda::SearchPlan plan;
  const spae_cuda::Status status = args.run([&] { return spae_cuda::search_plan(n, v, k_pad, device, &plan); });
  return py::make_tuple(status.code, status.message, plan.num_chunks, plan.tiles_per_chunk, plan.max_ctas);
}

py::tuple search(KeywordArgs& args) {
  spae_cuda::SearchArgs search;
  search_args(args, &search, 1);
  search.x = reinterpret_cast<const void*>(args.pointer("x", search.n > 0));
  search.row_scale = reinterpret_cast<const float*>(args.pointer("row_scale", false));  // 0: no row scale
  search.keys = reinterpret_cast<long long*>(args.pointer("keys", search.k_pad == 1 && search.n > 0));
  if (search.k_pad == 1) {
    args.absent("out_score", "for k_pad = 1 (the result goes to keys)");
    args.absent("out_index", "for k_pad = 1 (the result goes to keys)");
  } else {
    args.absent("keys", "for k_pad > 1 (the lists go to out_score / out_index)");
  }
  return status_tuple(args.run([&] { return spae_cuda::search(search); }));
}

// The SAQ layer arguments of saq_search and saq_pair_dot64; `needed`: there are rows to form (the addresses
// must be non-zero).
spae_cuda::SaqLayer saq_layer_args(KeywordArgs& args, bool needed) {
  spae_cuda::SaqLayer saq;
  saq.z = reinterpret_cast<const void*>(args.pointer("z", needed));
  saq.z_dtype = args.dtype("z_dtype");
  const std::vector<int64_t> z_strides = args.integers("z_strides", 4, 4, INT64_MIN);
  for (int i = 0; i < 4; ++i) saq.z_strides[i] = z_strides[i];
  saq.ids = reinterpret_cast<const int64_t*>(args.pointer("ids", needed));
  saq.ids_stride = args.stride("ids_stride");
  saq.sides = reinterpret_cast<const int*>(args.pointer("sides", needed));
  saq.firsts = reinterpret_cast<const int*>(args.pointer("firsts", needed));
  saq.grid = static_cast<int>(args.integer("grid", 1, INT32_MAX));
  saq.layer = static_cast<int>(args.integer("layer", 0, spae_cuda::kMaxSaqLayers - 1));
  saq.coefficient = args.real("coefficient", -DBL_MAX, DBL_MAX);
  return saq;
}

py::tuple saq_search(KeywordArgs& args) {
  spae_cuda::SaqSearchArgs request;
  search_args(args, &request.search, 2);
  request.saq = saq_layer_args(args, request.search.n > 0);
  request.dim = args.integer("dim", 1, request.search.d);
  request.scratch = reinterpret_cast<void*>(args.pointer("scratch", request.search.n > 0));
  request.scratch_ctas = args.integer("scratch_ctas", 1);
  return status_tuple(args.run([&] { return spae_cuda::saq_search(request); }));
}

// The b / index / out / device / stream arguments of both pair kernels.
void pair_args(KeywordArgs& args, spae_cuda::PairDotArgs* pair) {
  pair->m = args.size("m");
  pair->c = args.size("c");
  pair->d = args.dim("d");
  const bool pairs = pair->m > 0 && pair->c > 0;
  pair->b = reinterpret_cast<const void*>(args.pointer("b", pairs));
  pair->b_dtype = args.dtype("b_dtype");
  pair->b_stride0 = args.stride("b_stride0");
  pair->b_stride1 = args.stride("b_stride1");
  pair->index = reinterpret_cast<const int64_t*>(args.pointer("index", pairs));
  pair->index_stride0 = args.stride("index_stride0");
  pair->index_stride1 = args.stride("index_stride1");
  pair->out = reinterpret_cast<double*>(args.pointer("out", pairs));
  pair->device = device_arg(args);
  pair->stream = stream_arg(args);
}

py::tuple pair_dot64(KeywordArgs& args) {
  spae_cuda::PairDotArgs pair;
  pair_args(args, &pair);
  pair.a = reinterpret_cast<const void*>(args.pointer("a", pair.m > 0 && pair.c > 0));
  pair.a_dtype = args.dtype("a_dtype");
  pair.a_stride0 = args.stride("a_stride0");
  pair.a_stride1 = args.stride("a_stride1");
  return status_tuple(args.run([&] { return spae_cuda::pair_dot64(pair); }));
}

py::tuple saq_pair_dot64(KeywordArgs& args) {
  spae_cuda::SaqPairArgs request;
  pair_args(args, &request.pair);
  request.saq = saq_layer_args(args, request.pair.m > 0 && request.pair.c > 0);
  return status_tuple(args.run([&] { return spae_cuda::saq_pair_dot64(request); }));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "spae_fast CUDA module (torch-free): fused nearest / top-k on tensor cores, fp64 pair rescoring; "
            "entry points take keyword arguments only";
  m.def("device_count", [] {
    int error_code = 0;
    const int count = spae_cuda::device_count(&error_code);
    return py::make_tuple(count, error_code == 0 ? std::string() : std::string(spae_cuda::error_string(error_code)));
  }, "(number of usable CUDA devices, reason when zero)");
  m.def("runtime_version", &spae_cuda::runtime_version);
  def_keywords(m, kModule, "search_plan", search_plan,
               "search_plan(*, n, v, k_pad, device) -> (code, message, num_chunks, tiles_per_chunk, max_ctas)");
  def_keywords(m, kModule, "search", search,
               "Fused search; see kernels/cuda/cuda_api.h. search(*, x, e, n, v, d, dtype, tf32, bias, col_scale, "
               "row_scale, k_pad, num_chunks, tiles_per_chunk, keys, out_score, out_index, device, stream) "
               "-> (code, message)");
  def_keywords(m, kModule, "pair_dot64", pair_dot64,
               "fp64 dot products of (row, candidate) pairs. pair_dot64(*, a, a_dtype, a_stride0, a_stride1, b, "
               "b_dtype, b_stride0, b_stride1, index, index_stride0, index_stride1, m, c, d, out, device, stream) "
               "-> (code, message)");
  def_keywords(m, kModule, "saq_search", saq_search,
               "Fused search of one SAQ / RQ layer's targets. saq_search(*, e, n, v, d, dtype, tf32, bias, "
               "col_scale, k_pad, num_chunks, tiles_per_chunk, out_score, out_index, z, z_dtype, z_strides, ids, "
               "ids_stride, sides, firsts, grid, layer, dim, coefficient, scratch, scratch_ctas, device, stream) "
               "-> (code, message)");
  def_keywords(m, kModule, "saq_pair_dot64", saq_pair_dot64,
               "fp64 (SAQ target, candidate) dot products. saq_pair_dot64(*, b, b_dtype, b_stride0, b_stride1, "
               "index, index_stride0, index_stride1, m, c, d, out, z, z_dtype, z_strides, ids, ids_stride, sides, "
               "firsts, grid, layer, coefficient, device, stream) -> (code, message)");
  m.attr("MAX_SAQ_LAYERS") = spae_cuda::kMaxSaqLayers;
  m.attr("ARCHITECTURES") = SPAE_CUDA_ARCHITECTURES;
  m.attr("MAX_TOPK") = spae_cuda::kMaxTopk;
}
