/* ledger.c — the shared ledger: a per-uid shared-memory file, one slot per process.
 *
 * Owns: the region's layout and its validation, slot claim and release, the per-slot
 * sequence lock, the sweep of dead slots, plans (pending -> planned), and the Python face
 * (ledger_join/leave/status/plan/clear/participants/sweep/others_planned).
 *
 * Trust: every other process of the same uid can write anything into the region, so every
 * figure read from it is range-checked, every sum saturates, no index is ever read from it
 * (the slot and device counts are ours, compared against the header), and a bad header makes
 * us drop the region with a reason instead of reading on.
 *
 * Liveness: a slot names pid + start time (/proc/<pid>/stat field 22).  A slot is verified
 * once by reading /proc and opening a pidfd; after that one poll() over all pidfds tells which
 * participants exited (zombies included), so a sweep costs one syscall, and a reused pid can
 * never look alive (the pidfd names the process, not the number).
 *
 * Plans are published as `pending`, checked against the budget after a full fence, and only
 * then committed to `planned`: two processes planning at once either see each other or one of
 * them sees the other (Dekker), so committed plans never add up to more than free - reserve. */
#include "vg_ledger.h"
#include "vg_args.h"
#include "vg_snapshot.h"

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
#include <unistd.h>

#define LEDGER_MAGIC 0x315244474c475656ULL /* "VVGLGDR1" */
#define LEDGER_VERSION 1u
#define SEQ_TRIES 256

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
} ledger_header;

typedef struct {
    ledger_header h;
    ledger_slot slot[VG_LEDGER_SLOTS];
} ledger_region;

#define REGION_SIZE ((uint64_t)sizeof(ledger_region))

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
    char path[4096];
    char reason[VG_REASON]; /* why we are not joined (or the last problem seen) */
    /* liveness cache, per slot: the (pid, start) verified and its pidfd */
    int64_t vpid[VG_LEDGER_SLOTS], vstart[VG_LEDGER_SLOTS];
    int pidfd[VG_LEDGER_SLOTS];
    int no_pidfd; /* kernel without pidfd_open: re-read /proc on every sweep */
    _Atomic int joined; /* lets the not-joined reading path skip the lock */
    int64_t swept_total;
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
    snprintf(L.reason, VG_REASON, "not joined (opt-in: ledger_join())");
    pthread_atfork(NULL, NULL, after_fork_child);
}

static void lock_local(void)
{
    pthread_once(&L_once, local_init);
    pthread_mutex_lock(&L.lock);
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

static void write_end(ledger_slot *s)
{
    uint64_t q = atomic_load_explicit(&s->seq, memory_order_relaxed);
    atomic_store_explicit(&s->seq, (q | 1) + 1, memory_order_release);
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
    int64_t o = vg_sat_sub(p > q ? p : q, clamp_bytes(v->used[d]));
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
}

/* 0 when the header is ours; else -1 with the message in `msg`. */
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
 * faults (SIGBUS) on access, so the size is checked before every pass over the slots. */
static int file_bad(int fd, char *msg)
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
    return 0;
}

/* Lock held, joined: 0 when the region may be read, else it was dropped.  `with_stat`: also
 * fstat the file (one syscall); the publish that follows a budget read within the same
 * snapshot skips it, every other entry point pays it. */
static int check_region_ex(int with_stat)
{
    if (L.reg == NULL)
        return -1;
    char msg[VG_REASON];
    /* A forked child was already detached by after_fork_child (pthread_atfork): no getpid()
     * here, this runs on every budget read. */
    if ((with_stat && file_bad(L.fd, msg) < 0) || header_bad(&L.reg->h, msg) < 0) {
        drop_region(msg);
        return -1;
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

static int check_region(void) { return check_region_ex(1); }

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
 * live participant, ourselves included) and `views`.  Returns how many were swept. */
static int sweep(slot_view *views, uint64_t *seqs, unsigned char *alive)
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
        if (L.pidfd[k] >= 0) {
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

/* ================================================================ own slot */

static void publish_used(int d, int64_t used)
{
    ledger_slot *me = &L.reg->slot[L.slot];
    if (atomic_load_explicit(&me->dev[d].used, memory_order_relaxed) == used)
        return; /* unchanged: no seq churn for readers */
    write_begin(me);
    atomic_store_explicit(&me->dev[d].used, used, memory_order_relaxed);
    write_end(me);
}

static void publish_host(int64_t rss, int64_t pinned)
{
    ledger_slot *me = &L.reg->slot[L.slot];
    write_begin(me);
    if (rss >= 0)
        atomic_store_explicit(&me->host_rss, rss, memory_order_relaxed);
    if (pinned >= 0)
        atomic_store_explicit(&me->host_pinned, pinned, memory_order_relaxed);
    write_end(me);
}

static int64_t others_of(const slot_view *views, const unsigned char *alive, int d)
{
    int64_t sum = 0;
    for (int k = 0; k < VG_LEDGER_SLOTS; k++)
        if (alive[k] && k != L.slot)
            sum = vg_sat_add(sum, outstanding(&views[k], d));
    return sum;
}

int64_t vg_ledger_others(int index)
{
    pthread_once(&L_once, local_init);
    if (!atomic_load_explicit(&L.joined, memory_order_relaxed))
        return 0; /* not joined, the common case: costs one load */
    if (index < 0 || index >= VG_LEDGER_DEVS)
        return 0;
    lock_local();
    int64_t r = 0;
    if (check_region() == 0) {
        slot_view views[VG_LEDGER_SLOTS];
        uint64_t seqs[VG_LEDGER_SLOTS];
        unsigned char alive[VG_LEDGER_SLOTS];
        sweep(views, seqs, alive);
        r = others_of(views, alive, index);
    }
    pthread_mutex_unlock(&L.lock);
    return r;
}

void vg_ledger_publish(int index, int64_t process_used)
{
    pthread_once(&L_once, local_init);
    if (!atomic_load_explicit(&L.joined, memory_order_relaxed) || process_used < 0)
        return;
    if (index != VG_HOST && (index < 0 || index >= VG_LEDGER_DEVS))
        return;
    lock_local();
    /* no fstat: vg_snapshot() read the others (and checked the file) just before */
    if (check_region_ex(index == VG_HOST) == 0) {
        if (index == VG_HOST)
            publish_host(process_used, -1);
        else
            publish_used(index, process_used);
    }
    pthread_mutex_unlock(&L.lock);
}

/* ================================================================ join / leave */

static int64_t own_start(void)
{
    char state;
    int64_t st;
    return read_stat(getpid(), &state, &st) == 0 ? st : 0;
}

/* Lock held.  0 joined, -1 with L.reason (not an error: the ledger is opt-in and stays off). */
static int join_locked(const char *path)
{
    if (L.reg != NULL && L.owner == getpid())
        return 0; /* already joined */
    snprintf(L.path, sizeof L.path, "%s", path);
    local_reset_fds();
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
    if (file_bad(fd, msg) < 0) {
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
    sweep(views, seqs, alive);
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

/* ================================================================ pinned host memory */

/* Locked and pinned pages of this process (/proc/self/status VmLck, VmPin; bytes).  Kept apart
 * from the host source: it is read on demand (host_pinned(), the ledger's host figures), not on
 * every host snapshot.  0, or -1 when the file cannot be read. */
static int read_pinned(int64_t *locked, int64_t *pinned)
{
    char buf[4096];
    int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    *locked = *pinned = -1;
    static const char *keys[2] = {"\nVmLck:", "\nVmPin:"};
    int64_t *out[2] = {locked, pinned};
    for (int i = 0; i < 2; i++) {
        const char *p = strstr(buf, keys[i]);
        if (p == NULL)
            continue;
        char *end;
        long long kb = strtoll(p + 7, &end, 10);
        if (end != p + 7 && kb >= 0 && kb < (INT64_MAX >> 10))
            *out[i] = (int64_t)kb << 10;
    }
    return 0;
}

/* ================================================================ Python face */

typedef struct {
    int joined, slot;
    long long swept;
    char path[sizeof L.path], reason[VG_REASON];
} status_copy;

static void status_locked(status_copy *c)
{
    c->joined = L.reg != NULL && L.owner == getpid();
    c->slot = c->joined ? L.slot : -1;
    c->swept = (long long)L.swept_total;
    memcpy(c->path, L.path, sizeof c->path);
    memcpy(c->reason, c->joined ? "" : L.reason, c->joined ? 1 : sizeof c->reason);
}

static PyObject *status_dict(const status_copy *c)
{
    return Py_BuildValue("{s:O,s:s,s:i,s:s,s:i,s:L,s:i,s:i,s:K}", "joined",
                         c->joined ? Py_True : Py_False, "path", c->path, "slot", c->slot,
                         "reason", c->reason, "pid", (int)getpid(), "swept", c->swept, "slots",
                         VG_LEDGER_SLOTS, "devices", VG_LEDGER_DEVS, "size",
                         (unsigned long long)REGION_SIZE);
}

static PyObject *py_ledger_join(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path", NULL};
    PyObject *path_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:ledger_join", kwlist, &path_obj))
        return NULL;
    char path[4096];
    if (path_obj == Py_None) {
        snprintf(path, sizeof path, "/dev/shm/vramguard-%u", (unsigned)geteuid());
    } else {
        if (!PyUnicode_Check(path_obj)) {
            PyErr_Format(PyExc_TypeError, "ledger path must be a str or None, got %.80s",
                         Py_TYPE(path_obj)->tp_name);
            return NULL;
        }
        Py_ssize_t n;
        const char *p = PyUnicode_AsUTF8AndSize(path_obj, &n);
        if (p == NULL)
            return NULL;
        if (n == 0 || (size_t)n >= sizeof path || strlen(p) != (size_t)n) {
            PyErr_Format(PyExc_ValueError,
                         "ledger path must be non-empty, without NUL, under %zu bytes, got %.200R",
                         sizeof path, path_obj);
            return NULL;
        }
        memcpy(path, p, (size_t)n + 1);
    }
    status_copy *c = PyMem_Malloc(sizeof *c);
    if (c == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    lock_local();
    (void)join_locked(path);
    status_locked(c);
    pthread_mutex_unlock(&L.lock);
    Py_END_ALLOW_THREADS
    PyObject *r = status_dict(c);
    PyMem_Free(c);
    return r;
}

static PyObject *py_ledger_leave(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    Py_BEGIN_ALLOW_THREADS
    lock_local();
    if (L.reg != NULL)
        leave_locked();
    pthread_mutex_unlock(&L.lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_ledger_status(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    status_copy *c = PyMem_Malloc(sizeof *c);
    if (c == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    lock_local();
    if (L.reg != NULL)
        (void)check_region(); /* a corrupted region is noticed here too */
    status_locked(c);
    pthread_mutex_unlock(&L.lock);
    Py_END_ALLOW_THREADS
    PyObject *r = status_dict(c);
    PyMem_Free(c);
    return r;
}

static int parse_ledger_device(PyObject *obj, int *out)
{
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "ledger device must be an int, got %.80s %.200R",
                     Py_TYPE(obj)->tp_name, obj);
        return -1;
    }
    int overflow = 0;
    long long d = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (d == -1 && PyErr_Occurred())
        return -1;
    if (overflow || d < 0 || d >= VG_LEDGER_DEVS) {
        PyErr_Format(PyExc_ValueError, "ledger device must be 0..%d, got %.200R",
                     VG_LEDGER_DEVS - 1, obj);
        return -1;
    }
    *out = (int)d;
    return 0;
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

/* ledger_plan(device, nbytes, *, fit=False) -> bool.
 * Announce this process's peak on `device` (replacing its previous plan).  fit=True plans
 * only if what is still to be allocated (nbytes - measured) fits this process's budget with
 * every other participant's plan counted; False (and the old plan kept) when it does not.
 * Not joined: nothing is recorded; True (nothing to contend with). */
static PyObject *py_ledger_plan(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"device", "nbytes", "fit", NULL};
    PyObject *dev_obj, *n_obj;
    int fit = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$p:ledger_plan", kwlist, &dev_obj, &n_obj,
                                     &fit))
        return NULL;
    int d;
    int64_t n;
    if (parse_ledger_device(dev_obj, &d) < 0 || vg_parse_bytes(n_obj, "nbytes", 1, &n) < 0)
        return NULL;
    vg_state *st = vg_get_state(m);
    if (fit) {
        int ndev;
        char reason[VG_REASON];
        if (vg_device_count_nogil(&st->src, &ndev, reason) == 0 && d >= ndev) {
            PyErr_Format(PyExc_ValueError, "device %d does not exist (%d visible)", d, ndev);
            return NULL;
        }
    }
    int joined;
    int64_t old_planned = 0, old_pending = 0;
    Py_BEGIN_ALLOW_THREADS
    lock_local();
    joined = check_region() == 0;
    if (joined) {
        ledger_slot *me = &L.reg->slot[L.slot];
        old_planned = atomic_load_explicit(&me->dev[d].planned, memory_order_relaxed);
        old_pending = atomic_load_explicit(&me->dev[d].pending, memory_order_relaxed);
        if (fit)
            set_plan(d, old_planned, n); /* tentative: others count it from now on */
        else
            set_plan(d, n, 0);
        /* Dekker: our pending store is globally visible before we read anyone else's */
        atomic_thread_fence(memory_order_seq_cst);
    }
    pthread_mutex_unlock(&L.lock);
    Py_END_ALLOW_THREADS
    if (!joined || !fit)
        Py_RETURN_TRUE;
    /* The budget (computed in one place) with everyone else's plans, pending ones included. */
    vg_snap s;
    if (vg_snapshot(st, d, NULL, &s) < 0) {
        lock_local();
        if (check_region() == 0)
            set_plan(d, old_planned, old_pending);
        pthread_mutex_unlock(&L.lock);
        return NULL;
    }
    int64_t mine = s.process_used >= 0 ? s.process_used : 0;
    int64_t need = vg_sat_sub(n, mine);
    int ok = need <= s.budget;
    Py_BEGIN_ALLOW_THREADS
    lock_local();
    if (check_region() == 0)
        set_plan(d, ok ? n : old_planned, ok ? 0 : old_pending);
    else
        ok = 1; /* the region went away meanwhile: nothing to contend with */
    pthread_mutex_unlock(&L.lock);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ok);
}

/* ledger_clear(device=None): withdraw this process's plan on one device or all. */
static PyObject *py_ledger_clear(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"device", NULL};
    PyObject *dev_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:ledger_clear", kwlist, &dev_obj))
        return NULL;
    int d = -1;
    if (dev_obj != Py_None && parse_ledger_device(dev_obj, &d) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    lock_local();
    if (check_region() == 0)
        for (int i = 0; i < VG_LEDGER_DEVS; i++)
            if (d < 0 || i == d)
                set_plan(i, 0, 0);
    pthread_mutex_unlock(&L.lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ledger_host(rss=None, pinned=None): record host RAM held (bytes). */
static PyObject *py_ledger_host(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"rss", "pinned", NULL};
    PyObject *o[2] = {Py_None, Py_None};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OO:ledger_host", kwlist, &o[0], &o[1]))
        return NULL;
    int64_t v[2] = {-1, -1};
    static const char *what[2] = {"rss", "pinned"};
    for (int i = 0; i < 2; i++)
        if (o[i] != Py_None && vg_parse_bytes(o[i], what[i], 1, &v[i]) < 0)
            return NULL;
    Py_BEGIN_ALLOW_THREADS
    lock_local();
    if (check_region() == 0)
        publish_host(v[0], v[1]);
    pthread_mutex_unlock(&L.lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ledger_participants() -> (list of dicts, consistent).  Live participants after a sweep;
 * `consistent` is True when every slot's sequence number was unchanged across the whole
 * read, i.e. the figures held all at one instant (retried up to 100 times for that). */
static PyObject *py_ledger_participants(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    slot_view *views = PyMem_Calloc(VG_LEDGER_SLOTS, sizeof(slot_view));
    if (views == NULL)
        return PyErr_NoMemory();
    uint64_t seqs[VG_LEDGER_SLOTS];
    unsigned char alive[VG_LEDGER_SLOTS];
    int joined, consistent = 0, me = -1;
    Py_BEGIN_ALLOW_THREADS
    lock_local();
    joined = check_region() == 0;
    if (joined) {
        me = L.slot;
        for (int tries = 0; tries < 100 && !consistent; tries++) {
            sweep(views, seqs, alive);
            atomic_thread_fence(memory_order_acquire);
            consistent = 1;
            for (int k = 0; k < VG_LEDGER_SLOTS && consistent; k++) {
                ledger_slot *s = &L.reg->slot[k];
                int64_t pid = atomic_load_explicit(&s->pid, memory_order_relaxed);
                if (alive[k])
                    consistent = atomic_load_explicit(&s->seq, memory_order_relaxed) ==
                                     seqs[k] && pid == views[k].pid;
                else if (pid > 0) /* appeared meanwhile, or unreadable */
                    consistent = 0;
            }
        }
    }
    pthread_mutex_unlock(&L.lock);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(0);
    if (list == NULL)
        goto error;
    for (int k = 0; joined && k < VG_LEDGER_SLOTS; k++) {
        if (!alive[k])
            continue;
        slot_view *v = &views[k];
        PyObject *devs = PyDict_New();
        if (devs == NULL)
            goto error;
        for (int d = 0; d < VG_LEDGER_DEVS; d++) {
            if (v->used[d] == 0 && v->planned[d] == 0 && v->pending[d] == 0)
                continue;
            PyObject *dd = Py_BuildValue("{s:L,s:L,s:L,s:L}", "used",
                                         (long long)clamp_bytes(v->used[d]), "planned",
                                         (long long)clamp_bytes(v->planned[d]), "pending",
                                         (long long)clamp_bytes(v->pending[d]), "outstanding",
                                         (long long)outstanding(v, d));
            PyObject *key = PyLong_FromLong(d);
            int rc = (dd == NULL || key == NULL) ? -1 : PyDict_SetItem(devs, key, dd);
            Py_XDECREF(dd);
            Py_XDECREF(key);
            if (rc < 0) {
                Py_DECREF(devs);
                goto error;
            }
        }
        PyObject *p = Py_BuildValue("{s:L,s:L,s:i,s:O,s:L,s:L,s:N}", "pid", (long long)v->pid,
                                    "start_time", (long long)v->start, "slot", k, "self",
                                    k == me ? Py_True : Py_False, "host_rss",
                                    (long long)clamp_bytes(v->host_rss), "host_pinned",
                                    (long long)clamp_bytes(v->host_pinned), "devices", devs);
        if (p == NULL || PyList_Append(list, p) < 0) {
            Py_XDECREF(p);
            goto error;
        }
        Py_DECREF(p);
    }
    PyMem_Free(views);
    return Py_BuildValue("(NO)", list, consistent || !joined ? Py_True : Py_False);
error:
    PyMem_Free(views);
    Py_XDECREF(list);
    return NULL;
}

static PyObject *py_ledger_sweep(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    int n = 0;
    Py_BEGIN_ALLOW_THREADS
    slot_view *views = malloc(VG_LEDGER_SLOTS * sizeof(slot_view));
    uint64_t seqs[VG_LEDGER_SLOTS];
    unsigned char alive[VG_LEDGER_SLOTS];
    lock_local();
    if (views != NULL && check_region() == 0)
        n = sweep(views, seqs, alive);
    pthread_mutex_unlock(&L.lock);
    free(views);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *py_ledger_others_planned(PyObject *Py_UNUSED(m), PyObject *dev_obj)
{
    int d;
    if (parse_ledger_device(dev_obj, &d) < 0)
        return NULL;
    int64_t r;
    Py_BEGIN_ALLOW_THREADS
    r = vg_ledger_others(d);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(r);
}

/* host_pinned() -> {"locked": bytes or None, "pinned": bytes or None}; also recorded in
 * this process's ledger slot (host_pinned = max of the two) when joined. */
static PyObject *py_host_pinned(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    int64_t locked = -1, pinned = -1;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = read_pinned(&locked, &pinned);
    if (rc == 0 && atomic_load_explicit(&L.joined, memory_order_relaxed)) {
        lock_local();
        if (check_region() == 0)
            publish_host(-1, locked > pinned ? locked : pinned);
        pthread_mutex_unlock(&L.lock);
    }
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "/proc/self/status");
    PyObject *a = locked >= 0 ? PyLong_FromLongLong(locked) : Py_NewRef(Py_None);
    PyObject *b = pinned >= 0 ? PyLong_FromLongLong(pinned) : Py_NewRef(Py_None);
    if (a == NULL || b == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return NULL;
    }
    return Py_BuildValue("{s:N,s:N}", "locked", a, "pinned", b);
}

PyMethodDef vg_ledger_methods[] = {
    {"ledger_join", (PyCFunction)(void (*)(void))py_ledger_join, METH_VARARGS | METH_KEYWORDS,
     "ledger_join($module, /, path=None)\n--\n\nJoin the shared ledger (default "
     "/dev/shm/vramguard-<uid>); returns ledger_status(). A foreign or corrupted region is "
     "ignored with the reason in the status, never raised."},
    {"ledger_leave", py_ledger_leave, METH_NOARGS,
     "ledger_leave($module, /)\n--\n\nRelease this process's slot."},
    {"ledger_status", py_ledger_status, METH_NOARGS,
     "ledger_status($module, /)\n--\n\nDict: joined, path, slot, reason (why not joined), pid, "
     "swept, slots, devices, size."},
    {"ledger_plan", (PyCFunction)(void (*)(void))py_ledger_plan, METH_VARARGS | METH_KEYWORDS,
     "ledger_plan($module, /, device, nbytes, *, fit=False)\n--\n\nAnnounce this process's "
     "peak on device; fit=True only if it fits the budget (returns False otherwise)."},
    {"ledger_clear", (PyCFunction)(void (*)(void))py_ledger_clear, METH_VARARGS | METH_KEYWORDS,
     "ledger_clear($module, /, device=None)\n--\n\nWithdraw this process's plan(s)."},
    {"ledger_host", (PyCFunction)(void (*)(void))py_ledger_host, METH_VARARGS | METH_KEYWORDS,
     "ledger_host($module, /, rss=None, pinned=None)\n--\n\nRecord host RAM held (bytes)."},
    {"ledger_participants", py_ledger_participants, METH_NOARGS,
     "ledger_participants($module, /)\n--\n\n(list of live participants, consistent)."},
    {"ledger_sweep", py_ledger_sweep, METH_NOARGS,
     "ledger_sweep($module, /)\n--\n\nSweep dead slots now; returns how many."},
    {"ledger_others_planned", py_ledger_others_planned, METH_O,
     "ledger_others_planned($module, device, /)\n--\n\nBytes the other participants have "
     "planned but not allocated on device."},
    {"host_pinned", py_host_pinned, METH_NOARGS,
     "host_pinned($module, /)\n--\n\nThis process's locked and pinned host memory (bytes, "
     "/proc/self/status VmLck and VmPin; None where the kernel does not say)."},
    {NULL, NULL, 0, NULL}};
