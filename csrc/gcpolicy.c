/* gcpolicy.c — collect or skip, and why.
 *
 * Owns the Policy type: threshold, low-VRAM mode, the ZLUDA exception, hysteresis and the
 * OOM/retry counter baselines.  A collection costs ~0.1 s and deoptimises JIT paths, so the
 * common answer must be a cheap "skip": check() reads the device without building Python
 * objects unless it decides to collect.
 *
 * Order of the rules (first match wins):
 *   forced -> oom / retries grew -> hysteresis (skip) -> budget < need -> growth -> used% >= threshold
 * Growth: a steady workflow comes back to the same live bytes at the same stage boundary every
 * run; live bytes above that stage's baseline by more than `growth` x total, reached by at least
 * two successive rises at that stage, are garbage that only a collection frees (tensors held by
 * reference cycles).  One step that then holds (a model loaded and kept) is not accumulation, and
 * sizes that go up and down never rise twice in a row.  Cache the allocator can reuse is not live,
 * so it never triggers this rule.
 * Two actions: a full collection (gc.collect() over the whole heap: 0.3-2.3 s, by load, on a
 * ComfyUI-sized heap of ~630k objects, recorded in bench/profiles/) only on a garbage signal --
 * forced, oom, retries, budget, growth; a plain threshold crossing (and low-VRAM's threshold 0) asks only for
 * the cheap release: the framework's cache and a young-generation collection (well under 1 ms),
 * which frees cache but not old cyclic garbage, so the growth baselines are kept.
 * Low-VRAM mode sets the effective threshold to 0, except on ZLUDA where forced collection
 * is known to misbehave; the reason says so. */
#include "vg_args.h"
#include "vg_snapshot.h"

#include <math.h>
#include <string.h>

#define VG_POLICY_STAGES 64

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock; /* hooks may fire from several host threads */
    double threshold, min_interval, last_collect, growth;
    int64_t base_live[VG_POLICY_STAGES]; /* live bytes at each stage's boundary; -1 = unseen */
    int64_t last_live[VG_POLICY_STAGES]; /* at the stage's previous boundary; -1 = unseen */
    int rises[VG_POLICY_STAGES];         /* successive boundaries of the stage that rose */
    int low_vram, zluda;
    int64_t base_oom, base_retry; /* -1 until first seen */
    int64_t decisions, collections;
} Policy;

typedef enum {
    R_FORCED, R_OOM, R_RETRY, R_BUDGET, R_GROWTH, R_THRESHOLD, R_LOWVRAM, R_FRAGMENTATION,
    R_HYSTERESIS, R_BELOW, R_BELOW_ZLUDA, R_NREASONS
} vg_reason;

static const char *reason_text[R_NREASONS] = {
    "forced", "oom", "retries", "budget", "growth", "threshold", "low-vram", "fragmentation",
    "hysteresis", "below-threshold", "below-threshold (low-VRAM not applied: ZLUDA)"};

/* Fragmentation (issue 16): the budget covers `need`, yet no single block that large can be
 * had without a release — neither a cached free block nor a new segment from the free
 * device bytes above the reserve.  The cache is the obstacle: releasing it turns whole free
 * segments back into device memory.  Needs the allocator's largest-block figure. */
static int fragmented(const vg_snap *s, int64_t need)
{
    if (need <= 0 || s->largest_free < 0 || s->budget < need)
        return 0;
    int64_t fresh = vg_sat_sub(s->free, s->reserve);
    int64_t can = s->largest_free > fresh ? s->largest_free : fresh;
    return can < need;
}

/* The decision itself; caller holds p->lock.  Updates counter baselines as it sees them. */
static int64_t live_bytes(const vg_snap *s)
{
    if (s->framework_allocated >= 0)
        return s->framework_allocated;
    int64_t l = s->used - s->evictable;
    return l > 0 ? l : 0;
}

/* Successive rises at `stage` counting this boundary: a rise is more than growth/8 of total above
 * the previous boundary of the stage (below that is noise: sizes, small caches). */
static int rises_now(const Policy *p, const vg_snap *s, int stage)
{
    if (p->growth <= 0 || p->last_live[stage] < 0)
        return 0;
    double d = (double)live_bytes(s) - (double)p->last_live[stage];
    return d > p->growth / 8 * (double)s->total ? p->rises[stage] + 1 : 0;
}

/* The garbage signal: above the stage's baseline by more than growth x total, reached by at
 * least two successive rises. */
static int garbage_grew(const Policy *p, const vg_snap *s, int stage)
{
    if (p->growth <= 0 || p->base_live[stage] < 0)
        return 0;
    return (double)live_bytes(s) - (double)p->base_live[stage] > p->growth * (double)s->total &&
           rises_now(p, s, stage) >= 2;
}

static vg_reason decide(Policy *p, const vg_snap *s, int forced, int64_t need, double now, int stage)
{
    vg_reason r;
    int oom_grew = s->oom_count >= 0 && p->base_oom >= 0 && s->oom_count > p->base_oom;
    int retry_grew = s->retry_count >= 0 && p->base_retry >= 0 && s->retry_count > p->base_retry;
    if (p->base_oom < 0 || s->oom_count < p->base_oom) /* first sight, or counters were reset */
        p->base_oom = s->oom_count;
    if (p->base_retry < 0 || s->retry_count < p->base_retry)
        p->base_retry = s->retry_count;
    double thr = (p->low_vram && !p->zluda) ? 0.0 : p->threshold;
    double used_pct = s->total > 0 ? 100.0 * (double)s->used / (double)s->total : 0.0;

    if (forced)
        r = R_FORCED;
    else if (oom_grew)
        r = R_OOM;
    else if (retry_grew)
        r = R_RETRY;
    else if (p->last_collect > 0 && now - p->last_collect < p->min_interval)
        r = R_HYSTERESIS;
    else if (fragmented(s, need))
        r = R_FRAGMENTATION;
    else if (need > 0 && s->budget < need)
        r = R_BUDGET;
    else if (stage >= 0 && garbage_grew(p, s, stage))
        r = R_GROWTH;
    else if (used_pct >= thr)
        r = (thr == 0.0 && p->low_vram) ? R_LOWVRAM : R_THRESHOLD;
    else
        r = (p->low_vram && p->zluda) ? R_BELOW_ZLUDA : R_BELOW;
    if (stage >= 0) { /* learn the baseline: first sight, or a lower level than before */
        int64_t l = live_bytes(s);
        p->rises[stage] = rises_now(p, s, stage);
        p->last_live[stage] = l;
        if (p->base_live[stage] < 0 || l < p->base_live[stage])
            p->base_live[stage] = l;
    }
    p->decisions++;
    return r;
}

static int collects(vg_reason r) { return r < R_HYSTERESIS; }

/* A full collection only on a garbage signal; every other collecting reason is the cheap release. */
static int full_collection(vg_reason r)
{
    switch (r) {
    case R_FORCED: case R_OOM: case R_RETRY: case R_BUDGET: case R_GROWTH:
        return 1;
    default:
        return 0;
    }
}

static void forget_stages(Policy *p)
{
    for (int i = 0; i < VG_POLICY_STAGES; i++) {
        p->base_live[i] = p->last_live[i] = -1;
        p->rises[i] = 0;
    }
}

/* ---------------------------------------------------------------- type */

static int parse_threshold(PyObject *v, double *out)
{
    double x;
    if (!vg_as_double(v, &x)) { /* the value itself: no __float__ runs */
        vg_raise(PyExc_TypeError, "threshold", "threshold must be a number (percent), got %.80s %.200R",
                     Py_TYPE(v)->tp_name, v);
        return -1;
    }
    if (!isfinite(x) || x < 0 || x > 100) {
        vg_raise(PyExc_ValueError, "threshold", "threshold must be 0..100 (percent), got %.200R", v);
        return -1;
    }
    *out = x;
    return 0;
}

static PyObject *Policy_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"threshold", "low_vram", "min_interval", "zluda", "growth", NULL};
    PyObject *thr = NULL, *mi = NULL, *gr = NULL;
    int low = 0, zluda = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OpOpO:Policy", kwlist, &thr, &low, &mi, &zluda, &gr))
        return NULL;
    double threshold = 70.0, min_interval = 1.0, growth = 0.02;
    if (thr && parse_threshold(thr, &threshold) < 0)
        return NULL;
    if (mi && vg_parse_double(mi, "min_interval", -1e-300, 86400, &min_interval) < 0)
        return NULL;
    if (gr && vg_parse_double(gr, "growth", -1e-300, 1.0, &growth) < 0)
        return NULL;
    Policy *p = (Policy *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    if (pthread_mutex_init(&p->lock, NULL) != 0) {
        Py_DECREF(p);
        PyErr_SetString(PyExc_RuntimeError, "pthread_mutex_init failed");
        return NULL;
    }
    p->threshold = threshold, p->min_interval = min_interval;
    p->low_vram = low, p->zluda = zluda;
    p->base_oom = p->base_retry = -1;
    p->growth = growth;
    forget_stages(p);
    return (PyObject *)p;
}

static int Policy_traverse(Policy *p, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(p));
    return 0;
}

static void Policy_dealloc(Policy *p)
{
    PyTypeObject *tp = Py_TYPE(p);
    PyObject_GC_UnTrack(p);
    pthread_mutex_destroy(&p->lock);
    tp->tp_free((PyObject *)p);
    Py_DECREF(tp);
}

static int parse_stage(PyObject *o, int *stage)
{
    *stage = -1;
    if (o == NULL || o == Py_None)
        return 0;
    long v = PyLong_Check(o) && !PyBool_Check(o) ? PyLong_AsLong(o) : -2;
    if (v == -1 && PyErr_Occurred())
        PyErr_Clear();
    if (v < 0 || v >= VG_POLICY_STAGES) {
        vg_raise(PyExc_ValueError, "stage id", "stage id must be an int 0..%d or None, got %.200R",
                     VG_POLICY_STAGES - 1, o);
        return -1;
    }
    *stage = (int)v;
    return 0;
}

static int parse_now(PyObject *o, double *now)
{
    if (o == NULL || o == Py_None) {
        *now = vg_now();
        return 0;
    }
    return vg_parse_double(o, "now", -1e-300, 1e12, now);
}

/* decide(snapshot, forced=False, need=0, now=None, stage=None) -> (collect, reason) */
static PyObject *Policy_decide(Policy *p, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"snapshot", "forced", "need", "now", "stage", NULL};
    PyObject *snap, *needo = NULL, *nowo = NULL, *sto = NULL;
    int forced = 0, stage;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|pOOO:decide", kwlist, &snap, &forced, &needo,
                                     &nowo, &sto) ||
        parse_stage(sto, &stage) < 0)
        return NULL;
    vg_state *st = vg_state_from_type(Py_TYPE(p));
    vg_snap s;
    int64_t need = 0;
    double now;
    if (st == NULL || vg_snap_from_py(st, snap, &s) < 0 ||
        (needo && needo != Py_None && vg_parse_bytes(needo, "need", 1, &need) < 0) ||
        parse_now(nowo, &now) < 0)
        return NULL;
    pthread_mutex_lock(&p->lock);
    vg_reason r = decide(p, &s, forced, need, now, stage);
    pthread_mutex_unlock(&p->lock);
    return Py_BuildValue("(Os)", collects(r) ? Py_True : Py_False, reason_text[r]);
}

/* check(device, forced=False, need=0, stage=None) -> (collect, reason, snapshot_or_None)
 * device None is host RAM.  The hot path: reads the device itself and builds a Snapshot only when collecting. */
static PyObject *Policy_check(Policy *p, PyObject *const *args, Py_ssize_t nargs, PyObject *kwn)
{
    if (kwn != NULL || nargs < 1 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError,
                        "check(device, forced=False, need=0, stage=None): 1 to 4 positional arguments");
        return NULL;
    }
    vg_state *st = vg_state_from_type(Py_TYPE(p));
    if (st == NULL)
        return NULL;
    int index, forced = 0;
    int64_t need = 0;
    if (vg_parse_device(st, args[0], &index) < 0)
        return NULL;
    if (nargs > 1 && (forced = PyObject_IsTrue(args[1])) < 0)
        return NULL;
    if (nargs > 2 && args[2] != Py_None && vg_parse_bytes(args[2], "need", 1, &need) < 0)
        return NULL;
    int stage = -1;
    if (nargs > 3 && parse_stage(args[3], &stage) < 0)
        return NULL;
    vg_snap s;
    if (vg_snapshot(st, index, NULL, &s) < 0)
        return NULL;
    pthread_mutex_lock(&p->lock);
    vg_reason r = decide(p, &s, forced, need, s.timestamp, stage);
    pthread_mutex_unlock(&p->lock);
    PyObject *snap = collects(r) ? vg_snap_to_py(st, &s) : Py_NewRef(Py_None);
    if (snap == NULL)
        return NULL;
    return Py_BuildValue("(OsN)", collects(r) ? Py_True : Py_False, reason_text[r], snap);
}

/* collected(snapshot_after=None, now=None, full=True): a collection happened; restart hysteresis
 * and take the counters as the new baseline.  full=False (the release: cache and young
 * generation) leaves old garbage where it was, so the growth baselines stay. */
static PyObject *Policy_collected(Policy *p, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"snapshot", "now", "full", NULL};
    PyObject *snap = Py_None, *nowo = NULL;
    int full = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OOp:collected", kwlist, &snap, &nowo, &full))
        return NULL;
    vg_state *st = vg_state_from_type(Py_TYPE(p));
    vg_snap s;
    double now;
    s.oom_count = s.retry_count = -1;
    if (st == NULL || (snap != Py_None && vg_snap_from_py(st, snap, &s) < 0) || parse_now(nowo, &now) < 0)
        return NULL;
    pthread_mutex_lock(&p->lock);
    p->last_collect = now > 0 ? now : 1e-9;
    if (s.oom_count >= 0)
        p->base_oom = s.oom_count;
    if (s.retry_count >= 0)
        p->base_retry = s.retry_count;
    if (full) /* garbage is gone: re-learn the baselines */
        forget_stages(p);
    p->collections++;
    pthread_mutex_unlock(&p->lock);
    Py_RETURN_NONE;
}

static PyObject *Policy_get_threshold(Policy *p, void *c)
{
    (void)c;
    return PyFloat_FromDouble(p->threshold);
}
static int Policy_set_threshold(Policy *p, PyObject *v, void *c)
{
    (void)c;
    double x;
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete threshold");
        return -1;
    }
    if (parse_threshold(v, &x) < 0)
        return -1;
    pthread_mutex_lock(&p->lock);
    p->threshold = x;
    pthread_mutex_unlock(&p->lock);
    return 0;
}
static PyObject *Policy_get_effective(Policy *p, void *c)
{
    (void)c;
    return PyFloat_FromDouble((p->low_vram && !p->zluda) ? 0.0 : p->threshold);
}
static PyObject *Policy_get_min_interval(Policy *p, void *c)
{
    (void)c;
    return PyFloat_FromDouble(p->min_interval);
}
/* A float setting in (lo, hi], validated before the lock is taken. */
static int set_double(Policy *p, PyObject *v, double *field, const char *name, double lo, double hi)
{
    double x;
    if (v == NULL) {
        PyErr_Format(PyExc_AttributeError, "cannot delete %s", name);
        return -1;
    }
    if (vg_parse_double(v, name, lo, hi, &x) < 0)
        return -1;
    pthread_mutex_lock(&p->lock);
    *field = x;
    pthread_mutex_unlock(&p->lock);
    return 0;
}
static int Policy_set_min_interval(Policy *p, PyObject *v, void *c)
{
    (void)c;
    return set_double(p, v, &p->min_interval, "min_interval", -1e-300, 86400);
}

static int set_flag(Policy *p, PyObject *v, int *field, const char *name)
{
    if (v == NULL || !PyBool_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s must be True or False, got %R", name, v ? v : Py_None);
        return -1;
    }
    pthread_mutex_lock(&p->lock);
    *field = (v == Py_True);
    pthread_mutex_unlock(&p->lock);
    return 0;
}
static PyObject *Policy_get_low(Policy *p, void *c) { (void)c; return PyBool_FromLong(p->low_vram); }
static int Policy_set_low(Policy *p, PyObject *v, void *c) { (void)c; return set_flag(p, v, &p->low_vram, "low_vram"); }
static PyObject *Policy_get_zluda(Policy *p, void *c) { (void)c; return PyBool_FromLong(p->zluda); }
static int Policy_set_zluda(Policy *p, PyObject *v, void *c) { (void)c; return set_flag(p, v, &p->zluda, "zluda"); }
static PyObject *Policy_get_growth(Policy *p, void *c)
{
    (void)c;
    return PyFloat_FromDouble(p->growth);
}
static int Policy_set_growth(Policy *p, PyObject *v, void *c)
{
    (void)c;
    return set_double(p, v, &p->growth, "growth", -1e-300, 1.0);
}
static PyObject *Policy_get_counts(Policy *p, void *c)
{
    (void)c;
    return Py_BuildValue("{s:L,s:L}", "decisions", (long long)p->decisions, "collections",
                         (long long)p->collections);
}

static PyObject *Policy_get_full_reasons(Policy *p, void *c)
{
    (void)p, (void)c;
    PyObject *set = PyFrozenSet_New(NULL);
    for (int r = 0; set != NULL && r < R_NREASONS; r++) {
        PyObject *t = full_collection((vg_reason)r) ? PyUnicode_FromString(reason_text[r]) : NULL;
        if (full_collection((vg_reason)r) && (t == NULL || PySet_Add(set, t) < 0))
            Py_CLEAR(set);
        Py_XDECREF(t);
    }
    return set;
}

static PyMethodDef Policy_methods[] = {
    {"decide", (PyCFunction)(void (*)(void))Policy_decide, METH_VARARGS | METH_KEYWORDS,
     "decide($self, /, snapshot, forced=False, need=0, now=None, stage=None)\n--\n\n"
     "Decide over a Snapshot or mapping: (collect, reason)."},
    {"check", (PyCFunction)(void (*)(void))Policy_check, METH_FASTCALL | METH_KEYWORDS,
     "check($self, device, forced=False, need=0, stage=None, /)\n--\n\n"
     "Read `device` (None: host RAM) and decide: (collect, reason, snapshot_or_None)."},
    {"collected", (PyCFunction)(void (*)(void))Policy_collected, METH_VARARGS | METH_KEYWORDS,
     "collected($self, /, snapshot=None, now=None, full=True)\n--\n\n"
     "Record that a collection ran (full=False: only the release of cache and young generation)."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Policy_getset[] = {
    {"threshold", (getter)Policy_get_threshold, (setter)Policy_set_threshold, "percent 0..100", NULL},
    {"effective_threshold", (getter)Policy_get_effective, NULL, "0 in low-VRAM mode (not on ZLUDA)", NULL},
    {"min_interval", (getter)Policy_get_min_interval, (setter)Policy_set_min_interval, "seconds", NULL},
    {"growth", (getter)Policy_get_growth, (setter)Policy_set_growth,
     "live-byte growth over a stage's baseline, as a fraction of total, that counts as garbage (0 = off)", NULL},
    {"low_vram", (getter)Policy_get_low, (setter)Policy_set_low, NULL, NULL},
    {"zluda", (getter)Policy_get_zluda, (setter)Policy_set_zluda, NULL, NULL},
    {"counts", (getter)Policy_get_counts, NULL, NULL, NULL},
    {"full_reasons", (getter)Policy_get_full_reasons, NULL,
     "reasons that call for a full gc.collect(); any other collecting reason is the cheap release", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot Policy_slots[] = {
    {Py_tp_doc, "Policy(threshold=70.0, low_vram=False, min_interval=1.0, zluda=False, growth=0.02)\n--\n\n"
                "Collect or skip after a stage, and why."},
    {Py_tp_new, Policy_new},
    {Py_tp_dealloc, Policy_dealloc},
    {Py_tp_traverse, Policy_traverse},
    {Py_tp_methods, Policy_methods},
    {Py_tp_getset, Policy_getset},
    {0, NULL}};

static PyType_Spec Policy_spec = {"vramguard._native.Policy", sizeof(Policy), 0,
                                  Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, Policy_slots};

int vg_policy_add_type(PyObject *m, vg_state *st)
{
    st->PolicyType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Policy_spec, NULL);
    if (st->PolicyType == NULL)
        return -1;
    return PyModule_AddObjectRef(m, "Policy", (PyObject *)st->PolicyType);
}
