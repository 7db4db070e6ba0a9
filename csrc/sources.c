/* sources.c — every source of memory figures, read without the GIL.
 *
 * Owns: NVML and CUDA-driver device reads, host RAM from /proc + cgroups, simulated devices,
 * the visible-index -> NVML map, and the caches that keep slow sources rare (the NVML process
 * list, /proc/meminfo).  No Python here: these run from Python threads with the GIL released
 * and from sampler threads, so everything shared sits behind src->lock.  What the figures mean
 * for a budget is decided one layer up (snapshot.c). */
#include "vg_sources.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

double vg_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ================================================================ host memory */

static int64_t read_num(int fd, int64_t dflt)
{
    char buf[64];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0)
        return dflt;
    buf[n] = '\0';
    if (strncmp(buf, "max", 3) == 0)
        return dflt;
    char *end;
    long long v = strtoll(buf, &end, 10);
    return end == buf ? dflt : (int64_t)v;
}

/* Find the tightest memory limit along this process's cgroup path (v2 first, then v1).
 * Limits can sit on an ancestor, so walk up to the root. */
static void open_cgroup(vg_sources *src)
{
    char line[512], path[1024], best_max[1024] = "", best_cur[1024] = "";
    int64_t best = INT64_MAX;
    FILE *f = fopen("/proc/self/cgroup", "re");
    if (f == NULL)
        return;
    while (fgets(line, sizeof line, f)) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        const char *rel = NULL, *root = NULL, *maxf = NULL, *curf = NULL;
        if (strncmp(line, "0::", 3) == 0) {
            rel = line + 3, root = "/sys/fs/cgroup", maxf = "memory.max", curf = "memory.current";
        } else {
            char *c1 = strchr(line, ':');
            char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
            if (c2 && strstr(c1, "memory") && (size_t)(c2 - c1) < 64) {
                rel = c2 + 1, root = "/sys/fs/cgroup/memory";
                maxf = "memory.limit_in_bytes", curf = "memory.usage_in_bytes";
            }
        }
        if (rel == NULL)
            continue;
        char dir[512];
        snprintf(dir, sizeof dir, "%s", rel);
        for (;;) {
            snprintf(path, sizeof path, "%s%s/%s", root, dir, maxf);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd >= 0) {
                /* v1 reports "unlimited" as a huge page-rounded number */
                int64_t v = read_num(fd, INT64_MAX);
                close(fd);
                if (v > 0 && v < ((int64_t)1 << 60) && v < best) {
                    best = v;
                    snprintf(best_max, sizeof best_max, "%s", path);
                    snprintf(best_cur, sizeof best_cur, "%s%s/%s", root, dir, curf);
                }
            }
            char *slash = strrchr(dir, '/');
            if (slash == NULL || dir[0] == '\0')
                break;
            *slash = '\0';
        }
    }
    fclose(f);
    if (best_max[0]) {
        src->fd_cg_max = open(best_max, O_RDONLY | O_CLOEXEC);
        src->fd_cg_cur = open(best_cur, O_RDONLY | O_CLOEXEC);
    }
}

static void close_fds(vg_sources *src)
{
    int *fds[] = {&src->fd_meminfo, &src->fd_statm, &src->fd_cg_max, &src->fd_cg_cur,
                  &src->fd_status};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
}

/* /proc/self/statm names the pid at open time: a forked child must reopen.  A fork bumps a
 * generation (pthread_atfork, every libc fork(), also one that skips Python's at-fork hooks),
 * so the check per read is one relaxed load instead of a getpid() system call (a host() read
 * made two of them). */
static atomic_uint fork_gen = 1;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void bump_fork_gen(void) { atomic_fetch_add_explicit(&fork_gen, 1, memory_order_relaxed); }
static void register_fork_gen(void) { pthread_atfork(NULL, NULL, bump_fork_gen); }

static void ensure_fds(vg_sources *src)
{
    unsigned gen = atomic_load_explicit(&fork_gen, memory_order_relaxed);
    if (atomic_load_explicit(&src->fd_gen, memory_order_acquire) == gen)
        return;
    pthread_mutex_lock(&src->lock);
    if (atomic_load_explicit(&src->fd_gen, memory_order_relaxed) != gen) {
        close_fds(src);
        src->fd_meminfo = open("/proc/meminfo", O_RDONLY | O_CLOEXEC);
        src->fd_statm = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
        src->fd_status = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
        open_cgroup(src);
        atomic_store_explicit(&src->fd_gen, gen, memory_order_release);
    }
    pthread_mutex_unlock(&src->lock);
}

int64_t vg_process_rss_nogil(vg_sources *src)
{
    ensure_fds(src);
    char buf[128];
    ssize_t n = src->fd_statm >= 0 ? pread(src->fd_statm, buf, sizeof buf - 1, 0) : -1;
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    long long size, rss;
    if (sscanf(buf, "%lld %lld", &size, &rss) != 2)
        return -1;
    int64_t bytes;
    if (rss < 0 || __builtin_mul_overflow((int64_t)rss, (int64_t)sysconf(_SC_PAGESIZE), &bytes))
        return -1; /* a page count no kernel reports: unknown rather than wrapped */
    return bytes;
}

static int64_t meminfo_field(const char *buf, const char *key)
{
    const char *p = strstr(buf, key);
    if (p == NULL)
        return -1;
    p += strlen(key);
    while (*p == ' ' || *p == ':')
        p++;
    int64_t kib = (int64_t)strtoll(p, NULL, 10), bytes;
    if (kib < 0 || __builtin_mul_overflow(kib, (int64_t)1024, &bytes))
        return -1;
    return bytes;
}

/* Pinned host memory (issue 13): this process's locked and pinned pages, /proc/self/status
 * VmLck and VmPin.  Read at most every VG_PINNED_INTERVAL (or when asked for them fresh), not
 * with every host refresh: the kernel formats ~1.5 KB for it, more than the rest of a fresh
 * host read costs, and pinned memory changes at model-load granularity. */
static void read_locked_pinned(vg_sources *src, vg_host *h, int now_please, double now)
{
    pthread_mutex_lock(&src->lock);
    int cached = !now_please && src->pinned_at > 0 && now - src->pinned_at < VG_PINNED_INTERVAL;
    h->locked = src->locked_cache, h->pinned = src->pinned_cache;
    pthread_mutex_unlock(&src->lock);
    if (cached)
        return;
    h->locked = h->pinned = -1;
    char buf[4096];
    ssize_t n = src->fd_status >= 0 ? pread(src->fd_status, buf, sizeof buf - 1, 0) : -1;
    if (n > 0) {
        buf[n] = '\0';
        h->locked = meminfo_field(buf, "\nVmLck:");
        h->pinned = meminfo_field(buf, "\nVmPin:");
    }
    pthread_mutex_lock(&src->lock);
    src->locked_cache = h->locked, src->pinned_cache = h->pinned, src->pinned_at = now;
    pthread_mutex_unlock(&src->lock);
}

int vg_host_read_nogil(vg_sources *src, vg_host *h, int fresh, char *reason)
{
    ensure_fds(src);
    double now = vg_now();
    pthread_mutex_lock(&src->lock);
    int cached = !fresh && src->host_at > 0 && now - src->host_at < src->host_interval;
    if (cached)
        *h = src->host_cache;
    pthread_mutex_unlock(&src->lock);
    if (cached) {
        h->process_rss = vg_process_rss_nogil(src); /* always fresh: it is ours and cheap */
        h->timestamp = now;
        return 0;
    }
    /* MemTotal and MemAvailable are the first and third lines: 256 bytes is plenty and
     * keeps the kernel's formatting work (the real cost here) to one short read. */
    char buf[512];
    ssize_t n = src->fd_meminfo >= 0 ? pread(src->fd_meminfo, buf, sizeof buf - 1, 0) : -1;
    if (n <= 0) {
        snprintf(reason, VG_REASON, "cannot read /proc/meminfo: %s", strerror(errno));
        return -1;
    }
    buf[n] = '\0';
    h->total = meminfo_field(buf, "MemTotal");
    h->available = meminfo_field(buf, "MemAvailable");
    if (h->total < 0 || h->available < 0) {
        snprintf(reason, VG_REASON, "/proc/meminfo lacks MemTotal or MemAvailable");
        return -1;
    }
    h->cgroup_limit = -1;
    if (src->fd_cg_max >= 0) {
        int64_t lim = read_num(src->fd_cg_max, -1);
        int64_t cur = src->fd_cg_cur >= 0 ? read_num(src->fd_cg_cur, -1) : -1;
        if (lim > 0) {
            h->cgroup_limit = lim;
            if (lim < h->total)
                h->total = lim;
            if (cur >= 0) {
                int64_t room = lim > cur ? lim - cur : 0;
                if (room < h->available)
                    h->available = room;
            }
        }
    }
    h->process_rss = vg_process_rss_nogil(src);
    read_locked_pinned(src, h, fresh == VG_HOST_FRESH_PINNED, now);
    h->timestamp = now;
    pthread_mutex_lock(&src->lock);
    src->host_cache = *h;
    src->host_at = now;
    pthread_mutex_unlock(&src->lock);
    return 0;
}

/* ================================================================ devices */

static void format_uuid(const vg_CUuuid *u, char *out, size_t n)
{
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, n,
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
             b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
             b[14], b[15]);
}

/* Visible index -> NVML index.  Once CUDA is initialised the driver's own ordinals are
 * matched by UUID (exact, honours CUDA_DEVICE_ORDER); before that, CUDA_VISIBLE_DEVICES
 * is applied to NVML's PCI order, stopping at the first invalid entry as CUDA does.
 * Caller holds src->lock. */
static void build_map(vg_sources *src, const vg_nvml_api *nv)
{
    char why[VG_REASON - 16];
    unsigned int count = 0;
    int rc = nv->nvmlDeviceGetCount_v2(&count);
    src->nmap = 0;
    src->map_reason[0] = '\0';
    src->map_built = 1;
    src->map_by_uuid = 0;
    if (rc != 0) {
        vg_nvml_error(rc, "nvmlDeviceGetCount_v2", why, sizeof why);
        snprintf(src->map_reason, VG_REASON, "unavailable: %s", why);
        return;
    }
    const vg_cuda_api *cu = vg_cuda(NULL);
    if (cu && vg_cuda_initialized() && (cu->cuDeviceGetUuid_v2 || cu->cuDeviceGetUuid)) {
        int ncu = 0;
        if (cu->cuDeviceGetCount(&ncu) == 0) {
            for (int i = 0; i < ncu && src->nmap < VG_MAX_DEV; i++) {
                int dev;
                vg_CUuuid u;
                vg_nvmlDevice_t h;
                char s[VG_NAME];
                if (cu->cuDeviceGet(&dev, i) != 0)
                    break;
                rc = cu->cuDeviceGetUuid_v2 ? cu->cuDeviceGetUuid_v2(&u, dev)
                                            : cu->cuDeviceGetUuid(&u, dev);
                if (rc != 0)
                    break;
                format_uuid(&u, s, sizeof s);
                if (nv->nvmlDeviceGetHandleByUUID(s, &h) != 0)
                    break; /* e.g. a MIG instance: NVML names it differently */
                for (unsigned int k = 0; k < count; k++) {
                    vg_nvmlDevice_t hk;
                    if (nv->nvmlDeviceGetHandleByIndex_v2(k, &hk) == 0 && hk == h) {
                        src->map[src->nmap++] = k;
                        break;
                    }
                }
            }
            if (src->nmap == ncu) {
                src->map_by_uuid = 1;
                goto names;
            }
            src->nmap = 0;
        }
    }
    const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
    if (cvd == NULL) {
        for (unsigned int k = 0; k < count && k < VG_MAX_DEV; k++)
            src->map[src->nmap++] = k;
    } else {
        const char *p = cvd;
        while (*p && src->nmap < VG_MAX_DEV) {
            while (*p == ' ' || *p == ',')
                p++;
            if (!*p)
                break;
            char tok[VG_NAME];
            size_t len = strcspn(p, ",");
            if (len >= sizeof tok)
                break;
            memcpy(tok, p, len);
            tok[len] = '\0';
            p += len;
            if (isdigit((unsigned char)tok[0])) {
                char *end;
                long v = strtol(tok, &end, 10);
                if (*end != '\0' || v < 0 || (unsigned long)v >= count)
                    break;
                src->map[src->nmap++] = (unsigned int)v;
            } else if (strncmp(tok, "GPU-", 4) == 0) {
                /* CUDA accepts a unique UUID prefix */
                int found = -1, hits = 0;
                for (unsigned int k = 0; k < count; k++) {
                    vg_nvmlDevice_t hk;
                    char u[VG_NAME];
                    if (nv->nvmlDeviceGetHandleByIndex_v2(k, &hk) == 0 &&
                        nv->nvmlDeviceGetUUID(hk, u, sizeof u) == 0 &&
                        strncmp(u, tok, strlen(tok)) == 0)
                        found = (int)k, hits++;
                }
                if (hits != 1)
                    break;
                src->map[src->nmap++] = (unsigned int)found;
            } else {
                break; /* MIG-..., -1, junk: CUDA stops here */
            }
        }
        if (src->nmap == 0)
            snprintf(src->map_reason, VG_REASON,
                     "no device visible: CUDA_VISIBLE_DEVICES=\"%s\" selects none of %u", cvd,
                     count);
    }
names:
    for (int i = 0; i < src->nmap; i++) {
        vg_nvmlDevice_t h;
        src->map_name[i][0] = src->map_uuid[i][0] = '\0';
        if (nv->nvmlDeviceGetHandleByIndex_v2(src->map[i], &h) == 0) {
            nv->nvmlDeviceGetName(h, src->map_name[i], VG_NAME);
            nv->nvmlDeviceGetUUID(h, src->map_uuid[i], VG_NAME);
        }
    }
    if (src->nmap == 0 && src->map_reason[0] == '\0')
        snprintf(src->map_reason, VG_REASON, "no device: NVML reports %u", count);
}

/* Caller holds src->lock.  Rebuilds the map when CUDA came up since it was built, so the
 * UUID-exact mapping replaces the guess. */
static const vg_nvml_api *real_devices(vg_sources *src, char *reason)
{
    const char *why;
    const vg_nvml_api *nv = vg_nvml(&why);
    if (nv == NULL) {
        snprintf(reason, VG_REASON, "%s", why);
        return NULL;
    }
    if (!src->map_built || (!src->map_by_uuid && vg_cuda_initialized()))
        build_map(src, nv);
    if (src->nmap == 0) {
        snprintf(reason, VG_REASON, "%s", src->map_reason);
        return NULL;
    }
    return nv;
}

int vg_device_count_nogil(vg_sources *src, int *n, char *reason)
{
    pthread_mutex_lock(&src->lock);
    int rc = 0;
    if (src->nsim > 0) {
        *n = src->nsim;
    } else if (real_devices(src, reason) != NULL) {
        *n = src->nmap;
    } else {
        *n = 0;
        rc = -1;
    }
    pthread_mutex_unlock(&src->lock);
    return rc;
}

/* Driver figures are unsigned; an int64 holds every real size, and anything past it is
 * nonsense we clamp rather than let wrap negative. */
static int64_t clamp_u64(unsigned long long v)
{
    return v > (unsigned long long)INT64_MAX ? INT64_MAX : (int64_t)v;
}

static void reading_init(vg_reading *r, int index, double now)
{
    memset(r, 0, sizeof *r);
    r->index = index;
    r->timestamp = now;
    r->process_used = r->framework_reserved = r->framework_allocated = -1;
    r->oom_count = r->retry_count = -1;
    r->inactive_split = r->largest_free = -1;
    r->expandable = -1;
}

static void sim_read(const vg_simdev *d, vg_reading *r, double now)
{
    int64_t used = d->used, proc = d->process_used;
    for (int64_t i = 0; i < d->nscript && now - d->t0 >= d->script_t[i]; i++) {
        used = d->script_used[i];
        proc = d->script_proc[i];
    }
    r->total = d->total;
    r->used = used;
    r->free = used < d->total ? d->total - used : 0;
    r->process_used = proc;
    r->framework_reserved = d->fw_reserved;
    r->framework_allocated = d->fw_allocated;
    r->oom_count = d->oom_count;
    r->retry_count = d->retry_count;
    r->inactive_split = d->inactive_split, r->largest_free = d->largest_free;
    r->expandable = d->expandable;
    snprintf(r->name, VG_NAME, "%s", d->name);
    snprintf(r->uuid, VG_NAME, "SIM-%d", r->index);
    r->source = "simulated";
}

/* nvmlDeviceGetComputeRunningProcesses_v3 kept its name while its element changed: R535
 * filled the 32-byte nvmlProcessInfo_v3_t (with usedGpuCcProtectedMemory), current drivers
 * fill the 24-byte nvmlProcessInfo_v2_t again (nvidia-ml-py now aliases v3 to v2; nvitop
 * probes the stride).  We hand the driver room for the larger layout and work out which one
 * it wrote: under the 32-byte layout the word at offset 24 is entry 0's protected-memory
 * count (0 outside confidential computing), never a pid, while offset 32 holds entry 1's pid.
 * With one entry the layouts agree on pid and usedGpuMemory. */
#define VG_NPROC 128
static size_t proc_stride(const unsigned char *buf, unsigned int n)
{
    if (n < 2)
        return sizeof(vg_nvmlProcessInfo_v2_t);
    unsigned int pid24, pid32;
    memcpy(&pid24, buf + 24, sizeof pid24);
    memcpy(&pid32, buf + 32, sizeof pid32);
    return pid24 == 0 && pid32 != 0 ? sizeof(vg_nvmlProcessInfo_v3_t)
                                    : sizeof(vg_nvmlProcessInfo_v2_t);
}

/* This process's bytes on NVML device `h`.  Takes milliseconds: called without src->lock
 * (NVML handles stay valid for the life of the process), so nobody waits on our lock for it. */
static int64_t nvml_process_used(const vg_nvml_api *nv, vg_nvmlDevice_t h)
{
    int64_t mine = -1;
    unsigned int me = (unsigned int)getpid(), n = VG_NPROC;
    /* room and alignment for either element type (4 KiB); zeroed so bytes the driver did
     * not write read as "no process" */
    vg_nvmlProcessInfo_v3_t raw[VG_NPROC];
    memset(raw, 0, sizeof raw);
    const unsigned char *buf = (const unsigned char *)raw;
    size_t stride = 0;
    if (nv->nvmlDeviceGetComputeRunningProcesses_v3) {
        if (nv->nvmlDeviceGetComputeRunningProcesses_v3(h, &n, raw) == 0)
            stride = proc_stride(buf, n);
    } else if (nv->nvmlDeviceGetComputeRunningProcesses_v2) {
        if (nv->nvmlDeviceGetComputeRunningProcesses_v2(h, &n, (vg_nvmlProcessInfo_v2_t *)raw) == 0)
            stride = sizeof(vg_nvmlProcessInfo_v2_t);
    }
    if (n > VG_NPROC)
        n = VG_NPROC;
    for (unsigned int i = 0; stride != 0 && i < n; i++) {
        vg_nvmlProcessInfo_v2_t p; /* the common prefix of both layouts */
        memcpy(&p, buf + (size_t)i * stride, sizeof p);
        if (p.pid == me) {
            if (p.usedGpuMemory != ~0ULL) /* NVML_VALUE_NOT_AVAILABLE */
                mine = clamp_u64(p.usedGpuMemory);
            break;
        }
    }
    return mine;
}

/* Caller holds src->lock.  Fills everything but process_used; *h and *stale say whether the
 * cached process figure is too old, for the caller to refresh outside the lock. */
static int nvml_read(vg_sources *src, int index, vg_reading *r, double now, char *reason,
                     vg_nvmlDevice_t *hout, int *stale)
{
    const vg_nvml_api *nv = real_devices(src, reason);
    if (nv == NULL)
        return -1;
    if (index >= src->nmap) {
        snprintf(reason, VG_REASON, "device %d out of range: %d device(s) visible", index,
                 src->nmap);
        return -1;
    }
    vg_nvmlDevice_t h;
    int e = nv->nvmlDeviceGetHandleByIndex_v2(src->map[index], &h);
    if (e != 0) {
        vg_nvml_error(e, "nvmlDeviceGetHandleByIndex_v2", reason, VG_REASON);
        return -1;
    }
    snprintf(r->name, VG_NAME, "%s", src->map_name[index]);
    snprintf(r->uuid, VG_NAME, "%s", src->map_uuid[index]);
    r->source = "nvml";
    if (nv->nvmlDeviceGetMemoryInfo_v2) {
        vg_nvmlMemory_v2_t m = {.version = (unsigned int)(sizeof m | (2u << 24))};
        e = nv->nvmlDeviceGetMemoryInfo_v2(h, &m);
        if (e == 0) {
            /* v2 "used" excludes the driver's reservation; for "what is left" we want
             * everything that is not free, so derive used from free. */
            r->total = clamp_u64(m.total), r->free = clamp_u64(m.free);
        }
    } else {
        e = -1;
    }
    if (e != 0) {
        vg_nvmlMemory_t m;
        e = nv->nvmlDeviceGetMemoryInfo(h, &m);
        if (e != 0) {
            vg_nvml_error(e, "nvmlDeviceGetMemoryInfo", reason, VG_REASON);
            return -1;
        }
        r->total = clamp_u64(m.total), r->free = clamp_u64(m.free);
    }
    /* The driver's view is what the framework's allocator sees; read it only through a
     * context that is already current on this thread and belongs to this device. */
    const vg_cuda_api *cu = vg_cuda(NULL);
    vg_CUcontext ctx = NULL;
    int dev = -1;
    if (cu && src->map_by_uuid && cu->cuCtxGetCurrent(&ctx) == 0 && ctx != NULL &&
        cu->cuCtxGetDevice(&dev) == 0 && dev == index) {
        size_t fr = 0, tot = 0;
        if (cu->cuMemGetInfo_v2(&fr, &tot) == 0) {
            r->free = clamp_u64(fr), r->total = clamp_u64(tot);
            r->source = "cuda+nvml";
        }
    }
    if (r->free > r->total)
        r->free = r->total;
    r->used = r->total - r->free;
    /* The process list costs milliseconds: cached per device for proc_interval seconds. */
    *stale = !(src->proc_at[index] > 0 && now - src->proc_at[index] < src->proc_interval);
    r->process_used = src->proc_used[index];
    *hout = h;
    return 0;
}

/* Host RAM as a source: total within the cgroup limit, free = available, ours = RSS. */
static int host_source_read(vg_sources *src, vg_reading *r, char *reason)
{
    vg_host h;
    if (vg_host_read_nogil(src, &h, 0, reason) < 0)
        return -1;
    r->total = h.total;
    r->free = h.available < h.total ? h.available : h.total;
    r->used = r->total - r->free;
    r->process_used = h.process_rss;
    snprintf(r->name, VG_NAME, "host RAM");
    snprintf(r->uuid, VG_NAME, "host");
    r->source = "host";
    return 0;
}

int vg_source_read_nogil(vg_sources *src, int index, vg_reading *r, char *reason)
{
    double now = vg_now();
    reading_init(r, index, now);
    if (index == VG_HOST)
        return host_source_read(src, r, reason);
    if (index < 0 || index >= VG_MAX_DEV) {
        snprintf(reason, VG_REASON, "device %d out of range", index);
        return -1;
    }
    int rc = -1, stale = 0;
    vg_nvmlDevice_t h = NULL;
    pthread_mutex_lock(&src->lock);
    if (src->nsim > 0) {
        if (index >= src->nsim) {
            snprintf(reason, VG_REASON, "device %d out of range: %d simulated device(s)",
                     index, src->nsim);
        } else {
            sim_read(&src->sim[index], r, now);
            rc = 0;
        }
    } else {
        rc = nvml_read(src, index, r, now, reason, &h, &stale);
    }
    pthread_mutex_unlock(&src->lock);
    if (rc == 0 && stale) {
        const vg_nvml_api *nv = vg_nvml(NULL);
        r->process_used = nvml_process_used(nv, h);
        pthread_mutex_lock(&src->lock);
        src->proc_at[index] = now;
        src->proc_used[index] = r->process_used;
        pthread_mutex_unlock(&src->lock);
    }
    return rc;
}

int vg_sources_simulated(vg_sources *src)
{
    pthread_mutex_lock(&src->lock);
    int n = src->nsim > 0;
    pthread_mutex_unlock(&src->lock);
    return n;
}

int vg_sources_by_uuid(vg_sources *src)
{
    pthread_mutex_lock(&src->lock);
    int b = src->map_by_uuid;
    pthread_mutex_unlock(&src->lock);
    return b;
}

void vg_simdev_free_script(vg_simdev *d)
{
    free(d->script_t), free(d->script_used), free(d->script_proc);
    d->script_t = NULL, d->script_used = d->script_proc = NULL;
    d->nscript = 0;
}

/* ================================================================ lifecycle */

int vg_sources_init(vg_sources *src)
{
    int rc = pthread_mutex_init(&src->lock, NULL);
    if (rc != 0)
        return rc;
    src->defcfg.reserve = src->defcfg.cap = 0;
    src->hostcfg.reserve = src->hostcfg.cap = 0;
    for (int i = 0; i < VG_MAX_DEV; i++)
        src->cfg[i].reserve = src->cfg[i].cap = -1;
    src->proc_interval = 1.0;
    src->host_interval = 0.010;
    atomic_init(&src->fd_gen, 0u); /* 0: never opened (the generation starts at 1) */
    pthread_once(&fork_once, register_fork_gen);
    src->fd_meminfo = src->fd_statm = src->fd_cg_max = src->fd_cg_cur = -1;
    src->fd_status = -1;
    src->locked_cache = src->pinned_cache = -1;
    return 0;
}

void vg_sources_free(vg_sources *src)
{
    for (int i = 0; i < src->nsim; i++)
        vg_simdev_free_script(&src->sim[i]);
    src->nsim = 0;
    close_fds(src);
    pthread_mutex_destroy(&src->lock);
}

/* Only the forking thread exists in the child: re-initialising the lock is safe. */
void vg_sources_after_fork(vg_sources *src)
{
    pthread_mutex_init(&src->lock, NULL);
    atomic_store(&src->fd_gen, 0u); /* /proc/self files name the parent */
    src->host_at = 0;
    src->pinned_at = 0;
    for (int i = 0; i < VG_MAX_DEV; i++)
        src->proc_at[i] = 0;
}

void vg_sources_refresh(vg_sources *src)
{
    pthread_mutex_lock(&src->lock);
    src->map_built = 0;
    for (int i = 0; i < VG_MAX_DEV; i++)
        src->proc_at[i] = 0;
    pthread_mutex_unlock(&src->lock);
}
