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
