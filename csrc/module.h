// An importable Python module for each compiled library. Importing it dlopens the library, whose static
// initializers register the schemas (TORCH_LIBRARY) or kernels (TORCH_LIBRARY_IMPL) with the dispatcher.
// The module carries the torch version it was built against, so Python can refuse a stale build with a
// clear message instead of crashing in a mismatched ABI.
#pragma once

#include <Python.h>
#include <torch/headeronly/version.h>

// torch's BuildExtension defines TORCH_EXTENSION_NAME as the last component of the extension's name.
#ifndef DDPM_MODULE_NAME
#define DDPM_MODULE_NAME TORCH_EXTENSION_NAME
#endif
#define DDPM_STR2(x) #x
#define DDPM_STR(x) DDPM_STR2(x)

// What the library holds: the CPU instruction set of a CPU kernel library, else the schema library.
#if defined(CPU_CAPABILITY)
#define DDPM_MODULE_KIND DDPM_STR(CPU_CAPABILITY)
#else
#define DDPM_MODULE_KIND "SCHEMA"
#endif
#if defined(DDPM_WITH_CUDA)
#define DDPM_MODULE_WITH_CUDA 1
#else
#define DDPM_MODULE_WITH_CUDA 0
#endif
// The module's Python functions: a library with some defines DDPM_MODULE_METHODS (a PyMethodDef table).
#ifndef DDPM_MODULE_METHODS
#define DDPM_MODULE_METHODS nullptr
#endif
#define DDPM_CAT2(a, b) a##b
#define DDPM_CAT(a, b) DDPM_CAT2(a, b)

extern "C" PyMODINIT_FUNC DDPM_CAT(PyInit_, DDPM_MODULE_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, DDPM_STR(DDPM_MODULE_NAME), "ddpm_kernels compiled operators", -1,
      DDPM_MODULE_METHODS};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "TORCH_VERSION", TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "KIND", DDPM_MODULE_KIND) < 0 ||
      PyModule_AddIntConstant(m, "WITH_CUDA", DDPM_MODULE_WITH_CUDA) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
