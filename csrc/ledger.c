/* ledger.c — the shared ledger's source half: a per-uid shared-memory file, one slot per
 * process.  No Python here (ledger_py.c is the Python face).
 *
 * Owns: the region's layout and its validation, slot claim and release, the per-slot
 * sequence lock and the header's generation word, the sweep of dead slots, plans (pending ->
 * planned), and the per-device sums budget reads are answered from.
 *
 * Trust: every other process of the same uid can write anything into the region, so every
 * figure read from it is range-checked, every sum saturates, no index is ever read from it
 * (the slot and device counts are ours, compared against the header), and a bad header makes
 * us drop the region with a reason instead of reading on.  A path that names another file
 * than ours (removed, re-created) is followed: we leave the old file and join the new one.
 *
 * Cost of a budget read: the region is mapped once.  Every slot write ends by bumping the
 * header's generation word; a budget read checks the header (a few loads, no syscall) and
 * answers from per-device sums cached at the generation it last saw.  Only when the
 * generation moved, or VG_LEDGER_REVALIDATE_S passed, does it fstat the file (a truncated
 * shared mapping faults with SIGBUS on access, so the size is checked before any pass over the
 * slots), re-read the slots under their sequence locks and, on the interval, poll the
 * participants' pidfds for deaths.  A death writes nothing, so a SIGKILLed participant's plan
 * keeps shrinking budgets for at most that interval (never growing them); an explicit sweep
 * (ledger_sweep, ledger_participants) polls at once.
 *
 * Liveness: a slot names pid + start time (/proc/<pid>/stat field 22).  A slot is verified
 * once by reading /proc and opening a pidfd; after that one poll() over all pidfds tells which
 * participants exited (zombies included), and a reused pid can never look alive (the pidfd
 * names the process, not the number).
 *
 * Plans are published as `pending`, checked against the budget after a full fence, and only
 * then committed to `planned`: two processes planning at once either see each other or one of
 * them sees the other (Dekker; the generation word is the location both RMW), so committed
 * plans never add up to more than free - reserve. */
#include "vg_ledger.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define LEDGER_MAGIC 0x315244474c475656ULL /* "VVGLGDR1" */
/* 2: the header's generation word (a version-1 writer would not bump it, and a reader caching
 * by it would miss that writer's plans) */
#define LEDGER_VERSION VG_LEDGER_VERSION
#define SEQ_TRIES 256

static int64_t sat_add(int64_t a, int64_t b)
{
    int64_t r;
    return __builtin_add_overflow(a, b, &r) ? (b > 0 ? INT64_MAX : INT64_MIN) : r;
}

/* ================================================================ layout */

typedef struct {
    _Atomic int64_t used, planned, pending;
} ledger_dev;

typedef struct {
    _Alignas(64) _Atomic uint64_t seq; /* odd while the owner writes */
    _Atomic int64_t pid;               /* 0 free, > 0 owner, < 0 being swept by -pid */
    _Atomic int64_t start;             /* owner's start time (clock ticks since boot) */
    _Atomic int64_t host_rss, host_pinned;
    _Atomic int64_t updates;
    ledger_dev dev[VG_LEDGER_DEVS];
} ledger_slot;

typedef struct {
    _Alignas(64) _Atomic uint64_t magic;
    _Atomic uint32_t version, header_size;
    _Atomic uint64_t size;
    _Atomic uint32_t nslots, ndev, slot_size, reserved;
    _Atomic uint64_t gen; /* bumped after every slot write (any process) */
} ledger_header;

typedef struct {
    ledger_header h;
    ledger_slot slot[VG_LEDGER_SLOTS];
} ledger_region;

#define REGION_SIZE ((uint64_t)sizeof(ledger_region))

uint64_t vg_ledger_region_size(void) { return REGION_SIZE; }

/* ================================================================ process-local state */

/* One per process: the slot belongs to the process, not to a module instance.  Guarded by
 * `lock`, created under pthread_once and re-created in a forked child. */
typedef struct {
    pthread_mutex_t lock;
    ledger_region *reg;
    int fd;
    pid_t owner; /* the process that joined; a forked child is not it */
    uid_t euid;  /* ours, read at join (the region must belong to it) */
    int slot;
    int64_t start;
    char path[VG_LEDGER_PATH_MAX];
    char reason[VG_REASON]; /* why we are not joined (or the last problem seen) */
    /* liveness cache, per slot: the (pid, start) verified and its pidfd */
    int64_t vpid[VG_LEDGER_SLOTS], vstart[VG_LEDGER_SLOTS];
    int pidfd[VG_LEDGER_SLOTS];
    int no_pidfd; /* kernel without pidfd_open: re-read /proc on every sweep */
    _Atomic int joined; /* lets the not-joined reading path skip the lock */
    int64_t swept_total;
    int64_t rejoins; /* times the path named a new file and we followed */
    /* what budget reads answer from: the others' sums at generation `cgen`, last fully
     * validated (fstat + poll) at `cval_at` (coarse monotonic seconds) */
    int cvalid;
    uint64_t cgen;
    double cval_at, reval_s;
    int64_t cplanned[VG_LEDGER_DEVS], cused[VG_LEDGER_DEVS];
    /* our own published figures (so an unchanged one is not written, nor our slot touched) */
    int64_t my_used[VG_LEDGER_DEVS];
} ledger_local;

static ledger_local L;
static pthread_once_t L_once = PTHREAD_ONCE_INIT;

static void local_reset_fds(void)
{
    for (int k = 0; k < VG_LEDGER_SLOTS; k++) {
        L.pidfd[k] = -1;
        L.vpid[k] = L.vstart[k] = 0;
    }
}

static void cache_reset(void)
{
    L.cvalid = 0;
    L.cgen = 0;
    L.cval_at = 0;
    for (int d = 0; d < VG_LEDGER_DEVS; d++)
        L.cplanned[d] = L.cused[d] = 0, L.my_used[d] = -1;
}

static void after_fork_child(void)
{
    /* Only the forking thread survives: the lock may have been held; the slot is the
     * parent's.  The child keeps nothing: it must join on its own. */
    pthread_mutex_init(&L.lock, NULL);
    if (L.reg != NULL && L.owner != getpid()) {
        munmap(L.reg, sizeof(ledger_region));
        L.reg = NULL;
        atomic_store(&L.joined, 0);
        if (L.fd >= 0)
            close(L.fd);
        L.fd = -1;
        for (int k = 0; k < VG_LEDGER_SLOTS; k++)
            if (L.pidfd[k] >= 0)
                close(L.pidfd[k]);
        local_reset_fds();
        cache_reset();
        L.slot = -1;
        snprintf(L.reason, VG_REASON, "forked child: not joined (call ledger_join)");
    }
}

static void local_init(void)
{
    pthread_mutex_init(&L.lock, NULL);
    L.fd = -1;
    L.slot = -1;
    local_reset_fds();
    cache_reset();
    snprintf(L.reason, VG_REASON, "not joined (opt-in: ledger_join())");
    L.reval_s = VG_LEDGER_REVALIDATE_S;
    pthread_atfork(NULL, NULL, after_fork_child);
}

static void lock_local(void)
{
    pthread_once(&L_once, local_init);
    pthread_mutex_lock(&L.lock);
}

static void unlock_local(void) { pthread_mutex_unlock(&L.lock); }

/* Coarse monotonic seconds: a vDSO read of the tick clock, a few ns (the interval it times
 * is tens of ms). */
static double coarse_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ================================================================ /proc and pidfds */

/* State letter and start time (field 22) of `pid`; -1 if it does not exist. */
static int read_stat(int64_t pid, char *state, int64_t *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    /* comm (field 2) may hold spaces and ')': fields resume after the last ')' */
    char *p = strrchr(buf, ')');
    if (p == NULL || p[1] != ' ')
        return -1;
    p += 2;
    *state = *p;
    /* p is at field 3; field 22 is 19 spaces further */
    for (int f = 3; f < 22; f++) {
        p = strchr(p, ' ');
        if (p == NULL)
            return -1;
        p++;
    }
    char *end;
    long long v = strtoll(p, &end, 10);
    if (end == p || v < 0)
        return -1;
    *start = v;
    return 0;
}

static int open_pidfd(int64_t pid)
{
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
#else
    (void)pid;
    errno = ENOSYS;
    return -1;
#endif
}

static void drop_pidfd(int k)
{
    if (L.pidfd[k] >= 0)
        close(L.pidfd[k]);
    L.pidfd[k] = -1;
    L.vpid[k] = L.vstart[k] = 0;
}

/* ================================================================ sequence lock */

typedef struct {
    int64_t pid, start, host_rss, host_pinned;
    int64_t used[VG_LEDGER_DEVS], planned[VG_LEDGER_DEVS], pending[VG_LEDGER_DEVS];
} slot_view;

static void load_slot(const ledger_slot *s, slot_view *v)
{
    v->pid = atomic_load_explicit(&s->pid, memory_order_relaxed);
    v->start = atomic_load_explicit(&s->start, memory_order_relaxed);
    v->host_rss = atomic_load_explicit(&s->host_rss, memory_order_relaxed);
    v->host_pinned = atomic_load_explicit(&s->host_pinned, memory_order_relaxed);
    for (int d = 0; d < VG_LEDGER_DEVS; d++) {
        v->used[d] = atomic_load_explicit(&s->dev[d].used, memory_order_relaxed);
        v->planned[d] = atomic_load_explicit(&s->dev[d].planned, memory_order_relaxed);
        v->pending[d] = atomic_load_explicit(&s->dev[d].pending, memory_order_relaxed);
    }
}

/* A consistent copy of slot k: 0.  -1 when it never held still (its writer was preempted
 * mid-write, or a foreign process left `seq` odd): then `v` holds an unvalidated copy with
 * `used` taken as 0, so the slot's plans still count in full: an unreadable slot may shrink
 * budgets, never grow them. */
static int read_slot(const ledger_slot *s, slot_view *v, uint64_t *seq_out)
{
    for (int tries = 0; tries < SEQ_TRIES; tries++) {
        if (tries >= 32)
            sched_yield();
        uint64_t a = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (a & 1)
            continue;
        load_slot(s, v);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&s->seq, memory_order_relaxed) == a) {
            *seq_out = a;
            return 0;
        }
    }
    load_slot(s, v);
    for (int d = 0; d < VG_LEDGER_DEVS; d++)
        v->used[d] = 0;
    *seq_out = 1; /* odd: never equal to a later even read, so never "consistent" */
    return -1;
}

static void write_begin(ledger_slot *s)
{
    uint64_t q = atomic_load_explicit(&s->seq, memory_order_relaxed);
    atomic_store_explicit(&s->seq, (q | 1) + ((q & 1) ? 2 : 0), memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
}

/* Ends a write of host figures only: they are not in the cached per-device sums, so no
 * generation bump (a monitor reading host RAM every second must not make every other
 * participant's next budget read re-sum the slots). */
static void write_end_host(ledger_slot *s)
{
    uint64_t q = atomic_load_explicit(&s->seq, memory_order_relaxed);
    atomic_store_explicit(&s->seq, (q | 1) + 1, memory_order_release);
}

/* Ends the write and bumps the generation, so cached sums everywhere are recomputed.  Our
 * own writes do not change the OTHERS' sums: when our cache was current just before, it
 * stays current (the RMW tells whether anyone else's bump came in between). */
static void write_end(ledger_slot *s)
{
    write_end_host(s);
    uint64_t old = atomic_fetch_add_explicit(&L.reg->h.gen, 1, memory_order_seq_cst);
    if (L.cvalid && old == L.cgen && s == &L.reg->slot[L.slot])
        L.cgen = old + 1;
}

/* Every figure of slot `s` to 0 and its start time to `start`, inside one sequence-lock write
 * (reclaiming a dead slot, joining, leaving). */
static void reset_slot(ledger_slot *s, int64_t start)
{
    write_begin(s);
    atomic_store_explicit(&s->start, start, memory_order_relaxed);
    atomic_store_explicit(&s->host_rss, 0, memory_order_relaxed);
    atomic_store_explicit(&s->host_pinned, 0, memory_order_relaxed);
    for (int d = 0; d < VG_LEDGER_DEVS; d++) {
        atomic_store_explicit(&s->dev[d].used, 0, memory_order_relaxed);
        atomic_store_explicit(&s->dev[d].planned, 0, memory_order_relaxed);
        atomic_store_explicit(&s->dev[d].pending, 0, memory_order_relaxed);
    }
    write_end(s);
}

/* Byte figures from the region: negative or absurd values count as 0 / the maximum. */
static int64_t clamp_bytes(int64_t x) { return x < 0 ? 0 : x; }

static int64_t outstanding(const slot_view *v, int d)
{
    int64_t p = clamp_bytes(v->planned[d]), q = clamp_bytes(v->pending[d]);
    int64_t o = (p > q ? p : q) - clamp_bytes(v->used[d]); /* both >= 0: cannot overflow */
    return o < 0 ? 0 : o;
}

/* ================================================================ validation */

/* Drop the region (lock held): not joined any more; `msg` says why. */
static void drop_region(const char *msg)
{
    char m[VG_REASON];
    snprintf(m, sizeof m, "%.200s", msg); /* msg may point into L.reason */
    snprintf(L.reason, VG_REASON, "ledger %.100s ignored: %.130s", L.path, m);
    if (L.reg != NULL)
        munmap(L.reg, sizeof(ledger_region));
    L.reg = NULL;
    atomic_store(&L.joined, 0);
    if (L.fd >= 0)
        close(L.fd);
    L.fd = -1;
    L.slot = -1;
    for (int k = 0; k < VG_LEDGER_SLOTS; k++)
        drop_pidfd(k);
    cache_reset();
}

/* 0 when the header is ours; else -1 with the message in `msg`.  Loads only: this runs on
 * every budget read. */
static int header_bad(const ledger_header *h, char *msg)
{
    uint64_t magic = atomic_load_explicit(&h->magic, memory_order_acquire);
    uint32_t ver = atomic_load_explicit(&h->version, memory_order_relaxed);
    if (magic != LEDGER_MAGIC) {
        snprintf(msg, VG_REASON, "bad magic 0x%016llx", (unsigned long long)magic);
        return -1;
    }
    if (ver != LEDGER_VERSION) {
        snprintf(msg, VG_REASON, "version %u, this build speaks %u", ver, LEDGER_VERSION);
        return -1;
    }
    if (atomic_load_explicit(&h->size, memory_order_relaxed) != REGION_SIZE ||
        atomic_load_explicit(&h->header_size, memory_order_relaxed) != sizeof(ledger_header) ||
        atomic_load_explicit(&h->nslots, memory_order_relaxed) != VG_LEDGER_SLOTS ||
        atomic_load_explicit(&h->ndev, memory_order_relaxed) != VG_LEDGER_DEVS ||
        atomic_load_explicit(&h->slot_size, memory_order_relaxed) != sizeof(ledger_slot)) {
        snprintf(msg, VG_REASON, "layout (size %llu, %u slots x %u devices) is not this build's",
                 (unsigned long long)atomic_load_explicit(&h->size, memory_order_relaxed),
                 atomic_load_explicit(&h->nslots, memory_order_relaxed),
                 atomic_load_explicit(&h->ndev, memory_order_relaxed));
        return -1;
    }
    return 0;
}

/* The file behind the mapping must still be ours and whole: a truncated shared mapping
 * faults (SIGBUS) on access, so the size is checked before any pass over the slots. */
static int file_bad(int fd, char *msg, struct stat *out)
{
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        snprintf(msg, VG_REASON, "fstat: %s", strerror(errno));
        return -1;
    }
    if (!S_ISREG(sb.st_mode)) {
        snprintf(msg, VG_REASON, "not a regular file");
        return -1;
    }
    if (sb.st_uid != L.euid) {
        snprintf(msg, VG_REASON, "owned by uid %u, not %u", (unsigned)sb.st_uid,
                 (unsigned)L.euid);
        return -1;
    }
    if (sb.st_mode & 077) {
        snprintf(msg, VG_REASON, "mode %03o, expected 0600", (unsigned)(sb.st_mode & 0777));
        return -1;
    }
    if ((uint64_t)sb.st_size != REGION_SIZE) {
        snprintf(msg, VG_REASON, "size %lld, expected %llu", (long long)sb.st_size,
                 (unsigned long long)REGION_SIZE);
        return -1;
    }
    if (out != NULL)
        *out = sb;
    return 0;
}

static int join_locked(const char *path, double revalidate_s);
static void leave_locked(void);

/* Whether the path names another file than ours now: removed (a clean-up), or removed and
 * re-created.  Whoever joins from now on meets at the path, so we follow them there. */
static int replaced(const struct stat *ours)
{
    struct stat now;
    return stat(L.path, &now) != 0 || now.st_dev != ours->st_dev || now.st_ino != ours->st_ino;
}

/* Lock held: 0 when the region may be read and written (file, header and our slot checked),
 * else it was dropped.  Every entry point but the cached budget read pays this. */
static int check_region(void)
{
    if (L.reg == NULL)
        return -1;
    char msg[VG_REASON];
    struct stat sb;
    /* A forked child was already detached by after_fork_child (pthread_atfork). */
    if (file_bad(L.fd, msg, &sb) < 0 || header_bad(&L.reg->h, msg) < 0) {
        drop_region(msg);
        return -1;
    }
    if (replaced(&sb)) { /* leave the old file (its remaining readers stop counting us) */
        char path[VG_LEDGER_PATH_MAX];
        double rv = L.reval_s;
        memcpy(path, L.path, sizeof path);
        leave_locked();
        L.rejoins++;
        return join_locked(path, rv);
    }
    ledger_slot *me = &L.reg->slot[L.slot];
    int64_t who = atomic_load_explicit(&me->pid, memory_order_relaxed);
    if (who != (int64_t)L.owner) {
        snprintf(msg, sizeof msg, "our slot %d now names pid %lld (region overwritten)", L.slot,
                 (long long)who);
        drop_region(msg);
        return -1;
    }
    return 0;
}

/* ================================================================ sweep */

/* Take a dead slot out: only the sweeper whose CAS wins zeroes it. */
static int reclaim(int k, int64_t pid)
{
    ledger_slot *s = &L.reg->slot[k];
    int64_t expect = pid;
    if (!atomic_compare_exchange_strong(&s->pid, &expect, -(int64_t)L.owner))
        return 0;
    reset_slot(s, 0);
    atomic_store_explicit(&s->pid, 0, memory_order_release);
    drop_pidfd(k);
    L.swept_total++;
    return 1;
}

/* Is the slot's (pid, start) a live process?  Verifies uncached pairs (one /proc read and
 * a pidfd); cached ones are answered by the poll in sweep(). 1 alive, 0 dead. */
static int verify(int k, int64_t pid, int64_t start)
{
    if (pid == L.vpid[k] && start == L.vstart[k] && L.pidfd[k] >= 0)
        return 1;
    drop_pidfd(k);
    int fd = -1;
    if (!L.no_pidfd) {
        fd = open_pidfd(pid);
        if (fd < 0 && errno == ESRCH)
            return 0;
        if (fd < 0 && (errno == ENOSYS || errno == EPERM))
            L.no_pidfd = 1;
    }
    char state;
    int64_t st;
    /* after the pidfd: if the pid was reused in between, the pidfd names the dead one */
    if (read_stat(pid, &state, &st) < 0 || state == 'Z' || state == 'X' ||
        (start != 0 && st != start)) {
        if (fd >= 0)
            close(fd);
        return 0;
    }
    if (start == 0) { /* claimed, start not yet written: alive, verify again next time */
        if (fd >= 0)
            close(fd);
        return 1;
    }
    if (fd >= 0) {
        L.pidfd[k] = fd;
        L.vpid[k] = pid, L.vstart[k] = start;
    }
    return 1;
}

/* Lock held, region checked.  Sweeps dead slots and fills `alive` (1 for slots owned by a
 * live participant, ourselves included) and `views`.  `with_poll`: also poll the verified
 * participants' pidfds (the one syscall that notices deaths).  Returns how many were swept. */
static int sweep(slot_view *views, uint64_t *seqs, unsigned char *alive, int with_poll)
{
    struct pollfd pfd[VG_LEDGER_SLOTS];
    int pk[VG_LEDGER_SLOTS], np = 0, swept = 0;
    for (int k = 0; k < VG_LEDGER_SLOTS; k++) {
        alive[k] = 0;
        ledger_slot *s = &L.reg->slot[k];
        int64_t pid = atomic_load_explicit(&s->pid, memory_order_acquire);
        if (pid == 0)
            continue;
        if (pid < 0 || pid > INT32_MAX) {
            /* a sweep in progress (by -pid), or garbage: reclaim when that sweeper is gone */
            int64_t sw = pid < 0 && pid >= -(int64_t)INT32_MAX ? -pid : 0;
            if (sw == 0 || (kill((pid_t)sw, 0) != 0 && errno == ESRCH))
                swept += reclaim(k, pid);
            continue;
        }
        (void)read_slot(s, &views[k], &seqs[k]); /* unreadable: counted conservatively */
        if (views[k].pid != pid)
            continue; /* freed or re-claimed between the two loads: look next time */
        if (k == L.slot) {
            alive[k] = 1;
            continue;
        }
        if (!verify(k, pid, views[k].start)) {
            swept += reclaim(k, pid);
            continue;
        }
        alive[k] = 1;
        if (with_poll && L.pidfd[k] >= 0) {
            pfd[np].fd = L.pidfd[k], pfd[np].events = POLLIN, pfd[np].revents = 0;
            pk[np++] = k;
        }
    }
    if (np > 0 && poll(pfd, (nfds_t)np, 0) > 0) {
        for (int i = 0; i < np; i++)
            if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL)) {
                int k = pk[i];
                alive[k] = 0;
                swept += reclaim(k, views[k].pid);
            }
    }
    if (L.no_pidfd == 1) /* no pidfds: verify() re-reads /proc each time */
        for (int k = 0; k < VG_LEDGER_SLOTS; k++)
            L.vpid[k] = L.vstart[k] = 0;
    return swept;
}

/* Lock held, region checked: a sweep (with the poll) and the others' sums recomputed at the
 * generation loaded before reading any slot (a write landing during the pass bumps it past
 * that, so the next read recomputes).  Returns how many were swept. */
static int refresh_sums(int with_poll, slot_view *views, uint64_t *seqs, unsigned char *alive)
{
    uint64_t g = atomic_load_explicit(&L.reg->h.gen, memory_order_acquire);
    int swept = sweep(views, seqs, alive, with_poll);
    for (int d = 0; d < VG_LEDGER_DEVS; d++) {
        int64_t p = 0, u = 0;
        for (int k = 0; k < VG_LEDGER_SLOTS; k++)
            if (alive[k] && k != L.slot) {
                p = sat_add(p, outstanding(&views[k], d));
                u = sat_add(u, clamp_bytes(views[k].used[d]));
            }
        L.cplanned[d] = p, L.cused[d] = u;
    }
    if (swept == 0)
        L.cgen = g;
    L.cvalid = swept == 0; /* after reclaims, recompute next time from a settled region */
    return swept;
}

/* refresh_sums with its scratch on the stack. */
static int sweep_refresh(int with_poll)
{
    slot_view views[VG_LEDGER_SLOTS];
    uint64_t seqs[VG_LEDGER_SLOTS];
    unsigned char alive[VG_LEDGER_SLOTS];
    return refresh_sums(with_poll, views, seqs, alive);
}

/* ================================================================ budget reads */

void vg_ledger_others(int index, int64_t *planned, int64_t *used)
{
    *planned = *used = 0;
    pthread_once(&L_once, local_init);
    if (!atomic_load_explicit(&L.joined, memory_order_relaxed))
        return; /* not joined, the common case: costs one load */
    if (index < 0 || index >= VG_LEDGER_DEVS)
        return;
    lock_local();
    if (L.reg == NULL)
        goto out;
    double now = coarse_now();
    if (!(now - L.cval_at < L.reval_s) || now < L.cval_at) {
        /* the slow path, every reval_s: file, header, our slot, deaths */
        if (check_region() < 0)
            goto out;
        sweep_refresh(1);
        L.cval_at = now;
    } else {
        char msg[VG_REASON];
        if (header_bad(&L.reg->h, msg) < 0) { /* a replaced or scribbled header: at once */
            drop_region(msg);
            goto out;
        }
        uint64_t g = atomic_load_explicit(&L.reg->h.gen, memory_order_acquire);
        if (!L.cvalid || g != L.cgen) {
            if (check_region() < 0) /* slots are about to be read: the file must be whole */
                goto out;
            sweep_refresh(0);
        }
    }
    *planned = L.cplanned[index];
    *used = L.cused[index];
out:
    unlock_local();
}

static void publish_used(int d, int64_t used)
{
    ledger_slot *me = &L.reg->slot[L.slot];
    write_begin(me);
    atomic_store_explicit(&me->dev[d].used, used, memory_order_relaxed);
    write_end(me);
    L.my_used[d] = used;
}

static void publish_host(int64_t rss, int64_t pinned)
{
    ledger_slot *me = &L.reg->slot[L.slot];
    write_begin(me);
    if (rss >= 0)
        atomic_store_explicit(&me->host_rss, rss, memory_order_relaxed);
    if (pinned >= 0)
        atomic_store_explicit(&me->host_pinned, pinned, memory_order_relaxed);
    write_end_host(me);
}

void vg_ledger_publish(int index, int64_t process_used)
{
    pthread_once(&L_once, local_init);
    if (!atomic_load_explicit(&L.joined, memory_order_relaxed) || process_used < 0)
        return;
    if (index != VG_HOST && (index < 0 || index >= VG_LEDGER_DEVS))
        return;
    lock_local();
    /* unchanged (the usual case): nothing written, the region not even touched */
    if (L.reg != NULL && (index == VG_HOST || L.my_used[index] != process_used) &&
        check_region() == 0) {
        if (index == VG_HOST)
            publish_host(process_used, -1);
        else
            publish_used(index, process_used);
    }
    unlock_local();
}

/* ================================================================ join / leave */

static int64_t own_start(void)
{
    char state;
    int64_t st;
    return read_stat(getpid(), &state, &st) == 0 ? st : 0;
}

/* Lock held.  0 joined, -1 with L.reason (not an error: the ledger is opt-in and stays off). */
static int join_locked(const char *path, double revalidate_s)
{
    if (L.reg != NULL && L.owner == getpid())
        return 0; /* already joined */
    L.reval_s = revalidate_s;
    /* absolute: the path is looked at again (replaced()) after the cwd may have changed */
    size_t np = strlen(path), nc = 0;
    if (path[0] != '/' && getcwd(L.path, sizeof L.path) != NULL &&
        (nc = strlen(L.path)) < sizeof L.path - 1 - np) {
        L.path[nc] = '/';
        memcpy(L.path + nc + 1, path, np + 1);
    } else {
        snprintf(L.path, sizeof L.path, "%s", path);
    }
    path = L.path;
    local_reset_fds();
    cache_reset();
    L.euid = geteuid();
    int fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(L.reason, VG_REASON, "ledger %.200s ignored: open: %s", path, strerror(errno));
        return -1;
    }
    L.fd = fd;
    /* Creation race: the first to take the lock sizes and stamps the header; the magic is
     * written last, so a reader sees a whole header or a bad magic. */
    char msg[VG_REASON];
    /* Non-blocking, bounded: a process sitting on the lock must not hang our join. */
    int locked = -1;
    for (int i = 0; i < 200 && locked != 0; i++) {
        locked = flock(fd, LOCK_EX | LOCK_NB);
        if (locked != 0 && errno != EWOULDBLOCK)
            break;
        if (locked != 0)
            usleep(5000);
    }
    if (locked != 0) {
        snprintf(msg, sizeof msg, "flock: %s", strerror(errno));
        drop_region(msg);
        return -1;
    }
    struct stat sb;
    /* Only a file that is ours in every way is stamped: an empty file someone else made
     * readable (mode) is refused below like any foreign one. */
    if (fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_size == 0 &&
        sb.st_uid == geteuid() && (sb.st_mode & 077) == 0) {
        if (ftruncate(fd, (off_t)REGION_SIZE) != 0) {
            snprintf(msg, sizeof msg, "ftruncate: %s", strerror(errno));
            flock(fd, LOCK_UN);
            drop_region(msg);
            return -1;
        }
        ledger_region *r =
            mmap(NULL, sizeof(ledger_region), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (r != MAP_FAILED) {
            atomic_store(&r->h.version, LEDGER_VERSION);
            atomic_store(&r->h.header_size, (uint32_t)sizeof(ledger_header));
            atomic_store(&r->h.size, REGION_SIZE);
            atomic_store(&r->h.nslots, VG_LEDGER_SLOTS);
            atomic_store(&r->h.ndev, VG_LEDGER_DEVS);
            atomic_store(&r->h.slot_size, (uint32_t)sizeof(ledger_slot));
            atomic_store_explicit(&r->h.magic, LEDGER_MAGIC, memory_order_release);
            munmap(r, sizeof(ledger_region));
        }
    }
    flock(fd, LOCK_UN);
    if (file_bad(fd, msg, NULL) < 0) {
        drop_region(msg);
        return -1;
    }
    L.reg = mmap(NULL, sizeof(ledger_region), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (L.reg == MAP_FAILED) {
        L.reg = NULL;
        snprintf(msg, sizeof msg, "mmap: %s", strerror(errno));
        drop_region(msg);
        return -1;
    }
    if (header_bad(&L.reg->h, msg) < 0) {
        drop_region(msg);
        return -1;
    }
    L.owner = getpid();
    L.start = own_start();
    /* Sweep first so the slots of the dead are free, then claim one by CAS on its pid. */
    L.slot = -1;
    slot_view views[VG_LEDGER_SLOTS];
    uint64_t seqs[VG_LEDGER_SLOTS];
    unsigned char alive[VG_LEDGER_SLOTS];
    sweep(views, seqs, alive, 1);
    for (int k = 0; k < VG_LEDGER_SLOTS && L.slot < 0; k++) {
        int64_t expect = 0;
        if (atomic_compare_exchange_strong(&L.reg->slot[k].pid, &expect, (int64_t)L.owner))
            L.slot = k;
    }
    if (L.slot < 0) {
        snprintf(msg, sizeof msg, "all %d slots are taken by live processes", VG_LEDGER_SLOTS);
        drop_region(msg);
        return -1;
    }
    ledger_slot *me = &L.reg->slot[L.slot];
    atomic_store_explicit(&me->updates, 0, memory_order_relaxed);
    reset_slot(me, L.start);
    L.reason[0] = 0;
    atomic_store(&L.joined, 1);
    return 0;
}

static void leave_locked(void)
{
    if (L.reg != NULL && L.owner == getpid() && L.slot >= 0) {
        ledger_slot *me = &L.reg->slot[L.slot];
        int64_t expect = (int64_t)L.owner;
        /* mark it ours-being-released, zero it, free it: same order as a sweep */
        if (atomic_compare_exchange_strong(&me->pid, &expect, -(int64_t)L.owner)) {
            reset_slot(me, 0);
            atomic_store_explicit(&me->pid, 0, memory_order_release);
        }
    }
    drop_region("left");
    snprintf(L.reason, VG_REASON, "not joined (left)");
}

/* ================================================================ the Python face's calls */

static void status_locked(vg_ledger_status *c)
{
    c->joined = L.reg != NULL && L.owner == getpid();
    c->slot = c->joined ? L.slot : -1;
    c->swept = (long long)L.swept_total;
    c->revalidate_s = L.reval_s;
    c->rejoins = (long long)L.rejoins;
    c->generation = c->joined ? atomic_load_explicit(&L.reg->h.gen, memory_order_acquire) : 0;
    memcpy(c->path, L.path, sizeof c->path);
    memcpy(c->reason, c->joined ? "" : L.reason, c->joined ? 1 : sizeof c->reason);
}

void vg_ledger_join(const char *path, double revalidate_s, vg_ledger_status *out)
{
    lock_local();
    (void)join_locked(path, revalidate_s);
    status_locked(out);
    unlock_local();
}

void vg_ledger_leave(void)
{
    lock_local();
    if (L.reg != NULL)
        leave_locked();
    unlock_local();
}

void vg_ledger_get_status(vg_ledger_status *out)
{
    lock_local();
    if (L.reg != NULL)
        (void)check_region(); /* a corrupted region is noticed here too */
    status_locked(out);
    unlock_local();
}

int vg_ledger_joined(void)
{
    pthread_once(&L_once, local_init);
    return atomic_load_explicit(&L.joined, memory_order_relaxed);
}

int vg_ledger_participants(vg_ledger_part *out, int *n, int *consistent)
{
    slot_view *views = malloc(VG_LEDGER_SLOTS * sizeof(slot_view));
    uint64_t seqs[VG_LEDGER_SLOTS];
    unsigned char alive[VG_LEDGER_SLOTS];
    int joined = 0, ok = 0, me = -1;
    *n = 0;
    lock_local();
    if (views != NULL && (joined = check_region() == 0)) {
        me = L.slot;
        for (int tries = 0; tries < 100 && !ok; tries++) {
            refresh_sums(1, views, seqs, alive);
            atomic_thread_fence(memory_order_acquire);
            ok = 1;
            for (int k = 0; k < VG_LEDGER_SLOTS && ok; k++) {
                ledger_slot *s = &L.reg->slot[k];
                int64_t pid = atomic_load_explicit(&s->pid, memory_order_relaxed);
                if (alive[k])
                    ok = atomic_load_explicit(&s->seq, memory_order_relaxed) == seqs[k] &&
                         pid == views[k].pid;
                else if (pid > 0) /* appeared meanwhile, or unreadable */
                    ok = 0;
            }
        }
    }
    unlock_local();
    for (int k = 0; joined && k < VG_LEDGER_SLOTS; k++) {
        if (!alive[k])
            continue;
        const slot_view *v = &views[k];
        vg_ledger_part *p = &out[(*n)++];
        p->pid = v->pid, p->start = v->start, p->slot = k, p->self = k == me;
        p->host_rss = clamp_bytes(v->host_rss), p->host_pinned = clamp_bytes(v->host_pinned);
        for (int d = 0; d < VG_LEDGER_DEVS; d++) {
            p->used[d] = clamp_bytes(v->used[d]);
            p->planned[d] = clamp_bytes(v->planned[d]);
            p->pending[d] = clamp_bytes(v->pending[d]);
            p->outstanding[d] = outstanding(v, d);
        }
    }
    free(views);
    *consistent = ok || !joined;
    return joined;
}

int vg_ledger_sweep_now(void)
{
    int n = 0;
    lock_local();
    if (check_region() == 0)
        n = sweep_refresh(1);
    unlock_local();
    return n;
}

/* Lock held, joined. */
static void set_plan(int d, int64_t planned, int64_t pending)
{
    ledger_slot *me = &L.reg->slot[L.slot];
    write_begin(me);
    atomic_store_explicit(&me->dev[d].planned, planned, memory_order_relaxed);
    atomic_store_explicit(&me->dev[d].pending, pending, memory_order_relaxed);
    write_end(me);
}

int vg_ledger_plan_begin(int d, int64_t nbytes, int fit, int64_t *old_planned,
                         int64_t *old_pending)
{
    lock_local();
    int joined = check_region() == 0;
    if (joined) {
        ledger_slot *me = &L.reg->slot[L.slot];
        *old_planned = atomic_load_explicit(&me->dev[d].planned, memory_order_relaxed);
        *old_pending = atomic_load_explicit(&me->dev[d].pending, memory_order_relaxed);
        if (fit)
            set_plan(d, *old_planned, nbytes); /* tentative: others count it from now on */
        else
            set_plan(d, nbytes, 0);
        /* Dekker: our pending store is globally visible before we read anyone else's */
        atomic_thread_fence(memory_order_seq_cst);
    }
    unlock_local();
    return joined;
}

int vg_ledger_plan_set(int d, int64_t planned, int64_t pending)
{
    lock_local();
    int joined = check_region() == 0;
    if (joined)
        set_plan(d, planned, pending);
    unlock_local();
    return joined;
}

void vg_ledger_plan_clear(int d)
{
    lock_local();
    if (check_region() == 0)
        for (int i = 0; i < VG_LEDGER_DEVS; i++)
            if (d < 0 || i == d)
                set_plan(i, 0, 0);
    unlock_local();
}

void vg_ledger_host(int64_t rss, int64_t pinned)
{
    lock_local();
    if (check_region() == 0)
        publish_host(rss, pinned);
    unlock_local();
}
