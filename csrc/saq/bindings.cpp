// Entry point of the SAQ op in spae_fast._C (keyword arguments only, see common/bindings.h).
#include <pybind11/pybind11.h>

#include <climits>
#include <vector>

#include "common/bindings.h"
#include "saq/saq.h"

namespace spae {
namespace {

py::tuple saq_entry(KeywordArgs& args) {
  SaqRequest request;
  request.batch = args.queries("batch");
  request.dim = args.dim("dim");
  request.grid = args.integer("grid", 1);
  request.z_dtype = static_cast<DType>(args.dtype("z_dtype"));
  const std::vector<int64_t> z_strides = args.integers("z_strides", 4, 4, LLONG_MIN);
  const int64_t z_sizes[4] = {request.batch, request.dim, request.grid, request.grid};
  const uint64_t z_span = strided_bytes(z_sizes, z_strides.data(), 4, dtype_bytes(request.z_dtype),
                                        [&](const char* why) { args.fail_value("z_strides", why); });
  request.z = reinterpret_cast<const void*>(args.buffer("z", z_span));
  request.stride_b = z_strides[0];
  request.stride_d = z_strides[1];
  request.stride_y = z_strides[2];
  request.stride_x = z_strides[3];
  const int64_t num_rows = args.rows("num_rows");
  request.weight = matrix_arg(args, "weight", num_rows, request.dim);
  request.codebook = packed_codebook_arg(args, num_rows, request.dim);
  const std::vector<int64_t> sides = args.integers("sides", 1, kMaxSaqLayers, 1, request.grid);
  request.sides = sides.data();
  request.num_layers = static_cast<int64_t>(sides.size());
  request.residual = args.flag("residual");
  request.check_finite = args.flag("check_finite");
  request.num_threads = args.threads("num_threads");
  int64_t tokens = 0;
  for (const int64_t side : sides) tokens += side * side;
  request.out_ids = dense_arg<int64_t>(args, "out_ids", {request.batch, tokens});
  request.prefilter = prefilter_arg(args, num_rows, request.dim);
  int64_t full_search_rows = 0;
  request.out_full_search_rows = &full_search_rows;
  return status_tuple(args.run([&] { return spae::saq(request); }), full_search_rows);
}

}  // namespace

void register_saq_bindings(py::module_& m) {
  def_keywords(m, kModule, "saq", saq_entry,
               "Streaming average / residual quantization over a token pyramid (ids only). saq(*, z, z_dtype, "
               "batch, dim, grid, z_strides, weight, num_rows, weight_row_stride, weight_col_stride, "
               "weight_dtype, panels, bias, max_norm, sides, residual, check_finite, num_threads, out_ids, "
               "prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds) "
               "-> (code, detail, full_search_rows)");
}

}  // namespace spae
