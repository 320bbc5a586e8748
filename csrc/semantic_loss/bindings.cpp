// pybind11 entry point of the fused semantic loss (spae_fast._C.semantic_loss), registered into the module
// by common/module.cpp. Pointers arrive as integers, strides in elements; returns (status code, detail).
#include <pybind11/pybind11.h>

#include "semantic_loss/semantic_loss.h"

namespace py = pybind11;

namespace spae {
namespace {

MatrixView view_of(uintptr_t data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride, int dtype) {
  MatrixView view;
  view.data = reinterpret_cast<const void*>(data);
  view.rows = rows;
  view.cols = cols;
  view.row_stride = row_stride;
  view.col_stride = col_stride;
  view.dtype = static_cast<DType>(dtype);
  return view;
}

py::tuple semantic_loss_binding(uintptr_t z, int64_t rows, int64_t dim, int64_t z_row_stride, int64_t z_col_stride,
                                int z_dtype, uintptr_t weight, int64_t vocab, int64_t weight_row_stride,
                                int64_t weight_col_stride, int weight_dtype, uintptr_t panels, uintptr_t bias,
                                double max_norm, uintptr_t candidate_index, int64_t num_candidates,
                                uintptr_t candidate_offsets, int64_t num_sets, uintptr_t set_of_position, double tau,
                                bool compute_grad, bool check_finite, int num_threads, uintptr_t out_loss,
                                uintptr_t out_grad, uintptr_t bf16_panels, uintptr_t bf16_rows, uintptr_t bf16_bias) {
  SemanticLossRequest request;
  request.z = view_of(z, rows, dim, z_row_stride, z_col_stride, z_dtype);
  request.weight = view_of(weight, vocab, dim, weight_row_stride, weight_col_stride, weight_dtype);
  request.codebook.panels = reinterpret_cast<const float*>(panels);
  request.codebook.bias = reinterpret_cast<const float*>(bias);
  request.codebook.rows = vocab;
  request.codebook.dim = dim;
  request.codebook.max_norm = max_norm;
  request.codebook.metric = Metric::L2;
  request.candidate_index = reinterpret_cast<const int64_t*>(candidate_index);
  request.num_candidates = num_candidates;
  request.candidate_offsets = reinterpret_cast<const int64_t*>(candidate_offsets);
  request.num_sets = num_sets;
  request.set_of_position = reinterpret_cast<const int64_t*>(set_of_position);
  request.tau = tau;
  request.compute_grad = compute_grad;
  request.check_finite = check_finite;
  request.num_threads = num_threads;
  request.out_loss = reinterpret_cast<float*>(out_loss);
  request.out_grad = reinterpret_cast<float*>(out_grad);
  request.bf16_panels = reinterpret_cast<const uint32_t*>(bf16_panels);  // 0: precision fp32
  request.bf16_rows = reinterpret_cast<const uint32_t*>(bf16_rows);
  request.bf16_bias = reinterpret_cast<const float*>(bf16_bias);
  StatusInfo info;
  {
    py::gil_scoped_release release;
    info = semantic_loss(request);
  }
  return py::make_tuple(static_cast<int>(info.status), info.detail);
}

}  // namespace

void register_semantic_loss_bindings(py::module_& m) {
  m.def("semantic_loss", &semantic_loss_binding,
        "Fused semantic loss: per-row loss and gradient direction (see csrc/semantic_loss/semantic_loss.h).");
  m.def("cpu_supports_avx512_bf16", &spae::cpu_supports_avx512_bf16,
        "Whether semantic_loss has its AVX512-BF16 kernel (precision 'bf16') on this CPU.");
}

}  // namespace spae
