// spae_fast native CPU core: shared declarations.
//
// Torch-free by design: every entry point takes raw pointers, sizes, element strides and a dtype tag.
// Python (spae_fast/_native.py) validates arguments, allocates outputs with torch and turns Status codes
// into exceptions, so one build of this library works with any torch version.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace spae {

// N lanes of T as one vector (GCC / clang vector extensions): element-wise IEEE operations, lowered to the
// instructions of the function they are used in, so a loop over Lanes computes bitwise what the scalar loop does
// lane by lane on every ISA (the packing loops: pack_codebook, pack_codebook_int8).
template <typename T, int N>
using Lanes [[gnu::vector_size(sizeof(T) * N)]] = T;

// N consecutive floats from `values` (any alignment) widened to fp64 lanes, exactly: the load of every
// packing loop. Inlined into its caller, so it runs on the caller's ISA (SPAE_TARGET).
template <int N>
[[gnu::always_inline]] inline void load_widened(const float* values, Lanes<double, N>& out) {
  Lanes<float, N> narrow;
  std::memcpy(&narrow, values, sizeof narrow);
  out = __builtin_convertvector(narrow, Lanes<double, N>);
}

// Compiles a function for one x86 ISA (the packing loops' per-width copies); empty elsewhere.
#if defined(__x86_64__) && defined(__GNUC__)
#define SPAE_TARGET(isa) __attribute__((target(isa)))
#else
#define SPAE_TARGET(isa)
#endif

// Register tile of the fused GEMM + selection micro-kernel: MR queries x NR codebook rows.
// 6 x 16 fp32 = 12 AVX2 accumulators, leaving registers for 2 codebook vectors and 1 broadcast.
constexpr int kTileRows = 6;   // MR
constexpr int kPanelWidth = 16;  // NR: codebook rows per packed panel

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// The three metrics share one kernel:  score_j = bias_j + x . p_j  with the packed panel p and bias:
//   l2:      p = -2 e,  bias = ||e||^2        -> dist = max(score + ||x||^2, 0)    (squared Euclidean)
//   ip:      p = -e,    bias = 0              -> dist = score = -x . e             (largest inner product)
//   cosine:  p = -e/|e|, bias = 0, x -> x/|x| -> dist = max(1 + score, 0) = 1 - cos
// Scaling by -2 and -1 is exact in binary floating point, so no precision is lost by folding it in.
enum class Metric : int { L2 = 0, InnerProduct = 1, Cosine = 2 };

enum class Status : int {
  Ok = 0,
  NonFiniteQuery = 1,     // x holds NaN or +-Inf (detail = flat row index)
  NonFiniteCodebook = 2,  // codebook holds NaN or +-Inf (detail = row index)
  Overflow = 3,           // |x| * |e| could overflow fp32 accumulation (detail = row index)
  BadArgument = 4,
  OutOfMemory = 5,
};

struct StatusInfo {
  Status status = Status::Ok;
  int64_t detail = -1;
};

// Norm below which a vector counts as zero for the cosine metric (as torch.nn.functional.normalize).
constexpr double kCosineEps = 1e-12;

// Largest |x|*|e| we accept: keeps every partial dot product, and ||e||^2 + 2 x.e, finite in fp32
// (Cauchy-Schwarz bounds all partial sums by the product of the norms).
constexpr double kMaxNormProduct = 1.0e37;

// A float's bits and the float of given bits (std::bit_cast, before C++20).
inline uint32_t float_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}
inline float float_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t h) { return float_from_bits(static_cast<uint32_t>(h) << 16); }

// fp32 -> bf16 bits, rounded to nearest even (as torch's .to(torch.bfloat16)); NaN stays a quiet NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits = float_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// f rounded to the nearest bf16 and widened back (the value a bf16 operand stands for).
inline float round_to_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {  // inf / nan
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal: renormalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    mantissa &= 0x3ffu;
    bits = sign | (exponent << 23) | (mantissa << 13);
  }
  return float_from_bits(bits);
}

// fp32 -> fp16 bits for a value fp16 represents exactly (the narrow panels hold only such values: -e of an
// fp16 table, or 0). Exact conversion, no rounding needed; NaN / Inf map to fp16 NaN / Inf.
inline uint16_t float_to_half(float f) {
  const uint32_t bits = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u));
  if (magnitude >= 0x38800000u)  // normal fp16: exponent 113 .. 142 of fp32
    return static_cast<uint16_t>(sign | (((magnitude >> 23) - 112u) << 10) | ((magnitude >> 13) & 0x3ffu));
  if (magnitude < 0x33000000u) return sign;  // below 2^-25: zero (never for exact fp16 values but 0)
  // fp16 subnormal m * 2^-24: the value's significand shifted into place
  const uint32_t exponent = magnitude >> 23, mantissa = (magnitude & 0x7fffffu) | 0x800000u;
  return static_cast<uint16_t>(sign | (mantissa >> (126u - exponent)));
}

// Reads element i of a strided vector of the given dtype as fp32 (exact for bf16 / fp16).
inline float load_as_float(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::Float32:
      return static_cast<const float*>(base)[offset];
    case DType::BFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(base)[offset]);
    case DType::Float16:
      return half_to_float(static_cast<const uint16_t*>(base)[offset]);
  }
  return 0.0f;
}

// A strided [rows, cols] matrix of fp32 / bf16 / fp16 elements (strides in elements, may be 0 or negative
// as torch allows for views).
struct MatrixView {
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
  DType dtype = DType::Float32;

  float at(int64_t r, int64_t c) const { return load_as_float(data, dtype, r * row_stride + c * col_stride); }
};

// How a panel stores its fp32 values p (what every kernel multiplies with). fp32 tables and cosine: p itself.
// bf16 / fp16 tables with metric l2 / ip keep their own dtype (half the bytes), converted exactly in the
// micro-kernel's load: bf16 holds p (-2e or -e: scaling a bf16 value by -2 or -1 stays exact in bf16, whose
// range is fp32's); fp16 holds -e, and for l2 the load doubles it (-2e could overflow fp16's range, while
// 2 * (-e) is exact in fp32). Cosine's p = -e/|e| is not representable in the narrow dtype: fp32 panels.
enum class PanelFormat : int { Float32 = 0, BFloat16 = 1, Float16 = 2, Float16Doubled = 3 };

// The codebook packed once for the CPU kernel: ceil(V / 16) panels of [D][16] plus one fp32 bias per row.
// Pad rows (V .. padded V) are zero with bias +inf, so every column runs the same arithmetic.
struct PackedCodebookView {
  const void* panels = nullptr;  // [num_panels][dim][kPanelWidth] of panel_dtype
  const float* bias = nullptr;   // [num_panels * kPanelWidth]
  int64_t rows = 0;              // V
  int64_t dim = 0;               // D
  double max_norm = 0.0;         // max_j |e_j| (after normalisation for cosine)
  Metric metric = Metric::L2;
  DType panel_dtype = DType::Float32;
  int64_t num_panels() const { return (rows + kPanelWidth - 1) / kPanelWidth; }
  PanelFormat format() const {
    if (panel_dtype == DType::BFloat16) return PanelFormat::BFloat16;
    if (panel_dtype == DType::Float16) return metric == Metric::L2 ? PanelFormat::Float16Doubled : PanelFormat::Float16;
    return PanelFormat::Float32;
  }
  // Panel p's first element.
  const void* panel(int64_t p) const {
    const int64_t element_bytes = panel_dtype == DType::Float32 ? 4 : 2;
    return static_cast<const char*>(panels) + p * dim * kPanelWidth * element_bytes;
  }
  // Writes the fp32 panel values p[row][0 .. dim) to out[d * out_stride] (exact: the kernels' own values).
  void unpack_row(int64_t row, float* out, int64_t out_stride) const {
    const int64_t first = (row / kPanelWidth) * dim * kPanelWidth + row % kPanelWidth;
    switch (format()) {
      case PanelFormat::Float32: {
        const float* column = static_cast<const float*>(panels) + first;
        for (int64_t d = 0; d < dim; ++d) out[d * out_stride] = column[d * kPanelWidth];
        return;
      }
      case PanelFormat::BFloat16: {
        const uint16_t* column = static_cast<const uint16_t*>(panels) + first;
        for (int64_t d = 0; d < dim; ++d) out[d * out_stride] = bf16_to_float(column[d * kPanelWidth]);
        return;
      }
      case PanelFormat::Float16:
      case PanelFormat::Float16Doubled: {
        const float scale = format() == PanelFormat::Float16Doubled ? 2.0f : 1.0f;
        const uint16_t* column = static_cast<const uint16_t*>(panels) + first;
        for (int64_t d = 0; d < dim; ++d) out[d * out_stride] = scale * half_to_float(column[d * kPanelWidth]);
        return;
      }
    }
  }
};

// Micro-kernel: scores of kTileRows packed queries against one packed panel, fused with the selection
// pre-filter. Writes scores[r][c] = bias[c] + sum_d a[d][r] * p[d][c] (fp32, d ascending, one
// multiply-add chain per element so the value never depends on tiling) and returns per row r a 16-bit
// mask of the columns with !(score > threshold[r]) (NaN passes, so the exact check sees it). `panel` is
// read in the kernel's PanelFormat and converted to the fp32 p exactly in the load, so a narrow panel
// gives bitwise the scores of the fp32 panel of the same table.
using MicroKernel = void (*)(const float* packed_queries, const void* panel, const float* bias, int64_t dim,
                             const float* thresholds, float* scores, uint32_t* masks);

// The micro-kernel of one panel format, portable C++ or AVX2 + FMA (+ F16C for fp16 panels).
MicroKernel portable_micro_kernel(PanelFormat format);
// The one dispatch from a run-time panel format to a kernel instantiated for it, shared by every ISA's file:
// returns pick(std::integral_constant<PanelFormat, F>{}) for F = format.
template <class Pick>
MicroKernel micro_kernel_for(PanelFormat format, Pick pick) {
  switch (format) {
    case PanelFormat::BFloat16:
      return pick(std::integral_constant<PanelFormat, PanelFormat::BFloat16>{});
    case PanelFormat::Float16:
      return pick(std::integral_constant<PanelFormat, PanelFormat::Float16>{});
    case PanelFormat::Float16Doubled:
      return pick(std::integral_constant<PanelFormat, PanelFormat::Float16Doubled>{});
    case PanelFormat::Float32:
      break;
  }
  return pick(std::integral_constant<PanelFormat, PanelFormat::Float32>{});
}
#if defined(SPAE_HAVE_AVX2_KERNEL)
MicroKernel avx2_micro_kernel(PanelFormat format);
#endif

// Low-precision pre-filter of the SAQ search (AVX512-VNNI): a 24 x 16 tile over int8 panels of 16 rows
// whose 32-bit words each hold 4 consecutive dimensions (int8) of one row; see micro_kernel_avx512vnni.cpp.
// columns: [4][16] fp32 per panel (scale s_k, ||p_k|| and ||p_k - p~_k|| rounded up, bias), offsets: [16]
// int32 per panel (128 sum_d q_k[d]). The packed query tile holds [quads][24] u8 words, then 3 x 24 fp32
// row parameters (s_x, ||x - x~||, ||x~||, the last two rounded up).
constexpr int kInt8TileRows = 24;
constexpr int kInt8PanelWidth = 16;
#if defined(SPAE_HAVE_AVX512VNNI_KERNEL)
void micro_kernel_avx512vnni(const uint32_t* packed_queries, const uint32_t* panel, const float* columns,
                             const int32_t* offsets, int64_t quads, const float* thresholds, float* scores,
                             uint32_t* masks);
uint32_t append_offers_avx512(const float* lbs, int64_t first_column, uint32_t mask, const float* columns,
                              float rounding, float rounded_norm, double kth_upper, float* values,
                              int64_t* indices);
#endif
bool cpu_supports_avx512_vnni();

enum class Isa : int { Portable = 0, Avx2Fma = 1 };

// fp64 lanes per vector of the packing loops (pack_codebook, pack_codebook_int8): 8 (AVX-512), 4 (AVX2) or 2,
// the widest this CPU runs unless set_packing_lanes chose another (tests: every width gives the same bits).
int packing_lanes();
bool set_packing_lanes(int lanes);  // 0: the widest again; false if this CPU cannot run `lanes`

// The micro-kernel of the active ISA for panels of this format (every fp32 score is computed by the ISA's
// kernels, rescoring included: all formats give bitwise the same scores).
MicroKernel active_micro_kernel(PanelFormat format);

bool cpu_supports_avx2_fma();
Isa active_isa();
// Returns false (and changes nothing) when the CPU cannot run the requested ISA.
bool set_active_isa(Isa isa);
const char* isa_name(Isa isa);

// Packs the codebook into panels of panel_dtype (fp32, or the table's own bf16 / fp16 for l2 / ip, see
// PanelFormat); computes max_norm. Returns NonFiniteCodebook on NaN/Inf, BadArgument for a panel dtype the
// table and metric cannot be packed in exactly.
StatusInfo pack_codebook(const MatrixView& codebook, Metric metric, DType panel_dtype, void* panels, float* bias,
                         double* max_norm, int num_threads);

// Where the fused search reads its queries from: row r as D fp32 values. The search asks for each row once
// per work item, from any thread, while it packs its query block, so a source may compute queries on the fly
// (the SAQ op forms each layer's target l*z - sum e here, never storing an N x D target matrix).
class QuerySource {
 public:
  virtual ~QuerySource() = default;
  virtual int64_t rows() const = 0;
  virtual int64_t dim() const = 0;
  // Writes query `row` (dim() fp32 values, contiguous) to out. Must be thread-safe and deterministic.
  virtual void load_row(int64_t row, float* out) const = 0;
};

// A strided matrix as a query source (the nearest / top-k ops).
class MatrixQuerySource final : public QuerySource {
 public:
  explicit MatrixQuerySource(const MatrixView& view) : view_(view) {}
  int64_t rows() const override { return view_.rows; }
  int64_t dim() const override { return view_.cols; }
  void load_row(int64_t row, float* out) const override {
    for (int64_t d = 0; d < view_.cols; ++d) out[d] = view_.at(row, d);
  }

 private:
  MatrixView view_;
};

}  // namespace spae
