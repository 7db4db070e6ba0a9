/* vg_ledger.h — the shared ledger: one GPU, many cooperating processes.
 *
 *   ledger.c          the shared region, its validation, the sequence lock, the sweep of dead
 *                     slots, plans, and the cached per-device sums budget reads use (no Python)
 *   ledger_reserve.c  the reserve that learns from what the other applications were seen using
 *                     (no Python)
 *   ledger_py.c       the Python face of both (registered by module.c)
 *
 * A small file in /dev/shm, one slot per participating process: measured and planned bytes
 * per device, host RAM held.  The snapshot layer asks it, once per reading, how much the
 * OTHER participants have planned but not yet allocated; vg_budget subtracts that, so the
 * participants' budgets add up to at most free - reserve.
 *
 * Everything declared here is GIL-free and takes the ledger's own lock.  Opt-in: nothing
 * happens until vg_ledger_join(). */
#ifndef VG_LEDGER_H
#define VG_LEDGER_H

#include "vg_sources.h"

#include <stdint.h>

#define VG_LEDGER_SLOTS 64 /* participating processes per machine (per uid) */
#define VG_LEDGER_DEVS 16  /* devices per slot; higher indices are not ledgered */
#define VG_LEDGER_PATH_MAX 4096
/* The layout version; it is also in the default file name (/dev/shm/vramguard-<uid>-v<N>), so a
 * region left by an older build (other layout) never blocks a newer one after an upgrade. */
#define VG_LEDGER_VERSION 2u
/* By default a budget read re-checks the file (fstat) and polls the participants' pidfds at
 * most this often; in between it answers from sums cached per header generation.  Joining
 * with revalidate_s = 0 checks on every read (the benchmark's rival: what it cost before). */
#define VG_LEDGER_REVALIDATE_S 0.020

/* ---------------------------------------------------------------- budget reads (snapshot.c) */

/* What the OTHER live participants hold on device `index`: `planned`, planned but not yet
 * allocated (saturating sum of max(0, max(planned, pending) - used)), and `used`, their
 * measured use.  Both 0 when not joined (one atomic load), for host RAM and for indices >=
 * VG_LEDGER_DEVS.  Answered from a cache that is recomputed when the region's generation
 * word changes (any slot write bumps it) or VG_LEDGER_REVALIDATE_S has passed. */
void vg_ledger_others(int index, int64_t *planned, int64_t *used);
/* Records this process's measured use (`process_used` >= 0; for VG_HOST its RSS). */
void vg_ledger_publish(int index, int64_t process_used);

/* ---------------------------------------------------------------- the Python face's calls */

typedef struct {
    int joined, slot;
    long long swept;
    double revalidate_s;
    unsigned long long generation; /* the region's generation word (0 when not joined) */
    long long rejoins; /* times the path named a new file and this process followed */
    char path[VG_LEDGER_PATH_MAX], reason[VG_REASON];
} vg_ledger_status;

typedef struct {
    int64_t pid, start, host_rss, host_pinned;
    int slot, self;
    int64_t used[VG_LEDGER_DEVS], planned[VG_LEDGER_DEVS], pending[VG_LEDGER_DEVS],
        outstanding[VG_LEDGER_DEVS]; /* clamped to >= 0 */
} vg_ledger_part;

/* Join (idempotent) / leave; the status after.  Never fails loudly: a refused region leaves
 * joined = 0 and the reason. */
void vg_ledger_join(const char *path, double revalidate_s, vg_ledger_status *out);
void vg_ledger_leave(void);
/* The status after a full check of the region (a corrupted one is dropped here). */
void vg_ledger_get_status(vg_ledger_status *out);
/* Live participants after a sweep, into `out` (VG_LEDGER_SLOTS entries); *n of them;
 * *consistent: every figure held at one instant (retried up to 100 times).  0 not joined. */
int vg_ledger_participants(vg_ledger_part *out, int *n, int *consistent);
int vg_ledger_sweep_now(void); /* slots swept */
/* Plans.  vg_ledger_plan_begin: fit = 0 sets planned = nbytes; fit = 1 publishes nbytes as
 * pending (others count it from now on) behind a full fence; returns 0 when not joined,
 * else 1 and the old plan.  vg_ledger_plan_set: planned/pending of device d (0 if the
 * region went away meanwhile, 1 done).  d < 0 in vg_ledger_plan_clear: every device. */
int vg_ledger_plan_begin(int d, int64_t nbytes, int fit, int64_t *old_planned,
                         int64_t *old_pending);
int vg_ledger_plan_set(int d, int64_t planned, int64_t pending);
void vg_ledger_plan_clear(int d);
/* Host RAM this process holds (bytes; < 0 leaves a figure as it is). */
void vg_ledger_host(int64_t rss, int64_t pinned);
int vg_ledger_joined(void);
uint64_t vg_ledger_region_size(void);

/* ---------------------------------------------------------------- the reserve that learns */

typedef struct {
    int enabled;
    double window_s; /* how far back the peak is kept */
    int64_t margin;  /* bytes added on top */
} vg_learn_cfg;

typedef struct {
    int enabled, known;  /* known: at least one reading could tell ours from theirs */
    int64_t reserve;     /* the learned reserve now (0 when off or unknown) */
    int64_t peak, now;   /* the others' recent peak and their latest figure */
    int64_t margin;
    double window_s, age_s; /* age of the latest sample */
    int64_t samples;
    char reason[VG_REASON];
} vg_learn_view;

/* Feed one reading of device `index`: `used` (device-wide), `ours` (this process, < 0
 * unknown: the sample is skipped), `participants` (the other participants' measured use).
 * Returns the learned reserve to join the reserve rule's max (0 when off). */
int64_t vg_learn_feed(int index, int64_t used, int64_t ours, int64_t participants, double now);
void vg_learn_configure(const vg_learn_cfg *cfg); /* one setting for every device */
void vg_learn_get(int index, vg_learn_view *out, double now);
void vg_learn_reset(void);

#ifdef Py_PYTHON_H
extern PyMethodDef vg_ledger_methods[];
#endif

#endif
