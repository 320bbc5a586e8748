// Entry point of the fused semantic loss in spae_fast._C (keyword arguments only, see common/bindings.h):
// returns (status code, detail).
#include <pybind11/pybind11.h>

#include <cfloat>
#include <cmath>

#include "common/bindings.h"
#include "semantic_loss/semantic_loss.h"

namespace spae {
namespace {

py::tuple semantic_loss_entry(KeywordArgs& args) {
  SemanticLossRequest request;
  const int64_t num_rows = args.queries("num_rows"), dim = args.dim("dim");
  request.z = matrix_arg(args, "z", num_rows, dim);
  const int64_t vocab = args.rows("vocab");
  request.weight = matrix_arg(args, "weight", vocab, dim);
  // Operands: fp32 (panels, bias) or precision "bf16" (bf16_panels, bf16_rows, bf16_bias), never both.
  // bf16 packing (common.pack_semantic_bf16): G groups of 64 rows.
  const int64_t groups = (vocab + kSemanticGroupCols - 1) / kSemanticGroupCols;
  const int64_t padded_rows = (vocab + kPanelWidth - 1) / kPanelWidth * kPanelWidth;
  const bool bf16 = args.buffer("bf16_panels", 0) != 0;
  if (bf16) {
    request.bf16_panels = dense_arg<const uint32_t>(args, "bf16_panels", {groups, (dim + 1) / 2, kSemanticGroupCols});
    args.no_buffer("panels", "with bf16_panels (precision 'bf16' reads the bf16 operands only)");
    args.no_buffer("bias", "with bf16_panels (precision 'bf16' reads the bf16 operands only)");
    args.dtype("panels_dtype");  // of the unused fp32-path panels
  } else {
    request.codebook.panels = panels_arg(args, "panels", "panels_dtype", vocab, dim, &request.codebook.panel_dtype);
    request.codebook.bias = dense_arg<const float>(args, "bias", {padded_rows});
  }
  request.codebook.rows = vocab;
  request.codebook.dim = dim;
  request.codebook.max_norm = args.real("max_norm", 0.0, DBL_MAX);
  request.codebook.metric = Metric::L2;
  request.num_candidates = args.size("num_candidates");
  request.candidate_index = dense_arg<const int64_t>(args, "candidate_index", {request.num_candidates});
  request.num_sets = args.size("num_sets");
  request.candidate_offsets = dense_arg<const int64_t>(args, "candidate_offsets", {request.num_sets + 1});
  request.set_of_position = dense_arg<const int64_t>(args, "set_of_position", {num_rows});
  request.tau = args.real("tau");
  if (!(request.tau > 0.0) || !std::isfinite(request.tau)) args.fail_value("tau", "must be a finite float > 0");
  request.compute_grad = args.flag("compute_grad");
  request.check_finite = args.flag("check_finite");
  request.num_threads = args.threads("num_threads");
  request.out_loss = dense_arg<float>(args, "out_loss", {num_rows});
  if (request.compute_grad)
    request.out_grad = dense_arg<float>(args, "out_grad", {num_rows, dim});
  else
    args.no_buffer("out_grad", "without compute_grad");
  if (bf16) {
    const int64_t padded_dim = (dim + 63) / 64 * 64;
    if (request.compute_grad)
      request.bf16_rows = dense_arg<const uint32_t>(args, "bf16_rows", {groups, kSemanticGroupCols / 2, padded_dim});
    else
      request.bf16_rows = reinterpret_cast<const uint32_t*>(args.buffer("bf16_rows", 0));
    request.bf16_bias = dense_arg<const float>(args, "bf16_bias", {groups, kSemanticGroupCols});
  } else {
    args.no_buffer("bf16_rows", "without bf16_panels (precision fp32)");
    args.no_buffer("bf16_bias", "without bf16_panels (precision fp32)");
  }
  return status_tuple(args.run([&] { return semantic_loss(request); }));
}

}  // namespace

void register_semantic_loss_bindings(py::module_& m) {
  def_keywords(m, kModule, "semantic_loss", semantic_loss_entry,
               "Fused semantic loss: per-row loss and gradient direction (see csrc/semantic_loss/semantic_loss.h). "
               "semantic_loss(*, z, num_rows, dim, z_row_stride, z_col_stride, z_dtype, weight, vocab, "
               "weight_row_stride, weight_col_stride, weight_dtype, panels, panels_dtype, bias, max_norm, "
               "candidate_index, num_candidates, candidate_offsets, num_sets, set_of_position, tau, compute_grad, "
               "check_finite, num_threads, out_loss, out_grad, bf16_panels, bf16_rows, bf16_bias) -> (code, detail)");
  m.def("cpu_supports_avx512_bf16", &cpu_supports_avx512_bf16,
        "Whether semantic_loss has its AVX512-BF16 kernel (precision 'bf16') on this CPU.");
}

}  // namespace spae
