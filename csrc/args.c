/* args.c — the argument parsers every Python-facing function shares.
 *
 * Numbers are read without calling back into Python: an int (or int subclass) by its value,
 * a float (or float subclass) by its value.  No __float__ or __index__ runs, so parsing can
 * neither fail half-way with a foreign exception nor change the state of the object whose
 * method is parsing.  Out-of-range values raise ValueError naming the argument. */
#include "vg_args.h"

#include <math.h>

/* 1 and *x for an int or float (bool excluded), 0 for anything else.  Ints too large for a
 * double come back as +-inf, never with an exception set. */
int vg_as_double(PyObject *obj, double *x)
{
    if (PyBool_Check(obj))
        return 0;
    if (PyFloat_Check(obj)) {
        *x = PyFloat_AS_DOUBLE(obj);
        return 1;
    }
    if (PyLong_Check(obj)) {
        *x = PyLong_AsDouble(obj); /* the value itself: a subclass's __float__ never runs */
        if (*x == -1.0 && PyErr_Occurred()) {
            PyErr_Clear(); /* OverflowError: only magnitude can fail here */
            int sign = 0;
            (void)PyLong_AsLongLongAndOverflow(obj, &sign); /* the sign, without raising */
            *x = sign < 0 ? -INFINITY : INFINITY;
        }
        return 1;
    }
    return 0;
}

int vg_parse_bytes(PyObject *obj, const char *what, int allow_zero, int64_t *out)
{
    double x;
    if (!vg_as_double(obj, &x)) {
        PyErr_Format(PyExc_TypeError, "%s must be a number of bytes, got %.80s %.200R", what,
                     Py_TYPE(obj)->tp_name, obj);
        return -1;
    }
    if (!isfinite(x) || x < 0 || (!allow_zero && x == 0) || x > 9.0e18) {
        PyErr_Format(PyExc_ValueError, "%s must be a finite number of bytes %s 0, got %.200R",
                     what, allow_zero ? ">=" : ">", obj);
        return -1;
    }
    *out = (int64_t)x;
    return 0;
}

int vg_parse_double(PyObject *obj, const char *what, double lo, double hi, double *out)
{
    double x;
    if (!vg_as_double(obj, &x)) {
        PyErr_Format(PyExc_TypeError, "%s must be a number, got %.80s %.200R", what,
                     Py_TYPE(obj)->tp_name, obj);
        return -1;
    }
    if (!isfinite(x) || !(x > lo) || x > hi) {
        /* callers pass lo = -1e-300 to mean ">= 0" */
        int zero_ok = lo < 0 && lo > -1e-200;
        PyObject *l = PyFloat_FromDouble(zero_ok ? 0.0 : lo), *h = PyFloat_FromDouble(hi);
        if (l && h)
            PyErr_Format(PyExc_ValueError, "%s must be %s %R and <= %R, got %.200R", what,
                         zero_ok ? ">=" : ">", l, h, obj);
        Py_XDECREF(l);
        Py_XDECREF(h);
        return -1;
    }
    *out = x;
    return 0;
}

int vg_parse_index(vg_state *st, PyObject *obj, int *out)
{
    if (PyBool_Check(obj) || !PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "device index must be an int, got %.80s %.200R",
                     Py_TYPE(obj)->tp_name, obj);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow); /* never raises for an int */
    if (overflow)
        v = -1;
    int n = 0;
    char reason[VG_REASON];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vg_device_count_nogil(&st->src, &n, reason);
    Py_END_ALLOW_THREADS
    if (rc != 0 && v == 0) {
        PyErr_Format(PyExc_RuntimeError, "no GPU: %s", reason);
        return -1;
    }
    if (v < 0 || v >= n) {
        PyErr_Format(PyExc_ValueError, "unknown device index %.200R: %d device(s) present%s%s",
                     obj, n, rc ? "; " : "", rc ? reason : "");
        return -1;
    }
    *out = (int)v;
    return 0;
}

int vg_parse_device(vg_state *st, PyObject *obj, int *out)
{
    if (obj == Py_None) {
        *out = VG_HOST;
        return 0;
    }
    return vg_parse_index(st, obj, out);
}
