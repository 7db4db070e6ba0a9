/* One way to include the NumPy C API in every file: module.c defines VG_NUMPY_MAIN and
 * calls import_array(); the table symbol is hidden by -fvisibility=hidden. */
#ifndef VG_NUMPY_H
#define VG_NUMPY_H
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL vg_ARRAY_API
#ifndef VG_NUMPY_MAIN
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>
#endif
