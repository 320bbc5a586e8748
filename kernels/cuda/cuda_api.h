// Torch-free entry points of the CUDA module (compiled by nvcc, bound by bindings_cuda.cpp).
#pragma once

namespace spae_cuda {
// Number of usable CUDA devices; error_code receives the cudaError_t of cudaGetDeviceCount.
int device_count(int* error_code);
const char* error_string(int error_code);
int runtime_version();
}  // namespace spae_cuda
