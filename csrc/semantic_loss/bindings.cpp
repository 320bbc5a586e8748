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
  request.bf16_panels = reinterpret_cast<const uint32_t*>(args.pointer("bf16_panels", false));
  const bool bf16 = request.bf16_panels != nullptr;
  request.codebook.panels = reinterpret_cast<const float*>(args.pointer("panels", !bf16));
  request.codebook.bias = reinterpret_cast<const float*>(args.pointer("bias", !bf16));
  if (bf16) {
    args.absent("panels", "with bf16_panels (precision 'bf16' reads the bf16 operands only)");
    args.absent("bias", "with bf16_panels (precision 'bf16' reads the bf16 operands only)");
  }
  request.codebook.rows = vocab;
  request.codebook.dim = dim;
  request.codebook.max_norm = args.real("max_norm", 0.0, DBL_MAX);
  request.codebook.metric = Metric::L2;
  request.num_candidates = args.size("num_candidates");
  request.candidate_index = reinterpret_cast<const int64_t*>(args.pointer("candidate_index", request.num_candidates > 0));
  request.num_sets = args.size("num_sets");
  request.candidate_offsets = reinterpret_cast<const int64_t*>(args.pointer("candidate_offsets", true));
  request.set_of_position = reinterpret_cast<const int64_t*>(args.pointer("set_of_position", num_rows > 0));
  request.tau = args.real("tau");
  if (!(request.tau > 0.0) || !std::isfinite(request.tau)) args.fail_value("tau", "must be a finite float > 0");
  request.compute_grad = args.flag("compute_grad");
  request.check_finite = args.flag("check_finite");
  request.num_threads = args.threads("num_threads");
  request.out_loss = reinterpret_cast<float*>(args.pointer("out_loss", num_rows > 0));
  request.out_grad = reinterpret_cast<float*>(args.pointer("out_grad", request.compute_grad && num_rows > 0));
  if (!request.compute_grad) args.absent("out_grad", "without compute_grad");
  request.bf16_rows = reinterpret_cast<const uint32_t*>(args.pointer("bf16_rows", bf16 && request.compute_grad));
  request.bf16_bias = reinterpret_cast<const float*>(args.pointer("bf16_bias", bf16));
  if (!bf16) {
    args.absent("bf16_rows", "without bf16_panels (precision fp32)");
    args.absent("bf16_bias", "without bf16_panels (precision fp32)");
  }
  args.done();
  StatusInfo info;
  {
    py::gil_scoped_release release;
    info = semantic_loss(request);
  }
  return py::make_tuple(static_cast<int>(info.status), info.detail);
}

}  // namespace

void register_semantic_loss_bindings(py::module_& m) {
  def_keywords(m, kModule, "semantic_loss", semantic_loss_entry,
               "Fused semantic loss: per-row loss and gradient direction (see csrc/semantic_loss/semantic_loss.h). "
               "semantic_loss(*, z, num_rows, dim, z_row_stride, z_col_stride, z_dtype, weight, vocab, "
               "weight_row_stride, weight_col_stride, weight_dtype, panels, bias, max_norm, candidate_index, "
               "num_candidates, candidate_offsets, num_sets, set_of_position, tau, compute_grad, check_finite, "
               "num_threads, out_loss, out_grad, bf16_panels, bf16_rows, bf16_bias) -> (code, detail)");
  m.def("cpu_supports_avx512_bf16", &cpu_supports_avx512_bf16,
        "Whether semantic_loss has its AVX512-BF16 kernel (precision 'bf16') on this CPU.");
}

}  // namespace spae
