/* module.c — vramguard._native: multi-phase init, module state and its GC contract.
 *
 * Assembles the parts (vg.h lists them): sources and snapshot first, consumers after.
 *
 * The only exported symbol is PyInit__native.  Sub-interpreters are declared unsupported
 * (NumPy's C API is process-global). */
#define VG_NUMPY_MAIN
#include "vg.h"
#include "vg_numpy.h"
#include "vg_ledger.h"
#include "vg_allocsim.h"

#include <errno.h>
#include <string.h>

static struct PyModuleDef vg_module;

vg_state *vg_get_state(PyObject *module) { return (vg_state *)PyModule_GetState(module); }

vg_state *vg_state_from_type(PyTypeObject *tp)
{
#if PY_VERSION_HEX >= 0x030B0000
    PyObject *m = PyType_GetModuleByDef(tp, &vg_module);
#else
    /* 3.10: our types are not subclassable, so the exact type carries the module */
    PyObject *m = PyType_GetModule(tp);
    if (m != NULL && PyModule_GetDef(m) != &vg_module) {
        PyErr_SetString(PyExc_TypeError, "not a vramguard._native type");
        m = NULL;
    }
#endif
    return m ? vg_get_state(m) : NULL;
}

static PyObject *py_build_info(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    return Py_BuildValue("{s:s,s:i,s:s}", "compiler", __VERSION__, "max_devices", VG_MAX_DEV,
#if defined(__SANITIZE_ADDRESS__)
                         "sanitizer", "address"
#else
                         "sanitizer", "none"
#endif
    );
}

static int vg_exec(PyObject *m)
{
    vg_state *st = vg_get_state(m);
    memset(st, 0, sizeof *st);
    if (PyArray_ImportNumPyAPI() < 0)
        return -1;
    int rc = vg_sources_init(&st->src);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    st->src_ok = 1;
    if (vg_snapshot_add_types(m, st) < 0 || vg_sampler_add_type(m, st) < 0 ||
        vg_policy_add_type(m, st) < 0 || vg_tiler_add_types(m, st) < 0)
        return -1;
    if (vg_allocsim_add_type(m, st) < 0) /* issue 16: the caching-allocator model */
        return -1;
    if (PyModule_AddFunctions(m, vg_snapshot_methods) < 0 ||
        PyModule_AddFunctions(m, vg_devices_methods) < 0 ||
        PyModule_AddFunctions(m, vg_tiler_methods) < 0 ||
        PyModule_AddFunctions(m, vg_ledger_methods) < 0 ||
        PyModule_AddIntConstant(m, "LEDGER_VERSION", VG_LEDGER_VERSION) < 0)
        return -1;
    return 0;
}

static int vg_traverse(PyObject *m, visitproc visit, void *arg)
{
    vg_state *st = vg_get_state(m);
    if (st == NULL)
        return 0;
    Py_VISIT(st->SnapshotType);
    Py_VISIT(st->HostType);
    Py_VISIT(st->SamplerType);
    Py_VISIT(st->PolicyType);
    Py_VISIT(st->CanvasType);
    Py_VISIT(st->probe);
    return 0;
}

static int vg_clear(PyObject *m)
{
    vg_state *st = vg_get_state(m);
    if (st == NULL)
        return 0;
    Py_CLEAR(st->SnapshotType);
    Py_CLEAR(st->HostType);
    Py_CLEAR(st->SamplerType);
    Py_CLEAR(st->PolicyType);
    Py_CLEAR(st->CanvasType);
    Py_CLEAR(st->probe);
    return 0;
}

static void vg_free(void *m)
{
    vg_clear((PyObject *)m);
    vg_state *st = vg_get_state((PyObject *)m);
    if (st != NULL && st->src_ok) {
        vg_sources_free(&st->src);
        st->src_ok = 0;
    }
}

static PyMethodDef vg_methods[] = {
    {"build_info", py_build_info, METH_NOARGS, "build_info($module, /)\n--\n\nHow this extension was built."},
    {NULL, NULL, 0, NULL}};

static PyModuleDef_Slot vg_slots[] = {
    {Py_mod_exec, vg_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
    {0, NULL}};

static struct PyModuleDef vg_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vramguard._native",
    .m_doc = "vramguard's C core: accounting, sampling, GC policy, tiling.",
    .m_size = sizeof(vg_state),
    .m_methods = vg_methods,
    .m_slots = vg_slots,
    .m_traverse = vg_traverse,
    .m_clear = vg_clear,
    .m_free = vg_free,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModuleDef_Init(&vg_module); }
