/* allocsim.c — a caching-allocator model for the simulated device (issue 16).
 *
 * Owns the AllocSim type: blocks, segments, splits, merges and releases as PyTorch's
 * CUDACachingAllocator makes them, so fragmentation, prewarm and the batch guard are tested
 * deterministically on any machine.  What is modelled (c10/cuda/CUDACachingAllocator.cpp):
 *   - requests round up to 512 B; <= 1 MiB goes to the small pool (2 MiB segments), the rest
 *     to the large pool (20 MiB segments below 10 MiB, else the request rounded to 2 MiB);
 *   - best fit: the smallest cached free block of the pool that holds the request;
 *   - a block is split when the rest is >= 512 B (small) or > 1 MiB (large); frees merge
 *     with free neighbours in the same segment;
 *   - no block fits and the device is full: release every wholly free segment, retry once
 *     (a "retry"), then fail (an "OOM");
 *   - empty_cache releases only wholly free segments: a free block beside a live one
 *     (an inactive split) stays reserved — the fragmentation the issue is about;
 *   - expandable_segments: one segment per pool that grows by mapping 2 MiB pages; freed
 *     pages stay mapped until empty_cache unmaps every page no live block touches.
 * Not modelled: streams, graphs, max_split_size_mb, garbage_collection_threshold.
 *
 * Every method holds the GIL throughout and parses all its arguments before it touches the
 * model, so no lock of its own is needed; the figures published to a simulated device go
 * under the sources' lock.  Capacity is capped at 1 TiB, so byte arithmetic on rounded sizes
 * (each <= capacity + 20 MiB) never overflows. */
#include "vg_allocsim.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KB512 ((int64_t)512)
#define MIB ((int64_t)1 << 20)
#define SMALL_SIZE MIB          /* kSmallSize: largest "small" request */
#define SMALL_BUFFER (2 * MIB)  /* kSmallBuffer: small-pool segment */
#define LARGE_BUFFER (20 * MIB) /* kLargeBuffer: segment for requests below kMinLargeAlloc */
#define MIN_LARGE_ALLOC (10 * MIB)
#define ROUND_LARGE (2 * MIB)
#define PAGE (2 * MIB) /* expandable segments map 2 MiB pages */
#define MAX_CAPACITY ((int64_t)1 << 40)
#define MAX_BLOCKS (1 << 22)

typedef struct {
    int64_t off, size, req; /* offset in its segment, rounded size, bytes asked for */
    int32_t seg, prev, next; /* neighbours by address in the segment; -1 = none */
    uint32_t gen;            /* bumped on every allocation in the slot: stale handles are refused */
    uint8_t in_use, allocated;
} sim_block;

typedef struct {
    int64_t size; /* bytes (expandable: the virtual size) */
    int32_t first;
    uint8_t pool, live;
} sim_seg;

typedef struct {
    PyObject_HEAD
    int64_t capacity;
    int expandable, device;
    int64_t base_used, base_proc; /* the bound simulated device's figures without us */
    sim_block *blk;
    int32_t nblk, capblk, free_slot; /* free_slot: head of the list of unused slots (via next) */
    sim_seg *seg;
    int32_t nseg, capseg;
    int32_t xseg[2];     /* expandable: the segment of each pool, -1 until first use */
    int64_t vpages;      /* expandable: pages of each pool's virtual range */
    uint32_t *ref[2];    /* expandable: live blocks touching each page */
    uint8_t *mapped[2];  /* expandable: page mapped */
    int64_t reserved, allocated, requested;
    int64_t peak_reserved, peak_allocated;
    int64_t n_malloc, n_free, n_seg_alloc, n_seg_free, oom_count, retry_count;
} AllocSim;

/* ================================================================ the model */

static int64_t round_size(int64_t n) { return n < KB512 ? KB512 : (n + KB512 - 1) / KB512 * KB512; }
static int pool_of(int64_t size) { return size <= SMALL_SIZE ? 0 : 1; }
static int64_t segment_size(int64_t size)
{
    if (size <= SMALL_SIZE)
        return SMALL_BUFFER;
    if (size < MIN_LARGE_ALLOC)
        return LARGE_BUFFER;
    return (size + ROUND_LARGE - 1) / ROUND_LARGE * ROUND_LARGE;
}
static int should_split(int pool, int64_t rest) { return pool == 0 ? rest >= KB512 : rest > SMALL_SIZE; }

/* Room for element n of a growing array (doubling, at most MAX_BLOCKS): 0, or -1. */
static int room_for_one(void **arr, int32_t *cap, int32_t n, size_t elem, int32_t first)
{
    if (n < *cap)
        return 0;
    if (*cap >= MAX_BLOCKS)
        return -1;
    int32_t c = *cap ? *cap * 2 : first;
    void *p = realloc(*arr, elem * (size_t)c);
    if (p == NULL)
        return -1;
    *arr = p, *cap = c;
    return 0;
}

static int32_t new_block(AllocSim *a)
{
    if (a->free_slot >= 0) {
        int32_t i = a->free_slot;
        a->free_slot = a->blk[i].next;
        uint32_t gen = a->blk[i].gen + 1;
        memset(&a->blk[i], 0, sizeof a->blk[i]);
        a->blk[i].gen = gen;
        a->blk[i].in_use = 1;
        return i;
    }
    if (room_for_one((void **)&a->blk, &a->capblk, a->nblk, sizeof *a->blk, 64) < 0)
        return -1;
    int32_t i = a->nblk++;
    memset(&a->blk[i], 0, sizeof a->blk[i]);
    a->blk[i].in_use = 1;
    return i;
}

static void drop_block(AllocSim *a, int32_t i)
{
    a->blk[i].in_use = 0;
    a->blk[i].next = a->free_slot;
    a->free_slot = i;
}

static int32_t new_segment(AllocSim *a, int pool, int64_t size)
{
    int32_t s = -1;
    for (int32_t i = 0; i < a->nseg; i++)
        if (!a->seg[i].live) {
            s = i;
            break;
        }
    if (s < 0) {
        if (room_for_one((void **)&a->seg, &a->capseg, a->nseg, sizeof *a->seg, 16) < 0)
            return -1;
        s = a->nseg++;
    }
    int32_t b = new_block(a);
    if (b < 0)
        return -1;
    a->seg[s] = (sim_seg){size, b, (uint8_t)pool, 1};
    a->blk[b].seg = s, a->blk[b].off = 0, a->blk[b].size = size;
    a->blk[b].prev = a->blk[b].next = -1;
    return s;
}

/* Best fit: the smallest free block of the pool holding `size`; ties go to the lowest
 * segment and offset (the order PyTorch's set of blocks keeps for equal sizes). */
static int32_t best_fit(const AllocSim *a, int pool, int64_t size)
{
    int32_t best = -1;
    for (int32_t i = 0; i < a->nblk; i++) {
        const sim_block *b = &a->blk[i];
        if (!b->in_use || b->allocated || b->size < size || a->seg[b->seg].pool != pool)
            continue;
        if (best < 0 || b->size < a->blk[best].size)
            best = i;
    }
    return best;
}

static int64_t page_lo(int64_t off) { return off / PAGE; }
static int64_t page_hi(int64_t off, int64_t len) { return (off + len + PAGE - 1) / PAGE; }

/* Expandable: pages of [off, off+len) not mapped yet. */
static int64_t unmapped_pages(const AllocSim *a, int pool, int64_t off, int64_t len)
{
    int64_t n = 0;
    for (int64_t p = page_lo(off); p < page_hi(off, len); p++)
        n += !a->mapped[pool][p];
    return n;
}

/* Release every wholly free segment (expandable: unmap every page no live block touches).
 * Returns the bytes given back to the device. */
static int64_t release_cached(AllocSim *a)
{
    int64_t freed = 0;
    if (a->expandable) {
        for (int pool = 0; pool < 2; pool++) {
            if (a->mapped[pool] == NULL || a->ref[pool] == NULL)
                continue;
            for (int64_t p = 0; p < a->vpages; p++)
                if (a->mapped[pool][p] && a->ref[pool][p] == 0) {
                    a->mapped[pool][p] = 0;
                    freed += PAGE;
                }
        }
    } else {
        for (int32_t s = 0; s < a->nseg; s++) {
            sim_seg *g = &a->seg[s];
            if (!g->live)
                continue;
            sim_block *b = &a->blk[g->first];
            if (b->allocated || b->next >= 0)
                continue;
            freed += g->size;
            drop_block(a, g->first);
            g->live = 0;
            a->n_seg_free++;
        }
    }
    a->reserved -= freed;
    return freed;
}

/* Expandable: the pool's one segment, made on first use. */
static int32_t x_segment(AllocSim *a, int pool)
{
    if (a->xseg[pool] >= 0)
        return a->xseg[pool];
    if (a->mapped[pool] == NULL)
        a->mapped[pool] = calloc((size_t)a->vpages, 1);
    if (a->ref[pool] == NULL)
        a->ref[pool] = calloc((size_t)a->vpages, sizeof(uint32_t));
    if (a->mapped[pool] == NULL || a->ref[pool] == NULL)
        return -1;
    return a->xseg[pool] = new_segment(a, pool, a->vpages * PAGE);
}

/* Split block i so its front holds `size`; the rest becomes a free block after it. */
static int split(AllocSim *a, int32_t i, int64_t size)
{
    int32_t r = new_block(a);
    if (r < 0)
        return -1;
    sim_block *b = &a->blk[i], *n = &a->blk[r];
    n->seg = b->seg, n->off = b->off + size, n->size = b->size - size;
    n->prev = i, n->next = b->next;
    if (b->next >= 0)
        a->blk[b->next].prev = r;
    b->next = r, b->size = size;
    return 0;
}

typedef enum { A_OK, A_OOM, A_NOMEM } alloc_rc;

/* One attempt without releasing anything: a cached block, else a new segment / new pages. */
static alloc_rc try_alloc(AllocSim *a, int pool, int64_t size, int32_t *out)
{
    int32_t i;
    if (a->expandable) {
        int32_t s = x_segment(a, pool);
        if (s < 0)
            return A_NOMEM;
        i = best_fit(a, pool, size);
        if (i < 0)
            return A_OOM; /* the virtual range itself is exhausted */
        int64_t need = unmapped_pages(a, pool, a->blk[i].off, size) * PAGE;
        if (need > a->capacity - a->reserved)
            return A_OOM;
        for (int64_t p = page_lo(a->blk[i].off); p < page_hi(a->blk[i].off, size); p++)
            a->mapped[pool][p] = 1;
        a->reserved += need;
    } else {
        i = best_fit(a, pool, size);
        if (i < 0) {
            int64_t ss = segment_size(size);
            if (ss > a->capacity - a->reserved)
                return A_OOM;
            int32_t s = new_segment(a, pool, ss);
            if (s < 0)
                return A_NOMEM;
            a->reserved += ss;
            a->n_seg_alloc++;
            i = a->seg[s].first;
        }
    }
    if (should_split(pool, a->blk[i].size - size) && split(a, i, size) < 0)
        return A_NOMEM;
    *out = i;
    return A_OK;
}

static void publish(AllocSim *a);

static alloc_rc sim_malloc(AllocSim *a, int64_t req, int32_t *out)
{
    if (req > a->capacity) { /* also keeps every rounding below far from INT64_MAX */
        a->oom_count++;
        return A_OOM;
    }
    int64_t size = round_size(req);
    int pool = pool_of(size);
    alloc_rc rc = try_alloc(a, pool, size, out);
    if (rc == A_OOM) { /* torch counts the retry whether or not the release freed anything */
        release_cached(a);
        a->retry_count++;
        rc = try_alloc(a, pool, size, out);
    }
    if (rc == A_OOM)
        a->oom_count++;
    if (rc != A_OK)
        return rc;
    sim_block *b = &a->blk[*out];
    b->allocated = 1, b->req = req;
    b->gen++; /* a block slot outlives its allocations: every handle is new */
    if (a->expandable)
        for (int64_t p = page_lo(b->off); p < page_hi(b->off, b->size); p++)
            a->ref[pool][p]++;
    a->allocated += b->size, a->requested += req, a->n_malloc++;
    if (a->allocated > a->peak_allocated)
        a->peak_allocated = a->allocated;
    if (a->reserved > a->peak_reserved)
        a->peak_reserved = a->reserved;
    return A_OK;
}

static void merge_next(AllocSim *a, int32_t i)
{
    sim_block *b = &a->blk[i];
    int32_t n = b->next;
    if (n < 0 || a->blk[n].allocated)
        return;
    b->size += a->blk[n].size;
    b->next = a->blk[n].next;
    if (b->next >= 0)
        a->blk[b->next].prev = i;
    drop_block(a, n);
}

static void sim_free(AllocSim *a, int32_t i)
{
    sim_block *b = &a->blk[i];
    int pool = a->seg[b->seg].pool;
    if (a->expandable)
        for (int64_t p = page_lo(b->off); p < page_hi(b->off, b->size); p++)
            a->ref[pool][p]--;
    a->allocated -= b->size, a->requested -= b->req, a->n_free++;
    b->allocated = 0, b->req = 0;
    merge_next(a, i);
    int32_t p = b->prev;
    if (p >= 0 && !a->blk[p].allocated)
        merge_next(a, p);
}

typedef struct {
    int64_t inactive_split, largest_free, largest_now, largest_after_release, releasable;
    int64_t segments, live_blocks;
} sim_figures;

/* Mapped bytes of a free expandable block (whole pages inside it, plus partial edges
 * counted as mapped when their page is: the model's granularity is the page). */
static int64_t mapped_bytes(const AllocSim *a, int pool, const sim_block *b)
{
    int64_t n = 0, lo = page_lo(b->off), hi = page_hi(b->off, b->size);
    for (int64_t p = lo; p < hi; p++)
        if (a->mapped[pool][p]) {
            int64_t s = p * PAGE > b->off ? p * PAGE : b->off;
            int64_t e = (p + 1) * PAGE < b->off + b->size ? (p + 1) * PAGE : b->off + b->size;
            n += e - s;
        }
    return n;
}

static void figures(const AllocSim *a, sim_figures *f)
{
    memset(f, 0, sizeof *f);
    int64_t room = a->capacity - a->reserved;
    for (int32_t s = 0; s < a->nseg; s++)
        f->segments += a->seg[s].live;
    for (int32_t i = 0; i < a->nblk; i++) {
        const sim_block *b = &a->blk[i];
        if (!b->in_use)
            continue;
        if (b->allocated) {
            f->live_blocks++;
            continue;
        }
        const sim_seg *g = &a->seg[b->seg];
        if (a->expandable) {
            int64_t m = mapped_bytes(a, g->pool, b);
            f->inactive_split += m;
            f->releasable += m / PAGE * PAGE; /* approximately: whole free pages */
            if (m > f->largest_free)
                f->largest_free = m;
            int64_t can = m + room < b->size ? m + room : b->size;
            if (can > f->largest_now)
                f->largest_now = can;
            continue;
        }
        int whole = b->prev < 0 && b->next < 0;
        if (whole)
            f->releasable += b->size;
        else
            f->inactive_split += b->size;
        if (b->size > f->largest_free)
            f->largest_free = b->size;
        if (!whole && b->size > f->largest_after_release)
            f->largest_after_release = b->size;
    }
    if (a->expandable) {
        /* released pages come back as room in the same virtual range */
        f->largest_after_release = f->largest_now + f->releasable;
        if (f->largest_after_release > a->capacity - a->allocated)
            f->largest_after_release = a->capacity - a->allocated;
        return;
    }
    int64_t fresh = room / ROUND_LARGE * ROUND_LARGE; /* a new segment is 2 MiB-rounded */
    f->largest_now = f->largest_free > fresh ? f->largest_free : fresh;
    int64_t after = (room + f->releasable) / ROUND_LARGE * ROUND_LARGE;
    if (after > f->largest_after_release)
        f->largest_after_release = after;
}

/* The bound simulated device follows the model: its framework figures are ours, its used
 * bytes are the device's own plus what we reserve. */
static void publish(AllocSim *a)
{
    if (a->device < 0)
        return;
    vg_state *st = vg_state_from_type(Py_TYPE(a));
    if (st == NULL) {
        PyErr_Clear();
        return;
    }
    sim_figures f;
    figures(a, &f);
    pthread_mutex_lock(&st->src.lock);
    if (a->device < st->src.nsim) {
        vg_simdev *d = &st->src.sim[a->device];
        int64_t used = vg_sat_add(a->base_used, a->reserved);
        d->used = used < d->total ? used : d->total;
        d->process_used = vg_sat_add(a->base_proc, a->reserved);
        if (d->process_used > d->used)
            d->process_used = d->used;
        d->fw_reserved = a->reserved, d->fw_allocated = a->allocated;
        d->oom_count = a->oom_count, d->retry_count = a->retry_count;
        d->inactive_split = f.inactive_split, d->largest_free = f.largest_free;
        d->expandable = a->expandable;
    }
    pthread_mutex_unlock(&st->src.lock);
}

/* ================================================================ the type */

static PyObject *AllocSim_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"capacity", "device", "expandable_segments", NULL};
    PyObject *capo = Py_None, *devo = Py_None;
    int expandable = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O$Op:AllocSim", kwlist, &capo, &devo, &expandable))
        return NULL;
    vg_state *st = vg_state_from_type(type);
    if (st == NULL)
        return NULL;
    int64_t cap = -1, base_used = 0, base_proc = 0;
    int device = -1;
    if (capo != Py_None && vg_parse_bytes(capo, "capacity", 0, &cap) < 0)
        return NULL;
    if (devo != Py_None) {
        if (PyBool_Check(devo) || !PyLong_Check(devo)) {
            vg_raise(PyExc_TypeError, "device", "device must be a simulated device index, got %.200R", devo);
            return NULL;
        }
        long d = PyLong_AsLong(devo);
        if (d == -1 && PyErr_Occurred())
            PyErr_Clear();
        pthread_mutex_lock(&st->src.lock);
        int nsim = st->src.nsim;
        vg_simdev sd;
        memset(&sd, 0, sizeof sd);
        if (d >= 0 && d < nsim)
            sd = st->src.sim[d];
        pthread_mutex_unlock(&st->src.lock);
        if (d < 0 || d >= nsim) {
            vg_raise(PyExc_ValueError, "device",
                     "device must be a simulated device index 0..%d, got %.200R (see simulate())",
                     nsim - 1, devo);
            return NULL;
        }
        device = (int)d;
        base_used = sd.used, base_proc = sd.process_used;
        if (cap < 0)
            cap = sd.total - sd.used;
    }
    if (cap < 0) {
        PyErr_SetString(PyExc_TypeError, "AllocSim needs capacity= or device=");
        return NULL;
    }
    if (cap > MAX_CAPACITY) {
        PyErr_Format(PyExc_ValueError, "capacity must be <= %lld bytes (1 TiB), got %lld",
                     (long long)MAX_CAPACITY, (long long)cap);
        return NULL;
    }
    AllocSim *a = (AllocSim *)type->tp_alloc(type, 0);
    if (a == NULL)
        return NULL;
    a->capacity = cap, a->expandable = expandable, a->device = device;
    a->base_used = base_used, a->base_proc = base_proc;
    a->free_slot = -1;
    a->xseg[0] = a->xseg[1] = -1;
    /* twice the capacity of virtual range: room for the tail to move past freed holes */
    a->vpages = 2 * (cap / PAGE) + 2 * (LARGE_BUFFER / PAGE);
    publish(a);
    return (PyObject *)a;
}

static int AllocSim_traverse(AllocSim *a, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(a));
    return 0;
}

static void AllocSim_dealloc(AllocSim *a)
{
    PyTypeObject *tp = Py_TYPE(a);
    PyObject_GC_UnTrack(a);
    free(a->blk), free(a->seg);
    for (int p = 0; p < 2; p++)
        free(a->ref[p]), free(a->mapped[p]);
    tp->tp_free((PyObject *)a);
    Py_DECREF(tp);
}

static PyObject *oom_error(AllocSim *a, int64_t req)
{
    sim_figures f;
    figures(a, &f);
    PyErr_Format(PyExc_MemoryError,
                 "simulated CUDA out of memory: tried to allocate %lld bytes; capacity %lld, "
                 "reserved %lld, allocated %lld, largest free block %lld",
                 (long long)req, (long long)a->capacity, (long long)a->reserved,
                 (long long)a->allocated, (long long)f.largest_free);
    return NULL;
}

/* malloc(nbytes) -> handle; MemoryError when the model runs out (counted as an OOM). */
static PyObject *AllocSim_malloc(AllocSim *a, PyObject *arg)
{
    int64_t req;
    if (vg_parse_bytes(arg, "nbytes", 1, &req) < 0)
        return NULL;
    if (req == 0)
        return PyLong_FromLong(0); /* like torch: an empty tensor holds no block */
    int32_t i;
    alloc_rc rc = sim_malloc(a, req, &i);
    publish(a);
    if (rc == A_NOMEM)
        return PyErr_NoMemory();
    if (rc == A_OOM)
        return oom_error(a, req);
    return PyLong_FromUnsignedLongLong(((unsigned long long)a->blk[i].gen << 32) | (uint32_t)(i + 1));
}

/* 0 and *out for a live handle, 1 for the empty allocation (handle 0), -1 with
 * ValueError/TypeError otherwise. */
static int parse_handle(AllocSim *a, PyObject *h, int32_t *out)
{
    if (PyBool_Check(h) || !PyLong_Check(h)) {
        vg_raise(PyExc_TypeError, "handle", "handle must be an int from malloc(), got %.200R", h);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(h);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* negative or past 64 bits: no handle of ours */
        v = 1ull << 63;
    }
    if (v == 0)
        return 1;
    uint32_t lo = (uint32_t)(v & 0xffffffffu);
    if (lo == 0 || (int64_t)lo > a->nblk || !a->blk[lo - 1].in_use || !a->blk[lo - 1].allocated ||
        a->blk[lo - 1].gen != (uint32_t)(v >> 32)) {
        vg_raise(PyExc_ValueError, "handle", "handle %.200R is not a live block of this AllocSim", h);
        return -1;
    }
    *out = (int32_t)(lo - 1);
    return 0;
}

static PyObject *AllocSim_free(AllocSim *a, PyObject *h)
{
    int32_t i;
    int rc = parse_handle(a, h, &i);
    if (rc < 0)
        return NULL;
    if (rc == 0) {
        sim_free(a, i);
        publish(a);
    }
    Py_RETURN_NONE;
}

static PyObject *AllocSim_size(AllocSim *a, PyObject *h)
{
    int32_t i;
    int rc = parse_handle(a, h, &i);
    if (rc < 0)
        return NULL;
    if (rc == 1)
        return PyLong_FromLong(0);
    return PyLong_FromLongLong(a->blk[i].size);
}

static PyObject *AllocSim_empty_cache(AllocSim *a, PyObject *Py_UNUSED(x))
{
    int64_t freed = release_cached(a);
    publish(a);
    return PyLong_FromLongLong(freed);
}

static PyObject *AllocSim_stats(AllocSim *a, PyObject *Py_UNUSED(x))
{
    sim_figures f;
    figures(a, &f);
    return Py_BuildValue(
        "{s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:O}",
        "capacity", (long long)a->capacity, "reserved", (long long)a->reserved, "allocated",
        (long long)a->allocated, "requested", (long long)a->requested, "inactive_split",
        (long long)f.inactive_split, "largest_free_block", (long long)f.largest_free,
        "largest_obtainable", (long long)f.largest_now, "largest_after_release",
        (long long)f.largest_after_release, "releasable", (long long)f.releasable, "segments",
        (long long)f.segments, "live_blocks", (long long)f.live_blocks, "peak_reserved",
        (long long)a->peak_reserved, "peak_allocated", (long long)a->peak_allocated, "num_malloc",
        (long long)a->n_malloc, "num_free", (long long)a->n_free, "segment_allocs",
        (long long)a->n_seg_alloc, "oom_count", (long long)a->oom_count, "retry_count",
        (long long)a->retry_count, "expandable_segments", a->expandable ? Py_True : Py_False);
}

/* segments() -> [(pool, size, ((offset, size, allocated), ...)), ...]: the layout, for tests
 * and pictures.  Expandable segments list their virtual range. */
static PyObject *AllocSim_segments(AllocSim *a, PyObject *Py_UNUSED(x))
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (int32_t s = 0; s < a->nseg; s++) {
        if (!a->seg[s].live)
            continue;
        PyObject *blocks = PyList_New(0);
        if (blocks == NULL)
            goto error;
        for (int32_t i = a->seg[s].first; i >= 0; i = a->blk[i].next) {
            PyObject *t = Py_BuildValue("(LLO)", (long long)a->blk[i].off, (long long)a->blk[i].size,
                                        a->blk[i].allocated ? Py_True : Py_False);
            if (t == NULL || PyList_Append(blocks, t) < 0) {
                Py_XDECREF(t);
                Py_DECREF(blocks);
                goto error;
            }
            Py_DECREF(t);
        }
        PyObject *e = Py_BuildValue("(sLN)", a->seg[s].pool ? "large" : "small",
                                    (long long)a->seg[s].size, PyList_AsTuple(blocks));
        Py_DECREF(blocks);
        if (e == NULL || PyList_Append(out, e) < 0) {
            Py_XDECREF(e);
            goto error;
        }
        Py_DECREF(e);
    }
    return out;
error:
    Py_DECREF(out);
    return NULL;
}

static PyObject *AllocSim_get_capacity(AllocSim *a, void *c)
{
    (void)c;
    return PyLong_FromLongLong(a->capacity);
}
static PyObject *AllocSim_get_expandable(AllocSim *a, void *c)
{
    (void)c;
    return PyBool_FromLong(a->expandable);
}
static PyObject *AllocSim_get_device(AllocSim *a, void *c)
{
    (void)c;
    if (a->device < 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(a->device);
}

static PyMethodDef AllocSim_methods[] = {
    {"malloc", (PyCFunction)AllocSim_malloc, METH_O,
     "malloc($self, nbytes, /)\n--\n\nAllocate like torch would: a handle, or MemoryError (an OOM)."},
    {"free", (PyCFunction)AllocSim_free, METH_O,
     "free($self, handle, /)\n--\n\nFree a block; it stays cached (merged with free neighbours)."},
    {"block_size", (PyCFunction)AllocSim_size, METH_O,
     "block_size($self, handle, /)\n--\n\nThe rounded size of a live block."},
    {"empty_cache", (PyCFunction)AllocSim_empty_cache, METH_NOARGS,
     "empty_cache($self, /)\n--\n\nRelease wholly free segments (expandable: unused pages); bytes released."},
    {"stats", (PyCFunction)AllocSim_stats, METH_NOARGS,
     "stats($self, /)\n--\n\nReserved/allocated bytes, fragmentation figures and counters."},
    {"segments", (PyCFunction)AllocSim_segments, METH_NOARGS,
     "segments($self, /)\n--\n\n[(pool, size, ((offset, size, allocated), ...)), ...]"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef AllocSim_getset[] = {
    {"capacity", (getter)AllocSim_get_capacity, NULL, "bytes the model may reserve", NULL},
    {"expandable_segments", (getter)AllocSim_get_expandable, NULL, NULL, NULL},
    {"device", (getter)AllocSim_get_device, NULL, "the simulated device it drives, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot AllocSim_slots[] = {
    {Py_tp_doc, "AllocSim(capacity=None, *, device=None, expandable_segments=False)\n--\n\n"
                "A model of PyTorch's CUDA caching allocator.  device= binds it to a simulated\n"
                "device (capacity defaults to that device's free bytes) whose figures it drives."},
    {Py_tp_new, AllocSim_new},
    {Py_tp_dealloc, AllocSim_dealloc},
    {Py_tp_traverse, AllocSim_traverse},
    {Py_tp_methods, AllocSim_methods},
    {Py_tp_getset, AllocSim_getset},
    {0, NULL}};

static PyType_Spec AllocSim_spec = {"vramguard._native.AllocSim", sizeof(AllocSim), 0,
                                    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, AllocSim_slots};

int vg_allocsim_add_type(PyObject *m, vg_state *st)
{
    (void)st;
    PyObject *t = PyType_FromModuleAndSpec(m, &AllocSim_spec, NULL);
    if (t == NULL)
        return -1;
    int rc = PyModule_AddObjectRef(m, "AllocSim", t);
    Py_DECREF(t);
    return rc;
}
