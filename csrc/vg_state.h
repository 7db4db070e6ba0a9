/* vg_state.h — the module state (module.c): the types, the framework probe, the sources.
 *
 * Layer 2, above the sources: this is where Python objects enter.  Everything a sampler
 * thread reads lives in `src`, behind its own lock; the rest is touched with the GIL held. */
#ifndef VG_STATE_H
#define VG_STATE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "vg_sources.h"

typedef struct vg_state {
    PyTypeObject *SnapshotType, *HostType, *SamplerType, *PolicyType, *CanvasType;
    PyObject *probe; /* framework probe callable or NULL */
    int src_ok;      /* src initialised (its lock exists) */
    vg_sources src;
} vg_state;

vg_state *vg_get_state(PyObject *module);
vg_state *vg_state_from_type(PyTypeObject *tp);

#endif
