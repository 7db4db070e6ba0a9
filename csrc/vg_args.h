/* vg_args.h — argument parsers shared by every Python-facing function (args.c).
 *
 * Each returns 0, or -1 with an exception that names the argument and the value.  They may
 * run arbitrary Python (__float__, __index__): callers parse everything first and only then
 * look at or change their own state. */
#ifndef VG_ARGS_H
#define VG_ARGS_H

#include "vg_state.h"

/* 1 and *x for an int or float (not bool), 0 for anything else; never runs Python code and
 * never leaves an exception set (ints beyond a double's range give +-inf). */
int vg_as_double(PyObject *obj, double *x);
/* A finite number of bytes >= 0 (or > 0 without allow_zero), at most 9.0e18. */
int vg_parse_bytes(PyObject *obj, const char *what, int allow_zero, int64_t *out);
/* A finite float with lo < x <= hi (lo = -1e-300 means ">= 0"). */
int vg_parse_double(PyObject *obj, const char *what, double lo, double hi, double *out);
/* A visible (or simulated) device index. */
int vg_parse_index(vg_state *st, PyObject *obj, int *out);
/* A device index, or None for host RAM (VG_HOST). */
int vg_parse_device(vg_state *st, PyObject *obj, int *out);

#endif
