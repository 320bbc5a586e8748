// The typed boundary of the native modules (spae_fast._C and spae_fast._cuda).
//
// Every entry point takes keyword arguments only and reads them through KeywordArgs, which checks each one
// once, before any pointer is touched: it must be present, of its Python type (int, bool, float, a list of
// ints / floats) and in range (sizes >= 0, dtype / metric tags known, addresses non-zero where a buffer is
// read or written). A failed check raises a Python exception naming the function and the argument:
// TypeError (positional, missing, unknown or mistyped argument), ValueError (out of range). The entry point
// then fills its request struct. Deeper checks that need the data itself stay in the kernels' status codes.
// Header-only (pybind11, no torch), shared by both modules.
#pragma once

#include <pybind11/pybind11.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

namespace spae_boundary {

namespace py = pybind11;

constexpr int64_t kNoLimit = std::numeric_limits<int64_t>::max();
// The limits of every backend (spae_fast/ops/boundary.py states why): D bounds the int8 pre-filter's int32
// sums and offsets, V and N the GPU kernels' int32 row indices.
constexpr int64_t kMaxDim = 65536;
constexpr int64_t kMaxRows = (int64_t{1} << 31) - (int64_t{1} << 16);
constexpr int64_t kMaxQueries = kMaxRows;

class KeywordArgs {
 public:
  // Refuses positional arguments: `function` is the qualified name used in messages.
  KeywordArgs(const char* function, const py::args& positional, const py::kwargs& kwargs)
      : function_(function), kwargs_(kwargs) {
    if (positional.size() != 0)
      throw py::type_error(function_ + "() takes keyword arguments only (got " + std::to_string(positional.size()) +
                           " positional)");
  }

  // A Python int (not a bool) in [low, high].
  int64_t integer(const char* name, int64_t low = std::numeric_limits<int64_t>::min(), int64_t high = kNoLimit) {
    return integer_value(name, get(name), low, high);
  }
  int64_t size(const char* name) { return integer(name, 0); }  // >= 0
  int64_t dim(const char* name, int64_t low = 1) { return integer(name, low, kMaxDim); }
  int64_t rows(const char* name, int64_t low = 1) { return integer(name, low, kMaxRows); }  // codebook rows
  int64_t queries(const char* name) { return integer(name, 0, kMaxQueries); }              // query rows
  int64_t stride(const char* name) { return integer(name); }   // strides of torch views may be 0 or negative
  int threads(const char* name) { return static_cast<int>(integer(name, 1, INT_MAX)); }
  int tag(const char* name, int count) { return static_cast<int>(integer(name, 0, count - 1)); }
  int dtype(const char* name) { return tag(name, 3); }  // 0 float32, 1 bfloat16, 2 float16

  // The address of a buffer (tensor.data_ptr()): an int >= 0; must be non-zero when `required`.
  uintptr_t pointer(const char* name, bool required) {
    const py::handle value = get(name);
    check_int(name, value);
    const unsigned long long address = PyLong_AsUnsignedLongLong(value.ptr());
    if (PyErr_Occurred()) {
      PyErr_Clear();
      fail_value(name, "must be an address (an int >= 0, tensor.data_ptr()), got " + repr(value));
    }
    if (required && address == 0) fail_value(name, "is a null address but its buffer is read or written");
    return static_cast<uintptr_t>(address);
  }
  // An address that must be 0 (the buffer is not used in this mode).
  void absent(const char* name, const char* because) {
    if (pointer(name, false) != 0) fail_value(name, std::string("must be 0 ") + because);
  }

  // A buffer of the CPU module: the pair (address, nbytes) that spae_fast._native.buffer(tensor) gives, the
  // address of the first element and the bytes its storage holds from there. `needed` is what the entry
  // point reads or writes from it (0: unused, then any pair, (0, 0) included). A null address or a buffer
  // shorter than `needed` is refused, so no call reads or writes past the memory it was given.
  uintptr_t buffer(const char* name, uint64_t needed) {
    const py::handle value = get(name);
    if (!PyTuple_Check(value.ptr()) || PyTuple_GET_SIZE(value.ptr()) != 2)
      fail_type(name, "an (address, nbytes) tuple (spae_fast._native.buffer(tensor))", value);
    const uint64_t address = unsigned_value(name, PyTuple_GET_ITEM(value.ptr(), 0));
    const uint64_t nbytes = unsigned_value(name, PyTuple_GET_ITEM(value.ptr(), 1));
    if (needed == 0) return static_cast<uintptr_t>(address);
    if (address == 0) fail_value(name, "is a null address but its buffer is read or written");
    if (nbytes < needed)
      fail_value(name, "holds " + std::to_string(nbytes) + " bytes, but the call reads or writes " +
                           std::to_string(needed) + " (an operand of another shape?)");
    return static_cast<uintptr_t>(address);
  }
  // A buffer that must be unused in this mode: its address must be 0.
  void no_buffer(const char* name, const char* because) {
    if (buffer(name, 0) != 0) fail_value(name, std::string("must have address 0 ") + because);
  }

  bool flag(const char* name) {
    const py::handle value = get(name);
    if (!PyBool_Check(value.ptr())) fail_type(name, "a bool", value);
    return value.ptr() == Py_True;
  }

  // A Python float or int in [low, high] (NaN is never in range).
  double real(const char* name, double low = -HUGE_VAL, double high = HUGE_VAL) {
    const py::handle value = get(name);
    if (PyBool_Check(value.ptr()) || !(PyFloat_Check(value.ptr()) || PyLong_Check(value.ptr())))
      fail_type(name, "a float", value);
    const double result = PyFloat_AsDouble(value.ptr());
    if (PyErr_Occurred()) {
      PyErr_Clear();
      fail_value(name, "does not fit a float, got " + repr(value));
    }
    if (!(result >= low && result <= high))
      fail_value(name, "must be in [" + number(low) + ", " + number(high) + "], got " + repr(value));
    return result;
  }

  // A list or tuple of ints, each in [low, high], with a count in [min_count, max_count].
  std::vector<int64_t> integers(const char* name, int64_t min_count, int64_t max_count, int64_t low,
                                int64_t high = kNoLimit) {
    const py::sequence items = sequence(name, min_count, max_count);
    std::vector<int64_t> out;
    for (size_t i = 0; i < items.size(); ++i)
      out.push_back(integer_value((std::string(name) + "[" + std::to_string(i) + "]").c_str(), items[i], low, high));
    return out;
  }
  // A list or tuple of floats / ints.
  std::vector<double> reals(const char* name, int64_t min_count, int64_t max_count) {
    const py::sequence items = sequence(name, min_count, max_count);
    std::vector<double> out;
    for (size_t i = 0; i < items.size(); ++i) {
      const py::handle item = items[i];
      if (PyBool_Check(item.ptr()) || !(PyFloat_Check(item.ptr()) || PyLong_Check(item.ptr())))
        fail_type(name, "a list of floats", item);
      out.push_back(PyFloat_AsDouble(item.ptr()));
    }
    return out;
  }

  // Raises on keywords no reader asked for (a misspelt or extra argument); call after the last reader.
  void done() const {
    for (const auto& item : kwargs_) {
      const std::string key = py::str(item.first);
      bool known = false;
      for (const std::string& name : read_) known = known || name == key;
      if (!known) throw py::type_error(function_ + "() got an unexpected keyword argument '" + key + "'");
    }
  }

  // Ends the checks (done()) and runs kernel() with the GIL released, returning its result: every argument
  // has been read and checked by now, so the kernel touches no Python object.
  template <class Kernel>
  auto run(Kernel&& kernel) const {
    done();
    py::gil_scoped_release release;
    return kernel();
  }

  [[noreturn]] void fail_value(const char* name, const std::string& message) const {
    throw py::value_error(function_ + "(): argument '" + name + "' " + message);
  }

 private:
  py::handle get(const char* name) {
    read_.emplace_back(name);
    PyObject* value = PyDict_GetItemString(kwargs_.ptr(), name);  // borrowed; the dict outlives the call
    if (value == nullptr) throw py::type_error(function_ + "() missing keyword argument '" + name + "'");
    return value;
  }

  static std::string repr(py::handle value) { return py::repr(value); }
  static std::string number(double value) { return py::repr(py::float_(value)); }

  [[noreturn]] void fail_type(const char* name, const char* expected, py::handle value) const {
    throw py::type_error(function_ + "(): argument '" + name + "' must be " + expected + ", got " +
                         std::string(py::str(py::type::handle_of(value).attr("__name__"))) + " " + repr(value));
  }

  uint64_t unsigned_value(const char* name, py::handle value) const {
    check_int(name, value);
    const unsigned long long result = PyLong_AsUnsignedLongLong(value.ptr());
    if (PyErr_Occurred()) {
      PyErr_Clear();
      fail_value(name, "must hold two ints >= 0 (address, nbytes), got " + repr(value));
    }
    return result;
  }

  void check_int(const char* name, py::handle value) const {
    if (PyBool_Check(value.ptr()) || !PyLong_Check(value.ptr())) fail_type(name, "an int", value);
  }

  int64_t integer_value(const char* name, py::handle value, int64_t low, int64_t high) const {
    check_int(name, value);
    int overflow = 0;
    const long long result = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
    if (overflow != 0 || (result == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      fail_value(name, "does not fit int64, got " + repr(value));
    }
    if (result < low || result > high) {
      std::string range = "must be >= " + std::to_string(low);
      if (high != kNoLimit) range = "must be in [" + std::to_string(low) + ", " + std::to_string(high) + "]";
      fail_value(name, range + ", got " + std::to_string(result));
    }
    return result;
  }

  py::sequence sequence(const char* name, int64_t min_count, int64_t max_count) {
    const py::handle value = get(name);
    if (!PyList_Check(value.ptr()) && !PyTuple_Check(value.ptr())) fail_type(name, "a list or tuple", value);
    const py::sequence items = py::reinterpret_borrow<py::sequence>(value);
    const int64_t count = static_cast<int64_t>(items.size());
    if (count < min_count || count > max_count)
      fail_value(name, "must hold " +
                           (min_count == max_count ? std::to_string(min_count)
                                                   : std::to_string(min_count) + ".." + std::to_string(max_count)) +
                           " values, got " + std::to_string(count));
    return items;
  }

  std::string function_;
  const py::kwargs& kwargs_;
  std::vector<std::string> read_;
};

// Bytes of a dense array of `count` elements of `item` bytes each: sizes are bounded (rows, D, queries) so the
// product fits; saturates instead of wrapping if it would not.
inline uint64_t dense_bytes(std::initializer_list<int64_t> sizes, int64_t item) {
  unsigned __int128 total = static_cast<unsigned __int128>(item);
  for (const int64_t size : sizes) total *= static_cast<unsigned __int128>(size < 0 ? 0 : size);
  return total > UINT64_MAX ? UINT64_MAX : static_cast<uint64_t>(total);
}

// Bytes spanned by a strided array from its first element: (sum_i (size_i - 1) stride_i + 1) * item, 0 when
// it is empty. A negative stride would reach before the first element: `fail` is called with a message.
template <class Fail>
uint64_t strided_bytes(const int64_t* sizes, const int64_t* strides, int rank, int64_t item, Fail fail) {
  __int128 last = 0;
  for (int i = 0; i < rank; ++i) {
    if (sizes[i] <= 0) return 0;
    if (strides[i] < 0 && sizes[i] > 1) fail("has a negative stride (the kernels read from its first element on)");
    last += static_cast<__int128>(sizes[i] - 1) * strides[i];
  }
  const __int128 total = (last + 1) * item;
  return total > static_cast<__int128>(UINT64_MAX) ? UINT64_MAX : static_cast<uint64_t>(total);
}

// Registers `name` in m as a function of keyword arguments only, fn(KeywordArgs&) -> py::tuple; `module` qualifies
// it in messages ("spae_fast._C"). fn runs its checks with the GIL held and releases it around the kernel.
template <class Fn>
void def_keywords(py::module_& m, const char* module, const char* name, Fn fn, const char* doc) {
  const std::string qualified = std::string(module) + "." + name;
  m.def(
      name,
      [qualified, fn](const py::args& positional, const py::kwargs& kwargs) {
        KeywordArgs args(qualified.c_str(), positional, kwargs);
        return fn(args);
      },
      doc);
}

}  // namespace spae_boundary
