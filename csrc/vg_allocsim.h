/* vg_allocsim.h — the AllocSim type (allocsim.c): a model of PyTorch's CUDA caching allocator
 * (512 B rounding, 2 MiB small-pool segments, 20 MiB large segments, block splitting, whole-
 * segment release, expandable segments) that can drive a simulated device's figures.
 *
 * A consumer of the snapshot layer: includes vg_args.h and vg_snapshot.h only. */
#ifndef VG_ALLOCSIM_H
#define VG_ALLOCSIM_H

#include "vg_args.h"
#include "vg_snapshot.h"

int vg_allocsim_add_type(PyObject *m, vg_state *st);

#endif
