// pybind11 module spae_fast._C: the torch-free CPU core. Entry points take keyword arguments only, checked
// once at the boundary (common/bindings.h); each op registers its own (nearest/, saq/, semantic_loss/).
#include <omp.h>
#include <pybind11/pybind11.h>

#include <cfloat>
#include <cmath>
#include <string>

#include "common/bindings.h"
#include "common/spae_native.h"

namespace spae {

const void* panels_arg(KeywordArgs& args, const char* name, const char* dtype_name, int64_t rows, int64_t dim,
                       DType* dtype) {
  *dtype = static_cast<DType>(args.dtype(dtype_name));
  const int64_t padded_rows = (rows + kPanelWidth - 1) / kPanelWidth * kPanelWidth;
  return reinterpret_cast<const void*>(
      args.buffer(name, spae_boundary::dense_bytes({padded_rows, dim}, dtype_bytes(*dtype))));
}

PackedCodebookView packed_codebook_arg(KeywordArgs& args, int64_t rows, int64_t dim) {
  PackedCodebookView view;
  const int64_t padded_rows = (rows + kPanelWidth - 1) / kPanelWidth * kPanelWidth;
  view.panels = panels_arg(args, "panels", "panels_dtype", rows, dim, &view.panel_dtype);
  view.bias = dense_arg<const float>(args, "bias", {padded_rows});
  view.rows = rows;
  view.dim = dim;
  view.max_norm = args.real("max_norm", 0.0, DBL_MAX);
  view.metric = Metric::L2;
  return view;
}

namespace {

py::tuple pack_codebook_entry(KeywordArgs& args) {
  const int64_t num_rows = args.rows("num_rows", 0), dim = args.dim("dim", 0);
  const MatrixView weight = matrix_arg(args, "weight", num_rows, dim);
  const Metric metric = static_cast<Metric>(args.tag("metric", 3));
  const int64_t padded_rows = (num_rows + kPanelWidth - 1) / kPanelWidth * kPanelWidth;
  DType panel_dtype = DType::Float32;
  void* panels = const_cast<void*>(panels_arg(args, "out_panels", "out_panels_dtype", num_rows, dim, &panel_dtype));
  if (panel_dtype != DType::Float32 && (panel_dtype != weight.dtype || metric == Metric::Cosine))
    args.fail_value("out_panels_dtype", "must be float32, or the table's own bfloat16 / float16 for metric l2 or ip "
                                        "(cosine's -e/|e| is not exact in the narrow dtype)");
  float* bias = dense_arg<float>(args, "out_bias", {padded_rows});
  const int num_threads = args.threads("num_threads");
  double max_norm = 0.0;
  const StatusInfo info =
      args.run([&] { return spae::pack_codebook(weight, metric, panel_dtype, panels, bias, &max_norm, num_threads); });
  return status_tuple(info, max_norm);
}

bool set_isa(const std::string& name) {
  if (name == "portable") return set_active_isa(Isa::Portable);
  if (name == "avx2") return set_active_isa(Isa::Avx2Fma);
  throw py::value_error("isa must be 'portable' or 'avx2', got '" + name + "'");
}

}  // namespace
}  // namespace spae

PYBIND11_MODULE(_C, m) {
  m.doc() = "spae_fast native CPU core (torch-free); entry points take keyword arguments only";
  m.attr("PANEL_WIDTH") = spae::kPanelWidth;
  m.attr("TILE_ROWS") = spae::kTileRows;
  spae::def_keywords(m, spae::kModule, "pack_codebook", spae::pack_codebook_entry,
                     "pack_codebook(*, weight, num_rows, dim, weight_row_stride, weight_col_stride, weight_dtype, "
                     "metric, out_panels, out_panels_dtype, out_bias, num_threads) -> (code, detail, max_norm)");
  spae::register_nearest_bindings(m);
  spae::register_saq_bindings(m);
  spae::register_semantic_loss_bindings(m);
  m.def("set_isa", &spae::set_isa, "Select the micro-kernel ('portable' or 'avx2'); False if this CPU lacks it.");
  m.def("get_isa", [] { return std::string(spae::isa_name(spae::active_isa())); });
  m.def("cpu_supports_avx2", &spae::cpu_supports_avx2_fma);
  m.def("set_packing_lanes", &spae::set_packing_lanes,
        "fp64 lanes of the codebook packing loops (2, 4 or 8; 0: the widest); False if this CPU lacks them.");
  m.def("get_packing_lanes", &spae::packing_lanes);
  m.def("openmp_max_threads", [] { return omp_get_max_threads(); });
}
