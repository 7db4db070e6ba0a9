/* sampler.c — memory over time: a C thread, a ring buffer, named stages and their peaks.
 *
 * Owns the Sampler type.  Each tick records (t, device used, process used, host RSS).
 * Cheap sources every tick (simulated device, cuMemGetInfo through a context that already
 * exists, /proc/self/statm); NVML only every `nvml_interval` because frequent NVML polling
 * holds the driver's global lock long enough to stutter the desktop.  Between NVML reads the
 * last value is held.  Stage peaks are folded in as samples arrive, so they survive the
 * ring wrapping; begin/end take a sample themselves so short stages still see one.
 *
 * The thread never touches Python objects; everything it shares with Python sits behind
 * self->lock. */
#include "vg.h"
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

    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t thread;
    pid_t thread_pid; /* the process the thread runs in: a forked child has no thread */
    pid_t lock_pid;   /* the process `lock` belongs to: a Python thread may hold it (without the
                       * GIL) when another forks, running sampler thread or not */
    int running, stopping, lock_ok;

    Py_ssize_t capacity, head, count;
    double *t;
    int64_t *used, *proc, *rss;

    vg_stage *stages;             /* ring of VG_MAX_STAGES records */
    Py_ssize_t shead, nstages;    /* next slot, records held */
    Py_ssize_t open[VG_MAX_OPEN]; /* ring slots of open stages: samples fold into these only */
    int nopen;
    int64_t next_id;

    /* device-reading state, touched only by the sampling code under `lock` */
    vg_CUcontext ctx; /* retained primary context, or NULL */
    int ctx_dev;
    double last_slow, last_rss_at;
    int64_t last_used, last_proc, last_rss;
    char last_error[VG_REASON];
} Sampler;

/* ---------------------------------------------------------------- sampling (no GIL) */

/* Read the device; `fast` means the thread with a current context.  Caller holds lock. */
static void read_device(Sampler *s, double now, int64_t *used, int64_t *proc, int in_thread)
{
    vg_state *st = s->st;
    if (s->device < 0) {
        *used = *proc = -1;
        return;
    }
    pthread_mutex_lock(&st->lock);
    int sim = st->nsim > 0;
    pthread_mutex_unlock(&st->lock);
    vg_snap snap;
    char reason[VG_REASON];
    if (!sim && in_thread && s->ctx != NULL) {
        const vg_cuda_api *cu = vg_cuda(NULL);
        size_t fr, tot;
        if (cu && cu->cuMemGetInfo_v2(&fr, &tot) == 0)
            s->last_used = (int64_t)(tot - fr);
        /* process figure still comes from NVML's slow path below */
    }
    if (sim || s->last_slow == 0 || now - s->last_slow >= s->nvml_interval) {
        if (vg_device_read_nogil(st, s->device, &snap, reason) == 0) {
            if (sim || !(in_thread && s->ctx != NULL))
                s->last_used = snap.used;
            s->last_proc = snap.process_used;
            s->last_error[0] = '\0';
        } else {
            memcpy(s->last_error, reason, VG_REASON);
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

/* Take one sample and record it.  Caller holds s->lock.  Stage marks (mark=1) reuse an RSS
 * reading younger than one interval: /proc/self/statm costs ~1.5 us, a mark should not. */
static void sample_locked(Sampler *s, int in_thread, int mark, double *t_out, int64_t *u_out,
                          int64_t *p_out, int64_t *r_out)
{
    double now = vg_now();
    int64_t used, proc, rss;
    if (mark && s->last_rss_at > 0 && now - s->last_rss_at < s->interval) {
        rss = s->last_rss;
    } else {
        rss = vg_process_rss_nogil(s->st);
        s->last_rss = rss, s->last_rss_at = now;
    }
    read_device(s, now, &used, &proc, in_thread);
    Py_ssize_t i = s->head;
    s->t[i] = now, s->used[i] = used, s->proc[i] = proc, s->rss[i] = rss;
    s->head = (s->head + 1) % s->capacity;
    if (s->count < s->capacity)
        s->count++;
    for (int k = 0; k < s->nopen; k++)
        fold_stage(&s->stages[s->open[k]], used, proc, rss);
    if (t_out)
        *t_out = now, *u_out = used, *p_out = proc, *r_out = rss;
}

static void *sampler_main(void *arg)
{
    Sampler *s = arg;
    const vg_cuda_api *cu = vg_cuda(NULL);
    if (s->ctx != NULL && cu && cu->cuCtxSetCurrent(s->ctx) != 0)
        s->ctx = NULL; /* NVML only, then */
    pthread_mutex_lock(&s->lock);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    while (!s->stopping) {
        sample_locked(s, 1, 0, NULL, NULL, NULL, NULL);
        double ns = (double)next.tv_nsec + s->interval * 1e9;
        next.tv_sec += (time_t)(ns / 1e9);
        next.tv_nsec = (long)fmod(ns, 1e9);
        /* If we fell behind (suspend, overload), skip missed ticks instead of bursting. */
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > next.tv_sec || (now.tv_sec == next.tv_sec && now.tv_nsec > next.tv_nsec))
            next = now;
        while (!s->stopping) {
            int rc = pthread_cond_timedwait(&s->cond, &s->lock, &next);
            if (rc == ETIMEDOUT)
                break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    if (s->ctx != NULL && cu)
        cu->cuCtxSetCurrent(NULL);
    return NULL;
}

/* ---------------------------------------------------------------- lifecycle */

static int free_buffers(Sampler *s)
{
    PyMem_RawFree(s->t), PyMem_RawFree(s->used), PyMem_RawFree(s->proc), PyMem_RawFree(s->rss);
    PyMem_RawFree(s->stages);
    s->t = NULL, s->used = s->proc = s->rss = NULL, s->stages = NULL;
    return 0;
}

/* In a child after fork() the thread does not exist and the lock may have been copied held.
 * Only one thread exists there, so re-initialising is safe (as CPython does for its locks). */
static void fork_check(Sampler *s)
{
    pid_t me = getpid();
    if (s->lock_pid == me)
        return;
    s->lock_pid = me;
    pthread_mutex_init(&s->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cond, &ca);
    pthread_condattr_destroy(&ca);
    if (s->running) {
        s->running = 0;
        s->ctx = NULL; /* the parent's retain is the parent's to release */
    }
}

/* Stop and join.  The thread never needs the GIL, so joining with it held is safe; from
 * stop() we release it anyway so other Python threads run during a slow NVML tick. */
static void stop_thread(Sampler *s, int release_gil)
{
    fork_check(s);
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
    s->running = 0;
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
    int device = 0; /* -1: host only (no GPU) */
    if (devobj == Py_None)
        device = -1;
    else if (devobj != NULL && vg_parse_index(st, devobj, &device) < 0)
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
    if (pthread_mutex_init(&s->lock, NULL) != 0) {
        Py_DECREF(s);
        PyErr_SetString(PyExc_RuntimeError, "pthread_mutex_init failed");
        return NULL;
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int crc = pthread_cond_init(&s->cond, &ca);
    pthread_condattr_destroy(&ca);
    if (crc != 0) {
        pthread_mutex_destroy(&s->lock);
        Py_DECREF(s);
        PyErr_SetString(PyExc_RuntimeError, "pthread_cond_init failed");
        return NULL;
    }
    s->lock_ok = 1;
    s->lock_pid = getpid();
    size_t n = (size_t)capacity;
    s->t = PyMem_RawMalloc(n * sizeof(double));
    s->used = PyMem_RawMalloc(n * sizeof(int64_t));
    s->proc = PyMem_RawMalloc(n * sizeof(int64_t));
    s->rss = PyMem_RawMalloc(n * sizeof(int64_t));
    s->stages = PyMem_RawMalloc(VG_MAX_STAGES * sizeof(vg_stage));
    if (!s->t || !s->used || !s->proc || !s->rss || !s->stages) {
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
    stop_thread(s, 0);
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
    }
    tp->tp_free((PyObject *)s);
    Py_DECREF(tp);
}

/* ---------------------------------------------------------------- methods */

static PyObject *Sampler_start(Sampler *s, PyObject *Py_UNUSED(a))
{
    fork_check(s);
    if (s->running)
        Py_RETURN_NONE;
    /* Borrow the framework's context for cuMemGetInfo only if it is the device's primary
     * context and already active: retaining an active primary context creates nothing. */
    const vg_cuda_api *cu = vg_cuda(NULL);
    vg_CUcontext cur = NULL;
    int dev = -1;
    s->ctx = NULL;
    pthread_mutex_lock(&s->st->lock);
    int sim = s->st->nsim > 0, by_uuid = s->st->map_by_uuid;
    pthread_mutex_unlock(&s->st->lock);
    if (!sim && by_uuid && cu && s->device >= 0 && cu->cuCtxGetCurrent(&cur) == 0 && cur != NULL &&
        cu->cuCtxGetDevice(&dev) == 0 && dev == s->device) {
        unsigned int flags;
        int active = 0;
        vg_CUcontext prim = NULL;
        if (cu->cuDevicePrimaryCtxGetState(dev, &flags, &active) == 0 && active &&
            cu->cuDevicePrimaryCtxRetain(&prim, dev) == 0) {
            if (prim == cur)
                s->ctx = prim, s->ctx_dev = dev;
            else
                cu->cuDevicePrimaryCtxRelease_v2(dev);
        }
    }
    s->stopping = 0;
    s->last_slow = 0;
    s->thread_pid = getpid();
    int rc = pthread_create(&s->thread, NULL, sampler_main, s);
    if (rc != 0) {
        if (s->ctx && cu)
            cu->cuDevicePrimaryCtxRelease_v2(s->ctx_dev);
        s->ctx = NULL;
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    s->running = 1;
    Py_RETURN_NONE;
}

static PyObject *Sampler_stop(Sampler *s, PyObject *Py_UNUSED(a))
{
    stop_thread(s, 1);
    Py_RETURN_NONE;
}

static PyObject *Sampler_reset(Sampler *s, PyObject *Py_UNUSED(a))
{
    fork_check(s);
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
    Py_RETURN_NONE;
}

static PyObject *Sampler_sample(Sampler *s, PyObject *Py_UNUSED(a))
{
    fork_check(s);
    double t;
    int64_t u, p, r;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->lock);
    sample_locked(s, 0, 0, &t, &u, &p, &r);
    pthread_mutex_unlock(&s->lock);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(dLLL)", t, (long long)u, (long long)p, (long long)r);
}

static PyObject *stage_dict(const vg_stage *g)
{
    PyObject *end = g->t1 < 0 ? Py_NewRef(Py_None) : PyFloat_FromDouble(g->t1);
    if (end == NULL)
        return NULL;
    PyObject *d = Py_BuildValue("{s:L,s:s,s:d,s:N,s:L,s:L,s:L,s:L,s:L}", "id", (long long)g->id,
                                "name", g->name, "start", g->t0, "end", end, "start_used",
                                (long long)g->start_used, "end_used", (long long)g->end_used,
                                "peak_used", (long long)g->peak_used, "peak_process",
                                (long long)g->peak_proc, "peak_rss", (long long)g->peak_rss);
    return d;
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
        PyErr_Format(PyExc_ValueError, "stage name must be 1..%d bytes, got %R", VG_STAGE_NAME - 1,
                     name);
        return NULL;
    }
    int full = 0;
    int64_t id = 0;
    fork_check(s);
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->lock);
    if (s->nopen == VG_MAX_OPEN) {
        full = 1;
    } else {
        double t;
        int64_t u, p, r;
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
        sample_locked(s, 0, 1, &t, &u, &p, &r); /* folds into g too */
        g->t0 = t;
        g->start_used = u;
    }
    pthread_mutex_unlock(&s->lock);
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
    long long id = PyLong_AsLongLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    vg_stage copy;
    int found = 0;
    fork_check(s);
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->lock);
    for (int k = 0; k < s->nopen; k++) {
        vg_stage *g = &s->stages[s->open[k]];
        if (g->id == id) {
            double t;
            int64_t u, p, r;
            sample_locked(s, 0, 1, &t, &u, &p, &r);
            g->t1 = t;
            g->end_used = u;
            copy = *g;
            found = 1;
            s->open[k] = s->open[--s->nopen];
            break;
        }
    }
    if (!found && id > 0 && id <= s->next_id)
        found = -1; /* issued, but dropped by the ring or already ended */
    pthread_mutex_unlock(&s->lock);
    Py_END_ALLOW_THREADS
    if (found == 0) {
        PyErr_Format(PyExc_ValueError, "no open stage with id %lld", id);
        return NULL;
    }
    if (found < 0)
        Py_RETURN_NONE;
    return stage_dict(&copy);
}

static PyObject *Sampler_stages(Sampler *s, PyObject *Py_UNUSED(a))
{
    Py_ssize_t n;
    vg_stage *copy = NULL;
    fork_check(s);
    pthread_mutex_lock(&s->lock);
    n = s->nstages;
    copy = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(vg_stage));
    if (copy) {
        Py_ssize_t start = (s->shead - n + VG_MAX_STAGES) % VG_MAX_STAGES;
        for (Py_ssize_t i = 0; i < n; i++)
            copy[i] = s->stages[(start + i) % VG_MAX_STAGES];
    }
    pthread_mutex_unlock(&s->lock);
    if (copy == NULL)
        return PyErr_NoMemory();
    PyObject *list = PyList_New(n);
    for (Py_ssize_t i = 0; list && i < n; i++) {
        PyObject *d = stage_dict(&copy[i]);
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
    /* Size is read under the lock and the copy made under it: a consistent picture. */
    PyArrayObject *arr[4] = {NULL};
    PyObject *out = NULL;
    fork_check(s);
    pthread_mutex_lock(&s->lock);
    npy_intp n = (npy_intp)s->count;
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < 4; i++) {
        arr[i] = (PyArrayObject *)PyArray_SimpleNew(1, &n, i == 0 ? NPY_FLOAT64 : NPY_INT64);
        if (arr[i] == NULL)
            goto done;
    }
    pthread_mutex_lock(&s->lock);
    npy_intp have = (npy_intp)s->count < n ? (npy_intp)s->count : n; /* reset may shrink */
    Py_ssize_t start = (s->head - have + s->capacity) % s->capacity;
    for (npy_intp k = 0; k < have; k++) {
        Py_ssize_t i = (start + k) % s->capacity;
        ((double *)PyArray_DATA(arr[0]))[k] = s->t[i];
        ((int64_t *)PyArray_DATA(arr[1]))[k] = s->used[i];
        ((int64_t *)PyArray_DATA(arr[2]))[k] = s->proc[i];
        ((int64_t *)PyArray_DATA(arr[3]))[k] = s->rss[i];
    }
    pthread_mutex_unlock(&s->lock);
    if (have < n) {
        for (int i = 0; i < 4; i++) {
            PyArray_Dims d = {&have, 1};
            PyObject *r = PyArray_Resize(arr[i], &d, 0, NPY_CORDER);
            if (r == NULL)
                goto done;
            Py_DECREF(r);
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
    return PyBool_FromLong(s->running);
}
static PyObject *Sampler_get_device(Sampler *s, void *Py_UNUSED(c)) { return PyLong_FromLong(s->device); }
static PyObject *Sampler_get_interval(Sampler *s, void *Py_UNUSED(c)) { return PyFloat_FromDouble(s->interval); }
static PyObject *Sampler_get_nvml_interval(Sampler *s, void *Py_UNUSED(c)) { return PyFloat_FromDouble(s->nvml_interval); }
static PyObject *Sampler_get_capacity(Sampler *s, void *Py_UNUSED(c)) { return PyLong_FromSsize_t(s->capacity); }
static PyObject *Sampler_get_driver(Sampler *s, void *Py_UNUSED(c)) { return PyBool_FromLong(s->ctx != NULL); }
static PyObject *Sampler_get_last_error(Sampler *s, void *Py_UNUSED(c))
{
    char buf[VG_REASON];
    pthread_mutex_lock(&s->lock);
    memcpy(buf, s->last_error, VG_REASON);
    pthread_mutex_unlock(&s->lock);
    if (buf[0] == '\0')
        Py_RETURN_NONE;
    return PyUnicode_FromString(buf);
}

static PyMethodDef Sampler_methods[] = {
    {"start", (PyCFunction)Sampler_start, METH_NOARGS, "Start the sampling thread (idempotent)."},
    {"stop", (PyCFunction)Sampler_stop, METH_NOARGS, "Stop and join the thread (idempotent)."},
    {"reset", (PyCFunction)Sampler_reset, METH_NOARGS, "Forget samples and closed stages."},
    {"sample", (PyCFunction)Sampler_sample, METH_NOARGS, "Record one sample now: (t, used, process_used, rss)."},
    {"begin", (PyCFunction)Sampler_begin, METH_O, "begin(name) -> id: open a stage."},
    {"end", (PyCFunction)Sampler_end, METH_O, "end(id) -> dict, or None if the record was dropped: close a stage."},
    {"stages", (PyCFunction)Sampler_stages, METH_NOARGS, "All stage records."},
    {"timeline", (PyCFunction)Sampler_timeline, METH_NOARGS, "Samples as NumPy arrays."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Sampler_getset[] = {
    {"running", (getter)Sampler_get_running, NULL, NULL, NULL},
    {"device", (getter)Sampler_get_device, NULL, NULL, NULL},
    {"interval", (getter)Sampler_get_interval, NULL, NULL, NULL},
    {"nvml_interval", (getter)Sampler_get_nvml_interval, NULL, NULL, NULL},
    {"capacity", (getter)Sampler_get_capacity, NULL, NULL, NULL},
    {"uses_driver", (getter)Sampler_get_driver, NULL, "True when sampling through cuMemGetInfo", NULL},
    {"last_error", (getter)Sampler_get_last_error, NULL, "Why the last device read failed, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot Sampler_slots[] = {
    {Py_tp_doc, "Sampler(device=0, interval=0.01, nvml_interval=0.25, capacity=65536)\n"
                "device=None samples host memory only.\n"
                "Records device/process/host memory over time with named stages."},
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
