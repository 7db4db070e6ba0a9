/* accounting.c — what the device, the framework and the host hold, right now.
 *
 * Owns: the sources (NVML, CUDA driver, /proc + cgroups, the framework probe, simulated
 * devices), the per-device reserve/cap configuration, the visible-index -> NVML mapping,
 * the Snapshot/Host struct sequences, and vg_budget(): the one place the budget is computed.
 *
 * Device reads run without the GIL (NVML takes ~10 us); the probe is a Python callable and
 * runs with it.  Config and simulated devices are read by sampler threads, so they sit
 * behind st->lock. */
#include "vg.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
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

/* ================================================================ the budget */

/* budget = max(0, free + evictable - reserve), and with a cap:
 *          min(that, max(0, cap - live)),  live = max(0, held - evictable),
 *          held = process_used if known, else framework_reserved if known, else used.
 * `free` counts other applications, so keeping `reserve` free leaves room for them. */
int64_t vg_budget(const vg_snap *s)
{
    int64_t b = s->free + s->evictable - s->reserve;
    if (b < 0)
        b = 0;
    if (s->cap > 0) {
        int64_t held = s->process_used >= 0        ? s->process_used
                       : s->framework_reserved >= 0 ? s->framework_reserved
                                                    : s->used;
        int64_t live = held - s->evictable;
        if (live < 0)
            live = 0;
        int64_t room = s->cap - live;
        if (room < 0)
            room = 0;
        if (room < b)
            b = room;
    }
    return b;
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
static void open_cgroup(vg_state *st)
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
        st->fd_cg_max = open(best_max, O_RDONLY | O_CLOEXEC);
        st->fd_cg_cur = open(best_cur, O_RDONLY | O_CLOEXEC);
    }
}

static void close_fds(vg_state *st)
{
    int *fds[] = {&st->fd_meminfo, &st->fd_statm, &st->fd_cg_max, &st->fd_cg_cur};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
}

/* /proc/self/statm names the pid at open time: a forked child must reopen. */
static void ensure_fds(vg_state *st)
{
    pid_t pid = getpid();
    if (st->fd_pid == pid)
        return;
    pthread_mutex_lock(&st->lock);
    if (st->fd_pid != pid) {
        close_fds(st);
        st->fd_meminfo = open("/proc/meminfo", O_RDONLY | O_CLOEXEC);
        st->fd_statm = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
        open_cgroup(st);
        st->fd_pid = pid;
    }
    pthread_mutex_unlock(&st->lock);
}

int64_t vg_process_rss_nogil(vg_state *st)
{
    ensure_fds(st);
    char buf[128];
    ssize_t n = st->fd_statm >= 0 ? pread(st->fd_statm, buf, sizeof buf - 1, 0) : -1;
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    long long size, rss;
    if (sscanf(buf, "%lld %lld", &size, &rss) != 2)
        return -1;
    return (int64_t)rss * (int64_t)sysconf(_SC_PAGESIZE);
}

static int64_t meminfo_field(const char *buf, const char *key)
{
    const char *p = strstr(buf, key);
    if (p == NULL)
        return -1;
    p += strlen(key);
    while (*p == ' ' || *p == ':')
        p++;
    return (int64_t)strtoll(p, NULL, 10) * 1024;
}

int vg_host_read_nogil(vg_state *st, vg_host *h, int fresh, char *reason)
{
    ensure_fds(st);
    double now = vg_now();
    pthread_mutex_lock(&st->lock);
    int cached = !fresh && st->host_at > 0 && now - st->host_at < st->host_interval;
    if (cached)
        *h = st->host_cache;
    pthread_mutex_unlock(&st->lock);
    if (cached) {
        h->process_rss = vg_process_rss_nogil(st); /* always fresh: it is ours and cheap */
        h->timestamp = now;
        return 0;
    }
    /* MemTotal and MemAvailable are the first and third lines: 256 bytes is plenty and
     * keeps the kernel's formatting work (the real cost here) to one short read. */
    char buf[512];
    ssize_t n = st->fd_meminfo >= 0 ? pread(st->fd_meminfo, buf, sizeof buf - 1, 0) : -1;
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
    if (st->fd_cg_max >= 0) {
        int64_t lim = read_num(st->fd_cg_max, -1);
        int64_t cur = st->fd_cg_cur >= 0 ? read_num(st->fd_cg_cur, -1) : -1;
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
    h->process_rss = vg_process_rss_nogil(st);
    h->timestamp = now;
    pthread_mutex_lock(&st->lock);
    st->host_cache = *h;
    st->host_at = now;
    pthread_mutex_unlock(&st->lock);
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
 * Caller holds st->lock. */
static void build_map(vg_state *st, const vg_nvml_api *nv)
{
    char why[VG_REASON - 16];
    unsigned int count = 0;
    int rc = nv->nvmlDeviceGetCount_v2(&count);
    st->nmap = 0;
    st->map_reason[0] = '\0';
    st->map_built = 1;
    st->map_by_uuid = 0;
    if (rc != 0) {
        vg_nvml_error(rc, "nvmlDeviceGetCount_v2", why, sizeof why);
        snprintf(st->map_reason, VG_REASON, "unavailable: %s", why);
        return;
    }
    const vg_cuda_api *cu = vg_cuda(NULL);
    if (cu && vg_cuda_initialized() && (cu->cuDeviceGetUuid_v2 || cu->cuDeviceGetUuid)) {
        int ncu = 0;
        if (cu->cuDeviceGetCount(&ncu) == 0) {
            for (int i = 0; i < ncu && st->nmap < VG_MAX_DEV; i++) {
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
                        st->map[st->nmap++] = k;
                        break;
                    }
                }
            }
            if (st->nmap == ncu) {
                st->map_by_uuid = 1;
                goto names;
            }
            st->nmap = 0;
        }
    }
    const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
    if (cvd == NULL) {
        for (unsigned int k = 0; k < count && k < VG_MAX_DEV; k++)
            st->map[st->nmap++] = k;
    } else {
        const char *p = cvd;
        while (*p && st->nmap < VG_MAX_DEV) {
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
                st->map[st->nmap++] = (unsigned int)v;
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
                st->map[st->nmap++] = (unsigned int)found;
            } else {
                break; /* MIG-..., -1, junk: CUDA stops here */
            }
        }
        if (st->nmap == 0)
            snprintf(st->map_reason, VG_REASON,
                     "no device visible: CUDA_VISIBLE_DEVICES=\"%s\" selects none of %u", cvd,
                     count);
    }
names:
    for (int i = 0; i < st->nmap; i++) {
        vg_nvmlDevice_t h;
        st->map_name[i][0] = st->map_uuid[i][0] = '\0';
        if (nv->nvmlDeviceGetHandleByIndex_v2(st->map[i], &h) == 0) {
            nv->nvmlDeviceGetName(h, st->map_name[i], VG_NAME);
            nv->nvmlDeviceGetUUID(h, st->map_uuid[i], VG_NAME);
        }
    }
    if (st->nmap == 0 && st->map_reason[0] == '\0')
        snprintf(st->map_reason, VG_REASON, "no device: NVML reports %u", count);
}

/* Caller holds st->lock.  Rebuilds the map when CUDA came up since it was built, so the
 * UUID-exact mapping replaces the guess. */
static const vg_nvml_api *real_devices(vg_state *st, char *reason)
{
    const char *why;
    const vg_nvml_api *nv = vg_nvml(&why);
    if (nv == NULL) {
        snprintf(reason, VG_REASON, "%s", why);
        return NULL;
    }
    if (!st->map_built || (!st->map_by_uuid && vg_cuda_initialized()))
        build_map(st, nv);
    if (st->nmap == 0) {
        snprintf(reason, VG_REASON, "%s", st->map_reason);
        return NULL;
    }
    return nv;
}

int vg_device_count_nogil(vg_state *st, int *n, char *reason)
{
    pthread_mutex_lock(&st->lock);
    int rc = 0;
    if (st->nsim > 0) {
        *n = st->nsim;
    } else if (real_devices(st, reason) != NULL) {
        *n = st->nmap;
    } else {
        *n = 0;
        rc = -1;
    }
    pthread_mutex_unlock(&st->lock);
    return rc;
}

static void sim_read(const vg_simdev *d, vg_snap *s, double now)
{
    int64_t used = d->used, proc = d->process_used;
    for (Py_ssize_t i = 0; i < d->nscript && now - d->t0 >= d->script_t[i]; i++) {
        used = d->script_used[i];
        proc = d->script_proc[i];
    }
    s->total = d->total;
    s->used = used;
    s->free = used < d->total ? d->total - used : 0;
    s->process_used = proc;
    s->framework_reserved = d->fw_reserved;
    s->framework_allocated = d->fw_allocated;
    s->oom_count = d->oom_count;
    s->retry_count = d->retry_count;
    snprintf(s->name, VG_NAME, "%s", d->name);
    snprintf(s->uuid, VG_NAME, "SIM-%d", s->index);
    s->source = "simulated";
}

/* This process's bytes on NVML device `h`.  The process list costs milliseconds, so it is
 * cached per device for st->proc_interval seconds.  Caller holds st->lock. */
static int64_t nvml_process_used(vg_state *st, const vg_nvml_api *nv, int index,
                                 vg_nvmlDevice_t h, double now)
{
    if (st->proc_at[index] > 0 && now - st->proc_at[index] < st->proc_interval)
        return st->proc_used[index];
    int64_t mine = -1;
    unsigned int me = (unsigned int)getpid(), n = 64;
    if (nv->nvmlDeviceGetComputeRunningProcesses_v3) {
        vg_nvmlProcessInfo_v3_t p[64];
        if (nv->nvmlDeviceGetComputeRunningProcesses_v3(h, &n, p) == 0)
            for (unsigned int i = 0, found = 0; i < n && !found; i++)
                if (p[i].pid == me && (found = 1) && p[i].usedGpuMemory != ~0ULL)
                    mine = (int64_t)p[i].usedGpuMemory;
    } else if (nv->nvmlDeviceGetComputeRunningProcesses_v2) {
        vg_nvmlProcessInfo_v2_t p[64];
        if (nv->nvmlDeviceGetComputeRunningProcesses_v2(h, &n, p) == 0)
            for (unsigned int i = 0, found = 0; i < n && !found; i++)
                if (p[i].pid == me && (found = 1) && p[i].usedGpuMemory != ~0ULL)
                    mine = (int64_t)p[i].usedGpuMemory;
    }
    st->proc_at[index] = now;
    st->proc_used[index] = mine;
    return mine;
}

int vg_device_read_nogil(vg_state *st, int index, vg_snap *s, char *reason)
{
    int rc = -1;
    double now = vg_now();
    memset(s, 0, sizeof *s);
    s->index = index;
    s->timestamp = now;
    s->process_used = s->framework_reserved = s->framework_allocated = -1;
    s->framework_active = s->oom_count = s->retry_count = -1;

    pthread_mutex_lock(&st->lock);
    vg_devcfg c = st->cfg[index < VG_MAX_DEV ? index : 0];
    s->reserve = c.reserve >= 0 ? c.reserve : st->defcfg.reserve;
    s->cap = c.cap >= 0 ? c.cap : st->defcfg.cap;
    if (st->nsim > 0) {
        if (index >= st->nsim) {
            snprintf(reason, VG_REASON, "device %d out of range: %d simulated device(s)",
                     index, st->nsim);
            goto done;
        }
        sim_read(&st->sim[index], s, now);
        rc = 0;
        goto done;
    }
    const vg_nvml_api *nv = real_devices(st, reason);
    if (nv == NULL)
        goto done;
    if (index >= st->nmap) {
        snprintf(reason, VG_REASON, "device %d out of range: %d device(s) visible", index,
                 st->nmap);
        goto done;
    }
    vg_nvmlDevice_t h;
    int e = nv->nvmlDeviceGetHandleByIndex_v2(st->map[index], &h);
    if (e != 0) {
        vg_nvml_error(e, "nvmlDeviceGetHandleByIndex_v2", reason, VG_REASON);
        goto done;
    }
    snprintf(s->name, VG_NAME, "%s", st->map_name[index]);
    snprintf(s->uuid, VG_NAME, "%s", st->map_uuid[index]);
    s->source = "nvml";
    if (nv->nvmlDeviceGetMemoryInfo_v2) {
        vg_nvmlMemory_v2_t m = {.version = (unsigned int)(sizeof m | (2u << 24))};
        e = nv->nvmlDeviceGetMemoryInfo_v2(h, &m);
        if (e == 0) {
            /* v2 "used" excludes the driver's reservation; for "what is left" we want
             * everything that is not free, so derive used from free. */
            s->total = (int64_t)m.total, s->free = (int64_t)m.free;
            s->used = s->total - s->free;
        }
    } else {
        e = -1;
    }
    if (e != 0) {
        vg_nvmlMemory_t m;
        e = nv->nvmlDeviceGetMemoryInfo(h, &m);
        if (e != 0) {
            vg_nvml_error(e, "nvmlDeviceGetMemoryInfo", reason, VG_REASON);
            goto done;
        }
        s->total = (int64_t)m.total, s->free = (int64_t)m.free, s->used = (int64_t)m.used;
    }
    /* The driver's view is what the framework's allocator sees; read it only through a
     * context that is already current on this thread and belongs to this device. */
    const vg_cuda_api *cu = vg_cuda(NULL);
    vg_CUcontext ctx = NULL;
    int dev = -1;
    if (cu && st->map_by_uuid && cu->cuCtxGetCurrent(&ctx) == 0 && ctx != NULL &&
        cu->cuCtxGetDevice(&dev) == 0 && dev == index) {
        size_t fr = 0, tot = 0;
        if (cu->cuMemGetInfo_v2(&fr, &tot) == 0) {
            s->free = (int64_t)fr, s->total = (int64_t)tot;
            s->used = s->total - s->free;
            s->source = "cuda+nvml";
        }
    }
    s->process_used = nvml_process_used(st, nv, index, h, now);
    rc = 0;
done:
    pthread_mutex_unlock(&st->lock);
    return rc;
}

/* ================================================================ probe and snapshot */

/* -1 when the key is absent or None; -2 with an exception on a bad value. */
static int64_t probe_field(PyObject *d, const char *key)
{
    PyObject *v = PyDict_GetItemString(d, key); /* borrowed; never raises */
    if (v == NULL || v == Py_None)
        return -1;
    if (PyBool_Check(v) || !(PyLong_Check(v) || PyFloat_Check(v))) {
        PyErr_Format(PyExc_TypeError, "framework probe: %s must be a number of bytes, got %R",
                     key, v);
        return -2;
    }
    double x = PyFloat_Check(v) ? PyFloat_AS_DOUBLE(v) : PyLong_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred())
        return -2;
    if (!isfinite(x) || x < 0 || x > 9.2e18) {
        PyErr_Format(PyExc_ValueError, "framework probe: %s must be >= 0 and finite, got %R",
                     key, v);
        return -2;
    }
    return (int64_t)x;
}

static int apply_probe(vg_state *st, vg_snap *s)
{
    PyObject *r = PyObject_CallFunction(st->probe, "i", s->index);
    if (r == NULL)
        return -1;
    if (r == Py_None) {
        Py_DECREF(r);
        return 0;
    }
    if (!PyDict_Check(r)) {
        PyErr_Format(PyExc_TypeError, "framework probe must return a dict or None, got %.80s",
                     Py_TYPE(r)->tp_name);
        Py_DECREF(r);
        return -1;
    }
    int64_t f[8];
    static const char *keys[8] = {"reserved", "allocated", "active",    "oom_count",
                                  "retry_count", "free",    "evictable", "reserve"};
    for (int i = 0; i < 8; i++)
        if ((f[i] = probe_field(r, keys[i])) == -2) {
            Py_DECREF(r);
            return -1;
        }
    Py_DECREF(r);
    s->framework_reserved = f[0], s->framework_allocated = f[1], s->framework_active = f[2];
    s->oom_count = f[3], s->retry_count = f[4];
    /* Cached-but-unused allocator blocks are ours to reuse. */
    int64_t active = f[2] >= 0 ? f[2] : f[1];
    if (f[0] >= 0 && active >= 0 && f[0] > active)
        s->evictable = f[0] - active;
    if (f[6] >= 0)
        s->evictable = f[6];
    /* The host's own free figure (ComfyUI counts torch's cache and Dynamic VRAM's idle
     * weights) wins over raw driver free, which undercounts what we can use. */
    if (f[5] >= 0 && f[5] > s->free)
        s->evictable = f[5] - s->free;
    if (f[7] > s->reserve)
        s->reserve = f[7];
    return 0;
}

int vg_snapshot(vg_state *st, int index, vg_snap *s)
{
    char reason[VG_REASON];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vg_device_read_nogil(st, index, s, reason);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_SetString(PyExc_RuntimeError, reason);
        return -1;
    }
    if (st->probe != NULL && strcmp(s->source, "simulated") != 0 && apply_probe(st, s) < 0)
        return -1;
    s->budget = vg_budget(s);
    return 0;
}

/* ================================================================ struct sequences */

/* Field order is the public contract (README, --json).  Optional fields are None when the
 * source does not know them. */
static PyStructSequence_Field snap_fields[] = {
    {"index", "device index as the framework numbers it"},
    {"name", NULL},
    {"uuid", NULL},
    {"source", "where the figures came from"},
    {"total", "bytes"},
    {"free", "bytes free on the device, counting other applications"},
    {"used", "bytes"},
    {"process_used", "bytes this process holds, or None"},
    {"framework_reserved", "bytes the framework's allocator holds, or None"},
    {"framework_allocated", "bytes in live framework tensors, or None"},
    {"evictable", "bytes this process could release without losing work"},
    {"reserve", "bytes to keep free (max of ours and the host's)"},
    {"cap", "absolute cap on this process's bytes, 0 = none"},
    {"budget", "bytes this process may still allocate"},
    {"oom_count", "framework OOM counter, or None"},
    {"retry_count", "framework alloc-retry counter, or None"},
    {"timestamp", "monotonic seconds"},
    {NULL, NULL}};
#define SNAP_NFIELDS 17

static PyStructSequence_Desc snap_desc = {"vramguard.Snapshot",
                                          "Device memory at one instant (bytes).", snap_fields,
                                          SNAP_NFIELDS};

static PyStructSequence_Field host_fields[] = {
    {"total", "bytes of RAM, or the cgroup limit when lower"},
    {"available", "bytes available, within the cgroup limit"},
    {"process_rss", "bytes resident in this process"},
    {"cgroup_limit", "bytes, or None"},
    {"timestamp", "monotonic seconds"},
    {NULL, NULL}};
static PyStructSequence_Desc host_desc = {"vramguard.Host", "Host memory (bytes).", host_fields, 5};

static PyObject *opt_int(int64_t v)
{
    if (v < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(v);
}

PyObject *vg_snap_to_py(vg_state *st, const vg_snap *s)
{
    PyObject *o = PyStructSequence_New(st->SnapshotType);
    if (o == NULL)
        return NULL;
    PyObject *v[SNAP_NFIELDS] = {
        PyLong_FromLong(s->index),
        PyUnicode_DecodeUTF8(s->name, (Py_ssize_t)strlen(s->name), "replace"),
        PyUnicode_DecodeUTF8(s->uuid, (Py_ssize_t)strlen(s->uuid), "replace"),
        PyUnicode_FromString(s->source ? s->source : "unknown"),
        PyLong_FromLongLong(s->total),
        PyLong_FromLongLong(s->free),
        PyLong_FromLongLong(s->used),
        opt_int(s->process_used),
        opt_int(s->framework_reserved),
        opt_int(s->framework_allocated),
        PyLong_FromLongLong(s->evictable),
        PyLong_FromLongLong(s->reserve),
        PyLong_FromLongLong(s->cap),
        PyLong_FromLongLong(s->budget),
        opt_int(s->oom_count),
        opt_int(s->retry_count),
        PyFloat_FromDouble(s->timestamp),
    };
    int bad = 0;
    for (int i = 0; i < SNAP_NFIELDS; i++) {
        if (v[i] == NULL)
            bad = 1;
        PyStructSequence_SetItem(o, i, v[i]); /* steals; NULL slots are fine for dealloc */
    }
    if (bad) {
        Py_DECREF(o);
        return NULL;
    }
    return o;
}

static int64_t field_i64(PyObject *obj, int is_seq, int i, int64_t dflt, int *err)
{
    PyObject *v;
    if (is_seq) {
        v = PyStructSequence_GetItem(obj, i); /* borrowed */
        Py_XINCREF(v);
    } else {
        v = PyMapping_GetItemString(obj, snap_fields[i].name);
        if (v == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
                *err = 1;
                return 0;
            }
            PyErr_Clear();
            return dflt;
        }
    }
    if (v == NULL || v == Py_None) {
        Py_XDECREF(v);
        return -1;
    }
    double x = (PyLong_Check(v) || PyFloat_Check(v)) && !PyBool_Check(v)
                   ? PyFloat_AsDouble(v) : NAN;
    if (!isfinite(x) || x < -1 || x > 9.2e18) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "snapshot field %s must be a byte count, got %R",
                         snap_fields[i].name, v);
        Py_DECREF(v);
        *err = 1;
        return 0;
    }
    Py_DECREF(v);
    return (int64_t)x;
}

/* A Snapshot, or any mapping with its field names (missing numbers are 0 / unknown):
 * lets the GC policy and tests decide over hand-written snapshots. */
int vg_snap_from_py(vg_state *st, PyObject *obj, vg_snap *s)
{
    int is_seq = Py_IS_TYPE(obj, st->SnapshotType);
    if (!is_seq && !PyMapping_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "expected a vramguard.Snapshot or a mapping, got %.80s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int err = 0;
    memset(s, 0, sizeof *s);
    s->index = (int)field_i64(obj, is_seq, 0, 0, &err);
    s->source = "given";
    int64_t *dst[] = {&s->total, &s->free, &s->used, &s->process_used,
                      &s->framework_reserved, &s->framework_allocated, &s->evictable,
                      &s->reserve, &s->cap, &s->budget, &s->oom_count, &s->retry_count};
    int64_t dflt[] = {0, 0, 0, -1, -1, -1, 0, 0, 0, -2, -1, -1};
    for (int i = 0; i < 12 && !err; i++)
        *dst[i] = field_i64(obj, is_seq, 4 + i, dflt[i], &err);
    if (err)
        return -1;
    if (s->total < 0 || s->free < 0 || s->used < 0 || s->evictable < 0 || s->reserve < 0 ||
        s->cap < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "snapshot total/free/used/evictable/reserve/cap must be >= 0");
        return -1;
    }
    if (s->budget < 0) /* absent: derive it the one way it is ever derived */
        s->budget = vg_budget(s);
    return 0;
}

/* ================================================================ argument parsing */

int vg_parse_bytes(PyObject *obj, const char *what, int allow_zero, int64_t *out)
{
    if (PyBool_Check(obj) || !(PyLong_Check(obj) || PyFloat_Check(obj))) {
        PyErr_Format(PyExc_TypeError, "%s must be a number of bytes, got %.80s %R", what,
                     Py_TYPE(obj)->tp_name, obj);
        return -1;
    }
    double x = PyFloat_AsDouble(obj);
    if (x == -1.0 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        x = INFINITY;
    }
    if (!isfinite(x) || x < 0 || (!allow_zero && x == 0) || x > 9.0e18) {
        PyErr_Format(PyExc_ValueError, "%s must be a finite number of bytes %s 0, got %R", what,
                     allow_zero ? ">=" : ">", obj);
        return -1;
    }
    *out = (int64_t)x;
    return 0;
}

int vg_parse_double(PyObject *obj, const char *what, double lo, double hi, double *out)
{
    if (PyBool_Check(obj) || !(PyLong_Check(obj) || PyFloat_Check(obj))) {
        PyErr_Format(PyExc_TypeError, "%s must be a number, got %.80s %R", what,
                     Py_TYPE(obj)->tp_name, obj);
        return -1;
    }
    double x = PyFloat_AsDouble(obj);
    if (x == -1.0 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        x = INFINITY;
    }
    if (!isfinite(x) || !(x > lo) || x > hi) {
        /* callers pass lo = -1e-300 to mean ">= 0" */
        int zero_ok = lo < 0 && lo > -1e-200;
        PyObject *l = PyFloat_FromDouble(zero_ok ? 0.0 : lo), *h = PyFloat_FromDouble(hi);
        if (l && h)
            PyErr_Format(PyExc_ValueError, "%s must be %s %R and <= %R, got %R", what, zero_ok ? ">=" : ">",
                         l, h, obj);
        Py_XDECREF(l);
        Py_XDECREF(h);
        return -1;
    }
    *out = x;
    return 0;
}

int vg_parse_index(vg_state *st, PyObject *obj, int *out)
{
    if (PyBool_Check(obj) || !PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "device index must be an int, got %.80s %R",
                     Py_TYPE(obj)->tp_name, obj);
        return -1;
    }
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred())
        PyErr_Clear();
    int n = 0;
    char reason[VG_REASON];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vg_device_count_nogil(st, &n, reason);
    Py_END_ALLOW_THREADS
    if (rc != 0 && v == 0) {
        PyErr_Format(PyExc_RuntimeError, "no GPU: %s", reason);
        return -1;
    }
    if (v < 0 || v >= n) {
        PyErr_Format(PyExc_ValueError, "unknown device index %R: %d device(s) present%s%s", obj,
                     n, rc ? "; " : "", rc ? reason : "");
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* ================================================================ Python functions */

static PyObject *py_device_count(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_state *st = vg_get_state(m);
    int n = 0;
    char reason[VG_REASON];
    Py_BEGIN_ALLOW_THREADS
    (void)vg_device_count_nogil(st, &n, reason);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *py_gpu_status(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_state *st = vg_get_state(m);
    const char *nvr, *cur;
    char reason[VG_REASON] = "ok";
    int n = 0;
    Py_BEGIN_ALLOW_THREADS
    (void)vg_nvml(&nvr);
    (void)vg_cuda(&cur);
    if (vg_device_count_nogil(st, &n, reason) == 0)
        snprintf(reason, VG_REASON, "ok");
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&st->lock);
    int sim = st->nsim, by_uuid = st->map_by_uuid;
    pthread_mutex_unlock(&st->lock);
    return Py_BuildValue("{s:s,s:s,s:i,s:s,s:O,s:O,s:O}", "nvml", nvr, "cuda", cur, "devices",
                         n, "devices_reason", reason, "simulated", sim ? Py_True : Py_False,
                         "cuda_initialized", vg_cuda_initialized() ? Py_True : Py_False,
                         "mapped_by_uuid", by_uuid ? Py_True : Py_False);
}

static PyObject *py_snapshot(PyObject *m, PyObject *arg)
{
    vg_state *st = vg_get_state(m);
    int index;
    vg_snap s;
    if (vg_parse_index(st, arg, &index) < 0 || vg_snapshot(st, index, &s) < 0)
        return NULL;
    return vg_snap_to_py(st, &s);
}

static PyObject *py_host(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fresh", NULL};
    int fresh = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p:host", kwlist, &fresh))
        return NULL;
    vg_state *st = vg_get_state(m);
    vg_host h;
    char reason[VG_REASON];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vg_host_read_nogil(st, &h, fresh, reason);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_SetString(PyExc_OSError, reason);
        return NULL;
    }
    PyObject *o = PyStructSequence_New(st->HostType);
    if (o == NULL)
        return NULL;
    PyObject *v[5] = {PyLong_FromLongLong(h.total), PyLong_FromLongLong(h.available),
                      opt_int(h.process_rss), opt_int(h.cgroup_limit),
                      PyFloat_FromDouble(h.timestamp)};
    int bad = 0;
    for (int i = 0; i < 5; i++) {
        bad |= v[i] == NULL;
        PyStructSequence_SetItem(o, i, v[i]);
    }
    if (bad)
        Py_CLEAR(o);
    return o;
}

static PyObject *py_budget(PyObject *m, PyObject *arg)
{
    vg_snap s;
    if (vg_snap_from_py(vg_get_state(m), arg, &s) < 0)
        return NULL;
    return PyLong_FromLongLong(vg_budget(&s));
}

/* set_limits(index_or_None, reserve=None, cap=None): None leaves a value as it is. */
static PyObject *py_set_limits(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"device", "reserve", "cap", NULL};
    PyObject *dev = Py_None, *res = Py_None, *cap = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OOO:set_limits", kwlist, &dev, &res, &cap))
        return NULL;
    vg_state *st = vg_get_state(m);
    int64_t r = -1, c = -1;
    int index = -1;
    if (res != Py_None && vg_parse_bytes(res, "reserve", 1, &r) < 0)
        return NULL;
    if (cap != Py_None && vg_parse_bytes(cap, "cap", 1, &c) < 0)
        return NULL;
    if (dev != Py_None && vg_parse_index(st, dev, &index) < 0)
        return NULL;
    pthread_mutex_lock(&st->lock);
    vg_devcfg *cfg = index < 0 ? &st->defcfg : &st->cfg[index];
    if (r >= 0)
        cfg->reserve = r;
    if (c >= 0)
        cfg->cap = c;
    pthread_mutex_unlock(&st->lock);
    Py_RETURN_NONE;
}

static PyObject *py_get_limits(PyObject *m, PyObject *arg)
{
    vg_state *st = vg_get_state(m);
    int index = -1;
    if (arg != Py_None && vg_parse_index(st, arg, &index) < 0)
        return NULL;
    pthread_mutex_lock(&st->lock);
    vg_devcfg c = st->defcfg, d = st->defcfg;
    if (index >= 0)
        c = st->cfg[index];
    pthread_mutex_unlock(&st->lock);
    return Py_BuildValue("{s:L,s:L}", "reserve", (long long)(c.reserve >= 0 ? c.reserve : d.reserve),
                         "cap", (long long)(c.cap >= 0 ? c.cap : d.cap));
}

static PyObject *py_clear_limits(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_state *st = vg_get_state(m);
    pthread_mutex_lock(&st->lock);
    st->defcfg.reserve = 0, st->defcfg.cap = 0;
    for (int i = 0; i < VG_MAX_DEV; i++)
        st->cfg[i].reserve = st->cfg[i].cap = -1;
    pthread_mutex_unlock(&st->lock);
    Py_RETURN_NONE;
}

static PyObject *py_set_probe(PyObject *m, PyObject *fn)
{
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_Format(PyExc_TypeError, "probe must be callable or None, got %.80s",
                     Py_TYPE(fn)->tp_name);
        return NULL;
    }
    vg_state *st = vg_get_state(m);
    Py_XSETREF(st->probe, fn == Py_None ? NULL : Py_NewRef(fn));
    Py_RETURN_NONE;
}

static PyObject *py_get_probe(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_state *st = vg_get_state(m);
    return Py_NewRef(st->probe ? st->probe : Py_None);
}

static void sim_free_script(vg_simdev *d)
{
    free(d->script_t), free(d->script_used), free(d->script_proc);
    d->script_t = NULL, d->script_used = d->script_proc = NULL;
    d->nscript = 0;
}

/* script: sequence of (t_seconds, used[, process_used]), t non-decreasing from 0. */
static int parse_script(PyObject *obj, vg_simdev *d)
{
    PyObject *seq = PySequence_Fast(obj, "script must be a sequence of (t, used[, process_used])");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    double *t = NULL;
    int64_t *u = NULL, *p = NULL;
    if (n > 1000000) {
        PyErr_Format(PyExc_ValueError, "script has %zd entries; at most 1000000", n);
        goto error;
    }
    t = malloc(sizeof *t * (size_t)(n ? n : 1));
    u = malloc(sizeof *u * (size_t)(n ? n : 1));
    p = malloc(sizeof *p * (size_t)(n ? n : 1));
    if (!t || !u || !p) {
        PyErr_NoMemory();
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *ts = NULL, *us = NULL, *ps = NULL;
        if (!PyTuple_Check(e) || !PyArg_ParseTuple(e, "OO|O", &ts, &us, &ps)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "script[%zd] must be (t, used[, process_used]), got %R",
                         i, e);
            goto error;
        }
        t[i] = PyFloat_AsDouble(ts);
        if (t[i] == -1.0 && PyErr_Occurred())
            goto error;
        if (!isfinite(t[i]) || t[i] < 0 || (i > 0 && t[i] < t[i - 1])) {
            PyErr_Format(PyExc_ValueError,
                         "script[%zd]: t must be finite, >= 0 and non-decreasing, got %R", i, ts);
            goto error;
        }
        if (vg_parse_bytes(us, "script used", 1, &u[i]) < 0)
            goto error;
        p[i] = u[i];
        if (ps && vg_parse_bytes(ps, "script process_used", 1, &p[i]) < 0)
            goto error;
        if (u[i] > d->total) {
            PyErr_Format(PyExc_ValueError, "script[%zd]: used %lld exceeds total %lld", i,
                         (long long)u[i], (long long)d->total);
            goto error;
        }
    }
    Py_DECREF(seq);
    sim_free_script(d);
    d->script_t = t, d->script_used = u, d->script_proc = p, d->nscript = n;
    d->t0 = vg_now();
    return 0;
error:
    free(t), free(u), free(p);
    Py_DECREF(seq);
    return -1;
}

/* simulate(index, total=, used=, process_used=, name=, reserved=, allocated=, oom_count=,
 *          retry_count=, script=): add device `index` (== count) or update it. */
static PyObject *py_simulate(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"index", "total", "used", "process_used", "name", "reserved",
                             "allocated", "oom_count", "retry_count", "script", NULL};
    int index;
    PyObject *o[10] = {NULL};
    const char *name = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|$OOOzOOOOO:simulate", kwlist, &index, &o[0],
                                     &o[1], &o[2], &name, &o[4], &o[5], &o[6], &o[7], &o[8]))
        return NULL;
    vg_state *st = vg_get_state(m);
    int64_t v[8];
    static const char *what[8] = {"total", "used", "process_used", "", "reserved",
                                  "allocated", "oom_count", "retry_count"};
    for (int i = 0; i < 8; i++) {
        v[i] = -1;
        if (i != 3 && o[i] != NULL && o[i] != Py_None &&
            vg_parse_bytes(o[i], what[i], i != 0, &v[i]) < 0)
            return NULL;
    }
    pthread_mutex_lock(&st->lock);
    int n = st->nsim;
    pthread_mutex_unlock(&st->lock);
    if (index < 0 || index > n || index >= VG_MAX_DEV) {
        PyErr_Format(PyExc_ValueError,
                     "simulated device index must be 0..%d (existing, or the next one), got %d",
                     n < VG_MAX_DEV - 1 ? n : VG_MAX_DEV - 1, index);
        return NULL;
    }
    if (index == n && v[0] < 0) {
        PyErr_Format(PyExc_ValueError, "simulated device %d is new: total is required", index);
        return NULL;
    }
    /* Build the new state on the side and swap it in under the lock: the sampler never sees
     * a half-updated device. */
    vg_simdev d;
    memset(&d, 0, sizeof d);
    if (index < n) {
        pthread_mutex_lock(&st->lock);
        d = st->sim[index];
        pthread_mutex_unlock(&st->lock);
        d.nscript = 0, d.script_t = NULL, d.script_used = d.script_proc = NULL;
    } else {
        snprintf(d.name, VG_NAME, "Simulated GPU %d", index);
        d.fw_reserved = d.fw_allocated = d.oom_count = d.retry_count = -1;
    }
    if (v[0] >= 0)
        d.total = v[0];
    if (v[1] >= 0)
        d.used = d.process_used = v[1];
    if (v[2] >= 0)
        d.process_used = v[2];
    if (v[4] >= 0)
        d.fw_reserved = v[4];
    if (v[5] >= 0)
        d.fw_allocated = v[5];
    if (v[6] >= 0)
        d.oom_count = v[6];
    if (v[7] >= 0)
        d.retry_count = v[7];
    if (name)
        snprintf(d.name, VG_NAME, "%s", name);
    if (d.used > d.total) {
        PyErr_Format(PyExc_ValueError, "simulated used %lld exceeds total %lld",
                     (long long)d.used, (long long)d.total);
        return NULL;
    }
    if (d.process_used > d.used) {
        PyErr_Format(PyExc_ValueError, "simulated process_used %lld exceeds used %lld",
                     (long long)d.process_used, (long long)d.used);
        return NULL;
    }
    if (o[8] != NULL && o[8] != Py_None && parse_script(o[8], &d) < 0)
        return NULL;
    pthread_mutex_lock(&st->lock);
    vg_simdev old = st->sim[index];
    int keep_script = (o[8] == NULL && index < st->nsim);
    if (keep_script) { /* an update without script= keeps the running script */
        d.nscript = old.nscript, d.script_t = old.script_t;
        d.script_used = old.script_used, d.script_proc = old.script_proc, d.t0 = old.t0;
    }
    st->sim[index] = d;
    if (index == st->nsim)
        st->nsim++;
    pthread_mutex_unlock(&st->lock);
    if (!keep_script && index < n)
        sim_free_script(&old);
    Py_RETURN_NONE;
}

static PyObject *py_simulate_clear(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_state *st = vg_get_state(m);
    pthread_mutex_lock(&st->lock);
    for (int i = 0; i < st->nsim; i++)
        sim_free_script(&st->sim[i]);
    st->nsim = 0;
    pthread_mutex_unlock(&st->lock);
    Py_RETURN_NONE;
}

/* Seconds a cached reading may be reused, 0 = never reuse; under the lock for sampler threads. */
static PyObject *set_interval(PyObject *m, PyObject *arg, const char *what, double hi, size_t offset)
{
    double x;
    if (vg_parse_double(arg, what, -1e-300, hi, &x) < 0)
        return NULL;
    vg_state *st = vg_get_state(m);
    pthread_mutex_lock(&st->lock);
    *(double *)((char *)st + offset) = x;
    pthread_mutex_unlock(&st->lock);
    Py_RETURN_NONE;
}

static PyObject *py_set_proc_interval(PyObject *m, PyObject *arg)
{
    return set_interval(m, arg, "process-list interval", 3600, offsetof(vg_state, proc_interval));
}

static PyObject *py_set_host_interval(PyObject *m, PyObject *arg)
{
    return set_interval(m, arg, "host interval", 60, offsetof(vg_state, host_interval));
}

/* os.register_at_fork(after_in_child=...): a sampler thread of the parent may have held the
 * lock when the process forked; the child has only the forking thread, so start it afresh. */
static PyObject *py_after_fork_child(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_state *st = vg_get_state(m);
    pthread_mutex_init(&st->lock, NULL);
    st->fd_pid = -1; /* /proc/self files name the parent */
    for (int i = 0; i < VG_MAX_DEV; i++)
        st->proc_at[i] = 0;
    Py_RETURN_NONE;
}

static PyObject *py_refresh_devices(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_state *st = vg_get_state(m);
    pthread_mutex_lock(&st->lock);
    st->map_built = 0;
    for (int i = 0; i < VG_MAX_DEV; i++)
        st->proc_at[i] = 0;
    pthread_mutex_unlock(&st->lock);
    Py_RETURN_NONE;
}

PyMethodDef vg_accounting_methods[] = {
    {"device_count", py_device_count, METH_NOARGS, "Number of visible (or simulated) devices."},
    {"gpu_status", py_gpu_status, METH_NOARGS, "Why NVML / CUDA are (un)available."},
    {"snapshot", py_snapshot, METH_O, "snapshot(index) -> Snapshot"},
    {"host", (PyCFunction)(void (*)(void))py_host, METH_VARARGS | METH_KEYWORDS,
     "host(fresh=False) -> Host; system figures are reused for host_interval s unless fresh"},
    {"set_host_interval", py_set_host_interval, METH_O, "seconds system RAM figures are reused (0 = never)"},
    {"budget", py_budget, METH_O, "budget(snapshot_or_mapping) -> int: the budget formula."},
    {"set_limits", (PyCFunction)(void (*)(void))py_set_limits, METH_VARARGS | METH_KEYWORDS,
     "set_limits(device=None, reserve=None, cap=None)"},
    {"get_limits", py_get_limits, METH_O, "get_limits(device_or_None) -> dict"},
    {"clear_limits", py_clear_limits, METH_NOARGS, "Reset every reserve and cap to 0."},
    {"set_probe", py_set_probe, METH_O, "set_probe(callable_or_None)"},
    {"get_probe", py_get_probe, METH_NOARGS, NULL},
    {"simulate", (PyCFunction)(void (*)(void))py_simulate, METH_VARARGS | METH_KEYWORDS,
     "simulate(index, *, total, used, process_used, name, reserved, allocated, oom_count, "
     "retry_count, script)"},
    {"simulate_clear", py_simulate_clear, METH_NOARGS, "Remove all simulated devices."},
    {"set_process_interval", py_set_proc_interval, METH_O, NULL},
    {"refresh_devices", py_refresh_devices, METH_NOARGS, "Rebuild the device mapping."},
    {"after_fork_child", py_after_fork_child, METH_NOARGS, "Reset locks in a forked child."},
    {NULL, NULL, 0, NULL}};

/* ================================================================ lifecycle */

int vg_accounting_add_types(PyObject *m, vg_state *st)
{
    st->SnapshotType = PyStructSequence_NewType(&snap_desc);
    if (st->SnapshotType == NULL || PyModule_AddObjectRef(m, "Snapshot", (PyObject *)st->SnapshotType) < 0)
        return -1;
    st->HostType = PyStructSequence_NewType(&host_desc);
    if (st->HostType == NULL || PyModule_AddObjectRef(m, "Host", (PyObject *)st->HostType) < 0)
        return -1;
    return 0;
}

int vg_accounting_init(vg_state *st)
{
    if (pthread_mutex_init(&st->lock, NULL) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_mutex_init failed");
        return -1;
    }
    st->defcfg.reserve = 0, st->defcfg.cap = 0;
    for (int i = 0; i < VG_MAX_DEV; i++)
        st->cfg[i].reserve = st->cfg[i].cap = -1;
    st->proc_interval = 1.0;
    st->host_interval = 0.010;
    st->fd_pid = -1;
    st->fd_meminfo = st->fd_statm = st->fd_cg_max = st->fd_cg_cur = -1;
    return 0;
}

void vg_accounting_free(vg_state *st)
{
    for (int i = 0; i < st->nsim; i++)
        sim_free_script(&st->sim[i]);
    st->nsim = 0;
    close_fds(st);
    pthread_mutex_destroy(&st->lock);
}
