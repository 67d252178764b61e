// `ddpm_kernels._C.inputs_ok`: the Python layer's check of a call's tensor arguments, for the common case, in
// one C call. ddpm_kernels/ops.py validates every call before any kernel runs; done in Python that is a dozen
// tensor attribute reads per call (dtype, shape, device of each operand, t's dtype, shape, device, stride and
// values), which costs more than the kernel of a small sampling step. This answers one question: are these
// arguments the plain valid case? It raises nothing and converts nothing: on False the Python layer runs its
// full checks, which raise the detailed error or convert the arguments (e.g. an int32 or strided t), so every
// message lives in one place (ops.py) and this is a pure accelerator of the same predicate.
//
// inputs_ok(x, others, out, table, T, t, t_prev, check_device_values[, mixed]) -> int, nonzero (truthy) when
//   * x, every entry of `others` (a tuple of the call's data tensors; a None there is a missing argument),
//     `out` (or None), `t`, `t_prev` (or None) and `table` are plain strided torch.Tensors with storage (a
//     subclass may override metadata, a nested, sparse or functorch-wrapped tensor has no plain storage: they
//     take the Python path);
//   * x is floating point with ndim >= 1, and every other data tensor has its dtype, shape and device (with
//     `mixed` true, a call whose float operands differ in dtype: any floating dtype, its shape and device; the
//     caller has checked the dtypes, and checks out's against their promotion);
//   * `out` does not require grad while grad mode is on;
//   * t (and t_prev) is int64, 1-D, contiguous, of length B = x.shape[0], on x's device, and `table` is on
//     x's device;
//   * t's values lie in [0, T) and t_prev's in [-1, T) where ops.py checks them: always for CPU tensors;
//     for device tensors `check_device_values` asks for a check that needs a host sync, left to Python.
// It is 2 when, besides, no gradient is asked for: grad mode is off or neither x nor any of `others` requires
// grad (the dispatcher then skips its own per-operand requires_grad scan), and 1 otherwise.
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

#include "python_methods.h"

namespace {

bool is_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return false;
  const at::Tensor& x = THPVariable_Unpack(obj);
  return x.defined() && x.layout() == at::kStrided && !x.is_nested() && x.has_storage();
}

bool like(PyObject* obj, const at::Tensor& x, bool mixed) {
  if (!is_tensor(obj)) return false;
  const at::Tensor& y = THPVariable_Unpack(obj);
  return (mixed ? y.is_floating_point() : y.scalar_type() == x.scalar_type()) && y.device() == x.device() &&
         y.sizes().equals(x.sizes());
}

bool timesteps_ok(PyObject* obj, const at::Tensor& x, int64_t lo, int64_t T, bool check_device_values) {
  if (!is_tensor(obj)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.scalar_type() != at::kLong || t.dim() != 1 || t.size(0) != x.size(0) || t.device() != x.device() ||
      !t.is_contiguous()) {
    return false;
  }
  if (!t.is_cpu()) return !check_device_values;
  const int64_t* v = t.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = t.size(0); i < n; ++i) {
    if (v[i] < lo || v[i] >= T) return false;
  }
  return true;
}

int inputs_ok(PyObject* const* args, bool mixed) {
  PyObject *x_obj = args[0], *others = args[1], *out = args[2], *table = args[3], *t = args[5], *t_prev = args[6];
  if (!is_tensor(x_obj) || !PyTuple_Check(others) || !is_tensor(table)) return 0;
  const at::Tensor& x = THPVariable_Unpack(x_obj);
  if (!x.is_floating_point() || x.dim() < 1) return 0;
  const bool grad_mode = c10::GradMode::is_enabled();
  bool needs_grad = grad_mode && x.requires_grad();
  for (Py_ssize_t i = 0, n = PyTuple_GET_SIZE(others); i < n; ++i) {
    PyObject* y = PyTuple_GET_ITEM(others, i);
    if (!like(y, x, mixed)) return 0;
    needs_grad = needs_grad || (grad_mode && THPVariable_Unpack(y).requires_grad());
  }
  if (out != Py_None) {
    if (!like(out, x, mixed)) return 0;
    if (grad_mode && THPVariable_Unpack(out).requires_grad()) return 0;
  }
  if (THPVariable_Unpack(table).device() != x.device()) return 0;
  const int64_t T = PyLong_AsLongLong(args[4]);
  if (T == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return 0;
  }
  const bool check_device_values = args[7] == Py_True;
  const bool ok = timesteps_ok(t, x, 0, T, check_device_values) &&
                  (t_prev == Py_None || timesteps_ok(t_prev, x, -1, T, check_device_values));
  return ok ? (needs_grad ? 1 : 2) : 0;
}

}  // namespace

PyObject* py_inputs_ok(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8 && nargs != 9) {
    PyErr_SetString(PyExc_TypeError,
                    "inputs_ok(x, others, out, table, T, t, t_prev, check_device_values[, mixed]) takes 8 or 9 "
                    "arguments");
    return nullptr;
  }
  const bool mixed = nargs == 9 && args[8] == Py_True;
  // A metadata query that throws (a tensor kind not foreseen above) is one more case for the Python checks:
  // an exception must not cross into the interpreter from this plain C function.
  int ok = 0;
  try {
    ok = inputs_ok(args, mixed);
  } catch (...) {
    ok = 0;
  }
  return PyLong_FromLong(ok);
}

// same_kind(ref, *tensors) -> bool: whether every one of `tensors` is a plain strided torch.Tensor (as
// inputs_ok takes them) with ref's dtype, sizes and device, none asking for a gradient (grad mode off, or none
// requires grad). The drop-in schedulers' direct step asks it of a step's sample and model output against a
// tensor of the kind their checked call had: the metadata reads of two tensors in one C call.
PyObject* py_same_kind(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1) {
    PyErr_SetString(PyExc_TypeError, "same_kind(ref, *tensors) takes at least one argument");
    return nullptr;
  }
  bool ok = false;
  try {
    ok = is_tensor(args[0]);
    if (ok) {
      const at::Tensor& ref = THPVariable_Unpack(args[0]);
      const bool grad_mode = c10::GradMode::is_enabled();
      for (Py_ssize_t i = 1; ok && i < nargs; ++i) {
        ok = like(args[i], ref, false) && !(grad_mode && THPVariable_Unpack(args[i]).requires_grad());
      }
    }
  } catch (...) {
    ok = false;
  }
  return PyBool_FromLong(ok);
}
