// pybind11 module spae_fast._cuda. Importable on machines without a GPU or driver: the device query
// reports zero devices and the reason instead of failing.
#include <pybind11/pybind11.h>

#include <string>

#include "cuda_api.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "spae_fast CUDA module (torch-free)";
  m.def("device_count", [] {
    int error_code = 0;
    const int count = spae_cuda::device_count(&error_code);
    return py::make_tuple(count, error_code == 0 ? std::string() : std::string(spae_cuda::error_string(error_code)));
  }, "(number of usable CUDA devices, reason when zero)");
  m.def("runtime_version", &spae_cuda::runtime_version);
  m.attr("ARCHITECTURES") = SPAE_CUDA_ARCHITECTURES;
}
