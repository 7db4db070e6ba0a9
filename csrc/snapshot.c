/* snapshot.c — one struct per reading, the reserve rule and the budget.
 *
 * Owns: vg_snap and the Snapshot/Host struct sequences, the framework probe merge, the
 * configured reserves and caps (their rule; the storage sits with the sources because
 * sampler threads read it), per-call overrides, and vg_budget(): the one place the budget is
 * computed.  Host RAM is a source like a device: snapshot(None) has a budget too.
 *
 * The reserve rule: reserve = max(ours (configured), the host's (probe), the call's, the
 * learned one (ledger_reserve.c; 0 unless switched on)). */
#include "vg_snapshot.h"
#include "vg_args.h"
#include "vg_ledger.h"

#include <math.h>
#include <string.h>

/* ================================================================ the budget */

/* budget = max(0, free + evictable - reserve - others_planned), and with a cap:
 *          min(that, max(0, cap - live)),  live = max(0, held - evictable),
 *          held = process_used if known, else framework_reserved if known, else used.
 * `free` counts other applications, so keeping `reserve` free leaves room for them.
 * Computed in 128-bit integers and clamped to [0, INT64_MAX] once at the end: a hand-written
 * snapshot may hold any int64, and saturating each step would lose what a later subtraction
 * gives back (free + evictable past INT64_MAX, then minus a large reserve). */
int64_t vg_budget(const vg_snap *s)
{
    typedef __int128 i128;
    i128 b = (i128)s->free + s->evictable - s->reserve;
    /* Shared ledger: what the other participants announced but have not allocated yet is
     * not ours to plan with, so all participants' budgets add up to <= free - reserve. */
    if (s->others_planned > 0)
        b -= s->others_planned;
    if (b < 0)
        b = 0;
    if (s->cap > 0) {
        int64_t held = s->process_used >= 0        ? s->process_used
                       : s->framework_reserved >= 0 ? s->framework_reserved
                                                    : s->used;
        i128 live = (i128)held - s->evictable;
        if (live < 0)
            live = 0;
        i128 room = (i128)s->cap - live;
        if (room < 0)
            room = 0;
        if (room < b)
            b = room;
    }
    return b > INT64_MAX ? INT64_MAX : (int64_t)b;
}

/* ================================================================ probe and snapshot */

/* -1 when the key is absent or None; -2 with an exception on a bad value. */
static int64_t probe_field(PyObject *d, const char *key)
{
    PyObject *v = PyDict_GetItemString(d, key); /* borrowed; never raises */
    if (v == NULL || v == Py_None)
        return -1;
    double x;
    if (!vg_as_double(v, &x)) {
        vg_raise(PyExc_TypeError, key, "framework probe: %s must be a number of bytes, got %.200R",
                     key, v);
        return -2;
    }
    if (!isfinite(x) || x < 0 || x > 9.2e18) {
        vg_raise(PyExc_ValueError, key, "framework probe: %s must be >= 0 and finite, got %.200R",
                     key, v);
        return -2;
    }
    return (int64_t)x;
}

/* A flag: None/absent -1, a bool or a number 0/1; -2 with TypeError otherwise. */
static int flag_value(PyObject *v, const char *key)
{
    double x;
    if (v == NULL || v == Py_None)
        return -1;
    if (PyBool_Check(v))
        return v == Py_True;
    if (!vg_as_double(v, &x) || (x != 0 && x != 1)) {
        vg_raise(PyExc_TypeError, key, "%s must be True, False or None, got %.200R", key, v);
        return -2;
    }
    return x != 0;
}

/* The probe's fragmentation figures (issue 16), all optional. */
static int apply_probe_fragmentation(PyObject *r, vg_snap *s)
{
    int64_t split = probe_field(r, "inactive_split"), largest;
    if (split == -2 || (largest = probe_field(r, "largest_free_block")) == -2)
        return -1;
    int exp = flag_value(PyDict_GetItemString(r, "expandable_segments"), "framework probe: expandable_segments");
    if (exp == -2)
        return -1;
    s->inactive_split = split, s->largest_free = largest, s->expandable = exp;
    return 0;
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
    int frag = apply_probe_fragmentation(r, s);
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
    return frag < 0 ? -1 : 0;
}

static void from_reading(vg_snap *s, const vg_reading *r)
{
    memset(s, 0, sizeof *s);
    s->index = r->index;
    memcpy(s->name, r->name, VG_NAME);
    memcpy(s->uuid, r->uuid, VG_NAME);
    s->source = r->source;
    s->total = r->total, s->free = r->free, s->used = r->used;
    s->process_used = r->process_used;
    s->framework_reserved = r->framework_reserved;
    s->framework_allocated = r->framework_allocated;
    s->framework_active = -1;
    s->oom_count = r->oom_count, s->retry_count = r->retry_count;
    s->timestamp = r->timestamp;
    s->inactive_split = r->inactive_split, s->largest_free = r->largest_free;
    s->expandable = r->expandable;
    /* A simulated device driven by an AllocSim: its cache is reusable, as the probe's rule
     * says for real devices (issue 16). */
    if (r->framework_reserved > r->framework_allocated && r->framework_allocated >= 0)
        s->evictable = r->framework_reserved - r->framework_allocated;
}

/* The configured limits in force for `index` (VG_HOST: host RAM's own). */
static vg_devcfg limits_of(vg_sources *src, int index)
{
    pthread_mutex_lock(&src->lock);
    vg_devcfg c;
    if (index == VG_HOST) {
        c = src->hostcfg;
    } else {
        c = src->cfg[index];
        if (c.reserve < 0)
            c.reserve = src->defcfg.reserve;
        if (c.cap < 0)
            c.cap = src->defcfg.cap;
    }
    pthread_mutex_unlock(&src->lock);
    return c;
}

static void card_snapshot(vg_snap *s, int64_t card)
{
    memset(s, 0, sizeof *s);
    s->index = VG_HOST;
    snprintf(s->name, VG_NAME, "card of %lld bytes", (long long)card);
    snprintf(s->uuid, VG_NAME, "card");
    s->source = "card";
    s->total = s->free = card;
    s->process_used = 0;
    s->framework_reserved = s->framework_allocated = s->framework_active = -1;
    s->oom_count = s->retry_count = -1;
    s->timestamp = vg_now();
    s->inactive_split = s->largest_free = -1, s->expandable = -1;
}

/* The reserve that learns (ledger_reserve.c) joins the reserve rule's max.  Ours is the
 * larger of the process figure and the framework's: NVML's per-process figure is refreshed
 * slowly, and a stale low one would make our own growth look like another application's. */
static void learn_reserve(vg_snap *s, int64_t others_used)
{
    int64_t ours = s->process_used > s->framework_reserved ? s->process_used
                                                           : s->framework_reserved;
    if (s->index == VG_HOST || ours < 0)
        return;
    s->learned_reserve = vg_learn_feed(s->index, s->used, ours, others_used, s->timestamp);
    if (s->learned_reserve > s->reserve)
        s->reserve = s->learned_reserve;
}

int vg_snapshot(vg_state *st, int index, const vg_override *ov, vg_snap *s)
{
    if (ov != NULL && ov->card >= 0) {
        card_snapshot(s, ov->card);
    } else {
        char reason[VG_REASON];
        vg_reading r;
        int rc;
        int64_t others, others_used;
        Py_BEGIN_ALLOW_THREADS
        /* Shared ledger (ledger.c): the others' plans are read BEFORE the source, so an
         * allocation landing in between is counted twice (in free and in its plan), never
         * not at all; ours is published after. */
        vg_ledger_others(index, &others, &others_used);
        rc = vg_source_read_nogil(&st->src, index, &r, reason);
        if (rc == 0)
            vg_ledger_publish(index, r.process_used);
        Py_END_ALLOW_THREADS
        if (rc != 0) {
            PyErr_SetString(index == VG_HOST ? PyExc_OSError : PyExc_RuntimeError, reason);
            return -1;
        }
        from_reading(s, &r);
        s->others_planned = others;
        vg_devcfg c = limits_of(&st->src, index);
        s->reserve = c.reserve, s->cap = c.cap;
        /* The probe speaks for the framework's devices: not for simulated ones, whose
         * figures are the whole truth, nor for host RAM. */
        if (st->probe != NULL && index != VG_HOST && strcmp(s->source, "simulated") != 0 &&
            apply_probe(st, s) < 0)
            return -1;
        learn_reserve(s, others_used);
    }
    if (ov != NULL && ov->reserve > s->reserve)
        s->reserve = ov->reserve;
    s->budget = vg_budget(s);
    return 0;
}

/* ================================================================ struct sequences */

/* Field order is the public contract (README, --json).  Optional fields are None when the
 * source does not know them. */
static PyStructSequence_Field snap_fields[] = {
    {"index", "device index as the framework numbers it; None for host RAM and card sizes"},
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
    {"reserve", "bytes to keep free (max of ours, the host's and the call's)"},
    {"cap", "absolute cap on this process's bytes, 0 = none"},
    {"budget", "bytes this process may still allocate"},
    {"oom_count", "framework OOM counter, or None"},
    {"retry_count", "framework alloc-retry counter, or None"},
    {"timestamp", "monotonic seconds"},
    {"inactive_split", "bytes in free allocator blocks beside live ones (not releasable), or None"},
    {"largest_free_block", "the largest block one request could get without a cache release, or None"},
    {"expandable_segments", "PYTORCH_CUDA_ALLOC_CONF expandable_segments on, or None"},
#define SNAP_F_INACTIVE 17 /* the fragmentation fields (issue 16) */
    /* shared ledger (issue 13) */
    {"others_planned", "bytes other ledger participants planned but have not allocated"},
    {"learned_reserve", "bytes the learned reserve asked for (0 when off); joins the max"},
    {NULL, NULL}};
#define SNAP_NFIELDS 22

static PyStructSequence_Desc snap_desc = {"vramguard.Snapshot",
                                          "Device memory at one instant (bytes).", snap_fields,
                                          SNAP_NFIELDS};

static PyStructSequence_Field host_fields[] = {
    {"total", "bytes of RAM, or the cgroup limit when lower"},
    {"available", "bytes available, within the cgroup limit"},
    {"process_rss", "bytes resident in this process"},
    {"cgroup_limit", "bytes, or None"},
    {"timestamp", "monotonic seconds"},
    /* pinned host memory (issue 13) */
    {"locked", "bytes of this process's locked pages (VmLck), or None"},
    {"pinned", "bytes of this process's pinned pages (VmPin), or None"},
    {NULL, NULL}};
static PyStructSequence_Desc host_desc = {"vramguard.Host", "Host memory (bytes).", host_fields, 7};

static PyObject *opt_int(int64_t v)
{
    if (v < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(v);
}

/* Fill a fresh struct sequence from owned references; NULL entries (failed constructors)
 * make the whole thing fail, after every reference was handed over. */
static PyObject *fill_seq(PyTypeObject *tp, PyObject **v, int n)
{
    PyObject *o = PyStructSequence_New(tp);
    int bad = o == NULL;
    for (int i = 0; i < n; i++) {
        bad |= v[i] == NULL;
        if (o != NULL)
            PyStructSequence_SetItem(o, i, v[i]); /* steals; NULL slots are fine for dealloc */
        else
            Py_XDECREF(v[i]);
    }
    if (bad)
        Py_CLEAR(o);
    return o;
}

PyObject *vg_snap_to_py(vg_state *st, const vg_snap *s)
{
    PyObject *v[SNAP_NFIELDS] = {
        s->index < 0 ? Py_NewRef(Py_None) : PyLong_FromLong(s->index),
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
        opt_int(s->inactive_split),
        opt_int(s->largest_free),
        s->expandable < 0 ? Py_NewRef(Py_None) : PyBool_FromLong(s->expandable),
        PyLong_FromLongLong(s->others_planned),
        PyLong_FromLongLong(s->learned_reserve),
    };
    return fill_seq(st->SnapshotType, v, SNAP_NFIELDS);
}

/* One field: 0 and *out, or -1 with an exception naming the field.  Absent (mapping) gives
 * `dflt`; None gives -1 (unknown). */
static int field_i64(PyObject *obj, int is_seq, int i, int64_t dflt, int64_t *out)
{
    PyObject *v;
    if (is_seq) {
        v = Py_XNewRef(PyStructSequence_GetItem(obj, i)); /* borrowed */
    } else {
        v = PyMapping_GetItemString(obj, snap_fields[i].name);
        if (v == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError))
                return -1;
            PyErr_Clear();
            *out = dflt;
            return 0;
        }
    }
    if (v == NULL || v == Py_None) {
        Py_XDECREF(v);
        *out = -1;
        return 0;
    }
    double x;
    if (!vg_as_double(v, &x)) {
        vg_raise(PyExc_TypeError, snap_fields[i].name, "snapshot field %s must be a byte count, got %.80s %.200R",
                     snap_fields[i].name, Py_TYPE(v)->tp_name, v);
        Py_DECREF(v);
        return -1;
    }
    if (!isfinite(x) || x < -1 || x > 9.2e18) {
        vg_raise(PyExc_ValueError, snap_fields[i].name, "snapshot field %s must be a byte count, got %.200R",
                     snap_fields[i].name, v);
        Py_DECREF(v);
        return -1;
    }
    Py_DECREF(v);
    *out = (int64_t)x;
    return 0;
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
    memset(s, 0, sizeof *s);
    int64_t index;
    if (field_i64(obj, is_seq, 0, 0, &index) < 0)
        return -1;
    s->index = index >= 0 && index < VG_MAX_DEV ? (int)index : VG_HOST;
    s->source = "given";
    s->framework_active = -1;
    int64_t *dst[] = {&s->total, &s->free, &s->used, &s->process_used,
                      &s->framework_reserved, &s->framework_allocated, &s->evictable,
                      &s->reserve, &s->cap, &s->budget, &s->oom_count, &s->retry_count};
    int64_t dflt[] = {0, 0, 0, -1, -1, -1, 0, 0, 0, -2, -1, -1};
    for (int i = 0; i < 12; i++)
        if (field_i64(obj, is_seq, 4 + i, dflt[i], dst[i]) < 0)
            return -1;
    if (s->total < 0 || s->free < 0 || s->used < 0 || s->evictable < 0 || s->reserve < 0 ||
        s->cap < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "snapshot total/free/used/evictable/reserve/cap must be >= 0");
        return -1;
    }
    if (field_i64(obj, is_seq, SNAP_F_INACTIVE, -1, &s->inactive_split) < 0 ||
        field_i64(obj, is_seq, SNAP_F_INACTIVE + 1, -1, &s->largest_free) < 0)
        return -1;
    PyObject *ev = NULL;
    if (is_seq)
        ev = Py_XNewRef(PyStructSequence_GetItem(obj, SNAP_F_INACTIVE + 2));
    else if ((ev = PyMapping_GetItemString(obj, snap_fields[SNAP_F_INACTIVE + 2].name)) == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError))
            return -1;
        PyErr_Clear();
    }
    s->expandable = flag_value(ev, "snapshot field expandable_segments");
    Py_XDECREF(ev);
    if (s->expandable == -2)
        return -1;
    if (s->budget < 0) /* absent: derive it the one way it is ever derived */
        s->budget = vg_budget(s);
    return 0;
}

/* ================================================================ Python functions */

/* METH_FASTCALL: the common call is snapshot(0), on hot paths (~1 us matters here). */
static PyObject *py_snapshot(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwn)
{
    PyObject *dev = Py_None, *res = Py_None, *card = Py_None;
    Py_ssize_t nkw = kwn ? PyTuple_GET_SIZE(kwn) : 0;
    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "snapshot() takes at most 1 positional argument (%zd given)",
                     nargs);
        return NULL;
    }
    if (nargs == 1)
        dev = args[0];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwn, i), *v = args[nargs + i];
        if (PyUnicode_CompareWithASCIIString(k, "reserve") == 0)
            res = v;
        else if (PyUnicode_CompareWithASCIIString(k, "card") == 0)
            card = v;
        else if (PyUnicode_CompareWithASCIIString(k, "device") == 0 && nargs == 0)
            dev = v;
        else {
            PyErr_Format(PyExc_TypeError, "snapshot() got an unexpected keyword argument %R", k);
            return NULL;
        }
    }
    vg_state *st = vg_get_state(m);
    vg_override ov = VG_NO_OVERRIDE;
    int index = VG_HOST;
    if (res != Py_None && vg_parse_bytes(res, "reserve", 1, &ov.reserve) < 0)
        return NULL;
    if (card != Py_None && vg_parse_bytes(card, "card", 0, &ov.card) < 0)
        return NULL;
    /* a card size stands in for the device: its index is not looked at */
    if (ov.card < 0 && vg_parse_device(st, dev, &index) < 0)
        return NULL;
    vg_snap s;
    if (vg_snapshot(st, index, &ov, &s) < 0)
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
    rc = vg_host_read_nogil(&st->src, &h, fresh, reason);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_SetString(PyExc_OSError, reason);
        return NULL;
    }
    PyObject *v[7] = {PyLong_FromLongLong(h.total), PyLong_FromLongLong(h.available),
                      opt_int(h.process_rss), opt_int(h.cgroup_limit),
                      PyFloat_FromDouble(h.timestamp), opt_int(h.locked), opt_int(h.pinned)};
    return fill_seq(st->HostType, v, 7);
}

static PyObject *py_budget(PyObject *m, PyObject *arg)
{
    vg_snap s;
    if (vg_snap_from_py(vg_get_state(m), arg, &s) < 0)
        return NULL;
    return PyLong_FromLongLong(vg_budget(&s));
}

/* Which configuration a limits call addresses: a device index, "host", or None (the default
 * for every GPU).  Returns 0 and *which (index, VG_HOST, or -2 for the default). */
#define VG_DEFAULT_CFG (-2)
static int parse_target(vg_state *st, PyObject *obj, int *which)
{
    if (obj == Py_None) {
        *which = VG_DEFAULT_CFG;
        return 0;
    }
    if (PyUnicode_Check(obj)) {
        if (PyUnicode_CompareWithASCIIString(obj, "host") == 0) {
            *which = VG_HOST;
            return 0;
        }
        vg_raise(PyExc_ValueError, "device",
                 "device must be an index, \"host\" or None (every GPU), got %.200R", obj);
        return -1;
    }
    return vg_parse_index(st, obj, which);
}

static vg_devcfg *cfg_of(vg_sources *src, int which)
{
    return which == VG_DEFAULT_CFG ? &src->defcfg : which == VG_HOST ? &src->hostcfg : &src->cfg[which];
}

/* set_limits(device=None, reserve=None, cap=None): None leaves a value as it is.
 * Everything is parsed before the configuration is touched. */
static PyObject *py_set_limits(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"device", "reserve", "cap", NULL};
    PyObject *dev = Py_None, *res = Py_None, *cap = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OOO:set_limits", kwlist, &dev, &res, &cap))
        return NULL;
    vg_state *st = vg_get_state(m);
    int64_t r = -1, c = -1;
    int which;
    if (res != Py_None && vg_parse_bytes(res, "reserve", 1, &r) < 0)
        return NULL;
    if (cap != Py_None && vg_parse_bytes(cap, "cap", 1, &c) < 0)
        return NULL;
    if (parse_target(st, dev, &which) < 0)
        return NULL;
    pthread_mutex_lock(&st->src.lock);
    vg_devcfg *cfg = cfg_of(&st->src, which);
    if (r >= 0)
        cfg->reserve = r;
    if (c >= 0)
        cfg->cap = c;
    pthread_mutex_unlock(&st->src.lock);
    Py_RETURN_NONE;
}

static PyObject *py_get_limits(PyObject *m, PyObject *arg)
{
    vg_state *st = vg_get_state(m);
    int which;
    if (parse_target(st, arg, &which) < 0)
        return NULL;
    pthread_mutex_lock(&st->src.lock);
    vg_devcfg c = *cfg_of(&st->src, which), d = st->src.defcfg;
    pthread_mutex_unlock(&st->src.lock);
    if (which >= 0) { /* a device follows the default where it has no value of its own */
        if (c.reserve < 0)
            c.reserve = d.reserve;
        if (c.cap < 0)
            c.cap = d.cap;
    }
    return Py_BuildValue("{s:L,s:L}", "reserve", (long long)c.reserve, "cap", (long long)c.cap);
}

static PyObject *py_clear_limits(PyObject *m, PyObject *Py_UNUSED(a))
{
    vg_state *st = vg_get_state(m);
    pthread_mutex_lock(&st->src.lock);
    st->src.defcfg.reserve = st->src.defcfg.cap = 0;
    st->src.hostcfg.reserve = st->src.hostcfg.cap = 0;
    for (int i = 0; i < VG_MAX_DEV; i++)
        st->src.cfg[i].reserve = st->src.cfg[i].cap = -1;
    pthread_mutex_unlock(&st->src.lock);
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

PyMethodDef vg_snapshot_methods[] = {
    {"snapshot", (PyCFunction)(void (*)(void))py_snapshot, METH_FASTCALL | METH_KEYWORDS,
     "snapshot($module, /, device=None, *, reserve=None, card=None)\n--\n\n"
     "Memory of `device` right now; None is host RAM.  reserve= is a floor on the reserve\n"
     "(the effective one is max(configured, the host's, this)); card= plans for a card of\n"
     "that many bytes instead of reading any device."},
    {"host", (PyCFunction)(void (*)(void))py_host, METH_VARARGS | METH_KEYWORDS,
     "host($module, /, fresh=False)\n--\n\n"
     "Host RAM figures; system figures are reused for host_interval s unless fresh."},
    {"budget", py_budget, METH_O,
     "budget($module, fields, /)\n--\n\nThe budget formula over a Snapshot or a mapping."},
    {"set_limits", (PyCFunction)(void (*)(void))py_set_limits, METH_VARARGS | METH_KEYWORDS,
     "set_limits($module, /, device=None, reserve=None, cap=None)\n--\n\n"
     "Configure a device's reserve/cap; device None is the default for every GPU, \"host\"\n"
     "host RAM.  None leaves a value as it is."},
    {"get_limits", py_get_limits, METH_O,
     "get_limits($module, device, /)\n--\n\n{'reserve', 'cap'} in force for device, \"host\" or None."},
    {"clear_limits", py_clear_limits, METH_NOARGS,
     "clear_limits($module, /)\n--\n\nReset every reserve and cap to 0."},
    {"set_probe", py_set_probe, METH_O,
     "set_probe($module, fn, /)\n--\n\nRegister the framework probe (callable or None)."},
    {"get_probe", py_get_probe, METH_NOARGS,
     "get_probe($module, /)\n--\n\nThe registered framework probe, or None."},
    {NULL, NULL, 0, NULL}};

int vg_snapshot_add_types(PyObject *m, vg_state *st)
{
    st->SnapshotType = PyStructSequence_NewType(&snap_desc);
    if (st->SnapshotType == NULL || PyModule_AddObjectRef(m, "Snapshot", (PyObject *)st->SnapshotType) < 0)
        return -1;
    st->HostType = PyStructSequence_NewType(&host_desc);
    if (st->HostType == NULL || PyModule_AddObjectRef(m, "Host", (PyObject *)st->HostType) < 0)
        return -1;
    return 0;
}
