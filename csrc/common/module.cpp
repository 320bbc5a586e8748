// pybind11 module spae_fast._C: the torch-free CPU core. Pointers arrive as integers (tensor.data_ptr()),
// strides in elements; status codes go back as (code, detail) and spae_fast/_native.py raises from them.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "common/spae_native.h"
#include "nearest/nearest.h"
#include "saq/saq.h"

namespace py = pybind11;

namespace spae {
void register_semantic_loss_bindings(py::module_& m);  // semantic_loss/bindings.cpp
}  // namespace spae

namespace {

spae::MatrixView make_view(uintptr_t data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                           int dtype) {
  spae::MatrixView view;
  view.data = reinterpret_cast<const void*>(data);
  view.rows = rows;
  view.cols = cols;
  view.row_stride = row_stride;
  view.col_stride = col_stride;
  view.dtype = static_cast<spae::DType>(dtype);
  return view;
}

// The int8 copy of the certified pre-filter, or an empty view (panels == nullptr: pre-filter off).
spae::PackedInt8CodebookView int8_prefilter_view(uintptr_t panels, uintptr_t columns, uintptr_t offsets,
                                                 const std::vector<double>& bounds, int64_t rows, int64_t dim) {
  spae::PackedInt8CodebookView view;
  if (panels == 0 || bounds.size() != 4) return view;
  view.panels = reinterpret_cast<const uint32_t*>(panels);
  view.columns = reinterpret_cast<const float*>(columns);
  view.offsets = reinterpret_cast<const int32_t*>(offsets);
  view.rows = rows;
  view.dim = dim;
  view.max_norm = bounds[0];
  view.max_rounding = bounds[1];
  view.max_rounded_norm = bounds[2];
  view.max_abs_bias = bounds[3];
  return view;
}

py::tuple pack_codebook(uintptr_t data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                        int dtype, int metric, uintptr_t panels, uintptr_t bias, int num_threads) {
  const spae::MatrixView view = make_view(data, rows, cols, row_stride, col_stride, dtype);
  double max_norm = 0.0;
  spae::StatusInfo info;
  {
    py::gil_scoped_release release;
    info = spae::pack_codebook(view, static_cast<spae::Metric>(metric), reinterpret_cast<float*>(panels),
                               reinterpret_cast<float*>(bias), &max_norm, num_threads);
  }
  return py::make_tuple(static_cast<int>(info.status), info.detail, max_norm);
}

py::tuple search(uintptr_t x, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride, int dtype,
                 uintptr_t panels, uintptr_t bias, int64_t codebook_rows, double max_norm, int metric, int64_t k,
                 bool check_finite, int num_threads, uintptr_t out_dist, uintptr_t out_index, uintptr_t weight,
                 int64_t weight_row_stride, int64_t weight_col_stride, int weight_dtype, uintptr_t prefilter_panels,
                 uintptr_t prefilter_columns, uintptr_t prefilter_offsets, const std::vector<double>& prefilter_bounds,
                 bool prefilter_adaptive) {
  spae::SearchRequest request;
  request.queries = make_view(x, rows, cols, row_stride, col_stride, dtype);
  request.codebook.panels = reinterpret_cast<const float*>(panels);
  request.codebook.bias = reinterpret_cast<const float*>(bias);
  request.codebook.rows = codebook_rows;
  request.codebook.dim = cols;
  request.codebook.max_norm = max_norm;
  request.codebook.metric = static_cast<spae::Metric>(metric);
  request.k = k;
  request.check_finite = check_finite;
  request.num_threads = num_threads;
  request.out_dist = reinterpret_cast<float*>(out_dist);
  request.out_index = reinterpret_cast<int64_t*>(out_index);
  if (weight != 0) request.weight = make_view(weight, codebook_rows, cols, weight_row_stride, weight_col_stride, weight_dtype);
  request.prefilter = int8_prefilter_view(prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds,
                                          codebook_rows, cols);
  request.prefilter_adaptive = prefilter_adaptive;
  int64_t full_search_rows = 0;
  request.out_full_search_rows = &full_search_rows;
  spae::StatusInfo info;
  {
    py::gil_scoped_release release;
    info = spae::search_topk(request);
  }
  return py::make_tuple(static_cast<int>(info.status), info.detail, full_search_rows);
}

py::tuple saq(uintptr_t z, int z_dtype, int64_t batch, int64_t dim, int64_t grid, int64_t stride_b,
              int64_t stride_d, int64_t stride_y, int64_t stride_x, uintptr_t weight, int64_t weight_rows,
              int64_t weight_row_stride, int64_t weight_col_stride, int weight_dtype, uintptr_t panels,
              uintptr_t bias, double max_norm, const std::vector<int64_t>& sides, bool residual,
              bool check_finite, int num_threads, uintptr_t out_ids, uintptr_t prefilter_panels,
              uintptr_t prefilter_columns, uintptr_t prefilter_offsets, const std::vector<double>& prefilter_bounds) {
  spae::SaqRequest request;
  request.z = reinterpret_cast<const void*>(z);
  request.z_dtype = static_cast<spae::DType>(z_dtype);
  request.batch = batch;
  request.dim = dim;
  request.grid = grid;
  request.stride_b = stride_b;
  request.stride_d = stride_d;
  request.stride_y = stride_y;
  request.stride_x = stride_x;
  request.weight = make_view(weight, weight_rows, dim, weight_row_stride, weight_col_stride, weight_dtype);
  request.codebook.panels = reinterpret_cast<const float*>(panels);
  request.codebook.bias = reinterpret_cast<const float*>(bias);
  request.codebook.rows = weight_rows;
  request.codebook.dim = dim;
  request.codebook.max_norm = max_norm;
  request.codebook.metric = spae::Metric::L2;
  request.sides = sides.data();
  request.num_layers = static_cast<int64_t>(sides.size());
  request.residual = residual;
  request.check_finite = check_finite;
  request.num_threads = num_threads;
  request.out_ids = reinterpret_cast<int64_t*>(out_ids);
  request.prefilter = int8_prefilter_view(prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds,
                                          weight_rows, dim);
  int64_t full_search_rows = 0;
  request.out_full_search_rows = &full_search_rows;
  spae::StatusInfo info;
  {
    py::gil_scoped_release release;
    info = spae::saq(request);
  }
  return py::make_tuple(static_cast<int>(info.status), info.detail, full_search_rows);
}

py::tuple pack_codebook_int8(uintptr_t panels, uintptr_t bias, int64_t rows, int64_t dim, uintptr_t out_panels,
                             uintptr_t out_columns, uintptr_t out_offsets, int num_threads) {
  spae::PackedCodebookView fp32;
  fp32.panels = reinterpret_cast<const float*>(panels);
  fp32.bias = reinterpret_cast<const float*>(bias);
  fp32.rows = rows;
  fp32.dim = dim;
  double bounds[4] = {0.0, 0.0, 0.0, 0.0};
  {
    py::gil_scoped_release release;
    spae::pack_codebook_int8(fp32, reinterpret_cast<uint32_t*>(out_panels), reinterpret_cast<float*>(out_columns),
                             reinterpret_cast<int32_t*>(out_offsets), bounds, num_threads);
  }
  return py::make_tuple(bounds[0], bounds[1], bounds[2], bounds[3]);
}

bool set_isa(const std::string& name) {
  if (name == "portable") return spae::set_active_isa(spae::Isa::Portable);
  if (name == "avx2") return spae::set_active_isa(spae::Isa::Avx2Fma);
  throw py::value_error("isa must be 'portable' or 'avx2', got '" + name + "'");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "spae_fast native CPU core (torch-free)";
  m.attr("PANEL_WIDTH") = spae::kPanelWidth;
  m.attr("TILE_ROWS") = spae::kTileRows;
  m.def("pack_codebook", &pack_codebook);
  m.def("search", &search);
  m.def("saq", &saq, "Streaming average / residual quantization over a token pyramid (ids only).");
  m.def("pack_codebook_int8", &pack_codebook_int8, "int8 copy of packed fp32 panels for the certified nearest / SAQ search.");
  m.def("cpu_supports_avx512_vnni", &spae::cpu_supports_avx512_vnni);
  m.attr("INT8_PANEL_WIDTH") = spae::kInt8PanelWidth;
  m.def("set_isa", &set_isa, "Select the micro-kernel ('portable' or 'avx2'); False if this CPU lacks it.");
  m.def("get_isa", [] { return std::string(spae::isa_name(spae::active_isa())); });
  m.def("cpu_supports_avx2", &spae::cpu_supports_avx2_fma);
  m.def("openmp_max_threads", [] { return omp_get_max_threads(); });
  spae::register_semantic_loss_bindings(m);
}
