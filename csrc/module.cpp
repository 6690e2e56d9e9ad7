// The Python module `carfast._C`. It has no Python functions: importing it loads this shared object,
// whose static initialisers register the ops (csrc/ops.cpp) and their CPU kernels (csrc/cpu/) with
// the PyTorch dispatcher, so they appear as torch.ops.carfast.*. Only carfast/extensions.py imports it.
#include <Python.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

#define CARFAST_CAT_(a, b) a##b
#define CARFAST_CAT(a, b) CARFAST_CAT_(a, b)
#define CARFAST_STR_(a) #a
#define CARFAST_STR(a) CARFAST_STR_(a)

extern "C" PyMODINIT_FUNC CARFAST_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      CARFAST_STR(TORCH_EXTENSION_NAME),
      "carfast compiled kernels; the ops are registered as torch.ops.carfast.*",
      -1,       // no per-module state
      nullptr,  // no methods
      nullptr,
      nullptr,
      nullptr,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
