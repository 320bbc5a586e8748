// Streaming average quantization (SAQ) and residual quantization (RQ) over a token pyramid, fused on the CPU.
//
// Math (SPAE-METHOD.md §2-3). Layer l = 1..L has side s_l on a g x g latent grid, stride t_l = g / s_l, and
// samples the latent at rows / cols  t_l * i + t_l - ceil(t_l / 2)  (paper Eq. 1, dilated subsampling). The
// token of layer m covering grid position q is k_m(Up_m(q)) = ids_m[q_y / t_m, q_x / t_m]. For a sampled
// position p of layer l:
//
//     target    z_l(p) = c_l * z(p) - sum_{m<l} e(k_m(Up_m(p)))        c_l = l (SAQ) or 1 (RQ)
//     token     k_l(p) = argmin_k || z_l(p) - e(k) ||^2                 (ties to the lowest row)
//
// For SAQ, || l z - S - e ||^2 = l^2 || z - (S + e) / l ||^2, so k_l makes the running mean of the l token
// embeddings covering p the closest to z(p). For RQ the target is the residual z - sum_{m<l} e.
//
// Layers are sequential; the positions of one layer are independent and go through the shared fused search
// (nearest/search.cpp) as one batch of queries whose rows are formed while the search packs its query block
// (SaqLayerSource below): the sum over the covering tokens is accumulated in fp64 in ascending m, combined
// with c_l * z(p) in fp64 and rounded once to fp32, exactly as spae_fast._ref.saq_reference does. So no
// N x D target and no N x V distance matrix is stored; per layer the extra memory is N fp32 distances and N
// int64 indices. Results depend only on the inputs: bitwise identical for any batch split and thread count.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "common/fused_search.h"
#include "saq/saq.h"

namespace spae {
namespace {


struct LayerGeometry {
  int64_t side = 0;    // s_l
  int64_t stride = 0;  // t_l = g / s_l
  int64_t offset = 0;  // t_l - ceil(t_l / 2): sampled row / col of block i is t_l * i + offset
  int64_t first = 0;   // column of this layer's first token in the [B, total] id matrix
};

// The queries of one layer: row r = (b, i, j) in raster order is the SAQ / RQ target at position
// (t * i + offset, t * j + offset) of image b.
class SaqLayerSource final : public QuerySource {
 public:
  SaqLayerSource(const SaqRequest& request, const std::vector<LayerGeometry>& layers, int64_t layer,
                 int64_t total_tokens)
      : req_(request), layers_(layers), layer_(layer), total_(total_tokens) {}

  int64_t rows() const override { return req_.batch * layers_[layer_].side * layers_[layer_].side; }
  int64_t dim() const override { return req_.dim; }

  // Image and grid cell (b, y, x) that query row `row` of this layer samples.
  struct Cell {
    int64_t b, y, x;
  };
  Cell cell_of(int64_t row) const {
    const LayerGeometry& g = layers_[layer_];
    const int64_t per_image = g.side * g.side;
    const int64_t r = row % per_image;
    return {row / per_image, g.stride * (r / g.side) + g.offset, g.stride * (r % g.side) + g.offset};
  }

  int64_t position_of(int64_t row) const {
    const Cell c = cell_of(row);
    return (c.b * req_.grid + c.y) * req_.grid + c.x;
  }

  void load_row(int64_t row, float* out) const override {
    const auto [b, y, x] = cell_of(row);
    // Rows of the covering tokens of the layers above, in ascending layer order.
    int64_t covering[kMaxLayers];
    const int64_t* ids = req_.out_ids + b * total_;
    for (int64_t m = 0; m < layer_; ++m) {
      const LayerGeometry& up = layers_[m];
      covering[m] = ids[up.first + (y / up.stride) * up.side + (x / up.stride)];
    }
    const double coefficient = req_.residual ? 1.0 : static_cast<double>(layer_ + 1);
    const int64_t z_base = b * req_.stride_b + y * req_.stride_y + x * req_.stride_x;
    const int64_t dim = req_.dim;
    const MatrixView& e = req_.weight;
    const bool contiguous_fp32_table = e.dtype == DType::Float32 && e.col_stride == 1;
    // sum[d] = sum_m e(covering[m])[d] in ascending m, per chunk of dims layer after layer, so each pass reads
    // a contiguous piece of one row (the same fp64 chain per d as a d-outer loop; this one vectorises). The
    // chunk lives on the stack: no allocation inside the search's parallel region.
    constexpr int64_t kChunk = 256;
    double sum[kChunk];
    for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
      const int64_t width = std::min(kChunk, dim - d0);
      std::fill(sum, sum + width, 0.0);
      for (int64_t m = 0; m < layer_; ++m) {
        if (contiguous_fp32_table) {
          const float* row = static_cast<const float*>(e.data) + covering[m] * e.row_stride + d0;
          for (int64_t d = 0; d < width; ++d) sum[d] += static_cast<double>(row[d]);
        } else {
          for (int64_t d = 0; d < width; ++d) sum[d] += static_cast<double>(e.at(covering[m], d0 + d));
        }
      }
      if (req_.z_dtype == DType::Float32) {
        const float* z = static_cast<const float*>(req_.z) + z_base + d0 * req_.stride_d;
        for (int64_t d = 0; d < width; ++d)
          out[d0 + d] = static_cast<float>(coefficient * static_cast<double>(z[d * req_.stride_d]) - sum[d]);
      } else {
        for (int64_t d = 0; d < width; ++d) {
          const double z = load_as_float(req_.z, req_.z_dtype, z_base + (d0 + d) * req_.stride_d);
          out[d0 + d] = static_cast<float>(coefficient * z - sum[d]);
        }
      }
    }
  }

  static constexpr int64_t kMaxLayers = kMaxSaqLayers;

 private:
  const SaqRequest& req_;
  const std::vector<LayerGeometry>& layers_;
  int64_t layer_;
  int64_t total_;
};


// Lowest flat grid position b * g * g + y * g + x whose latent vector holds NaN / Inf, or -1.
int64_t first_non_finite_position(const SaqRequest& req) {
  const int64_t positions = req.batch * req.grid * req.grid;
  std::atomic<int64_t> first{std::numeric_limits<int64_t>::max()};
#pragma omp parallel for num_threads(std::max(1, req.num_threads)) schedule(static)
  for (int64_t p = 0; p < positions; ++p) {
    const int64_t b = p / (req.grid * req.grid), y = (p / req.grid) % req.grid, x = p % req.grid;
    const int64_t base = b * req.stride_b + y * req.stride_y + x * req.stride_x;
    bool finite = true;
    for (int64_t d = 0; d < req.dim; ++d) finite &= std::isfinite(load_as_float(req.z, req.z_dtype, base + d * req.stride_d));
    if (!finite) {
      int64_t current = first.load();
      while (p < current && !first.compare_exchange_weak(current, p)) {
      }
    }
  }
  const int64_t found = first.load();
  return found == std::numeric_limits<int64_t>::max() ? -1 : found;
}

}  // namespace

StatusInfo saq(const SaqRequest& req) {
  if (req.batch < 0 || req.dim < 1 || req.grid < 1 || req.num_layers < 1 ||
      req.num_layers > SaqLayerSource::kMaxLayers || req.dim != req.codebook.dim || req.dim != req.weight.cols ||
      req.codebook.rows < 1 || req.codebook.rows != req.weight.rows || req.codebook.metric != Metric::L2)
    return {Status::BadArgument, -1};
  std::vector<LayerGeometry> layers(static_cast<size_t>(req.num_layers));
  int64_t total = 0;
  for (int64_t l = 0; l < req.num_layers; ++l) {
    const int64_t side = req.sides[l];
    if (side < 1 || side > req.grid || req.grid % side != 0 || (l > 0 && side < req.sides[l - 1]))
      return {Status::BadArgument, l};
    LayerGeometry& g = layers[l];
    g.side = side;
    g.stride = req.grid / side;
    g.offset = g.stride - (g.stride + 1) / 2;
    g.first = total;
    total += side * side;
  }
  if (req.batch == 0) return {};
  if (req.check_finite) {
    const int64_t bad = first_non_finite_position(req);
    if (bad >= 0) return {Status::NonFiniteQuery, bad};
  }

  std::vector<float> distances;
  std::vector<int64_t> indices;
  try {
    const int64_t largest = req.batch * layers.back().side * layers.back().side;
    distances.resize(static_cast<size_t>(largest));
    indices.resize(static_cast<size_t>(largest));
  } catch (const std::bad_alloc&) {
    return {Status::OutOfMemory, -1};
  }

  int64_t full_search_rows = 0;
  for (int64_t l = 0; l < req.num_layers; ++l) {
    const SaqLayerSource source(req, layers, l, total);
    const StatusInfo info = nearest_exact(source, req.codebook, req.weight, req.prefilter, req.check_finite,
                                            req.num_threads, distances.data(), indices.data(), &full_search_rows);
    if (info.status != Status::Ok) {
      if (info.status == Status::NonFiniteQuery || info.status == Status::Overflow)
        return {info.status, source.position_of(info.detail)};
      return info;
    }
    const LayerGeometry& g = layers[l];
    const int64_t per_image = g.side * g.side;
    for (int64_t b = 0; b < req.batch; ++b)
      std::copy(indices.begin() + b * per_image, indices.begin() + (b + 1) * per_image,
                req.out_ids + b * total + g.first);
  }
  if (req.out_full_search_rows != nullptr) *req.out_full_search_rows = full_search_rows;
  return {};
}

}  // namespace spae
