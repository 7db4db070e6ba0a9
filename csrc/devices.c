/* devices.c — the Python face of the sources: how many devices, why not, simulated
 * devices, how often slow sources are re-read, and the reset after fork.
 *
 * Simulated devices are built on the side and swapped in under the sources' lock, so a
 * sampler thread never sees a half-updated device; every argument is parsed before that. */
#include "vg_args.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static PyObject *py_device_count(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_state *st = vg_get_state(m);
    int n = 0;
    char reason[VG_REASON];
    Py_BEGIN_ALLOW_THREADS
    (void)vg_device_count_nogil(&st->src, &n, reason);
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
    if (vg_device_count_nogil(&st->src, &n, reason) == 0)
        snprintf(reason, VG_REASON, "ok");
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&st->src.lock);
    int sim = st->src.nsim, by_uuid = st->src.map_by_uuid;
    pthread_mutex_unlock(&st->src.lock);
    return Py_BuildValue("{s:s,s:s,s:i,s:s,s:O,s:O,s:O}", "nvml", nvr, "cuda", cur, "devices",
                         n, "devices_reason", reason, "simulated", sim ? Py_True : Py_False,
                         "cuda_initialized", vg_cuda_initialized() ? Py_True : Py_False,
                         "mapped_by_uuid", by_uuid ? Py_True : Py_False);
}

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
        if (!vg_as_double(ts, &t[i])) {
            PyErr_Format(PyExc_TypeError, "script[%zd]: t must be a number of seconds, got %.200R",
                         i, ts);
            goto error;
        }
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
    vg_simdev_free_script(d);
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
    pthread_mutex_lock(&st->src.lock);
    int n = st->src.nsim;
    pthread_mutex_unlock(&st->src.lock);
    /* -1: append.  The slot is chosen under the lock at the end, so two threads adding
     * devices while a third clears them cannot ask for a slot that is gone. */
    int append = index == -1;
    if (append && n < VG_MAX_DEV)
        index = n;
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
        pthread_mutex_lock(&st->src.lock);
        d = st->src.sim[index];
        pthread_mutex_unlock(&st->src.lock);
        d.nscript = 0, d.script_t = NULL, d.script_used = d.script_proc = NULL;
    } else {
        snprintf(d.name, VG_NAME, "Simulated GPU %d", index);
        d.fw_reserved = d.fw_allocated = d.oom_count = d.retry_count = -1;
        d.inactive_split = d.largest_free = -1, d.expandable = -1; /* until an AllocSim drives it */
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
    pthread_mutex_lock(&st->src.lock);
    if (append) {
        if (st->src.nsim >= VG_MAX_DEV) {
            pthread_mutex_unlock(&st->src.lock);
            vg_simdev_free_script(&d);
            PyErr_Format(PyExc_ValueError, "at most %d simulated devices", VG_MAX_DEV);
            return NULL;
        }
        if (name == NULL && index != st->src.nsim)
            snprintf(d.name, VG_NAME, "Simulated GPU %d", st->src.nsim);
        index = st->src.nsim;
    }
    if (index > st->src.nsim) { /* cleared since it was checked: no holes in the table */
        pthread_mutex_unlock(&st->src.lock);
        vg_simdev_free_script(&d);
        PyErr_Format(PyExc_ValueError, "simulated device %d no longer exists", index);
        return NULL;
    }
    vg_simdev old = st->src.sim[index];
    int keep_script = (o[8] == NULL && index < st->src.nsim);
    if (keep_script) { /* an update without script= keeps the running script */
        d.nscript = old.nscript, d.script_t = old.script_t;
        d.script_used = old.script_used, d.script_proc = old.script_proc, d.t0 = old.t0;
    }
    st->src.sim[index] = d;
    if (index == st->src.nsim)
        st->src.nsim++;
    pthread_mutex_unlock(&st->src.lock);
    if (!keep_script && !append && index < n)
        vg_simdev_free_script(&old);
    return PyLong_FromLong(index);
}

static PyObject *py_simulate_clear(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_state *st = vg_get_state(m);
    pthread_mutex_lock(&st->src.lock);
    for (int i = 0; i < st->src.nsim; i++)
        vg_simdev_free_script(&st->src.sim[i]);
    st->src.nsim = 0;
    pthread_mutex_unlock(&st->src.lock);
    Py_RETURN_NONE;
}

/* Seconds a cached reading may be reused, 0 = never reuse; under the lock for sampler threads. */
static PyObject *set_interval(PyObject *m, PyObject *arg, const char *what, double hi, size_t offset)
{
    double x;
    if (vg_parse_double(arg, what, -1e-300, hi, &x) < 0)
        return NULL;
    vg_state *st = vg_get_state(m);
    pthread_mutex_lock(&st->src.lock);
    *(double *)((char *)&st->src + offset) = x;
    pthread_mutex_unlock(&st->src.lock);
    Py_RETURN_NONE;
}

static PyObject *py_set_proc_interval(PyObject *m, PyObject *arg)
{
    return set_interval(m, arg, "process-list interval", 3600, offsetof(vg_sources, proc_interval));
}

static PyObject *py_set_host_interval(PyObject *m, PyObject *arg)
{
    return set_interval(m, arg, "host interval", 60, offsetof(vg_sources, host_interval));
}

/* os.register_at_fork(after_in_child=...): a sampler thread of the parent may have held the
 * lock when the process forked; the child has only the forking thread, so start it afresh. */
static PyObject *py_after_fork_child(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_sources_after_fork(&vg_get_state(m)->src);
    Py_RETURN_NONE;
}

static PyObject *py_refresh_devices(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_sources_refresh(&vg_get_state(m)->src);
    Py_RETURN_NONE;
}

PyMethodDef vg_devices_methods[] = {
    {"device_count", py_device_count, METH_NOARGS,
     "device_count($module, /)\n--\n\nNumber of visible (or simulated) devices."},
    {"gpu_status", py_gpu_status, METH_NOARGS,
     "gpu_status($module, /)\n--\n\nWhy NVML / CUDA are (un)available."},
    {"set_host_interval", py_set_host_interval, METH_O,
     "set_host_interval($module, seconds, /)\n--\n\nSeconds system RAM figures are reused (0 = never)."},
    {"set_process_interval", py_set_proc_interval, METH_O,
     "set_process_interval($module, seconds, /)\n--\n\nSeconds NVML's process list is reused (0 = never)."},
    {"simulate", (PyCFunction)(void (*)(void))py_simulate, METH_VARARGS | METH_KEYWORDS,
     "simulate($module, /, index, *, total=None, used=None, process_used=None, name=None,\n"
     "         reserved=None, allocated=None, oom_count=None, retry_count=None, script=None)\n--\n\n"
     "Add simulated device `index` (== count; -1 appends) or update it.  Returns the index."},
    {"simulate_clear", py_simulate_clear, METH_NOARGS,
     "simulate_clear($module, /)\n--\n\nRemove all simulated devices."},
    {"refresh_devices", py_refresh_devices, METH_NOARGS,
     "refresh_devices($module, /)\n--\n\nRebuild the device mapping."},
    {"after_fork_child", py_after_fork_child, METH_NOARGS,
     "after_fork_child($module, /)\n--\n\nReset locks in a forked child."},
    {NULL, NULL, 0, NULL}};
