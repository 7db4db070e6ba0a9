/* sampler.c — memory over time: a C thread, a ring buffer, named stages and their peaks.
 *
 * Owns the Sampler type.  Each tick records (t, device used, process used, host RSS).
 * Cheap sources every tick (simulated device, cuMemGetInfo through a context that already
 * exists, /proc/self/statm); NVML only every `nvml_interval` because frequent NVML polling
 * holds the driver's global lock long enough to stutter the desktop.  Between NVML reads the
 * last value is held.  Stage peaks are folded in as samples arrive, so they survive the
 * ring wrapping; begin/end take a sample themselves so short stages still see one.
 *
 * Three locks, always taken in this order:
 *   ctl   serialises start/stop/reset: only the first of two stop() calls joins the thread.
 *   io    the device-reading state (last figures, the NVML clock); held across slow reads
 *         (NVML's process list takes milliseconds), always with the GIL released.
 *   lock  the rings; held only to copy a few bytes in or out, never across I/O.
 * Python-facing readers wait on `lock` the bz2 way: try it with the GIL held, else block
 * with the GIL released.  The thread never touches Python objects. */
#include "vg_args.h"
#include "vg_snapshot.h"
#include "vg_numpy.h"

#include <errno.h>
#include <math.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define VG_STAGE_NAME 64
#define VG_MAX_STAGES 4096 /* ring of stage records: the oldest are dropped */
#define VG_MAX_OPEN 64      /* stages open at once (nesting depth x threads) */

typedef struct {
    int64_t id;
    char name[VG_STAGE_NAME];
    double t0, t1; /* t1 < 0 while open */
    int64_t start_used, end_used, peak_used, peak_proc, peak_rss;
} vg_stage;

typedef struct {
    PyObject_HEAD
    PyObject *module; /* keeps the module state alive for the thread */
    vg_state *st;
    int device;
    double interval, nvml_interval;

    pthread_mutex_t ctl, io, lock;
    pthread_cond_t cond; /* with `lock`: wakes the thread for stop() */
    pthread_t thread;
    pid_t pid;           /* the process the locks belong to: a forked child starts afresh */
    int running;         /* written under ctl; read anywhere (atomic) */
    int stopping, lock_ok;

    Py_ssize_t capacity, head, count;
    double *t;
    int64_t *used, *proc, *rss;

    vg_stage *stages;             /* ring of VG_MAX_STAGES records */
    Py_ssize_t shead, nstages;    /* next slot, records held */
    Py_ssize_t open[VG_MAX_OPEN]; /* ring slots of open stages: samples fold into these only */
    int nopen;
    int64_t next_id;

    /* device-reading state, under `io` */
    vg_CUcontext ctx; /* retained primary context, or NULL (written under ctl and io) */
    int ctx_dev;
    double last_slow, last_rss_at;
    int64_t last_used, last_proc, last_rss;
    char io_error[VG_REASON];
    char last_error[VG_REASON]; /* published copy, under `lock` */

    /* stages(): dicts of closed records, built once (GIL held; the thread never looks) */
    PyObject **stage_cache;
    int64_t *stage_cache_id;
} Sampler;

/* Take `m` from a thread holding the GIL without stalling other Python threads: try first,
 * and block only with the GIL released (the bz2 idiom). */
static void lock_with_gil(pthread_mutex_t *m)
{
    if (pthread_mutex_trylock(m) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(m);
        Py_END_ALLOW_THREADS
    }
}

/* ---------------------------------------------------------------- sampling (no GIL) */

/* Read the device (or host RAM for VG_HOST); `in_thread` means the sampler thread, which
 * may hold a current context.  Caller holds s->io (not s->lock): this is the slow part. */
static void read_device(Sampler *s, double now, int64_t *used, int64_t *proc, int in_thread)
{
    vg_sources *src = &s->st->src;
    vg_reading r;
    char reason[VG_REASON];
    if (s->device == VG_HOST) {
        /* host RAM is a source like a device: used = total - available, ours = RSS */
        if (vg_source_read_nogil(src, VG_HOST, &r, reason) == 0) {
            s->last_used = r.used, s->last_proc = r.process_used;
            s->io_error[0] = '\0';
        } else {
            memcpy(s->io_error, reason, VG_REASON);
        }
        *used = s->last_used, *proc = s->last_proc;
        return;
    }
    int sim = vg_sources_simulated(src);
    if (!sim && in_thread && s->ctx != NULL) {
        const vg_cuda_api *cu = vg_cuda(NULL);
        size_t fr, tot;
        if (cu && cu->cuMemGetInfo_v2(&fr, &tot) == 0)
            s->last_used = fr <= tot ? (int64_t)(tot - fr) : 0;
        /* process figure still comes from NVML's slow path below */
    }
    if (sim || s->last_slow == 0 || now - s->last_slow >= s->nvml_interval) {
        if (vg_source_read_nogil(src, s->device, &r, reason) == 0) {
            if (sim || !(in_thread && s->ctx != NULL))
                s->last_used = r.used;
            s->last_proc = r.process_used;
            s->io_error[0] = '\0';
        } else {
            memcpy(s->io_error, reason, VG_REASON);
        }
        s->last_slow = now;
    }
    *used = s->last_used;
    *proc = s->last_proc;
}

static void fold_stage(vg_stage *g, int64_t used, int64_t proc, int64_t rss)
{
    if (used > g->peak_used)
        g->peak_used = used;
    if (proc > g->peak_proc)
        g->peak_proc = proc;
    if (rss > g->peak_rss)
        g->peak_rss = rss;
}

typedef struct {
    double t;
    int64_t used, proc, rss;
} vg_sample;

/* Read one sample.  Caller holds s->io.  Stage marks (mark=1) reuse an RSS reading younger
 * than one interval: /proc/self/statm costs ~1.5 us, a mark should not. */
static vg_sample read_sample(Sampler *s, int in_thread, int mark)
{
    vg_sample x;
    x.t = vg_now();
    if (mark && s->last_rss_at > 0 && x.t - s->last_rss_at < s->interval) {
        x.rss = s->last_rss;
    } else {
        x.rss = vg_process_rss_nogil(&s->st->src);
        s->last_rss = x.rss, s->last_rss_at = x.t;
    }
    read_device(s, x.t, &x.used, &x.proc, in_thread);
    return x;
}

/* Record a sample into the ring and every open stage.  Caller holds s->io and s->lock;
 * holding io keeps the ring in time order. */
static void record_locked(Sampler *s, const vg_sample *x)
{
    Py_ssize_t i = s->head;
    s->t[i] = x->t, s->used[i] = x->used, s->proc[i] = x->proc, s->rss[i] = x->rss;
    s->head = (s->head + 1) % s->capacity;
    if (s->count < s->capacity)
        s->count++;
    for (int k = 0; k < s->nopen; k++)
        fold_stage(&s->stages[s->open[k]], x->used, x->proc, x->rss);
    memcpy(s->last_error, s->io_error, VG_REASON);
}

static void *sampler_main(void *arg)
{
    Sampler *s = arg;
    const vg_cuda_api *cu = vg_cuda(NULL);
    pthread_mutex_lock(&s->io);
    if (s->ctx != NULL && cu && cu->cuCtxSetCurrent(s->ctx) != 0) {
        /* NVML only, then; the retain start() took is ours to give back */
        cu->cuDevicePrimaryCtxRelease_v2(s->ctx_dev);
        s->ctx = NULL;
    }
    pthread_mutex_unlock(&s->io);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        pthread_mutex_lock(&s->io);
        vg_sample x = read_sample(s, 1, 0);
        pthread_mutex_lock(&s->lock);
        record_locked(s, &x);
        pthread_mutex_unlock(&s->lock);
        pthread_mutex_unlock(&s->io);

        double ns = (double)next.tv_nsec + s->interval * 1e9;
        next.tv_sec += (time_t)(ns / 1e9);
        next.tv_nsec = (long)fmod(ns, 1e9);
        /* If we fell behind (suspend, overload), skip missed ticks instead of bursting. */
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > next.tv_sec || (now.tv_sec == next.tv_sec && now.tv_nsec > next.tv_nsec))
            next = now;
        pthread_mutex_lock(&s->lock);
        while (!s->stopping && pthread_cond_timedwait(&s->cond, &s->lock, &next) != ETIMEDOUT)
            ;
        int stop = s->stopping;
        pthread_mutex_unlock(&s->lock);
        if (stop)
            break;
    }
    if (s->ctx != NULL && cu)
        cu->cuCtxSetCurrent(NULL);
    return NULL;
}

/* ---------------------------------------------------------------- lifecycle */

static void free_buffers(Sampler *s)
{
    PyMem_RawFree(s->t), PyMem_RawFree(s->used), PyMem_RawFree(s->proc), PyMem_RawFree(s->rss);
    PyMem_RawFree(s->stages);
    s->t = NULL, s->used = s->proc = s->rss = NULL, s->stages = NULL;
    if (s->stage_cache != NULL)
        for (Py_ssize_t i = 0; i < VG_MAX_STAGES; i++)
            Py_CLEAR(s->stage_cache[i]);
    PyMem_Free(s->stage_cache);
    PyMem_Free(s->stage_cache_id);
    s->stage_cache = NULL, s->stage_cache_id = NULL;
}

static int init_locks(Sampler *s)
{
    pthread_condattr_t ca;
    if (pthread_mutex_init(&s->ctl, NULL) != 0)
        return -1;
    if (pthread_mutex_init(&s->io, NULL) != 0)
        goto no_io;
    if (pthread_mutex_init(&s->lock, NULL) != 0)
        goto no_lock;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&s->cond, &ca);
    pthread_condattr_destroy(&ca);
    if (rc == 0)
        return 0;
    pthread_mutex_destroy(&s->lock);
no_lock:
    pthread_mutex_destroy(&s->io);
no_io:
    pthread_mutex_destroy(&s->ctl);
    return -1;
}

/* In a child after fork() the thread does not exist and any lock may have been copied held
 * (by the thread, or by another Python thread inside begin()).  Only one thread exists there
 * on the first call, so re-initialising is safe (as CPython does for its locks). */
static void fork_check(Sampler *s)
{
    pid_t me = getpid();
    if (s->pid == me)
        return;
    (void)init_locks(s);
    s->stopping = 0;
    __atomic_store_n(&s->running, 0, __ATOMIC_RELEASE);
    s->ctx = NULL; /* the parent's retain is the parent's to release */
    s->pid = me;
}

/* Stop and join.  Caller holds s->ctl, so only one caller ever joins.  The thread never
 * needs the GIL; from Python we release it anyway so other threads run during a slow tick. */
static void stop_locked(Sampler *s, int release_gil)
{
    if (!s->running)
        return;
    pthread_mutex_lock(&s->lock);
    s->stopping = 1;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->lock);
    if (release_gil) {
        Py_BEGIN_ALLOW_THREADS
        pthread_join(s->thread, NULL);
        Py_END_ALLOW_THREADS
    } else {
        pthread_join(s->thread, NULL);
    }
    __atomic_store_n(&s->running, 0, __ATOMIC_RELEASE);
    if (s->ctx != NULL) {
        const vg_cuda_api *cu = vg_cuda(NULL);
        if (cu)
            cu->cuDevicePrimaryCtxRelease_v2(s->ctx_dev);
        s->ctx = NULL;
    }
}

static PyObject *Sampler_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"device", "interval", "nvml_interval", "capacity", NULL};
    PyObject *devobj = NULL, *iobj = NULL, *nobj = NULL;
    double interval = 0.010, nvml_interval = 0.250;
    Py_ssize_t capacity = 65536;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OOOn:Sampler", kwlist, &devobj, &iobj, &nobj,
                                     &capacity))
        return NULL;
    if (iobj && vg_parse_double(iobj, "interval", 0, 3600, &interval) < 0)
        return NULL;
    if (nobj && vg_parse_double(nobj, "nvml_interval", 0, 3600, &nvml_interval) < 0)
        return NULL;
    /* 2^24 samples is 46 hours at 10 ms and 512 MiB of ring; more is a mistake */
    if (capacity < 2 || capacity > (1 << 24)) {
        PyErr_Format(PyExc_ValueError, "capacity must be 2..%d samples, got %zd", 1 << 24,
                     capacity);
        return NULL;
    }
    vg_state *st = vg_state_from_type(type);
    if (st == NULL)
        return NULL;
    int device = 0; /* VG_HOST: host RAM */
    if (devobj != NULL && vg_parse_device(st, devobj, &device) < 0)
        return NULL;
    Sampler *s = (Sampler *)type->tp_alloc(type, 0);
    if (s == NULL)
        return NULL;
    s->module = PyType_GetModule(type);
    Py_XINCREF(s->module);
    s->st = st;
    s->device = device;
    s->interval = interval;
    s->nvml_interval = nvml_interval < interval ? interval : nvml_interval;
    s->capacity = capacity;
    s->last_used = s->last_proc = -1;
    s->pid = getpid();
    if (init_locks(s) != 0) {
        Py_DECREF(s);
        PyErr_SetString(PyExc_RuntimeError, "pthread_mutex_init failed");
        return NULL;
    }
    s->lock_ok = 1;
    size_t n = (size_t)capacity;
    s->t = PyMem_RawMalloc(n * sizeof(double));
    s->used = PyMem_RawMalloc(n * sizeof(int64_t));
    s->proc = PyMem_RawMalloc(n * sizeof(int64_t));
    s->rss = PyMem_RawMalloc(n * sizeof(int64_t));
    s->stages = PyMem_RawMalloc(VG_MAX_STAGES * sizeof(vg_stage));
    s->stage_cache = PyMem_Calloc(VG_MAX_STAGES, sizeof(PyObject *));
    s->stage_cache_id = PyMem_Calloc(VG_MAX_STAGES, sizeof(int64_t));
    if (!s->t || !s->used || !s->proc || !s->rss || !s->stages || !s->stage_cache ||
        !s->stage_cache_id) {
        Py_DECREF(s);
        return PyErr_NoMemory();
    }
    return (PyObject *)s;
}

static int Sampler_traverse(Sampler *s, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(s));
    Py_VISIT(s->module);
    return 0;
}

static int Sampler_clear(Sampler *s)
{
    if (s->lock_ok) {
        fork_check(s);
        lock_with_gil(&s->ctl);
        stop_locked(s, 0);
        pthread_mutex_unlock(&s->ctl);
    }
    Py_CLEAR(s->module);
    return 0;
}

static void Sampler_dealloc(Sampler *s)
{
    PyTypeObject *tp = Py_TYPE(s);
    PyObject_GC_UnTrack(s);
    Sampler_clear(s);
    free_buffers(s);
    if (s->lock_ok) {
        pthread_cond_destroy(&s->cond);
        pthread_mutex_destroy(&s->lock);
        pthread_mutex_destroy(&s->io);
        pthread_mutex_destroy(&s->ctl);
    }
    tp->tp_free((PyObject *)s);
    Py_DECREF(tp);
}

/* ---------------------------------------------------------------- methods */

static PyObject *Sampler_start(Sampler *s, PyObject *Py_UNUSED(a))
{
    fork_check(s);
    lock_with_gil(&s->ctl);
    if (s->running) {
        pthread_mutex_unlock(&s->ctl);
        Py_RETURN_NONE;
    }
    /* Borrow the framework's context for cuMemGetInfo only if it is the device's primary
     * context and already active: retaining an active primary context creates nothing. */
    const vg_cuda_api *cu = vg_cuda(NULL);
    vg_CUcontext cur = NULL, mine = NULL;
    int dev = -1;
    int sim = vg_sources_simulated(&s->st->src), by_uuid = vg_sources_by_uuid(&s->st->src);
    if (!sim && by_uuid && cu && s->device >= 0 && cu->cuCtxGetCurrent(&cur) == 0 && cur != NULL &&
        cu->cuCtxGetDevice(&dev) == 0 && dev == s->device) {
        unsigned int flags;
        int active = 0;
        vg_CUcontext prim = NULL;
        if (cu->cuDevicePrimaryCtxGetState(dev, &flags, &active) == 0 && active &&
            cu->cuDevicePrimaryCtxRetain(&prim, dev) == 0) {
            if (prim == cur)
                mine = prim;
            else
                cu->cuDevicePrimaryCtxRelease_v2(dev);
        }
    }
    lock_with_gil(&s->io);
    s->ctx = mine, s->ctx_dev = dev;
    s->last_slow = 0;
    pthread_mutex_unlock(&s->io);
    s->stopping = 0;
    int rc = pthread_create(&s->thread, NULL, sampler_main, s);
    if (rc != 0) {
        if (mine && cu)
            cu->cuDevicePrimaryCtxRelease_v2(dev);
        s->ctx = NULL;
        pthread_mutex_unlock(&s->ctl);
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    __atomic_store_n(&s->running, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&s->ctl);
    Py_RETURN_NONE;
}

static PyObject *Sampler_stop(Sampler *s, PyObject *Py_UNUSED(a))
{
    fork_check(s);
    lock_with_gil(&s->ctl);
    stop_locked(s, 1);
    pthread_mutex_unlock(&s->ctl);
    Py_RETURN_NONE;
}

static PyObject *Sampler_reset(Sampler *s, PyObject *Py_UNUSED(a))
{
    fork_check(s);
    lock_with_gil(&s->ctl);
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->lock);
    s->head = s->count = 0;
    /* open stages stay open: a `with stage()` around a reset must still be able to end.
     * Compact them to the front of the ring, in order. */
    vg_stage keep[VG_MAX_OPEN];
    for (int k = 0; k < s->nopen; k++)
        keep[k] = s->stages[s->open[k]];
    for (int k = 0; k < s->nopen; k++) {
        s->stages[k] = keep[k];
        s->open[k] = k;
    }
    s->nstages = s->shead = s->nopen;
    pthread_mutex_unlock(&s->lock);
    Py_END_ALLOW_THREADS
    pthread_mutex_unlock(&s->ctl);
    Py_RETURN_NONE;
}

static PyObject *Sampler_sample(Sampler *s, PyObject *Py_UNUSED(a))
{
    fork_check(s);
    vg_sample x;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->io);
    x = read_sample(s, 0, 0);
    pthread_mutex_lock(&s->lock);
    record_locked(s, &x);
    pthread_mutex_unlock(&s->lock);
    pthread_mutex_unlock(&s->io);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(dLLL)", x.t, (long long)x.used, (long long)x.proc, (long long)x.rss);
}

static PyObject *stage_dict(const vg_stage *g)
{
    PyObject *end = g->t1 < 0 ? Py_NewRef(Py_None) : PyFloat_FromDouble(g->t1);
    if (end == NULL)
        return NULL;
    /* "N" hands `end` over even when building fails: no decref after this */
    return Py_BuildValue("{s:L,s:s,s:d,s:N,s:L,s:L,s:L,s:L,s:L}", "id", (long long)g->id,
                         "name", g->name, "start", g->t0, "end", end, "start_used",
                         (long long)g->start_used, "end_used", (long long)g->end_used,
                         "peak_used", (long long)g->peak_used, "peak_process",
                         (long long)g->peak_proc, "peak_rss", (long long)g->peak_rss);
}

static PyObject *Sampler_begin(Sampler *s, PyObject *name)
{
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "stage name must be str, got %.80s", Py_TYPE(name)->tp_name);
        return NULL;
    }
    Py_ssize_t len;
    const char *c = PyUnicode_AsUTF8AndSize(name, &len);
    if (c == NULL)
        return NULL;
    if (len < 1 || len >= VG_STAGE_NAME) {
        PyErr_Format(PyExc_ValueError, "stage name must be 1..%d bytes, got %.100R",
                     VG_STAGE_NAME - 1, name);
        return NULL;
    }
    int full = 0;
    int64_t id = 0;
    fork_check(s);
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->io);
    vg_sample x = read_sample(s, 0, 1);
    pthread_mutex_lock(&s->lock);
    if (s->nopen == VG_MAX_OPEN) {
        full = 1;
    } else {
        Py_ssize_t slot = s->shead;
        /* The ring may wrap onto a stage that is still open (open across 4096 others): it is
         * dropped from the open list, and its end() returns None. */
        for (int k = 0; k < s->nopen; k++)
            if (s->open[k] == slot) {
                s->open[k] = s->open[--s->nopen];
                break;
            }
        vg_stage *g = &s->stages[slot];
        s->shead = (slot + 1) % VG_MAX_STAGES;
        if (s->nstages < VG_MAX_STAGES)
            s->nstages++;
        memset(g, 0, sizeof *g);
        memcpy(g->name, c, (size_t)len);
        g->id = id = ++s->next_id;
        g->t1 = -1;
        g->peak_used = g->peak_proc = g->peak_rss = -1;
        s->open[s->nopen++] = slot;
        record_locked(s, &x); /* folds into g too */
        g->t0 = x.t;
        g->start_used = x.used;
    }
    pthread_mutex_unlock(&s->lock);
    pthread_mutex_unlock(&s->io);
    Py_END_ALLOW_THREADS
    if (full) {
        PyErr_Format(PyExc_RuntimeError, "%d stages open at once: is something never ending them?",
                     VG_MAX_OPEN);
        return NULL;
    }
    return PyLong_FromLongLong(id);
}

static PyObject *Sampler_end(Sampler *s, PyObject *arg)
{
    /* parsed before any state is looked at: __index__ may run Python code */
    PyObject *num = PyNumber_Index(arg);
    if (num == NULL)
        return NULL;
    int overflow = 0;
    long long id = PyLong_AsLongLongAndOverflow(num, &overflow);
    Py_DECREF(num);
    if (overflow)
        id = 0; /* never issued */
    vg_stage copy;
    int found = 0;
    fork_check(s);
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->io);
    vg_sample x = read_sample(s, 0, 1);
    pthread_mutex_lock(&s->lock);
    for (int k = 0; k < s->nopen; k++) {
        vg_stage *g = &s->stages[s->open[k]];
        if (g->id == id) {
            record_locked(s, &x);
            g->t1 = x.t;
            g->end_used = x.used;
            copy = *g;
            found = 1;
            s->open[k] = s->open[--s->nopen];
            break;
        }
    }
    if (!found && id > 0 && id <= s->next_id)
        found = -1; /* issued, but dropped by the ring or already ended */
    pthread_mutex_unlock(&s->lock);
    pthread_mutex_unlock(&s->io);
    Py_END_ALLOW_THREADS
    if (found == 0) {
        PyErr_Format(PyExc_ValueError, "no open stage with id %.100R", arg);
        return NULL;
    }
    if (found < 0)
        Py_RETURN_NONE;
    return stage_dict(&copy);
}

/* Closed records never change, so their dicts are built once and handed out as copies
 * (a caller may change what it gets): a full ring costs a list of 4096 dict copies, not
 * 4096 Py_BuildValue calls. */
static PyObject *Sampler_stages(Sampler *s, PyObject *Py_UNUSED(a))
{
    fork_check(s);
    vg_stage *copy = PyMem_RawMalloc(VG_MAX_STAGES * sizeof(vg_stage));
    if (copy == NULL)
        return PyErr_NoMemory();
    lock_with_gil(&s->lock);
    Py_ssize_t n = s->nstages;
    Py_ssize_t start = (s->shead - n + VG_MAX_STAGES) % VG_MAX_STAGES;
    /* two memcpy calls instead of a loop: the ring is at most two runs */
    Py_ssize_t first = n < VG_MAX_STAGES - start ? n : VG_MAX_STAGES - start;
    memcpy(copy, s->stages + start, (size_t)first * sizeof(vg_stage));
    memcpy(copy + first, s->stages, (size_t)(n - first) * sizeof(vg_stage));
    pthread_mutex_unlock(&s->lock);
    PyObject *list = PyList_New(n);
    for (Py_ssize_t i = 0; list && i < n; i++) {
        const vg_stage *g = &copy[i];
        Py_ssize_t slot = (start + i) % VG_MAX_STAGES;
        PyObject *d;
        if (g->t1 >= 0 && s->stage_cache[slot] != NULL && s->stage_cache_id[slot] == g->id) {
            /* a strong reference: an allocation may run a finalizer that lets another
             * thread's stages() replace the slot */
            PyObject *cached = Py_NewRef(s->stage_cache[slot]);
            d = PyDict_Copy(cached);
            Py_DECREF(cached);
        } else {
            d = stage_dict(g);
            if (d != NULL && g->t1 >= 0) {
                PyObject *c = PyDict_Copy(d);
                if (c == NULL)
                    Py_CLEAR(d);
                else {
                    Py_XSETREF(s->stage_cache[slot], c);
                    s->stage_cache_id[slot] = g->id;
                }
            }
        }
        if (d == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, d);
    }
    PyMem_RawFree(copy);
    return list;
}

static PyObject *Sampler_timeline(Sampler *s, PyObject *Py_UNUSED(a))
{
    /* Arrays are allocated outside the lock (for the size read first) and filled under it;
     * a reset in between can only shrink what there is. */
    PyArrayObject *arr[4] = {NULL};
    PyObject *out = NULL;
    fork_check(s);
    lock_with_gil(&s->lock);
    npy_intp n = (npy_intp)s->count;
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < 4; i++) {
        arr[i] = (PyArrayObject *)PyArray_SimpleNew(1, &n, i == 0 ? NPY_FLOAT64 : NPY_INT64);
        if (arr[i] == NULL)
            goto done;
    }
    double *t = PyArray_DATA(arr[0]);
    int64_t *u = PyArray_DATA(arr[1]), *p = PyArray_DATA(arr[2]), *r = PyArray_DATA(arr[3]);
    npy_intp have;
    lock_with_gil(&s->lock);
    have = (npy_intp)s->count < n ? (npy_intp)s->count : n;
    Py_ssize_t start = (s->head - have + s->capacity) % s->capacity;
    Py_ssize_t first = have < s->capacity - start ? have : s->capacity - start;
    memcpy(t, s->t + start, (size_t)first * sizeof *t);
    memcpy(t + first, s->t, (size_t)(have - first) * sizeof *t);
    memcpy(u, s->used + start, (size_t)first * sizeof *u);
    memcpy(u + first, s->used, (size_t)(have - first) * sizeof *u);
    memcpy(p, s->proc + start, (size_t)first * sizeof *p);
    memcpy(p + first, s->proc, (size_t)(have - first) * sizeof *p);
    memcpy(r, s->rss + start, (size_t)first * sizeof *r);
    memcpy(r + first, s->rss, (size_t)(have - first) * sizeof *r);
    pthread_mutex_unlock(&s->lock);
    if (have < n) {
        for (int i = 0; i < 4; i++) {
            PyArray_Dims d = {&have, 1};
            PyObject *res = PyArray_Resize(arr[i], &d, 0, NPY_CORDER);
            if (res == NULL)
                goto done;
            Py_DECREF(res);
        }
    }
    out = Py_BuildValue("{s:O,s:O,s:O,s:O}", "t", arr[0], "used", arr[1], "process_used", arr[2],
                        "rss", arr[3]);
done:
    for (int i = 0; i < 4; i++)
        Py_XDECREF(arr[i]);
    return out;
}

static PyObject *Sampler_get_running(Sampler *s, void *Py_UNUSED(c))
{
    fork_check(s);
    return PyBool_FromLong(__atomic_load_n(&s->running, __ATOMIC_ACQUIRE));
}
static PyObject *Sampler_get_device(Sampler *s, void *Py_UNUSED(c))
{
    if (s->device == VG_HOST)
        Py_RETURN_NONE;
    return PyLong_FromLong(s->device);
}
static PyObject *Sampler_get_interval(Sampler *s, void *Py_UNUSED(c)) { return PyFloat_FromDouble(s->interval); }
static PyObject *Sampler_get_nvml_interval(Sampler *s, void *Py_UNUSED(c)) { return PyFloat_FromDouble(s->nvml_interval); }
static PyObject *Sampler_get_capacity(Sampler *s, void *Py_UNUSED(c)) { return PyLong_FromSsize_t(s->capacity); }
static PyObject *Sampler_get_driver(Sampler *s, void *Py_UNUSED(c))
{
    fork_check(s);
    lock_with_gil(&s->io);
    int d = s->ctx != NULL;
    pthread_mutex_unlock(&s->io);
    return PyBool_FromLong(d);
}
static PyObject *Sampler_get_last_error(Sampler *s, void *Py_UNUSED(c))
{
    char buf[VG_REASON];
    fork_check(s);
    lock_with_gil(&s->lock);
    memcpy(buf, s->last_error, VG_REASON);
    pthread_mutex_unlock(&s->lock);
    if (buf[0] == '\0')
        Py_RETURN_NONE;
    return PyUnicode_FromString(buf);
}

static PyMethodDef Sampler_methods[] = {
    {"start", (PyCFunction)Sampler_start, METH_NOARGS,
     "start($self, /)\n--\n\nStart the sampling thread (idempotent)."},
    {"stop", (PyCFunction)Sampler_stop, METH_NOARGS,
     "stop($self, /)\n--\n\nStop and join the thread (idempotent; safe from several threads)."},
    {"reset", (PyCFunction)Sampler_reset, METH_NOARGS,
     "reset($self, /)\n--\n\nForget samples and closed stages."},
    {"sample", (PyCFunction)Sampler_sample, METH_NOARGS,
     "sample($self, /)\n--\n\nRecord one sample now: (t, used, process_used, rss)."},
    {"begin", (PyCFunction)Sampler_begin, METH_O,
     "begin($self, name, /)\n--\n\nOpen a stage; returns its id."},
    {"end", (PyCFunction)Sampler_end, METH_O,
     "end($self, id, /)\n--\n\nClose a stage: its record, or None if the ring dropped it."},
    {"stages", (PyCFunction)Sampler_stages, METH_NOARGS,
     "stages($self, /)\n--\n\nAll stage records, oldest first."},
    {"timeline", (PyCFunction)Sampler_timeline, METH_NOARGS,
     "timeline($self, /)\n--\n\nSamples as NumPy arrays: t, used, process_used, rss."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Sampler_getset[] = {
    {"running", (getter)Sampler_get_running, NULL, NULL, NULL},
    {"device", (getter)Sampler_get_device, NULL, "device index, or None for host RAM", NULL},
    {"interval", (getter)Sampler_get_interval, NULL, NULL, NULL},
    {"nvml_interval", (getter)Sampler_get_nvml_interval, NULL, NULL, NULL},
    {"capacity", (getter)Sampler_get_capacity, NULL, NULL, NULL},
    {"uses_driver", (getter)Sampler_get_driver, NULL, "True when sampling through cuMemGetInfo", NULL},
    {"last_error", (getter)Sampler_get_last_error, NULL, "Why the last device read failed, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot Sampler_slots[] = {
    {Py_tp_doc, "Sampler(device=0, interval=0.01, nvml_interval=0.25, capacity=65536)\n--\n\n"
                "Records device/process/host memory over time with named stages.\n"
                "device=None samples host RAM as a source (used = total - available)."},
    {Py_tp_new, Sampler_new},
    {Py_tp_dealloc, Sampler_dealloc},
    {Py_tp_traverse, Sampler_traverse},
    {Py_tp_clear, Sampler_clear},
    {Py_tp_methods, Sampler_methods},
    {Py_tp_getset, Sampler_getset},
    {0, NULL}};

static PyType_Spec Sampler_spec = {"vramguard._native.Sampler", sizeof(Sampler), 0,
                                   Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, Sampler_slots};

int vg_sampler_add_type(PyObject *m, vg_state *st)
{
    st->SamplerType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Sampler_spec, NULL);
    if (st->SamplerType == NULL)
        return -1;
    return PyModule_AddObjectRef(m, "Sampler", (PyObject *)st->SamplerType);
}
