// spae_fast CUDA module, device query. The fused GPU kernels of issue "GPU kernels" build on this module;
// it is compiled on every CI run (SPAE_CUDA=ON) so CUDA sources never rot on GPU-less machines.
#include <cuda_runtime.h>

#include "cuda_api.h"

namespace spae_cuda {

int device_count(int* error_code) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  *error_code = static_cast<int>(status);
  // Any error (no driver, no device, insufficient driver) means zero usable devices.
  return status == cudaSuccess ? count : 0;
}

const char* error_string(int error_code) { return cudaGetErrorString(static_cast<cudaError_t>(error_code)); }

int runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

}  // namespace spae_cuda
