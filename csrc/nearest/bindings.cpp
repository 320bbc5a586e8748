// Entry points of the nearest / top-k op in spae_fast._C (keyword arguments only, see common/bindings.h):
// search (the exact fused top-k, with the certified int8 pre-filter for k = 1) and pack_codebook_int8.
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/bindings.h"
#include "nearest/nearest.h"

namespace spae {

PackedInt8CodebookView prefilter_arg(KeywordArgs& args, int64_t rows, int64_t dim) {
  PackedInt8CodebookView view;
  if (args.buffer("prefilter_panels", 0) == 0) {  // pre-filter off: nothing else may be given
    args.no_buffer("prefilter_columns", "when prefilter_panels is 0 (pre-filter off)");
    args.no_buffer("prefilter_offsets", "when prefilter_panels is 0 (pre-filter off)");
    args.reals("prefilter_bounds", 0, 0);
    return view;
  }
  const int64_t panels = (rows + kInt8PanelWidth - 1) / kInt8PanelWidth;
  view.panels = dense_arg<const uint32_t>(args, "prefilter_panels", {panels, (dim + 3) / 4, kInt8PanelWidth});
  view.columns = dense_arg<const float>(args, "prefilter_columns", {panels, 4, kInt8PanelWidth});
  view.offsets = dense_arg<const int32_t>(args, "prefilter_offsets", {panels, kInt8PanelWidth});
  const std::vector<double> bounds = args.reals("prefilter_bounds", 4, 4);
  for (const double bound : bounds)
    if (!(bound >= 0.0 && std::isfinite(bound))) args.fail_value("prefilter_bounds", "must be finite and >= 0");
  view.rows = rows;
  view.dim = dim;
  view.max_norm = bounds[0];
  view.max_rounding = bounds[1];
  view.max_rounded_norm = bounds[2];
  view.max_abs_bias = bounds[3];
  return view;
}

namespace {

py::tuple search_entry(KeywordArgs& args) {
  SearchRequest request;
  const int64_t num_queries = args.queries("num_queries"), dim = args.dim("dim", 0);
  request.queries = matrix_arg(args, "x", num_queries, dim);
  const int64_t codebook_rows = args.rows("codebook_rows");
  request.codebook = packed_codebook_arg(args, codebook_rows, dim);
  request.codebook.metric = static_cast<Metric>(args.tag("metric", 3));
  request.k = args.integer("k", 1, codebook_rows);
  request.check_finite = args.flag("check_finite");
  request.num_threads = args.threads("num_threads");
  request.out_dist = dense_arg<float>(args, "out_dist", {num_queries, request.k});
  request.out_index = dense_arg<int64_t>(args, "out_index", {num_queries, request.k});
  const MatrixView weight = matrix_arg(args, "weight", codebook_rows, dim, /*required=*/false);  // 0: none
  if (weight.data != nullptr) request.weight = weight;
  request.prefilter = prefilter_arg(args, codebook_rows, dim);
  if (request.prefilter.panels != nullptr && request.k > kMaxPrefilterK)
    args.fail_value("prefilter_panels", "must be 0 for k > " + std::to_string(kMaxPrefilterK) +
                                            " (the certified pre-filter serves k <= " +
                                            std::to_string(kMaxPrefilterK) + ")");
  request.prefilter_adaptive = args.flag("prefilter_adaptive");
  int64_t full_search_rows = 0;
  request.out_full_search_rows = &full_search_rows;
  return status_tuple(args.run([&] { return search_topk(request); }), full_search_rows);
}

py::tuple pack_codebook_int8_entry(KeywordArgs& args) {
  PackedCodebookView fp32;  // the panels as the kernels read them (any format: widened exactly)
  fp32.rows = args.rows("num_rows", 0);
  fp32.dim = args.dim("dim", 0);
  const int64_t panels = (fp32.rows + kPanelWidth - 1) / kPanelWidth;
  const int64_t int8_panels = (fp32.rows + kInt8PanelWidth - 1) / kInt8PanelWidth;
  fp32.panels = panels_arg(args, "panels", "panels_dtype", fp32.rows, fp32.dim, &fp32.panel_dtype);
  fp32.metric = static_cast<Metric>(args.tag("metric", 3));
  fp32.bias = dense_arg<const float>(args, "bias", {panels, kPanelWidth});
  uint32_t* out_panels = dense_arg<uint32_t>(args, "out_panels", {int8_panels, (fp32.dim + 3) / 4, kInt8PanelWidth});
  float* out_columns = dense_arg<float>(args, "out_columns", {int8_panels, 4, kInt8PanelWidth});
  int32_t* out_offsets = dense_arg<int32_t>(args, "out_offsets", {int8_panels, kInt8PanelWidth});
  const int num_threads = args.threads("num_threads");
  double bounds[4] = {0.0, 0.0, 0.0, 0.0};
  args.run([&] { spae::pack_codebook_int8(fp32, out_panels, out_columns, out_offsets, bounds, num_threads); });
  return py::make_tuple(bounds[0], bounds[1], bounds[2], bounds[3]);
}

}  // namespace

void register_nearest_bindings(py::module_& m) {
  def_keywords(m, kModule, "search", search_entry,
               "Exact fused top-k (k = 1: nearest). search(*, x, num_queries, dim, x_row_stride, x_col_stride, "
               "x_dtype, panels, panels_dtype, bias, codebook_rows, max_norm, metric, k, check_finite, num_threads, "
               "out_dist, out_index, weight, weight_row_stride, weight_col_stride, weight_dtype, prefilter_panels, "
               "prefilter_columns, prefilter_offsets, prefilter_bounds, prefilter_adaptive) "
               "-> (code, detail, full_search_rows)");
  def_keywords(m, kModule, "pack_codebook_int8", pack_codebook_int8_entry,
               "int8 copy of the packed panels for the certified nearest / SAQ search. pack_codebook_int8(*, "
               "panels, panels_dtype, metric, bias, num_rows, dim, out_panels, out_columns, out_offsets, "
               "num_threads) -> 4 bounds");
  m.def("cpu_supports_avx512_vnni", &cpu_supports_avx512_vnni);
  m.attr("INT8_PANEL_WIDTH") = kInt8PanelWidth;
}

}  // namespace spae
