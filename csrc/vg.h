/* vg.h — how the C files fit together; module.c (and, until the lead merges the planner /
 * canvas split, tiler.c) include this.
 *
 * Layers, each header including only the ones below it (scripts/include_graph.py checks there
 * is no circle):
 *   vg_gpulibs.h   NVML / CUDA driver symbol tables            gpulibs.c
 *   vg_sources.h   every source, GIL-free, no Python objects   sources.c
 *   vg_state.h     module state: types, probe, the sources     module.c
 *   vg_args.h      shared argument parsers                     args.c
 *   vg_snapshot.h  vg_snap, probe merge, reserve rule, budget  snapshot.c
 * Consumers (gcpolicy.c, sampler.c, tiler.c / planner.c / canvas.c) include vg_snapshot.h and
 * vg_args.h, never each other; devices.c is the Python face of the sources.
 *
 * Conventions: functions return -1 / NULL with a Python exception set when they hold the GIL;
 * GIL-free helpers return a status and write a reason into a caller buffer, and the caller
 * raises after re-acquiring the GIL.  The only exported symbol is PyInit__native. */
#ifndef VG_H
#define VG_H

#include "vg_args.h"
#include "vg_snapshot.h"

/* ---------------------------------------------------------------- the module's parts */
extern PyMethodDef vg_devices_methods[];
int vg_sampler_add_type(PyObject *m, vg_state *st);
int vg_policy_add_type(PyObject *m, vg_state *st);
int vg_tiler_add_types(PyObject *m, vg_state *st);
extern PyMethodDef vg_tiler_methods[];

#endif
