// The Python functions of `ddpm_kernels._C` besides its operators, each a METH_FASTCALL function listed in
// the module's method table (csrc/ops.cpp).
#pragma once

#include <Python.h>

// inputs_ok(x, others, out, table, T, t, t_prev, check_device_values[, mixed]): csrc/fast_checks.cpp.
PyObject* py_inputs_ok(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
// same_kind(ref, *tensors): csrc/fast_checks.cpp.
PyObject* py_same_kind(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
// bind_op(name, args, advance=-1) and call_bound(bound, *args[, next_index]): csrc/fast_calls.cpp.
PyObject* py_bind_op(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* py_call_bound(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
