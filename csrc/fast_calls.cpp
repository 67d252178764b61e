// `ddpm_kernels._C.bind_op` / `call_bound`: an operator call with its constant arguments converted once.
//
// A scheduler's step on a small sample costs more on the host than in the kernel, and through `torch.ops` most of
// that host time is the conversion of the step's 12-17 arguments against the operator's schema on every call;
// a sampling loop changes only its tensors. `bind_op` converts the constant arguments once; `call_bound` then
// takes only the per-call ones and calls the same operator through the dispatcher (a boxed call), so everything
// the dispatcher does for a `torch.ops` call (autograd, Python dispatch modes, the profiler, the backend's kernel)
// happens here too. What `torch.ops` does above the dispatcher does not (`__torch_function__` of tensor subclasses
// and of a TorchFunctionMode): the Python callers use `torch.ops` for those (ddpm_kernels/extension.py, _traced).
//
// bind_op(name, args, advance=-1) -> capsule
//   name: "ddpm_kernels::flow_step" (the default overload); args: one entry per schema argument, in order: the
//   constant's value (None, bool, int, float, str), or Ellipsis for an argument given per call (a Tensor, or
//   None where the schema takes an optional). advance: the position of a per-call argument (an int64 tensor)
//   into which a trailing `next_index` argument is written after the call, when it is >= 0 (a scheduler's step
//   index advanced on the device in the same call); -1 for none.
// call_bound(capsule, *per_call_args[, next_index]) -> the operator's result (a Tensor, a tuple of them, None)
// Errors come back as torch's Python exceptions (TypeError for the arguments of these two functions, the
// operator's own errors as `torch.ops` raises them).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "python_methods.h"

namespace {

constexpr const char* kCapsuleName = "ddpm_kernels.bound_op";

struct BoundOp {
  BoundOp(c10::OperatorHandle op_, std::string name_) : op(std::move(op_)), name(std::move(name_)) {}
  c10::OperatorHandle op;
  std::string name;
  std::vector<c10::IValue> args;  // the constants; per-call slots hold None until filled
  std::vector<size_t> slots;      // the positions given per call, in order
  std::vector<bool> optional;     // whether the schema takes None at each per-call slot
  int64_t advance = -1;           // a position among `slots` (index into `slots`), or -1
};

[[noreturn]] void type_error(const std::string& message) { throw torch::TypeError(message); }

bool takes_none(const c10::TypePtr& type) { return type->kind() == c10::TypeKind::OptionalType; }

// A constant argument as the schema's type wants it (the kinds the step schemas use).
c10::IValue constant(PyObject* obj, const c10::Argument& arg, const std::string& where) {
  c10::TypePtr type = arg.type();
  if (obj == Py_None) {
    if (!takes_none(type)) type_error(where + ": None for " + arg.name() + " (" + type->str() + ")");
    return c10::IValue();
  }
  if (takes_none(type)) type = type->castRaw<c10::OptionalType>()->getElementType();
  switch (type->kind()) {
    case c10::TypeKind::BoolType:
      if (PyBool_Check(obj)) return c10::IValue(obj == Py_True);
      break;
    case c10::TypeKind::IntType:
      if (PyLong_Check(obj) && !PyBool_Check(obj)) {
        const long long v = PyLong_AsLongLong(obj);
        if (v == -1 && PyErr_Occurred()) throw python_error();
        return c10::IValue(static_cast<int64_t>(v));
      }
      break;
    case c10::TypeKind::FloatType:
      if (PyFloat_Check(obj) || (PyLong_Check(obj) && !PyBool_Check(obj))) {
        const double v = PyFloat_AsDouble(obj);
        if (v == -1.0 && PyErr_Occurred()) throw python_error();
        return c10::IValue(v);
      }
      break;
    case c10::TypeKind::StringType:
      if (PyUnicode_Check(obj)) {
        const char* s = PyUnicode_AsUTF8(obj);
        if (s == nullptr) throw python_error();
        return c10::IValue(std::string(s));
      }
      break;
    default:
      break;
  }
  type_error(where + ": " + arg.name() + " (" + arg.type()->str() + ") cannot be bound to a " +
             Py_TYPE(obj)->tp_name);
}

void destroy(PyObject* capsule) {
  delete static_cast<BoundOp*>(PyCapsule_GetPointer(capsule, kCapsuleName));
}

PyObject* wrap_result(std::vector<c10::IValue>& stack) {
  if (stack.empty()) Py_RETURN_NONE;
  if (stack.size() == 1) return THPVariable_Wrap(std::move(stack[0]).toTensor());
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(stack.size()));
  if (tuple == nullptr) return nullptr;
  for (size_t i = 0; i < stack.size(); ++i) {
    PyObject* item = THPVariable_Wrap(std::move(stack[i]).toTensor());
    if (item == nullptr) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), item);
  }
  return tuple;
}

}  // namespace

PyObject* py_bind_op(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2 && nargs != 3) type_error("bind_op(name, args, advance=-1) takes 2 or 3 arguments");
  if (!PyUnicode_Check(args[0])) type_error("bind_op: name must be a str");
  if (!PyTuple_Check(args[1])) type_error("bind_op: args must be a tuple");
  const char* qualified = PyUnicode_AsUTF8(args[0]);
  if (qualified == nullptr) throw python_error();
  auto bound = std::make_unique<BoundOp>(c10::Dispatcher::singleton().findSchemaOrThrow(qualified, ""), qualified);
  const auto& schema = bound->op.schema();
  const auto& arguments = schema.arguments();
  const Py_ssize_t n = PyTuple_GET_SIZE(args[1]);
  if (static_cast<size_t>(n) != arguments.size()) {
    type_error("bind_op: " + bound->name + " takes " + std::to_string(arguments.size()) + " arguments, got " +
               std::to_string(n));
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* value = PyTuple_GET_ITEM(args[1], i);
    const auto& arg = arguments[static_cast<size_t>(i)];
    if (value == Py_Ellipsis) {
      if (!arg.type()->isSubtypeOf(*c10::OptionalType::ofTensor())) {
        type_error("bind_op: " + bound->name + ": " + arg.name() + " (" + arg.type()->str() +
                   ") cannot be given per call (only tensors can)");
      }
      bound->slots.push_back(static_cast<size_t>(i));
      bound->optional.push_back(takes_none(arg.type()));
      bound->args.emplace_back();
    } else {
      bound->args.push_back(constant(value, arg, "bind_op: " + bound->name));
    }
  }
  if (nargs == 3) {
    const long long advance = PyLong_AsLongLong(args[2]);
    if (advance == -1 && PyErr_Occurred()) throw python_error();
    if (advance >= 0) {
      const auto slot = std::find(bound->slots.begin(), bound->slots.end(), static_cast<size_t>(advance));
      if (slot == bound->slots.end()) {
        type_error("bind_op: advance=" + std::to_string(advance) + " is not a per-call argument");
      }
      bound->advance = slot - bound->slots.begin();
    }
  }
  PyObject* capsule = PyCapsule_New(bound.get(), kCapsuleName, destroy);
  if (capsule == nullptr) return nullptr;
  bound.release();
  return capsule;
  END_HANDLE_TH_ERRORS
}

PyObject* py_call_bound(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs < 1) type_error("call_bound(bound, *args) takes the bound operator first");
  auto* bound = static_cast<BoundOp*>(PyCapsule_GetPointer(args[0], kCapsuleName));
  if (bound == nullptr) throw python_error();
  const size_t given = bound->slots.size();
  const size_t expected = given + (bound->advance >= 0 ? 1 : 0);
  if (static_cast<size_t>(nargs - 1) != expected) {
    type_error("call_bound: " + bound->name + " takes " + std::to_string(expected) + " per-call arguments, got " +
               std::to_string(nargs - 1));
  }
  std::vector<c10::IValue> stack(bound->args);
  for (size_t k = 0; k < given; ++k) {
    PyObject* obj = args[k + 1];
    if (THPVariable_Check(obj)) {
      stack[bound->slots[k]] = THPVariable_Unpack(obj);
    } else if (obj != Py_None || !bound->optional[k]) {
      type_error("call_bound: " + bound->name + ": " +
                 bound->op.schema().arguments()[bound->slots[k]].name() + " must be a Tensor, got " +
                 Py_TYPE(obj)->tp_name);
    }
  }
  int64_t next_index = -1;
  if (bound->advance >= 0) {
    const long long v = PyLong_AsLongLong(args[nargs - 1]);
    if (v == -1 && PyErr_Occurred()) throw python_error();
    next_index = v;
  }
  at::Tensor advanced;
  if (next_index >= 0) {
    const c10::IValue& index = stack[bound->slots[static_cast<size_t>(bound->advance)]];
    if (!index.isTensor()) type_error("call_bound: " + bound->name + ": next_index given without an index tensor");
    advanced = index.toTensor();
  }
  {
    // without the GIL while the operator runs, as torch.ops calls run (a large CPU step does not hold up the
    // interpreter's other threads; the dispatcher takes the GIL where a Python mode or kernel needs it)
    pybind11::gil_scoped_release no_gil;
    bound->op.callBoxed(stack);
    // a scalar write on the device (no host read of it), as the caller's Python fill_ would do
    if (next_index >= 0) advanced.fill_(next_index);
  }
  return wrap_result(stack);
  END_HANDLE_TH_ERRORS
}
