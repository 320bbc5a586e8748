// The SAQ op of the CPU core (saq.cpp): every layer's target formed in the search's prologue, searched by
// the nearest op's exact search (nearest/nearest.h).
#pragma once

#include <cstdint>

#include "common/spae_native.h"
#include "nearest/nearest.h"

namespace spae {

// Streaming average quantization over a token pyramid (SPAE-METHOD.md §2-3), all layers in one call.
// Layer l (1-based) with side s_l on grid g has stride t = g / s_l and samples rows / cols t*i + t - ceil(t/2).
// At a sampled position p its target is   z_l(p) = c_l * z(p) - sum_{m<l} e(k_m(Up_m(p)))   with c_l = l
// (SAQ) or 1 (RQ), the sum accumulated in fp64 in ascending m and rounded once to fp32; the token is the
// exact l2 nearest row of the target (ties to the lowest row). Targets are formed while packing the search's
// query blocks, so no N x D target and no N x V matrix is ever stored.
constexpr int64_t kMaxSaqLayers = 64;  // layers per call

struct SaqRequest {
  const void* z = nullptr;  // [B, D, g, g], element strides below
  DType z_dtype = DType::Float32;
  int64_t batch = 0, dim = 0, grid = 0;
  int64_t stride_b = 0, stride_d = 0, stride_y = 0, stride_x = 0;
  MatrixView weight;             // [V, D] the raw table: e(k) for the targets
  PackedCodebookView codebook;   // the same table packed for metric l2
  const int64_t* sides = nullptr;  // [num_layers], each divides grid
  int64_t num_layers = 0;
  bool residual = false;  // RQ: c_l = 1
  bool check_finite = true;
  int num_threads = 1;
  int64_t* out_ids = nullptr;  // [B, sum_l s_l^2] contiguous, layer after layer, raster order
  // Optional (panels == nullptr: off): search each layer in int8 first (nearest_exact), keep the 64 best
  // candidates by a lower bound of their exact score (512 in a second pass where needed), prove with a
  // rigorous error bound that the exact fp32 winner is among them and rescore the ones that can still win
  // with the fp32 micro-kernel; rows it cannot certify take the full fp32 search.
  // Bitwise the same ids either way.
  PackedInt8CodebookView prefilter;
  int64_t* out_full_search_rows = nullptr;  // optional: how many queries the certificate sent to full fp32
};

// NonFiniteQuery / Overflow details are flat grid positions b * g * g + y * g + x.
StatusInfo saq(const SaqRequest& request);

}  // namespace spae
