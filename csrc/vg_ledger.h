/* vg_ledger.h — the shared ledger (ledger.c): one GPU, many cooperating processes.
 *
 * A small file in /dev/shm, one slot per participating process: measured and planned bytes
 * per device, host RAM held.  The snapshot layer asks it, once per reading, how much the
 * OTHER participants have planned but not yet allocated; vg_budget subtracts that, so the
 * participants' budgets add up to at most free - reserve.
 *
 * Layer beside the sources: GIL-free, no Python objects in the C core (the Python face in
 * ledger.c is registered by module.c).  Opt-in: nothing happens until ledger_join(). */
#ifndef VG_LEDGER_H
#define VG_LEDGER_H

#include "vg_state.h"

#include <stdint.h>

#define VG_LEDGER_SLOTS 64 /* participating processes per machine (per uid) */
#define VG_LEDGER_DEVS 16  /* devices per slot; higher indices are not ledgered */

/* Called by vg_snapshot() for every source reading, without the GIL; both do nothing (one
 * atomic load) when this process has not joined.
 * vg_ledger_others: sweeps dead slots and returns what the OTHER participants have planned
 * but not yet allocated on device `index` (saturating sum of max(0, max(planned, pending) -
 * used)); 0 for host RAM and for indices >= VG_LEDGER_DEVS.
 * vg_ledger_publish: records this process's measured use (`process_used` >= 0; for VG_HOST
 * its RSS). */
int64_t vg_ledger_others(int index);
void vg_ledger_publish(int index, int64_t process_used);

extern PyMethodDef vg_ledger_methods[];

#endif
