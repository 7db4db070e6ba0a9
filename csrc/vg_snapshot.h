/* vg_snapshot.h — the snapshot layer (snapshot.c): one struct with every figure a consumer
 * needs, the framework probe merged in, the reserve rule, and the budget.
 *
 * Consumers (gcpolicy.c, sampler.c, the tiler) read budgets from here and never recompute
 * them; they include this header and vg_args.h, never each other. */
#ifndef VG_SNAPSHOT_H
#define VG_SNAPSHOT_H

#include "vg_state.h"

typedef struct {
    int index; /* VG_HOST (-1) for host RAM and card snapshots */
    char name[VG_NAME];
    char uuid[VG_NAME];
    const char *source; /* static string: "simulated", "nvml", "cuda+nvml", "host", "card", "given" */
    int64_t total, free, used, process_used;
    int64_t framework_reserved, framework_allocated, framework_active;
    int64_t evictable, reserve, cap, budget;
    int64_t others_planned; /* shared ledger: other participants' planned-not-allocated bytes */
    int64_t oom_count, retry_count;
    double timestamp; /* CLOCK_MONOTONIC seconds */
    /* fragmentation (issue 16); -1 = unknown: free allocator blocks beside live ones, the
     * largest block a request could get without a release, expandable segments 1/0 */
    int64_t inactive_split, largest_free;
    int expandable;
    int64_t learned_reserve; /* the reserve that learns (ledger_reserve.c); 0 when off */
} vg_snap;

/* Per-call overrides; -1 = not given. */
typedef struct {
    int64_t reserve; /* a floor: the effective reserve is max(configured, probe's, this) */
    int64_t card;    /* "a card of this many bytes": total = free = card, nothing used */
} vg_override;
#define VG_NO_OVERRIDE ((vg_override){-1, -1})

/* Saturating byte arithmetic: absurd inputs clamp instead of wrapping. */
static inline int64_t vg_sat_add(int64_t a, int64_t b)
{
    int64_t r;
    return __builtin_add_overflow(a, b, &r) ? (b > 0 ? INT64_MAX : INT64_MIN) : r;
}
static inline int64_t vg_sat_sub(int64_t a, int64_t b)
{
    int64_t r;
    return __builtin_sub_overflow(a, b, &r) ? (b < 0 ? INT64_MAX : INT64_MIN) : r;
}

/* The budget: computed here and nowhere else (see README "The budget"). */
int64_t vg_budget(const vg_snap *s);

/* With the GIL: source read (GIL released) + limits + probe + overrides -> full snapshot.
 * index >= 0 is a device, VG_HOST host RAM.  -1 with an exception. */
int vg_snapshot(vg_state *st, int index, const vg_override *ov, vg_snap *s);
PyObject *vg_snap_to_py(vg_state *st, const vg_snap *s);
/* A Snapshot, or a mapping with its field names.  -1 with TypeError/ValueError naming the
 * field; runs no Python code of the values (mapping lookups aside). */
int vg_snap_from_py(vg_state *st, PyObject *obj, vg_snap *s);

int vg_snapshot_add_types(PyObject *m, vg_state *st);
extern PyMethodDef vg_snapshot_methods[];

#endif
