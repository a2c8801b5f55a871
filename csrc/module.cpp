// Python entry point of mskd_fast._C. The operators themselves are registered with
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL in the other translation units; importing this module
// (or torch.ops.load_library on it) runs those static registrations.
#include <Python.h>

static struct PyModuleDef mskd_c_module = {PyModuleDef_HEAD_INIT, "_C", "mskd-fast C++/CUDA operators", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mskd_c_module); }
