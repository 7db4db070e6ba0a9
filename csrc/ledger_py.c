/* ledger_py.c — the Python face of the shared ledger (ledger.c) and of the reserve that learns
 * (ledger_reserve.c): argument checks, GIL release around the C core, dicts out.
 *
 * Functions: ledger_join/leave/status/plan/clear/host/participants/sweep/others_planned,
 * host_pinned, set_learn_reserve, learned_reserve. */
#include "vg_ledger.h"
#include "vg_args.h"
#include "vg_snapshot.h"

#include <math.h>
#include <string.h>
#include <unistd.h>

static PyObject *status_dict(const vg_ledger_status *c)
{
    return Py_BuildValue("{s:O,s:s,s:i,s:s,s:i,s:L,s:i,s:i,s:K,s:d,s:K,s:L}", "joined",
                         c->joined ? Py_True : Py_False, "path", c->path, "slot", c->slot,
                         "reason", c->reason, "pid", (int)getpid(), "swept", c->swept, "slots",
                         VG_LEDGER_SLOTS, "devices", VG_LEDGER_DEVS, "size",
                         (unsigned long long)vg_ledger_region_size(), "revalidate_s",
                         c->revalidate_s, "generation", c->generation, "rejoins", c->rejoins);
}

static PyObject *py_ledger_join(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path", "revalidate_s", NULL};
    PyObject *path_obj = Py_None, *rv_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O$O:ledger_join", kwlist, &path_obj, &rv_obj))
        return NULL;
    double rv = VG_LEDGER_REVALIDATE_S;
    if (rv_obj != Py_None && vg_parse_double(rv_obj, "revalidate_s", -1e-300, 10.0, &rv) < 0)
        return NULL;
    char path[VG_LEDGER_PATH_MAX];
    if (path_obj == Py_None) {
        snprintf(path, sizeof path, "/dev/shm/vramguard-%u-v%u", (unsigned)geteuid(), VG_LEDGER_VERSION);
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
    vg_ledger_status *c = PyMem_Malloc(sizeof *c);
    if (c == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    vg_ledger_join(path, rv, c);
    Py_END_ALLOW_THREADS
    PyObject *r = status_dict(c);
    PyMem_Free(c);
    return r;
}

static PyObject *py_ledger_leave(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    Py_BEGIN_ALLOW_THREADS
    vg_ledger_leave();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_ledger_status(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    vg_ledger_status *c = PyMem_Malloc(sizeof *c);
    if (c == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    vg_ledger_get_status(c);
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
    joined = vg_ledger_plan_begin(d, n, fit, &old_planned, &old_pending);
    Py_END_ALLOW_THREADS
    if (!joined || !fit)
        Py_RETURN_TRUE;
    /* The budget (computed in one place) with everyone else's plans, pending ones included. */
    vg_snap s;
    if (vg_snapshot(st, d, NULL, &s) < 0) {
        Py_BEGIN_ALLOW_THREADS
        vg_ledger_plan_set(d, old_planned, old_pending);
        Py_END_ALLOW_THREADS
        return NULL;
    }
    int64_t mine = s.process_used >= 0 ? s.process_used : 0;
    int64_t need = vg_sat_sub(n, mine);
    int ok = need <= s.budget;
    Py_BEGIN_ALLOW_THREADS
    if (!vg_ledger_plan_set(d, ok ? n : old_planned, ok ? 0 : old_pending))
        ok = 1; /* the region went away meanwhile: nothing to contend with */
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
    vg_ledger_plan_clear(d);
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
    vg_ledger_host(v[0], v[1]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *participant_dict(const vg_ledger_part *p)
{
    PyObject *devs = PyDict_New();
    if (devs == NULL)
        return NULL;
    for (int d = 0; d < VG_LEDGER_DEVS; d++) {
        if (p->used[d] == 0 && p->planned[d] == 0 && p->pending[d] == 0)
            continue;
        PyObject *dd = Py_BuildValue("{s:L,s:L,s:L,s:L}", "used", (long long)p->used[d],
                                     "planned", (long long)p->planned[d], "pending",
                                     (long long)p->pending[d], "outstanding",
                                     (long long)p->outstanding[d]);
        PyObject *key = PyLong_FromLong(d);
        int rc = (dd == NULL || key == NULL) ? -1 : PyDict_SetItem(devs, key, dd);
        Py_XDECREF(dd);
        Py_XDECREF(key);
        if (rc < 0) {
            Py_DECREF(devs);
            return NULL;
        }
    }
    return Py_BuildValue("{s:L,s:L,s:i,s:O,s:L,s:L,s:N}", "pid", (long long)p->pid,
                         "start_time", (long long)p->start, "slot", p->slot, "self",
                         p->self ? Py_True : Py_False, "host_rss", (long long)p->host_rss,
                         "host_pinned", (long long)p->host_pinned, "devices", devs);
}

/* ledger_participants() -> (list of dicts, consistent).  Live participants after a sweep;
 * `consistent` is True when every slot's sequence number was unchanged across the whole
 * read, i.e. the figures held all at one instant (retried up to 100 times for that). */
static PyObject *py_ledger_participants(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    vg_ledger_part *parts = PyMem_Calloc(VG_LEDGER_SLOTS, sizeof *parts);
    if (parts == NULL)
        return PyErr_NoMemory();
    int n = 0, consistent = 1;
    Py_BEGIN_ALLOW_THREADS
    (void)vg_ledger_participants(parts, &n, &consistent);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(0);
    for (int i = 0; list != NULL && i < n; i++) {
        PyObject *p = participant_dict(&parts[i]);
        if (p == NULL || PyList_Append(list, p) < 0)
            Py_CLEAR(list);
        Py_XDECREF(p);
    }
    PyMem_Free(parts);
    if (list == NULL)
        return NULL;
    return Py_BuildValue("(NO)", list, consistent ? Py_True : Py_False);
}

static PyObject *py_ledger_sweep(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = vg_ledger_sweep_now();
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *py_ledger_others_planned(PyObject *Py_UNUSED(m), PyObject *dev_obj)
{
    int d;
    if (parse_ledger_device(dev_obj, &d) < 0)
        return NULL;
    int64_t planned, used;
    Py_BEGIN_ALLOW_THREADS
    vg_ledger_others(d, &planned, &used);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(planned);
}

/* host_pinned() -> {"locked": bytes or None, "pinned": bytes or None}, read fresh from the
 * host source (/proc/self/status VmLck, VmPin); also recorded in this process's ledger slot
 * (host_pinned = max of the two) when joined. */
static PyObject *py_host_pinned(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_state *st = vg_get_state(m);
    vg_host h;
    char reason[VG_REASON];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vg_host_read_nogil(&st->src, &h, VG_HOST_FRESH_PINNED, reason);
    if (rc == 0 && vg_ledger_joined() && (h.locked >= 0 || h.pinned >= 0))
        vg_ledger_host(-1, h.locked > h.pinned ? h.locked : h.pinned);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetString(PyExc_OSError, reason);
        return NULL;
    }
    PyObject *a = h.locked >= 0 ? PyLong_FromLongLong(h.locked) : Py_NewRef(Py_None);
    PyObject *b = h.pinned >= 0 ? PyLong_FromLongLong(h.pinned) : Py_NewRef(Py_None);
    if (a == NULL || b == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return NULL;
    }
    return Py_BuildValue("{s:N,s:N}", "locked", a, "pinned", b);
}

/* set_learn_reserve(enabled, *, window_s=600.0, margin=256 MiB): the reserve that learns. */
static PyObject *py_set_learn_reserve(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"enabled", "window_s", "margin", NULL};
    PyObject *en, *win = Py_None, *mar = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|$OO:set_learn_reserve", kwlist, &en, &win,
                                     &mar))
        return NULL;
    if (!PyBool_Check(en)) {
        PyErr_Format(PyExc_TypeError, "enabled must be a bool, got %.80s %.200R",
                     Py_TYPE(en)->tp_name, en);
        return NULL;
    }
    vg_learn_cfg c = {en == Py_True, 600.0, 256LL << 20};
    if (win != Py_None && vg_parse_double(win, "window_s", 0.0, 30 * 86400.0, &c.window_s) < 0)
        return NULL;
    if (win != Py_None && c.window_s < 1.0) {
        vg_raise(PyExc_ValueError, "window_s", "window_s must be >= 1 s, got %.200R", win);
        return NULL;
    }
    if (mar != Py_None && vg_parse_bytes(mar, "margin", 1, &c.margin) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    vg_learn_configure(&c);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* learned_reserve(device) -> dict: enabled, known, reserve, peak, now, margin, window_s,
 * age_s, samples, reason. */
static PyObject *py_learned_reserve(PyObject *m, PyObject *dev)
{
    int d;
    if (vg_parse_index(vg_get_state(m), dev, &d) < 0)
        return NULL;
    vg_learn_view v;
    vg_learn_get(d, &v, vg_now());
    return Py_BuildValue("{s:O,s:O,s:L,s:L,s:L,s:L,s:d,s:d,s:L,s:s}", "enabled",
                         v.enabled ? Py_True : Py_False, "known", v.known ? Py_True : Py_False,
                         "reserve", (long long)v.reserve, "peak", (long long)v.peak, "now",
                         (long long)v.now, "margin", (long long)v.margin, "window_s", v.window_s,
                         "age_s", v.age_s, "samples", (long long)v.samples, "reason", v.reason);
}

PyMethodDef vg_ledger_methods[] = {
    {"ledger_join", (PyCFunction)(void (*)(void))py_ledger_join, METH_VARARGS | METH_KEYWORDS,
     "ledger_join($module, /, path=None, *, revalidate_s=None)\n--\n\nJoin the shared "
     "ledger (default /dev/shm/vramguard-<uid>-v<LEDGER_VERSION>); returns ledger_status(). A foreign or "
     "corrupted region is ignored with the reason in the status, never raised.  revalidate_s "
     "(0.02): how often budget reads re-check the file and poll for dead participants."},
    {"ledger_leave", py_ledger_leave, METH_NOARGS,
     "ledger_leave($module, /)\n--\n\nRelease this process's slot."},
    {"ledger_status", py_ledger_status, METH_NOARGS,
     "ledger_status($module, /)\n--\n\nDict: joined, path, slot, reason (why not joined), pid, "
     "swept, slots, devices, size, revalidate_s, generation, rejoins."},
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
    {"set_learn_reserve", (PyCFunction)(void (*)(void))py_set_learn_reserve,
     METH_VARARGS | METH_KEYWORDS,
     "set_learn_reserve($module, /, enabled, *, window_s=None, margin=None)\n--\n\n"
     "Switch the reserve that learns on or off: the others' peak use over window_s (600) "
     "seconds minus their use now, plus margin (256 MiB) bytes, joins the reserve's max."},
    {"learned_reserve", py_learned_reserve, METH_O,
     "learned_reserve($module, device, /)\n--\n\nWhat the reserve that learns saw on device and "
     "why: enabled, known, reserve, peak, now, margin, window_s, age_s, samples, reason."},
    {NULL, NULL, 0, NULL}};
