// Shared pieces of the pybind11 module spae_fast._C (common/module.cpp) and of each op's entry points
// (nearest/bindings.cpp, saq/bindings.cpp, semantic_loss/bindings.cpp): keyword arguments only, checked once
// by KeywordArgs (common/keyword_args.h); pointers arrive as ints (tensor.data_ptr()), strides in elements;
// status codes go back as (code, detail, ...) and spae_fast/_native.py raises from them.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/keyword_args.h"
#include "common/spae_native.h"

namespace spae {

namespace py = pybind11;
using spae_boundary::def_keywords;
using spae_boundary::strided_bytes;
using spae_boundary::KeywordArgs;

constexpr const char* kModule = "spae_fast._C";  // names in messages: spae_fast._C.<entry point>

struct PackedInt8CodebookView;

inline int64_t dtype_bytes(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

// What an entry point returns: (status code, detail, extra...), raised from by spae_fast/_native.py. The extras
// are bound by reference, so status_tuple(args.run(kernel), out) reads `out` after the kernel wrote it.
template <class... Extra>
py::tuple status_tuple(const StatusInfo& info, const Extra&... extra) {
  return py::make_tuple(static_cast<int>(info.status), info.detail, extra...);
}

// A strided [rows, cols] matrix from the arguments <name> (a buffer: address, nbytes), <name>_row_stride,
// <name>_col_stride, <name>_dtype; it must hold every element it spans when `required` (else: unused when its
// address is 0).
inline MatrixView matrix_arg(KeywordArgs& args, const std::string& name, int64_t rows, int64_t cols,
                             bool required = true) {
  MatrixView view;
  view.rows = rows;
  view.cols = cols;
  view.row_stride = args.stride((name + "_row_stride").c_str());
  view.col_stride = args.stride((name + "_col_stride").c_str());
  view.dtype = static_cast<DType>(args.dtype((name + "_dtype").c_str()));
  const int64_t sizes[2] = {rows, cols}, strides[2] = {view.row_stride, view.col_stride};
  const uint64_t span = strided_bytes(sizes, strides, 2, dtype_bytes(view.dtype), [&](const char* why) {
    args.fail_value(name.c_str(), why);
  });
  const uintptr_t address = args.buffer(name.c_str(), 0);
  view.data = reinterpret_cast<const void*>(required || address != 0 ? args.buffer(name.c_str(), span) : 0);
  return view;
}

// A dense buffer of `count` elements of T, required when count > 0.
template <class T>
T* dense_arg(KeywordArgs& args, const char* name, std::initializer_list<int64_t> sizes) {
  return reinterpret_cast<T*>(args.buffer(name, spae_boundary::dense_bytes(sizes, sizeof(T))));
}

// The packed panels of a [rows, dim] table: buffer `name` of ceil(rows / 16) * 16 * dim elements of the dtype
// tagged by `dtype_name` (fp32, or bf16 / fp16 panels: half the bytes), stored to *dtype.
const void* panels_arg(KeywordArgs& args, const char* name, const char* dtype_name, int64_t rows, int64_t dim,
                       DType* dtype);

// The packed codebook (pack_codebook's panels / bias, metric l2 unless set): `panels` (of `panels_dtype`)
// and `bias` addresses, max_norm a finite float >= 0.
PackedCodebookView packed_codebook_arg(KeywordArgs& args, int64_t rows, int64_t dim);

// The int8 copy of the certified pre-filter (nearest and saq; nearest/bindings.cpp): prefilter_panels (0: off),
// prefilter_columns, prefilter_offsets (given exactly when the panels are) and prefilter_bounds (4 floats when
// on, empty when off).
PackedInt8CodebookView prefilter_arg(KeywordArgs& args, int64_t rows, int64_t dim);

void register_nearest_bindings(py::module_& m);        // nearest/bindings.cpp
void register_saq_bindings(py::module_& m);            // saq/bindings.cpp
void register_semantic_loss_bindings(py::module_& m);  // semantic_loss/bindings.cpp

}  // namespace spae
