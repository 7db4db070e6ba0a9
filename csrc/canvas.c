/* canvas.c — blend tile results into the output (the Canvas type).
 *
 * Owns Canvas (put / put_band / finish / coverage / weights) and the half-float conversions it needs.
 *
 * Blending: along each axis, neighbouring tiles overlap by L >= overlap input pixels.  The
 * two tiles' weights in that band are s(t) and 1 - s(t) (s = smoothstep) over its middle
 * `feather` fraction, 0 and 1 outside it.  Weights of a tile are products of such 1-D ramps,
 * so they sum to exactly one everywhere: no weight buffer, no final division pass.  A ramp
 * never reaches a tile's outer (1 - feather) * L / 2 pixels, so an operator whose receptive
 * radius fits in that margin reproduces the untiled result.
 *
 * Writes: the first tile to cover a pixel stores w*v, later ones add.  Which pixels are
 * already covered is tracked per output row as a prefix ("covered up to x"), which holds for
 * row-major tile order and for the back-off's re-planned sub-regions; a gap, should one ever
 * appear, is zeroed before adding, and from then on a one-bit-per-pixel map tracks coverage
 * exactly, so finish() can name the first pixel no tile covered.  So the floor — one read of
 * every tile result and one write of the output — is what it costs, plus read-modify-write in
 * the overlaps.
 *
 * Write order: put() blends one tile; put_band() a row of tiles, row by row across them, so the
 * output is written in address order as one copy writes it (plain stores there: each page is
 * still in cache after the kernel zeroed it), with exactly the values puts in order give.  Each
 * 2 MiB of a fresh output is faulted in at its end just before its first row is written
 * (populate_region), and a thread of the canvas faults the rest in while no put runs.
 *
 * Row kernels (see "row kernels" below): SSE2 / AVX2+F16C / AVX-512F / NEON picked at run time,
 * bit-identical to the scalar path; the interior of a first write is a streamed copy; tiles of
 * any strides (the node's movedim views, float16 or float32) are read in place.
 *
 * Hostile callers: put() parses every argument (where __index__, __float__, __bool__ and
 * __iter__ run) before it looks at the canvas; bounds are checked as `off > limit - len`
 * after `len <= limit`; a result overlapping the output is copied first; the output is held
 * by a reference of put()'s own while the GIL is released. */
#include "vg.h"
#include "vg_numpy.h"

#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; older kernels say EINVAL: see populate_region */
#endif

#define VG_MAX_RAMPS 32
#define VG_MAX_THREADS 16
#define VG_MAX_SIDE ((int64_t)1 << 20) /* 1 Mpx per side: beyond any real image */

/* ================================================================ half floats */

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, f;
    if (exp == 0) {
        if (man == 0) {
            f = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400))
                man <<= 1, exp--;
            f = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        f = sign | 0x7f800000 | (man << 13);
    } else {
        f = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float out;
    memcpy(&out, &f, 4);
    return out;
}

static uint16_t float_to_half(float v)
{
    uint32_t f;
    memcpy(&f, &v, 4);
    uint32_t sign = (f >> 16) & 0x8000;
    int32_t exp = (int32_t)((f >> 23) & 0xff) - 127 + 15;
    uint32_t man = f & 0x7fffff;
    if (((f >> 23) & 0xff) == 0xff) /* inf / nan */
        return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
    if (exp >= 31)
        return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10)
            return (uint16_t)sign;
        man |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1)))
            half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1)))
        half++; /* may carry into the exponent: that is the correct rounding */
    return (uint16_t)half;
}

/* ================================================================ Canvas */

typedef struct {
    double p, q;
    int rising;
} vg_ramp;

/* Locking: one mutex per canvas serialises put / finish / coverage, taken bz2's way (try
 * without releasing the GIL, then block with it released), and never held across a call into
 * Python, so a callback that re-enters the canvas cannot deadlock.  `lock_pid` notices a fork:
 * the child re-initialises a mutex another thread of the parent may have held. */
typedef struct {
    PyObject_HEAD
    PyArrayObject *out; /* NULL once finish() handed it back */
    int nchw, is_half;
    npy_intp B, C, H, W;
    npy_intp dims[4];   /* out's shape when the canvas was made: put() refuses a changed one */
    int64_t *covered;   /* B x H: output row written (stored or zeroed) up to x (exclusive) */
    /* Exact coverage, made only when a put leaves a gap (a tile right of the written prefix):
     * one bit per output pixel, rows padded to whole bytes so threads own their rows. */
    unsigned char *bits;
    npy_intp row_bytes;
    int nthreads;
    int isa; /* the row kernels' instruction set (ISA_*) */
    pthread_mutex_t lock;
    pid_t lock_pid;
    int64_t puts;
    /* The prefault thread (see prefault_thread): started, and not yet joined, while pf_pid is
     * this process's. */
    pthread_t pf;
    pid_t pf_pid;
    atomic_int pf_stop;
    atomic_int writing; /* puts running: the prefault thread waits (see prefault_thread) */
    _Atomic int64_t quiet_since; /* CLOCK_MONOTONIC ns when the last put ended (or the canvas was made) */
    pthread_mutex_t fault_lock; /* one populate at a time (made again with `lock` after a fork) */
    atomic_int no_populate;     /* the kernel refused MADV_POPULATE_WRITE (older than 5.14) */
    /* Regions (2 MiB of address space, huge-page aligned) of out's bytes [pf_base, pf_base +
     * pf_len): 0 untouched, 1 being populated, 2 done with (populated, found present, or the
     * kernel refused).  NULL for a small output. */
    atomic_uchar *reg;
    uintptr_t reg_lo; /* pf_base rounded down to 2 MiB */
    size_t nreg;
    char *pf_base;
    size_t pf_len;
} Canvas;

/* A fresh output costs its page faults: the kernel zeroes every page on first touch, as much
 * CPU as the stitch itself (17 ms for 201 MB here).  Where the fault lands matters: the kernel
 * zeroes a huge page's 4 KiB pages with the faulting one's neighbours last, so they are the ones
 * still in cache.  A writer that faults a 2 MiB region at its start (as a forward write does)
 * then writes into zeroes that have left the cache, and pays for them twice (26 ms to copy
 * 201 MB into a fresh buffer, against 16 ms into a present one); one that first faults the
 * region at its end writes into cache (16-17 ms, the cost of the faults alone: glibc's memcpy
 * gets there by copying backwards).  So each writer populates a region at its last page
 * (MADV_POPULATE_WRITE: contents untouched) before its first row there, once per region
 * (populate_region).
 *
 * In a put on several threads, one of them populates (stitch_rows) and the threads write
 * chunks of rows in turn, just behind it: here two threads each faulting its own half of a
 * fresh 201 MB output took 14-247 ms, against 16.4-17.7 ms for one thread alone.
 *
 * A big output is also faulted in by a thread of its own, from its end backwards, once no put
 * has run for 5 ms: in a real upscale the model computes between puts, and the stitch then
 * writes into present pages, all its threads each on its own rows.  It starts no region while
 * a put runs.  It touches only memory of `out`, which the canvas holds; finish() and clear stop
 * and join it before letting go of out.  fault_lock keeps its last region and a put's apart. */
#define VG_REGION_SHIFT 21
#define VG_REGION_MIN ((size_t)4 << 20) /* outputs below this: the faults cost next to nothing */

/* Populate region k of the output (see above) unless it is, or is being, populated; `whole`
 * populates all of it (the prefault thread), else its last page first (a writer: the huge page
 * comes in whole, its last part in cache) and then, where that brought no huge page in (huge
 * pages off, a region only partly in out's mapping), the rest in order, so that other threads
 * writing there do not fault.  A kernel without MADV_POPULATE_WRITE (EINVAL) turns it off for
 * the canvas: the writes then fault, and puts split their rows as for present pages. */
static void populate_region(Canvas *cv, size_t k, int whole)
{
    unsigned char zero = 0;
    if (atomic_load_explicit(&cv->reg[k], memory_order_relaxed) ||
        !atomic_compare_exchange_strong(&cv->reg[k], &zero, 1))
        return;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), lo = (uintptr_t)cv->pf_base,
              hi = lo + cv->pf_len, start = cv->reg_lo + ((uintptr_t)k << VG_REGION_SHIFT),
              end = start + ((uintptr_t)1 << VG_REGION_SHIFT);
    if (end > hi)
        end = hi;
    if (start < lo)
        start = lo;
    start &= ~(page - 1);
    uintptr_t last = (end - 1) & ~(page - 1);
    pthread_mutex_lock(&cv->fault_lock);
    int rc = madvise((void *)(whole ? start : last), end - (whole ? start : last), MADV_POPULATE_WRITE);
    unsigned char vec = 1;
    if (rc == 0 && !whole && start < last && (mincore((void *)start, 1, &vec) != 0 || !(vec & 1)))
        rc = madvise((void *)start, last - start, MADV_POPULATE_WRITE);
    pthread_mutex_unlock(&cv->fault_lock);
    if (rc != 0 && errno == EINVAL)
        atomic_store(&cv->no_populate, 1);
    atomic_store_explicit(&cv->reg[k], 2, memory_order_release);
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Wait until region k is populated (by the put's populating thread, or the prefault thread
 * that had it in hand when the put began), for a second at most: the writes are right either
 * way, and a wait must never hang the host.  0 when it gave up.  Not inlined: bench/tiling.py
 * leaves its spinning out of the stitch's instruction count. */
__attribute__((noinline, noclone)) static int await_region(Canvas *cv, size_t k)
{
    int64_t deadline = 0;
    for (int spin = 0; atomic_load_explicit(&cv->reg[k], memory_order_acquire) != 2; spin++) {
        if (spin < 256) {
#ifdef VG_X86
            _mm_pause();
#endif
            continue;
        }
        int64_t now = mono_ns();
        if (deadline == 0)
            deadline = now + 1000000000;
        else if (now > deadline)
            return 0;
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
    }
    return 1;
}

/* A writer is about to write bytes [p, p + n) of the output: populate their regions first
 * (`wait`: wait for another thread to do it; 0 when a wait gave up). */
static int populate_ahead(Canvas *cv, const char *p, size_t n, int wait)
{
    if (cv->reg == NULL || n == 0)
        return 1;
    uintptr_t a = (uintptr_t)p, b = a + n, lo = (uintptr_t)cv->pf_base;
    if (a < lo || b > lo + cv->pf_len) /* out is no longer where the canvas found it */
        return 1;
    for (size_t k = (a - cv->reg_lo) >> VG_REGION_SHIFT; k <= (b - 1 - cv->reg_lo) >> VG_REGION_SHIFT; k++)
        if (!wait)
            populate_region(cv, k, 0);
        else if (!await_region(cv, k))
            return 0;
    return 1;
}

/* Will a put writing bytes [p, p + n) of the output fault?  Regions not yet known to be
 * populated are asked (mincore of their first and last pages: a writer populates the last
 * first); those found present are marked.  1 at the first region not present. */
static int range_faults(Canvas *cv, const char *p, size_t n)
{
    if (cv->reg == NULL || n == 0)
        return 0;
    uintptr_t a = (uintptr_t)p, b = a + n, lo = (uintptr_t)cv->pf_base, hi = lo + cv->pf_len,
              page = (uintptr_t)sysconf(_SC_PAGESIZE);
    if (a < lo || b > hi)
        return 0;
    for (size_t k = (a - cv->reg_lo) >> VG_REGION_SHIFT; k <= (b - 1 - cv->reg_lo) >> VG_REGION_SHIFT; k++) {
        if (atomic_load_explicit(&cv->reg[k], memory_order_relaxed))
            continue;
        uintptr_t start = cv->reg_lo + ((uintptr_t)k << VG_REGION_SHIFT),
                  end = start + ((uintptr_t)1 << VG_REGION_SHIFT);
        start = (start < lo ? lo : start) & ~(page - 1);
        unsigned char v0 = 0, v1 = 0;
        if (mincore((void *)start, 1, &v0) != 0 || !(v0 & 1) ||
            mincore((void *)(((end > hi ? hi : end) - 1) & ~(page - 1)), 1, &v1) != 0 || !(v1 & 1))
            return 1;
        unsigned char zero = 0;
        atomic_compare_exchange_strong(&cv->reg[k], &zero, 2);
    }
    return 0;
}

/* The prefault thread waits until no put has run for this long: tiles that come back to back
 * (results ready, a fast model) find the writer faster alone; a model that computes between
 * puts leaves it all the time it takes. */
#define VG_QUIET_NS 5000000

static void *prefault_thread(void *arg)
{
    Canvas *cv = arg;
    for (size_t k = cv->nreg; k-- > 0 && !atomic_load_explicit(&cv->pf_stop, memory_order_relaxed);) {
        while (!atomic_load_explicit(&cv->pf_stop, memory_order_relaxed) &&
               (atomic_load_explicit(&cv->writing, memory_order_relaxed) ||
                mono_ns() - atomic_load_explicit(&cv->quiet_since, memory_order_relaxed) < VG_QUIET_NS)) {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
        populate_region(cv, k, 1);
    }
    return NULL;
}

static void prefault_stop(Canvas *cv)
{
    if (cv->pf_pid == 0)
        return;
    if (cv->pf_pid == getpid()) { /* in a forked child the thread does not exist */
        atomic_store(&cv->pf_stop, 1);
        pthread_join(cv->pf, NULL);
    }
    cv->pf_pid = 0;
}

static double ramp_weight(const vg_ramp *r, int n, double x)
{
    double w = 1.0;
    for (int i = 0; i < n; i++) {
        double t;
        if (r[i].q <= r[i].p)
            t = x >= r[i].p ? 1.0 : 0.0;
        else {
            t = (x - r[i].p) / (r[i].q - r[i].p);
            t = t < 0 ? 0 : (t > 1 ? 1 : t);
            t = t * t * (3.0 - 2.0 * t);
        }
        w *= r[i].rising ? t : 1.0 - t;
    }
    return w;
}

/* ================================================================ row kernels
 *
 * One output row segment is n values: out[i] = w[i] * wy * src[i]  (store), or out[i] plus
 * that (add), where w is the x weight expanded per channel.  Every kernel does the same IEEE
 * operations in the same order — (wy * w) * s, then + d, each rounded, no FMA contraction —
 * so every dispatch level gives bit-identical results to the scalar one (half outputs are
 * rounded to nearest-even by F16C / NEON / float_to_half alike).  Where a segment of a first
 * write has weight exactly one, it is a plain copy (copy_fn).
 *
 * Dispatch: the best level this CPU and OS support, chosen once (pthread_once); the
 * environment variable VRAMGUARD_CANVAS_ISA (scalar, sse2, avx2, avx512, neon) lowers it,
 * and Canvas(..., isa=...) picks one per canvas (the tests compare every level with scalar). */

enum { ISA_SCALAR, ISA_SSE2, ISA_AVX2, ISA_AVX512, ISA_NEON, ISA_COUNT };
static const char *const isa_names[ISA_COUNT] = {"scalar", "sse2", "avx2", "avx512", "neon"};

typedef void (*row_fn)(char *d, const char *s, const float *w, float wy, npy_intp n);
typedef void (*copy_fn)(char *d, const char *s, size_t bytes);
typedef row_fn row_table[2][2][2]; /* [dst half][src half][add] */

/* A kernel body is written once, as an always-inline function over constant flags; each
 * wrapper below instantiates it for one (dst half, src half, add) and one instruction set. */
#define VG_INLINE static inline __attribute__((always_inline))

static inline float ld_any(const char *p, int half, npy_intp i)
{
    return half ? half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st_any(char *p, int half, npy_intp i, float v)
{
    if (half)
        ((uint16_t *)p)[i] = float_to_half(v);
    else
        ((float *)p)[i] = v;
}

VG_INLINE void scalar_body(char *d, int dh, const char *s, int sh, const float *w, float wy, npy_intp n,
                           int add)
{
    for (npy_intp i = 0; i < n; i++) {
        float v = (wy * w[i]) * ld_any(s, sh, i);
        if (add)
            v = v + ld_any(d, dh, i);
        st_any(d, dh, i, v);
    }
}

static void copy_scalar(char *d, const char *s, size_t bytes) { memcpy(d, s, bytes); }

#define VG_ROW_ONE(isa, attr, body, tag, DH, SH, ADD)                                            \
    attr static void row_##isa##_##tag(char *d, const char *s, const float *w, float wy, npy_intp n) \
    {                                                                                             \
        body(d, DH, s, SH, w, wy, n, ADD);                                                        \
    }
#define VG_ROW_WRAPPERS(isa, attr, body)                                                          \
    VG_ROW_ONE(isa, attr, body, ff0, 0, 0, 0) VG_ROW_ONE(isa, attr, body, ff1, 0, 0, 1)          \
    VG_ROW_ONE(isa, attr, body, fh0, 0, 1, 0) VG_ROW_ONE(isa, attr, body, fh1, 0, 1, 1)          \
    VG_ROW_ONE(isa, attr, body, hf0, 1, 0, 0) VG_ROW_ONE(isa, attr, body, hf1, 1, 0, 1)          \
    VG_ROW_ONE(isa, attr, body, hh0, 1, 1, 0) VG_ROW_ONE(isa, attr, body, hh1, 1, 1, 1)
#define VG_ROW_TABLE(isa)                                                                         \
    {                                                                                             \
        {{row_##isa##_ff0, row_##isa##_ff1}, {row_##isa##_fh0, row_##isa##_fh1}},                 \
        {{row_##isa##_hf0, row_##isa##_hf1}, {row_##isa##_hh0, row_##isa##_hh1}},                 \
    }

VG_ROW_WRAPPERS(scalar, , scalar_body)

/* The vector kernels, one body for every width: V the vector type, N its lanes, SET1 / LDW /
 * MUL / ADDV the broadcast, weight load, multiply and add, LDV / STV a float-or-half load and
 * store of N values.  Two vectors a turn halve the loop's own instructions; the tail is scalar. */
#define VG_SIMD_BODY(name, attr, V, N, SET1, LDW, MUL, ADDV, LDV, STV)                             \
    VG_INLINE attr void name(char *d, int dh, const char *s, int sh, const float *w, float wy,    \
                             npy_intp n, int add)                                                 \
    {                                                                                             \
        V vy = SET1(wy);                                                                          \
        npy_intp i = 0;                                                                           \
        for (; i + 2 * N <= n; i += 2 * N) {                                                      \
            V a = MUL(MUL(vy, LDW(w + i)), LDV(s, sh, i));                                        \
            V b = MUL(MUL(vy, LDW(w + i + N)), LDV(s, sh, i + N));                                \
            if (add)                                                                              \
                a = ADDV(a, LDV(d, dh, i)), b = ADDV(b, LDV(d, dh, i + N));                       \
            STV(d, dh, i, a), STV(d, dh, i + N, b);                                               \
        }                                                                                         \
        for (; i + N <= n; i += N) {                                                              \
            V a = MUL(MUL(vy, LDW(w + i)), LDV(s, sh, i));                                        \
            if (add)                                                                              \
                a = ADDV(a, LDV(d, dh, i));                                                       \
            STV(d, dh, i, a);                                                                     \
        }                                                                                         \
        scalar_body(d + i * (dh ? 2 : 4), dh, s + i * (sh ? 2 : 4), sh, w + i, wy, n - i, add);   \
    }


/* Strided sources (a movedim view, a sliced or reversed result): read in place.  The planar
 * case — an NCHW network output viewed as NHWC, channels a plane apart — into a float output
 * of 3 or 4 channels has its own loop, which compilers vectorise; half planes are widened a
 * chunk at a time into a stack buffer first (F16C where there is one).  Anything else goes
 * value by value. */
typedef void (*half_plane_fn)(float *dst, const uint16_t *src, npy_intp n);

static void half_plane_scalar(float *dst, const uint16_t *src, npy_intp n)
{
    for (npy_intp i = 0; i < n; i++)
        dst[i] = half_to_float(src[i]);
}

VG_INLINE void planar_f32(float *o, const char *s, npy_intp sc, int C, const float *wx, float wy, npy_intp n,
                          int add)
{
    for (npy_intp x = 0; x < n; x++) {
        float w = wy * wx[x];
        for (int c = 0; c < C; c++) {
            float v = w * ((const float *)(s + c * sc))[x];
            o[C * x + c] = add ? v + o[C * x + c] : v;
        }
    }
}

#define VG_CHUNK 512
VG_INLINE void strided_body(char *d, int dh, const char *s, int sh, npy_intp sx, npy_intp sc, npy_intp C,
                            const float *wx, float wy, npy_intp n, int add, half_plane_fn cvt)
{
    if (!dh && sx == (sh ? 2 : 4) && (C == 3 || C == 4)) {
        float *o = (float *)d;
        if (!sh) {
            if (C == 3)
                planar_f32(o, s, sc, 3, wx, wy, n, add);
            else
                planar_f32(o, s, sc, 4, wx, wy, n, add);
            return;
        }
        float buf[4][VG_CHUNK];
        for (npy_intp x0 = 0; x0 < n; x0 += VG_CHUNK) {
            npy_intp k = n - x0 < VG_CHUNK ? n - x0 : VG_CHUNK;
            for (npy_intp c = 0; c < C; c++)
                cvt(buf[c], (const uint16_t *)(s + c * sc) + x0, k);
            if (C == 3)
                planar_f32(o + x0 * 3, (const char *)buf, sizeof buf[0], 3, wx + x0, wy, k, add);
            else
                planar_f32(o + x0 * 4, (const char *)buf, sizeof buf[0], 4, wx + x0, wy, k, add);
        }
        return;
    }
    for (npy_intp x = 0; x < n; x++) {
        float w = wy * wx[x];
        for (npy_intp c = 0; c < C; c++) {
            const char *p = s + x * sx + c * sc;
            float v = w * (sh ? half_to_float(*(const uint16_t *)p) : *(const float *)p);
            if (add)
                v = v + ld_any(d, dh, x * C + c);
            st_any(d, dh, x * C + c, v);
        }
    }
}

typedef void (*strided_fn)(char *d, int dh, const char *s, int sh, npy_intp sx, npy_intp sc, npy_intp C,
                           const float *wx, float wy, npy_intp n, int add);

static void strided_scalar(char *d, int dh, const char *s, int sh, npy_intp sx, npy_intp sc, npy_intp C,
                           const float *wx, float wy, npy_intp n, int add)
{
    strided_body(d, dh, s, sh, sx, sc, C, wx, wy, n, add, half_plane_scalar);
}

/* ---- x86: SSE2 (baseline of x86-64; float only), AVX2 + F16C, AVX-512F.  No FMA: a fused
 * multiply-add rounds once where the scalar path rounds twice, and bit-identical results are
 * worth more than the one instruction per vector it would save. */
#if defined(__x86_64__)
#include <immintrin.h>
#define VG_X86 1

#define SSE2 __attribute__((target("sse2")))
VG_INLINE SSE2 void sse2_body(char *d, int dh, const char *s, int sh, const float *w, float wy, npy_intp n,
                              int add)
{
    npy_intp i = 0;
    if (!dh && !sh) {
        float *o = (float *)d;
        const float *a = (const float *)s;
        __m128 vy = _mm_set1_ps(wy);
        for (; i + 4 <= n; i += 4) {
            __m128 v = _mm_mul_ps(_mm_mul_ps(vy, _mm_loadu_ps(w + i)), _mm_loadu_ps(a + i));
            if (add)
                v = _mm_add_ps(v, _mm_loadu_ps(o + i));
            _mm_storeu_ps(o + i, v);
        }
    }
    scalar_body(d + i * (dh ? 2 : 4), dh, s + i * (sh ? 2 : 4), sh, w + i, wy, n - i, add);
}
VG_ROW_WRAPPERS(sse2, SSE2, sse2_body)

SSE2 static void copy_sse2(char *d, const char *s, size_t bytes)
{
    size_t i = 0;
    for (; i + 64 <= bytes; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i)), b = _mm_loadu_si128((const __m128i *)(s + i + 16)),
                c = _mm_loadu_si128((const __m128i *)(s + i + 32)), e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_storeu_si128((__m128i *)(d + i), a), _mm_storeu_si128((__m128i *)(d + i + 16), b);
        _mm_storeu_si128((__m128i *)(d + i + 32), c), _mm_storeu_si128((__m128i *)(d + i + 48), e);
    }
    memcpy(d + i, s + i, bytes - i);
}

#define AVX2 __attribute__((target("avx2,f16c")))
VG_INLINE AVX2 __m256 ld8(const char *p, int half, npy_intp i)
{
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
                : _mm256_loadu_ps((const float *)p + i);
}
VG_INLINE AVX2 void st8(char *p, int half, npy_intp i, __m256 v)
{
    if (half)
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    else
        _mm256_storeu_ps((float *)p + i, v);
}
VG_SIMD_BODY(avx2_body, AVX2, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_mul_ps, _mm256_add_ps, ld8, st8)
VG_ROW_WRAPPERS(avx2, AVX2, avx2_body)

/* Copies of a row's interior: non-temporal stores once the destination is aligned.  That part
 * of the output is written once and not read again by this stitch, so the stores skip the
 * read-for-ownership of every line (a third of the traffic) and do not evict the tile being
 * read.  stitch_rows fences (sfence) before its rows count as done. */
#define VG_STREAM_MIN 1024
VG_INLINE AVX2 void copy_avx2_body(char *d, const char *s, size_t bytes, int stream)
{
    size_t i = 0;
    if (stream && bytes >= VG_STREAM_MIN) {
        size_t head = (32 - ((uintptr_t)d & 31)) & 31;
        _mm256_storeu_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
        for (i = head; i + 128 <= bytes; i += 128) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(s + i)),
                    b = _mm256_loadu_si256((const __m256i *)(s + i + 32)),
                    c = _mm256_loadu_si256((const __m256i *)(s + i + 64)),
                    e = _mm256_loadu_si256((const __m256i *)(s + i + 96));
            _mm256_stream_si256((__m256i *)(d + i), a), _mm256_stream_si256((__m256i *)(d + i + 32), b);
            _mm256_stream_si256((__m256i *)(d + i + 64), c), _mm256_stream_si256((__m256i *)(d + i + 96), e);
        }
    }
    for (; i + 128 <= bytes; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(s + i)), b = _mm256_loadu_si256((const __m256i *)(s + i + 32)),
                c = _mm256_loadu_si256((const __m256i *)(s + i + 64)),
                e = _mm256_loadu_si256((const __m256i *)(s + i + 96));
        _mm256_storeu_si256((__m256i *)(d + i), a), _mm256_storeu_si256((__m256i *)(d + i + 32), b);
        _mm256_storeu_si256((__m256i *)(d + i + 64), c), _mm256_storeu_si256((__m256i *)(d + i + 96), e);
    }
    for (; i + 32 <= bytes; i += 32)
        _mm256_storeu_si256((__m256i *)(d + i), _mm256_loadu_si256((const __m256i *)(s + i)));
    memcpy(d + i, s + i, bytes - i);
}
AVX2 static void copy_avx2(char *d, const char *s, size_t bytes) { copy_avx2_body(d, s, bytes, 1); }
AVX2 static void copy_plain_avx2(char *d, const char *s, size_t bytes) { copy_avx2_body(d, s, bytes, 0); }

AVX2 static void half_plane_f16c(float *dst, const uint16_t *src, npy_intp n)
{
    npy_intp i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = _cvtsh_ss(src[i]);
}

/* Three planes (float or half) into interleaved float pixels, 8 at a time: weight, then one
 * permute per plane and two blends per output vector put r0 g0 b0 r1 ... in place. */
VG_INLINE AVX2 void planar3_avx2(float *o, const char *s, int sh, npy_intp sc, const float *wx, float wy, npy_intp n,
                                 int add)
{
    const __m256i pr = _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5), pg = _mm256_setr_epi32(5, 0, 3, 6, 1, 4, 7, 2),
                  pb = _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7);
    __m256 vy = _mm256_set1_ps(wy);
    for (npy_intp x = 0; x < n; x += 8) {
        __m256 w = _mm256_mul_ps(vy, _mm256_loadu_ps(wx + x));
        __m256 r = _mm256_permutevar8x32_ps(_mm256_mul_ps(w, ld8(s, sh, x)), pr);
        __m256 g = _mm256_permutevar8x32_ps(_mm256_mul_ps(w, ld8(s + sc, sh, x)), pg);
        __m256 b = _mm256_permutevar8x32_ps(_mm256_mul_ps(w, ld8(s + 2 * sc, sh, x)), pb);
        /* lanes taken from g (mask bits) then b: out0 r.g b.r g.b r.g, out1 b r g b r g b r, ... */
        __m256 o0 = _mm256_blend_ps(_mm256_blend_ps(r, g, 0x92), b, 0x24);
        __m256 o1 = _mm256_blend_ps(_mm256_blend_ps(r, g, 0x24), b, 0x49);
        __m256 o2 = _mm256_blend_ps(_mm256_blend_ps(r, g, 0x49), b, 0x92);
        float *p = o + 3 * x;
        if (add) {
            o0 = _mm256_add_ps(o0, _mm256_loadu_ps(p));
            o1 = _mm256_add_ps(o1, _mm256_loadu_ps(p + 8));
            o2 = _mm256_add_ps(o2, _mm256_loadu_ps(p + 16));
        }
        _mm256_storeu_ps(p, o0), _mm256_storeu_ps(p + 8, o1), _mm256_storeu_ps(p + 16, o2);
    }
}

AVX2 static void strided_avx2(char *d, int dh, const char *s, int sh, npy_intp sx, npy_intp sc, npy_intp C,
                              const float *wx, float wy, npy_intp n, int add)
{
    npy_intp done = 0;
    if (!dh && C == 3 && sx == (sh ? 2 : 4)) {
        done = n / 8 * 8;
        float *o = (float *)d; /* one instantiation per (half, add): no branch in the loop */
        if (sh)
            add ? planar3_avx2(o, s, 1, sc, wx, wy, done, 1) : planar3_avx2(o, s, 1, sc, wx, wy, done, 0);
        else
            add ? planar3_avx2(o, s, 0, sc, wx, wy, done, 1) : planar3_avx2(o, s, 0, sc, wx, wy, done, 0);
    }
    if (done < n)
        strided_body(d + done * C * (dh ? 2 : 4), dh, s + done * sx, sh, sx, sc, C, wx + done, wy,
                     n - done, add, half_plane_f16c);
}

#define AVX512 __attribute__((target("avx512f")))
VG_INLINE AVX512 __m512 ld16(const char *p, int half, npy_intp i)
{
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)))
                : _mm512_loadu_ps((const float *)p + i);
}
VG_INLINE AVX512 void st16(char *p, int half, npy_intp i, __m512 v)
{
    if (half)
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    else
        _mm512_storeu_ps((float *)p + i, v);
}
VG_SIMD_BODY(avx512_body, AVX512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_mul_ps, _mm512_add_ps,
             ld16, st16)
VG_ROW_WRAPPERS(avx512, AVX512, avx512_body)

VG_INLINE AVX512 void copy_avx512_body(char *d, const char *s, size_t bytes, int stream)
{
    size_t i = 0;
    if (stream && bytes >= VG_STREAM_MIN) {
        size_t head = (64 - ((uintptr_t)d & 63)) & 63;
        _mm512_storeu_si512(d, _mm512_loadu_si512(s));
        for (i = head; i + 256 <= bytes; i += 256) {
            __m512i a = _mm512_loadu_si512(s + i), b = _mm512_loadu_si512(s + i + 64),
                    c = _mm512_loadu_si512(s + i + 128), e = _mm512_loadu_si512(s + i + 192);
            _mm512_stream_si512((void *)(d + i), a), _mm512_stream_si512((void *)(d + i + 64), b);
            _mm512_stream_si512((void *)(d + i + 128), c), _mm512_stream_si512((void *)(d + i + 192), e);
        }
    }
    for (; i + 256 <= bytes; i += 256) {
        __m512i a = _mm512_loadu_si512(s + i), b = _mm512_loadu_si512(s + i + 64),
                c = _mm512_loadu_si512(s + i + 128), e = _mm512_loadu_si512(s + i + 192);
        _mm512_storeu_si512(d + i, a), _mm512_storeu_si512(d + i + 64, b);
        _mm512_storeu_si512(d + i + 128, c), _mm512_storeu_si512(d + i + 192, e);
    }
    for (; i + 64 <= bytes; i += 64)
        _mm512_storeu_si512(d + i, _mm512_loadu_si512(s + i));
    memcpy(d + i, s + i, bytes - i);
}
AVX512 static void copy_avx512(char *d, const char *s, size_t bytes) { copy_avx512_body(d, s, bytes, 1); }
AVX512 static void copy_plain_avx512(char *d, const char *s, size_t bytes) { copy_avx512_body(d, s, bytes, 0); }

#endif /* __x86_64__ */

/* ---- aarch64: NEON is architectural, and so are the half <-> float conversions */
#if defined(__aarch64__)
#include <arm_neon.h>
#define VG_NEON 1
VG_INLINE float32x4_t ld4q(const char *p, int half, npy_intp i)
{
    return half ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p + i)))
                : vld1q_f32((const float *)p + i);
}
VG_INLINE void st4q(char *p, int half, npy_intp i, float32x4_t v)
{
    if (half)
        vst1_u16((uint16_t *)p + i, vreinterpret_u16_f16(vcvt_f16_f32(v)));
    else
        vst1q_f32((float *)p + i, v);
}
VG_SIMD_BODY(neon_body, , float32x4_t, 4, vdupq_n_f32, vld1q_f32, vmulq_f32, vaddq_f32, ld4q, st4q)
VG_ROW_WRAPPERS(neon, , neon_body)
#endif

static const row_table row_scalar_t = VG_ROW_TABLE(scalar);

/* stream: the copy kernel with non-temporal stores (tile order), else plain stores (a band) */
static void isa_kernels(int isa, int stream, const row_table **rows, copy_fn *copy, strided_fn *strided)
{
    *rows = &row_scalar_t, *copy = copy_scalar, *strided = strided_scalar;
#ifdef VG_X86
    static const row_table sse2_t = VG_ROW_TABLE(sse2), avx2_t = VG_ROW_TABLE(avx2),
                           avx512_t = VG_ROW_TABLE(avx512);
    if (isa == ISA_SSE2)
        *rows = &sse2_t, *copy = copy_sse2;
    else if (isa == ISA_AVX2)
        *rows = &avx2_t, *copy = stream ? copy_avx2 : copy_plain_avx2, *strided = strided_avx2;
    else if (isa == ISA_AVX512)
        *rows = &avx512_t, *copy = stream ? copy_avx512 : copy_plain_avx512,
        *strided = strided_avx2; /* planes: 8 lanes do */
#endif
#ifdef VG_NEON
    static const row_table neon_t = VG_ROW_TABLE(neon);
    if (isa == ISA_NEON)
        *rows = &neon_t;
#endif
    (void)isa, (void)stream;
}

/* What this CPU can run (bit i = level i), and the default level, found once. */
static pthread_once_t isa_once = PTHREAD_ONCE_INIT;
static unsigned isa_supported;
static int isa_default = -1; /* -1: VRAMGUARD_CANVAS_ISA names no level this CPU has */

static int isa_from_name(const char *s)
{
    for (int i = 0; i < ISA_COUNT; i++)
        if (strcmp(s, isa_names[i]) == 0)
            return i;
    return -1;
}

static void detect_isa(void)
{
    unsigned m = 1u << ISA_SCALAR;
    int best = ISA_SCALAR;
#ifdef VG_X86
    __builtin_cpu_init();
    m |= 1u << ISA_SSE2, best = ISA_SSE2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
        m |= 1u << ISA_AVX2, best = ISA_AVX2;
    if (__builtin_cpu_supports("avx512f") && (m & (1u << ISA_AVX2))) /* its strided loop uses F16C */
        m |= 1u << ISA_AVX512, best = ISA_AVX512;
#endif
#ifdef VG_NEON
    m |= 1u << ISA_NEON, best = ISA_NEON;
#endif
    isa_supported = m;
    const char *env = getenv("VRAMGUARD_CANVAS_ISA");
    if (env != NULL && *env != '\0' && strcmp(env, "auto") != 0) {
        int i = isa_from_name(env);
        best = i >= 0 && (m & (1u << i)) ? i : -1;
    }
    isa_default = best;
}

/* ================================================================ put */

typedef struct {
    Canvas *cv;
    char *out; /* output data, held alive by put() */
    const char *src;
    int src_half;
    int contig; /* a tile row's values lie back to back (NHWC: pixels x channels; NCHW: a plane row) */
    npy_intp nb, b0, h, w, ox, oy;
    npy_intp sb, sc, sy, sx; /* source strides in bytes: image, channel, row, pixel */
    const float *wx, *wxc, *wy; /* x weights, x weights per value (NHWC; = wx for NCHW), y weights */
    const npy_intp *ones;       /* nones [lo, hi) runs of x, ascending, where wx == 1 */
    npy_intp nones;
    const row_table *rows;
    copy_fn copy;
    strided_fn strided;
} put_job;

/* One thread's share of a put (one job) or a band (several jobs over the same rows): rows
 * [row_lo, row_hi) of the (nb x h) work, every job's span of a row before the next row. */
typedef struct {
    const put_job *jobs;
    int njobs;
    npy_intp row_lo, row_hi;
    npy_intp chunk, step; /* interleaved: rows [lo + i*step, +chunk) for i = 0, 1, ... (step 0: all) */
    int populator;        /* interleaved: this thread populates the whole turn before its chunk */
} put_share;

/* Pixels [x0, x1) of one tile row into d (that row's first output pixel), C values a pixel
 * (1 for a plane row of NCHW).  A first write with weight exactly one is a copy. */
static void blend_span(const put_job *j, char *d, const char *s, npy_intp C, float wy, npy_intp x0, npy_intp x1,
                       int add)
{
    if (x1 <= x0)
        return;
    int dh = j->cv->is_half, sh = j->src_half;
    size_t des = dh ? 2 : 4, ses = sh ? 2 : 4;
    if (!j->contig) {
        j->strided(d + (size_t)(x0 * C) * des, dh, s + x0 * j->sx, sh, j->sx, j->sc, C, j->wx + x0, wy, x1 - x0,
                   add);
        return;
    }
    row_fn k = (*j->rows)[dh][sh][add];
    npy_intp x = x0;
    if (!add && wy == 1.0f && dh == sh)
        for (npy_intp i = 0; i < j->nones && x < x1; i++) {
            npy_intp lo = j->ones[2 * i] > x ? j->ones[2 * i] : x;
            npy_intp hi = j->ones[2 * i + 1] < x1 ? j->ones[2 * i + 1] : x1;
            if (lo >= hi)
                continue;
            if (lo > x)
                k(d + (size_t)(x * C) * des, s + (size_t)(x * C) * ses, j->wxc + x * C, wy, (lo - x) * C);
            j->copy(d + (size_t)(lo * C) * des, s + (size_t)(lo * C) * ses, (size_t)((hi - lo) * C) * des);
            x = hi;
        }
    if (x < x1)
        k(d + (size_t)(x * C) * des, s + (size_t)(x * C) * ses, j->wxc + x * C, wy, (x1 - x) * C);
}

static void zero_row(char *dst, int half, npy_intp n)
{
    memset(dst, 0, (size_t)n * (half ? 2 : 4));
}

static void set_bits(unsigned char *row, npy_intp x0, npy_intp x1)
{
    for (npy_intp x = x0; x < x1; x++)
        row[x >> 3] |= (unsigned char)(1u << (x & 7));
}

/* Row r (of the nb x h work) of one job. */
static inline void stitch_row(const put_job *j, npy_intp r)
{
    Canvas *cv = j->cv;
    size_t es = cv->is_half ? 2 : 4;
    char *out = j->out;
    npy_intp n = r / j->h, y = r % j->h, b = j->b0 + n, Y = j->oy + y;
    int64_t *cov = &cv->covered[b * cv->H + Y];
    npy_intp a = (npy_intp)*cov - j->ox; /* tile-local x where "store" starts */
    if (a < 0) {
        /* a gap left of this tile: zero it so later tiles can add there (the bitmap,
         * made before the workers started, remembers it is not covered) */
        npy_intp gap0 = (npy_intp)*cov, gap1 = j->ox;
        if (!cv->nchw)
            zero_row(out + ((b * cv->H + Y) * cv->W + gap0) * cv->C * es, cv->is_half, (gap1 - gap0) * cv->C);
        else
            for (npy_intp c = 0; c < cv->C; c++)
                zero_row(out + (((b * cv->C + c) * cv->H + Y) * cv->W + gap0) * es, cv->is_half, gap1 - gap0);
        a = 0;
    }
    if (a > j->w)
        a = j->w;
    float wy = j->wy[y];
    if (!cv->nchw) {
        char *d = out + ((b * cv->H + Y) * cv->W + j->ox) * cv->C * es;
        const char *s = j->src + n * j->sb + y * j->sy;
        blend_span(j, d, s, cv->C, wy, 0, a, 1);
        blend_span(j, d, s, cv->C, wy, a, j->w, 0);
    } else {
        for (npy_intp c = 0; c < cv->C; c++) {
            char *d = out + (((b * cv->C + c) * cv->H + Y) * cv->W + j->ox) * es;
            const char *s = j->src + n * j->sb + c * j->sc + y * j->sy;
            blend_span(j, d, s, 1, wy, 0, a, 1);
            blend_span(j, d, s, 1, wy, a, j->w, 0);
        }
    }
    if (cv->bits)
        set_bits(cv->bits + (b * cv->H + Y) * cv->row_bytes, j->ox, j->ox + j->w);
    if (j->ox + j->w > *cov)
        *cov = j->ox + j->w;
}

/* Populate (or wait for: `wait`) the output rows of the jobs' row r; 0 when a wait gave up. */
static int prepare_row(const put_job *j, npy_intp r, int wait)
{
    Canvas *cv = j->cv;
    if (cv->reg == NULL)
        return 1;
    size_t es = cv->is_half ? 2 : 4;
    npy_intp b = j->b0 + r / j->h, Y = j->oy + r % j->h;
    if (!cv->nchw)
        return populate_ahead(cv, j->out + (b * cv->H + Y) * cv->W * cv->C * es, (size_t)(cv->W * cv->C) * es,
                              wait);
    for (npy_intp c = 0; c < cv->C; c++)
        if (!populate_ahead(cv, j->out + ((b * cv->C + c) * cv->H + Y) * cv->W * es, (size_t)cv->W * es, wait))
            return 0;
    return 1;
}

static void stitch_row_all(const put_share *sh, npy_intp r)
{
    for (int k = 0; k < sh->njobs; k++)
        stitch_row(&sh->jobs[k], r);
}

/* One thread's rows: for each row, every job in put order, so a band of tiles writes each
 * output row left to right as one copy would (the order of additions, and so every value, is
 * that of putting the tiles one by one).  Into pages not yet present the threads take chunks
 * of rows in turn, and thread 0 populates (see items_run): every thread's chunk of a turn
 * before writing its own (half the others' rows: it faults too), while the others wait for
 * their regions (one whose wait gave up populates its own from then on).  Not inlined and
 * never cloned: bench/tiling.py counts the instructions spent here (and in tile_weights) under
 * callgrind, by these names. */
__attribute__((noinline, noclone)) static void stitch_rows(const put_share *sh)
{
    const put_job *j = &sh->jobs[0];
    if (sh->step == 0) {
        for (npy_intp r = sh->row_lo; r < sh->row_hi; r++) {
            prepare_row(j, r, 0);
            stitch_row_all(sh, r);
        }
    } else {
        int first = sh->populator, wait = 1; /* thread 0 populates, the others wait */
        for (npy_intp r0 = sh->row_lo; r0 < sh->row_hi; r0 += sh->step) {
            if (first)
                for (npy_intp r = r0; r < r0 + sh->step && r < sh->row_hi; r++)
                    prepare_row(j, r, 0);
            for (npy_intp r = r0; r < r0 + sh->chunk && r < sh->row_hi; r++) {
                if (!first && !prepare_row(j, r, wait))
                    wait = 0; /* gave up: from here on this thread populates its own */
                stitch_row_all(sh, r);
            }
        }
    }
#ifdef VG_X86
    _mm_sfence(); /* the copies' non-temporal stores are visible before put() returns */
#endif
}

static void *put_thread(void *arg)
{
    stitch_rows(arg);
    return NULL;
}

/* Parse a ramp sequence into r.  Works on a private tuple copy: a callback (__float__,
 * __bool__) may mutate the caller's list while we read it. */
static int parse_ramps(PyObject *obj, const char *what, vg_ramp *r, int *n)
{
    if (PyUnicode_Check(obj) || PyBytes_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a sequence of (p, q, rising), got %.80s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *seq = PySequence_Tuple(obj);
    if (seq == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s must be a sequence of (p, q, rising), got %.80s", what,
                         Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    Py_ssize_t len = PyTuple_GET_SIZE(seq);
    if (len > VG_MAX_RAMPS) {
        PyErr_Format(PyExc_ValueError, "%s: at most %d ramps, got %zd", what, VG_MAX_RAMPS, len);
        Py_DECREF(seq);
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        PyObject *e = PyTuple_GET_ITEM(seq, i);
        int rising;
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 3) {
            PyErr_Format(PyExc_TypeError, "%s[%zd] must be (p: float, q: float, rising: bool), got %.80s",
                         what, i, Py_TYPE(e)->tp_name);
            Py_DECREF(seq);
            return -1;
        }
        if (!PyArg_ParseTuple(e, "ddp", &r[i].p, &r[i].q, &rising)) {
            /* keep the callback's own exception if it raised one; otherwise say what we want */
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "%s[%zd] must be (p: float, q: float, rising: bool)",
                             what, i);
            }
            Py_DECREF(seq);
            return -1;
        }
        if (!isfinite(r[i].p) || !isfinite(r[i].q)) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] has a non-finite bound: (%R, %R)", what, i,
                         PyTuple_GET_ITEM(e, 0), PyTuple_GET_ITEM(e, 1));
            Py_DECREF(seq);
            return -1;
        }
        r[i].rising = rising;
    }
    *n = (int)len;
    Py_DECREF(seq);
    return 0;
}

/* An offset: any object with __index__, 0 <= v <= PY_SSIZE_T_MAX, errors naming the value. */
static int parse_offset(PyObject *obj, const char *what, Py_ssize_t *out)
{
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %.80s", what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *v = PyNumber_Index(obj);
    if (v == NULL)
        return -1;
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred()) {
        Py_DECREF(v);
        return -1;
    }
    if (overflow || x < 0 || x > PY_SSIZE_T_MAX) {
        PyErr_Format(PyExc_ValueError, "%s must be 0..%zd, got %R", what, PY_SSIZE_T_MAX, v);
        Py_DECREF(v);
        return -1;
    }
    Py_DECREF(v);
    *out = (Py_ssize_t)x;
    return 0;
}

static void canvas_lock(Canvas *cv)
{
    pid_t pid = getpid();
    if (cv->lock_pid != pid) { /* a forked child: whoever held it does not exist here */
        pthread_mutex_init(&cv->lock, NULL);
        pthread_mutex_init(&cv->fault_lock, NULL);
        /* nor does a thread that had a region in hand: nobody would finish it */
        for (size_t k = 0; cv->reg != NULL && k < cv->nreg; k++) {
            unsigned char busy = 1;
            atomic_compare_exchange_strong(&cv->reg[k], &busy, 0);
        }
        cv->lock_pid = pid;
    }
    if (pthread_mutex_trylock(&cv->lock) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&cv->lock);
        Py_END_ALLOW_THREADS
    }
}

static void canvas_unlock(Canvas *cv) { pthread_mutex_unlock(&cv->lock); }

/* The first pixel not covered by any tile, as (row = b * H + y, x); returns 0 when complete.
 * Call with the lock held. */
static int first_gap(const Canvas *cv, npy_intp *row, npy_intp *x)
{
    npy_intp rows = cv->B * cv->H;
    if (cv->bits == NULL) {
        for (npy_intp r = 0; r < rows; r++)
            if (cv->covered[r] < cv->W) {
                *row = r, *x = (npy_intp)cv->covered[r];
                return 1;
            }
        return 0;
    }
    for (npy_intp r = 0; r < rows; r++) {
        const unsigned char *b = cv->bits + r * cv->row_bytes;
        for (npy_intp k = 0; k < cv->W; k += 8) {
            if (b[k >> 3] == 0xff)
                continue;
            for (npy_intp i = k; i < k + 8 && i < cv->W; i++)
                if (!(b[i >> 3] & (1u << (i & 7)))) {
                    *row = r, *x = i;
                    return 1;
                }
        }
    }
    return 0;
}

static PyObject *Canvas_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"out", "layout", "threads", "isa", "prefault", NULL};
    PyObject *arr;
    const char *layout = "nhwc", *isa_name = "auto";
    int threads = 0, prefault = -1;
    PyObject *opf = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|sisO:Canvas", kwlist, &arr, &layout, &threads, &isa_name,
                                     &opf))
        return NULL;
    if (opf != Py_None && (prefault = PyObject_IsTrue(opf)) < 0) /* None: auto */
        return NULL;
    pthread_once(&isa_once, detect_isa);
    int isa;
    if (strcmp(isa_name, "auto") == 0) {
        isa = isa_default;
        if (isa < 0) {
            PyErr_Format(PyExc_ValueError,
                         "VRAMGUARD_CANVAS_ISA=%.40s names no instruction set this CPU has (scalar, sse2, "
                         "avx2, avx512, neon; see Canvas.isas())", getenv("VRAMGUARD_CANVAS_ISA"));
            return NULL;
        }
    } else {
        isa = isa_from_name(isa_name);
        if (isa < 0 || !(isa_supported & (1u << isa))) {
            PyErr_Format(PyExc_ValueError, "isa must be 'auto' or one of Canvas.isas() on this CPU, got '%.40s'",
                         isa_name);
            return NULL;
        }
    }
    if (!PyArray_Check(arr)) {
        PyErr_Format(PyExc_TypeError, "out must be a numpy.ndarray, got %.80s", Py_TYPE(arr)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)arr;
    int nchw = strcmp(layout, "nchw") == 0;
    if (!nchw && strcmp(layout, "nhwc") != 0) {
        PyErr_Format(PyExc_ValueError, "layout must be 'nhwc' or 'nchw', got '%s'", layout);
        return NULL;
    }
    int t = PyArray_TYPE(a);
    if (t != NPY_FLOAT32 && t != NPY_FLOAT16) {
        PyErr_Format(PyExc_TypeError, "out must be float32 or float16, got %R",
                     (PyObject *)PyArray_DESCR(a));
        return NULL;
    }
    if (PyArray_NDIM(a) != 4 || !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISWRITEABLE(a) ||
        !PyArray_ISALIGNED(a) || PyArray_ISBYTESWAPPED(a)) {
        PyErr_SetString(PyExc_ValueError,
                        "out must be a 4-D, C-contiguous, aligned, writeable native-endian array");
        return NULL;
    }
    if (PyArray_SIZE(a) == 0) {
        npy_intp *e = PyArray_DIMS(a);
        PyErr_Format(PyExc_ValueError, "out must not be empty, got shape (%zd, %zd, %zd, %zd)",
                     e[0], e[1], e[2], e[3]);
        return NULL;
    }
    if (threads < 0 || threads > VG_MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be 0 (auto)..%d, got %d", VG_MAX_THREADS, threads);
        return NULL;
    }
    npy_intp *d = PyArray_DIMS(a);
    Canvas *cv = (Canvas *)type->tp_alloc(type, 0);
    if (cv == NULL)
        return NULL;
    cv->nchw = nchw;
    cv->is_half = t == NPY_FLOAT16;
    memcpy(cv->dims, d, sizeof cv->dims);
    cv->B = d[0];
    cv->H = nchw ? d[2] : d[1];
    cv->W = nchw ? d[3] : d[2];
    cv->C = nchw ? d[1] : d[3];
    if (threads == 0) {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        threads = nc < 1 ? 1 : (nc > VG_MAX_THREADS ? VG_MAX_THREADS : (int)nc);
    }
    cv->nthreads = threads;
    cv->isa = isa;
    cv->row_bytes = (cv->W + 7) / 8;
    pthread_mutex_init(&cv->lock, NULL);
    pthread_mutex_init(&cv->fault_lock, NULL);
    cv->lock_pid = getpid();
    /* B * H <= the array's element count, which NumPy keeps below NPY_MAX_INTP */
    cv->covered = PyMem_Calloc((size_t)cv->B * (size_t)cv->H, sizeof(int64_t));
    if (cv->covered == NULL) {
        Py_DECREF(cv);
        return PyErr_NoMemory();
    }
    cv->out = (PyArrayObject *)Py_NewRef(arr);
    size_t bytes = (size_t)PyArray_NBYTES(a);
    cv->pf_base = PyArray_BYTES(a), cv->pf_len = bytes;
    atomic_init(&cv->pf_stop, 0);
    atomic_init(&cv->writing, 0);
    atomic_init(&cv->no_populate, 0);
    atomic_init(&cv->quiet_since, mono_ns());
    if (bytes >= VG_REGION_MIN || prefault > 0) {
        cv->reg_lo = (uintptr_t)cv->pf_base & ~(((uintptr_t)1 << VG_REGION_SHIFT) - 1);
        cv->nreg = (((uintptr_t)cv->pf_base + bytes - 1 - cv->reg_lo) >> VG_REGION_SHIFT) + 1;
        cv->reg = PyMem_Calloc(cv->nreg, sizeof(atomic_uchar));
        if (cv->reg == NULL) {
            Py_DECREF(cv);
            return PyErr_NoMemory();
        }
    }
    /* auto: an output of 32 MiB or more (below that the faults cost well under a millisecond)
     * on a machine with a second CPU for the thread */
    if (prefault < 0)
        prefault = bytes >= ((size_t)32 << 20) && sysconf(_SC_NPROCESSORS_ONLN) >= 2;
    if (prefault && cv->reg != NULL && pthread_create(&cv->pf, NULL, prefault_thread, cv) == 0)
        cv->pf_pid = getpid();
    return (PyObject *)cv;
}

static int Canvas_traverse(Canvas *cv, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(cv));
    Py_VISIT(cv->out);
    return 0;
}

static int Canvas_clear(Canvas *cv)
{
    prefault_stop(cv); /* it writes into out's pages */
    Py_CLEAR(cv->out);
    return 0;
}

static void Canvas_dealloc(Canvas *cv)
{
    PyTypeObject *tp = Py_TYPE(cv);
    PyObject_GC_UnTrack(cv);
    Canvas_clear(cv);
    PyMem_Free(cv->covered);
    PyMem_Free(cv->bits);
    PyMem_Free((void *)cv->reg);
    if (cv->lock_pid != 0) {
        pthread_mutex_destroy(&cv->lock);
        pthread_mutex_destroy(&cv->fault_lock);
    }
    tp->tp_free((PyObject *)cv);
    Py_DECREF(tp);
}

/* Byte range [lo, hi) that an array's elements occupy. */
static void array_extent(PyArrayObject *a, uintptr_t *lo, uintptr_t *hi)
{
    intptr_t l = 0, h = 0;
    for (int i = 0; i < PyArray_NDIM(a); i++) {
        npy_intp s = PyArray_STRIDE(a, i), n = PyArray_DIM(a, i);
        if (n == 0) {
            l = h = 0;
            break;
        }
        if (s >= 0)
            h += s * (n - 1);
        else
            l += s * (n - 1);
    }
    uintptr_t base = (uintptr_t)PyArray_BYTES(a);
    *lo = base + (uintptr_t)l;
    *hi = base + (uintptr_t)h + (uintptr_t)PyArray_ITEMSIZE(a);
}

/* Is `out` still the array the canvas was made for (a caller may reshape it in place, or
 * flip its writeable flag)? */
static int out_unchanged(const Canvas *cv, PyArrayObject *out)
{
    if (!PyArray_ISWRITEABLE(out)) {
        PyErr_SetString(PyExc_ValueError, "out is no longer writeable");
        return 0;
    }
    if (PyArray_NDIM(out) != 4 || memcmp(PyArray_DIMS(out), cv->dims, sizeof cv->dims) != 0 ||
        PyArray_TYPE(out) != (cv->is_half ? NPY_FLOAT16 : NPY_FLOAT32) ||
        !PyArray_IS_C_CONTIGUOUS(out) || PyArray_ISBYTESWAPPED(out)) {
        PyErr_SetString(PyExc_ValueError,
                        "out changed (shape, strides or dtype) since the Canvas was made");
        return 0;
    }
    return 1;
}

/* One put's weights: wx (w) and wy (h) from the ramps, wxc (w x C: wx per value, NHWC only,
 * C > 0) and the runs of x where wx is exactly one, as [lo, hi) pairs in ones; returns how
 * many runs.  Counted with stitch_rows by bench/tiling.py, hence not inlined. */
__attribute__((noinline, noclone)) static npy_intp tile_weights(const vg_ramp *rx, int nrx, const vg_ramp *ry,
                                                                 int nry, npy_intp ox, npy_intp oy, npy_intp w,
                                                                 npy_intp h, npy_intp C, float *wx, float *wy,
                                                                 float *wxc, npy_intp *ones)
{
    npy_intp n = 0;
    for (npy_intp x = 0; x < w; x++) {
        wx[x] = (float)ramp_weight(rx, nrx, (double)(ox + x) + 0.5);
        if (wx[x] == 1.0f) {
            if (n == 0 || ones[2 * n - 1] != x)
                ones[2 * n] = x, n++;
            ones[2 * n - 1] = x + 1;
        }
        for (npy_intp k = 0; k < C; k++)
            wxc[x * C + k] = wx[x];
    }
    for (npy_intp y = 0; y < h; y++)
        wy[y] = (float)ramp_weight(ry, nry, (double)(oy + y) + 0.5);
    return n;
}

/* One tile of a put or a band, parsed and checked: the result (read in place or a copy of
 * ours), its offsets and its weights. */
typedef struct {
    PyArrayObject *src;
    npy_intp nb, b0, h, w, ox, oy;
    int type;
    vg_ramp rx[VG_MAX_RAMPS], ry[VG_MAX_RAMPS];
    int nrx, nry;
    float *wx, *wy, *wxc;
    npy_intp *ones, nones;
} put_item;

static void item_clear(put_item *it)
{
    Py_CLEAR(it->src);
    PyMem_Free(it->wx);
    PyMem_Free(it->ones);
    it->wx = NULL, it->ones = NULL;
}

/* Parse (result, b0, ox, oy, xramps, yramps): where Python code can run (__index__,
 * __float__, __bool__, __iter__), so before the canvas is looked at.  -1 with an exception. */
static int item_parse(PyObject *args, put_item *it)
{
    PyObject *res, *ob0, *oox, *ooy, *xr, *yr;
    if (!PyArg_ParseTuple(args, "OOOOOO:put", &res, &ob0, &oox, &ooy, &xr, &yr))
        return -1;
    Py_ssize_t b0, ox, oy;
    if (parse_offset(ob0, "image offset b0", &b0) < 0 || parse_offset(oox, "x offset", &ox) < 0 ||
        parse_offset(ooy, "y offset", &oy) < 0)
        return -1;
    if (parse_ramps(xr, "xramps", it->rx, &it->nrx) < 0 || parse_ramps(yr, "yramps", it->ry, &it->nry) < 0)
        return -1;
    if (!PyArray_Check(res)) {
        PyErr_Format(PyExc_TypeError, "result must be a numpy.ndarray, got %.80s", Py_TYPE(res)->tp_name);
        return -1;
    }
    PyArrayObject *ra = (PyArrayObject *)res;
    int t = PyArray_TYPE(ra);
    if (t != NPY_FLOAT32 && t != NPY_FLOAT16) {
        PyErr_Format(PyExc_TypeError, "result must be float32 or float16, got %R", (PyObject *)PyArray_DESCR(ra));
        return -1;
    }
    if (PyArray_NDIM(ra) != 4) {
        PyErr_Format(PyExc_ValueError, "result must be 4-D, got %d-D", PyArray_NDIM(ra));
        return -1;
    }
    if (PyArray_SIZE(ra) == 0) {
        PyErr_SetString(PyExc_ValueError, "result is empty (a zero-size dimension)");
        return -1;
    }
    /* Any strides are read in place (a movedim view of an NCHW network output, a slice, a
     * reversed view): no per-tile copy.  Only a subclass (viewed as a plain ndarray, so no
     * Python code of its runs later), a misaligned or a byte-swapped result is normalised.
     * The image/row strides are used as given; whether a row's values are back to back picks
     * the vector kernels or the strided one. */
    int read_in_place = PyArray_CheckExact(res) && PyArray_ISALIGNED(ra) && !PyArray_ISBYTESWAPPED(ra);
    it->src = read_in_place ? (PyArrayObject *)Py_NewRef(res)
                            : (PyArrayObject *)PyArray_FROM_OTF(res, t, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSUREARRAY);
    if (it->src == NULL)
        return -1;
    it->type = t, it->b0 = b0, it->ox = ox, it->oy = oy;
    return 0;
}

/* Check a parsed item against the canvas and out (no Python code runs here), copy a result
 * that overlaps out, and compute its weights.  -1 with an exception. */
static int item_prepare(Canvas *cv, PyArrayObject *out, put_item *it)
{
    npy_intp *d = PyArray_DIMS(it->src);
    npy_intp nb = d[0], c = cv->nchw ? d[1] : d[3], h = cv->nchw ? d[2] : d[1], w = cv->nchw ? d[3] : d[2];
    npy_intp b0 = it->b0, ox = it->ox, oy = it->oy;
    /* overflow-safe: each length is checked against its limit before the offset is */
    if (c != cv->C || nb > cv->B || b0 > cv->B - nb || w > cv->W || ox > cv->W - w || h > cv->H ||
        oy > cv->H - h) {
        PyErr_Format(PyExc_ValueError,
                     "result of %zd image(s) %zdx%zd px x %zd ch at (x=%zd, y=%zd, image %zd) does "
                     "not fit the output %zd image(s) %zdx%zd px x %zd ch",
                     nb, w, h, c, ox, oy, b0, cv->B, cv->W, cv->H, cv->C);
        return -1;
    }
    it->nb = nb, it->h = h, it->w = w;
    /* a result that overlaps the output would be overwritten while we read it */
    uintptr_t slo, shi, olo, ohi;
    array_extent(it->src, &slo, &shi);
    array_extent(out, &olo, &ohi);
    if (slo < ohi && olo < shi) {
        PyArrayObject *copy = (PyArrayObject *)PyArray_FROM_OTF(
            (PyObject *)it->src, it->type, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSUREARRAY | NPY_ARRAY_ENSURECOPY);
        if (copy == NULL)
            return -1;
        Py_SETREF(it->src, copy);
    }
    /* w * C <= the output's element count (w <= W was checked), so these sizes fit */
    size_t nwxc = cv->nchw ? 0 : (size_t)w * (size_t)c;
    it->wx = PyMem_Malloc(sizeof(float) * ((size_t)w + (size_t)h + nwxc));
    it->ones = PyMem_Malloc(sizeof(npy_intp) * ((size_t)w + 1));
    if (it->wx == NULL || it->ones == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    it->wy = it->wx + w, it->wxc = cv->nchw ? it->wx : it->wy + h;
    it->nones = tile_weights(it->rx, it->nrx, it->ry, it->nry, ox, oy, w, h, cv->nchw ? 0 : c, it->wx, it->wy,
                             it->wxc, it->ones);
    return 0;
}

/* Blend items (sharing nb, b0, h and oy when n > 1) into out, as n puts in this order would.
 * Call with the lock held and cv->out == out; the GIL is released while the rows run. */
static int items_run(Canvas *cv, PyArrayObject *out, const put_item *items, int n)
{
    const put_item *f = &items[0];
    npy_intp rows = f->nb * f->h;
    if (cv->bits == NULL) {
        /* a tile right of a row's written prefix leaves a gap: from now on track exactly (a
         * band's rows evolve their prefix tile by tile, as separate puts would) */
        int gap = 0;
        for (npy_intp r = 0; r < rows && !gap; r++) {
            int64_t cov = cv->covered[(f->b0 + r / f->h) * cv->H + f->oy + r % f->h];
            for (int k = 0; k < n && !gap; k++) {
                gap = cov < items[k].ox;
                if (items[k].ox + items[k].w > cov)
                    cov = items[k].ox + items[k].w;
            }
        }
        if (gap) {
            npy_intp all = cv->B * cv->H;
            cv->bits = PyMem_Calloc((size_t)all, (size_t)cv->row_bytes);
            if (cv->bits == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            for (npy_intp r = 0; r < all; r++)
                set_bits(cv->bits + r * cv->row_bytes, 0, (npy_intp)cv->covered[r]);
        }
    }
    put_job *jobs = PyMem_Malloc(sizeof(put_job) * (size_t)n);
    if (jobs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    const row_table *rowk;
    copy_fn copyk;
    strided_fn stridedk;
    /* a band writes each row's pages in order, still in cache after the zeroing fault: plain
     * stores there (non-temporal ones would write the zeroes back first) */
    isa_kernels(cv->isa, n == 1, &rowk, &copyk, &stridedk);
    double work = 0; /* values blended: a double, so no product of sizes can overflow */
    for (int k = 0; k < n; k++) {
        const put_item *it = &items[k];
        PyArrayObject *src = it->src;
        npy_intp ses = it->type == NPY_FLOAT16 ? 2 : 4, sx = PyArray_STRIDE(src, cv->nchw ? 3 : 2),
                 sc = PyArray_STRIDE(src, cv->nchw ? 1 : 3);
        int contig = cv->nchw ? sx == ses : (sc == ses || cv->C == 1) && sx == ses * cv->C;
        jobs[k] = (put_job){cv, PyArray_BYTES(out), PyArray_BYTES(src), it->type == NPY_FLOAT16, contig,
                            it->nb, it->b0, it->h, it->w, it->ox, it->oy, PyArray_STRIDE(src, 0), sc,
                            PyArray_STRIDE(src, cv->nchw ? 2 : 1), sx, it->wx, it->wxc, it->wy, it->ones,
                            it->nones, rowk, copyk, stridedk};
        work += (double)it->w * (double)rows * (double)cv->C;
    }
    int nt = cv->nthreads, fresh = 0;
    /* Into pages not yet present, one thread populates (stitch_rows): with two threads each
     * faulting its own half, some runs took 10x as long as one thread alone (bench/tiling.py,
     * 201 MB fresh output: 16.4-17.7 ms with one thread, 14-247 ms with two), and the threads
     * write chunks of rows in turn, so that they write where it just populated.  Each image's
     * (NCHW: each plane's) rows of the band are asked. */
    if (nt > 1 && cv->reg != NULL && !atomic_load(&cv->no_populate)) {
        size_t es = cv->is_half ? 2 : 4, rowb = (size_t)cv->W * es * (cv->nchw ? 1 : (size_t)cv->C);
        const char *base = PyArray_BYTES(out);
        for (npy_intp b = f->b0; b < f->b0 + f->nb && !fresh; b++)
            for (npy_intp c = 0; c < (cv->nchw ? cv->C : 1) && !fresh; c++) {
                size_t plane = (size_t)(cv->nchw ? b * cv->C + c : b) * (size_t)cv->H; /* its first row */
                fresh = range_faults(cv, base + (plane + (size_t)f->oy) * rowb, (size_t)f->h * rowb);
            }
    }
    /* threads pay off only on big tiles (~1 ms of work per extra thread) */
    if (work < (double)nt * 262144.0)
        nt = (int)(work / 262144.0) + 1;
    if (nt > rows)
        nt = (int)rows;
    put_share sh[VG_MAX_THREADS];
    for (int i = 0; i < nt; i++)
        sh[i] = fresh ? (put_share){jobs, n, i == 0 ? 0 : 4 + (npy_intp)(i - 1) * 8, rows, i == 0 ? 4 : 8,
                                    4 + (npy_intp)(nt - 1) * 8, i == 0}
                      : (put_share){jobs, n, rows * i / nt, rows * (i + 1) / nt, 0, 0, 0};
    pthread_t th[VG_MAX_THREADS];
    int started = 0;
    Py_BEGIN_ALLOW_THREADS
    atomic_fetch_add(&cv->writing, 1);
    for (int i = 1; i < nt; i++) {
        if (pthread_create(&th[i], NULL, put_thread, &sh[i]) != 0)
            break;
        started = i;
    }
    stitch_rows(&sh[0]);
    for (int i = 1; i <= started; i++)
        pthread_join(th[i], NULL);
    for (int i = started + 1; i < nt; i++) /* threads that could not start: do it here */
        stitch_rows(&sh[i]);
    atomic_store(&cv->quiet_since, mono_ns());
    atomic_fetch_sub(&cv->writing, 1);
    Py_END_ALLOW_THREADS
    PyMem_Free(jobs);
    cv->puts += n;
    return 0;
}

/* Prefix the pending exception's message with "band item k: " (same type; a non-string
 * exception is left as it is). */
static void band_error(int k)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *e = PyErr_GetRaisedException();
    PyObject *msg = e ? PyObject_Str(e) : NULL;
    if (msg != NULL)
        PyErr_Format((PyObject *)Py_TYPE(e), "band item %d: %U", k, msg);
    else
        PyErr_SetRaisedException(Py_XNewRef(e));
    Py_XDECREF(msg);
    Py_XDECREF(e);
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *msg = value ? PyObject_Str(value) : NULL;
    if (msg != NULL) {
        PyErr_Format(type, "band item %d: %U", k, msg);
        Py_DECREF(msg);
        Py_XDECREF(type), Py_XDECREF(value), Py_XDECREF(tb);
    } else {
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
    }
#endif
}

/* Parse n argument tuples (args[k]), then check them against the canvas and blend them under
 * its lock.  Order matters: every argument is parsed first (that is where Python callbacks
 * can run and even close this canvas), then the canvas state is checked, then we act. */
static PyObject *put_items(Canvas *cv, PyObject *const *args, int n, int band)
{
    put_item *items = PyMem_Calloc((size_t)n, sizeof(put_item));
    if (items == NULL)
        return PyErr_NoMemory();
    PyObject *ret = NULL;
    PyArrayObject *out = NULL;
    int locked = 0;
    for (int k = 0; k < n; k++)
        if (item_parse(args[k], &items[k]) < 0) {
            if (band)
                band_error(k);
            goto done;
        }
    if (cv->out == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "canvas is closed");
        goto done;
    }
    out = (PyArrayObject *)Py_NewRef(cv->out);
    if (!out_unchanged(cv, out))
        goto done;
    for (int k = 0; k < n; k++) {
        if (item_prepare(cv, out, &items[k]) < 0) {
            if (band)
                band_error(k);
            goto done;
        }
        if (k > 0 && (items[k].nb != items[0].nb || items[k].b0 != items[0].b0 || items[k].h != items[0].h ||
                      items[k].oy != items[0].oy)) {
            PyErr_Format(PyExc_ValueError,
                         "band item %d: a band's tiles share their images, y offset and height; item 0 has "
                         "%zd image(s) from %zd, y=%zd, %zd rows, item %d has %zd from %zd, y=%zd, %zd rows",
                         k, items[0].nb, items[0].b0, items[0].oy, items[0].h, k, items[k].nb, items[k].b0,
                         items[k].oy, items[k].h);
            goto done;
        }
    }
    canvas_lock(cv);
    locked = 1;
    if (cv->out != out) { /* finish() ran while we waited for the lock */
        PyErr_SetString(PyExc_RuntimeError, "canvas is closed");
        goto done;
    }
    if (items_run(cv, out, items, n) < 0)
        goto done;
    ret = Py_NewRef(Py_None);
done:
    if (locked)
        canvas_unlock(cv);
    for (int k = 0; k < n; k++)
        item_clear(&items[k]);
    PyMem_Free(items);
    Py_XDECREF(out);
    return ret;
}

/* put(result, b0, ox, oy, xramps, yramps): blend result ([nb,h,w,C] or [nb,C,h,w], float32
 * or float16, any strides) into out[b0:b0+nb] at output offset (oy, ox). */
static PyObject *Canvas_put(Canvas *cv, PyObject *args)
{
    return put_items(cv, &args, 1, 0);
}

/* put_band(items): items a list or tuple of put()'s argument tuples for tiles of one band (the
 * same images, y offset and height), blended as put() of each in order would (the same
 * values), but row by row across the band, so the output is written in address order as one
 * copy would write it: on a fresh output each page is written right after the kernel zeroed
 * it, while those zeroes are still in cache. */
#define VG_MAX_BAND 4096
static PyObject *Canvas_put_band(Canvas *cv, PyObject *arg)
{
    if (!PyList_Check(arg) && !PyTuple_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "items must be a list or tuple of put() argument tuples, got %.80s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    PyObject *seq = PySequence_Tuple(arg); /* a private copy: parsing may run code that mutates a list */
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    PyObject *ret = NULL;
    if (n < 1 || n > VG_MAX_BAND) {
        PyErr_Format(PyExc_ValueError, "items must hold 1..%d tiles, got %zd", VG_MAX_BAND, n);
        goto out;
    }
    for (Py_ssize_t k = 0; k < n; k++)
        if (!PyTuple_Check(PyTuple_GET_ITEM(seq, k))) {
            PyErr_Format(PyExc_TypeError, "band item %zd must be a tuple (result, b0, ox, oy, xramps, yramps), "
                         "got %.80s", k, Py_TYPE(PyTuple_GET_ITEM(seq, k))->tp_name);
            goto out;
        }
    ret = put_items(cv, &PyTuple_GET_ITEM(seq, 0), (int)n, 1);
out:
    Py_DECREF(seq);
    return ret;
}

/* weights(length_origin, n, ramps) -> float64 array: the 1-D weight profile (for tests). */
static PyObject *Canvas_weights(PyObject *Py_UNUSED(cls), PyObject *args)
{
    long long o;
    Py_ssize_t n;
    PyObject *r;
    if (!PyArg_ParseTuple(args, "LnO:weights", &o, &n, &r))
        return NULL;
    if (n < 0 || n > VG_MAX_SIDE * 16) {
        PyErr_Format(PyExc_ValueError, "n must be 0..%lld, got %zd", (long long)(VG_MAX_SIDE * 16), n);
        return NULL;
    }
    vg_ramp rr[VG_MAX_RAMPS];
    int nr;
    if (parse_ramps(r, "ramps", rr, &nr) < 0)
        return NULL;
    npy_intp dim = n;
    PyObject *a = PyArray_SimpleNew(1, &dim, NPY_FLOAT64);
    if (a == NULL)
        return NULL;
    double *p = PyArray_DATA((PyArrayObject *)a);
    for (npy_intp i = 0; i < n; i++) /* in double: o + i may not fit an int64 */
        p[i] = ramp_weight(rr, nr, (double)o + (double)i + 0.5);
    return a;
}

/* finish() -> out: only when every pixel of every image has been covered by a tile. */
static PyObject *Canvas_finish(Canvas *cv, PyObject *Py_UNUSED(a))
{
    canvas_lock(cv);
    PyObject *o = NULL;
    npy_intp row, x;
    if (cv->out == NULL)
        PyErr_SetString(PyExc_RuntimeError, "canvas is closed");
    else if (first_gap(cv, &row, &x))
        PyErr_Format(PyExc_RuntimeError,
                     "output incomplete: pixel (x=%zd, y=%zd) of image %zd was never covered by a "
                     "tile; refusing to return a half-written result",
                     x, row % cv->H, row / cv->H);
    else {
        prefault_stop(cv);
        o = (PyObject *)cv->out;
        cv->out = NULL;
    }
    canvas_unlock(cv);
    return o;
}

/* coverage() -> int64 [B, H]: per output row, the x of its first uncovered pixel (W when the
 * row is complete). */
static PyObject *Canvas_coverage(Canvas *cv, PyObject *Py_UNUSED(a))
{
    npy_intp dims[2] = {cv->B, cv->H};
    PyObject *a = PyArray_SimpleNew(2, dims, NPY_INT64);
    if (a == NULL)
        return NULL;
    int64_t *p = PyArray_DATA((PyArrayObject *)a);
    canvas_lock(cv);
    for (npy_intp r = 0; r < cv->B * cv->H; r++) {
        int64_t v = cv->covered[r];
        if (cv->bits) {
            const unsigned char *b = cv->bits + r * cv->row_bytes;
            npy_intp k = 0;
            while (k < cv->W && (b[k >> 3] & (1u << (k & 7))))
                k++;
            v = k;
        }
        p[r] = v;
    }
    canvas_unlock(cv);
    return a;
}

static PyObject *Canvas_get_puts(Canvas *cv, void *Py_UNUSED(c)) { return PyLong_FromLongLong(cv->puts); }

static PyObject *Canvas_get_isa(Canvas *cv, void *Py_UNUSED(c)) { return PyUnicode_FromString(isa_names[cv->isa]); }

/* isas() -> tuple of the instruction-set names this CPU can run, scalar first. */
static PyObject *Canvas_isas(PyObject *Py_UNUSED(cls), PyObject *Py_UNUSED(a))
{
    pthread_once(&isa_once, detect_isa);
    Py_ssize_t n = 0;
    for (int i = 0; i < ISA_COUNT; i++)
        n += (isa_supported >> i) & 1;
    PyObject *t = PyTuple_New(n);
    for (int i = 0, k = 0; i < ISA_COUNT && t != NULL; i++)
        if (isa_supported & (1u << i)) {
            PyObject *name = PyUnicode_FromString(isa_names[i]);
            if (name == NULL)
                Py_CLEAR(t);
            else
                PyTuple_SET_ITEM(t, k++, name);
        }
    return t;
}

static PyMethodDef Canvas_methods[] = {
    {"put", (PyCFunction)Canvas_put, METH_VARARGS,
     "put($self, result, b0, ox, oy, xramps, yramps, /)\n--\n\nBlend one tile result into the output."},
    {"put_band", (PyCFunction)Canvas_put_band, METH_O,
     "put_band($self, items, /)\n--\n\nBlend one band's tiles (put() argument tuples) row by row."},
    {"finish", (PyCFunction)Canvas_finish, METH_NOARGS,
     "finish($self, /)\n--\n\nReturn the output if every pixel was covered; close."},
    {"coverage", (PyCFunction)Canvas_coverage, METH_NOARGS,
     "coverage($self, /)\n--\n\nPer-row covered-to x (B x H)."},
    {"weights", (PyCFunction)Canvas_weights, METH_VARARGS | METH_STATIC,
     "weights(origin, n, ramps, /)\n--\n\nThe float64 weight profile of one axis."},
    {"isas", (PyCFunction)Canvas_isas, METH_NOARGS | METH_STATIC,
     "isas()\n--\n\nThe blend kernels' instruction sets this CPU can run, scalar first."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Canvas_getset[] = {
    {"puts", (getter)Canvas_get_puts, NULL, "tiles blended so far", NULL},
    {"isa", (getter)Canvas_get_isa, NULL, "the instruction set of this canvas's blend kernels", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot Canvas_slots[] = {
    {Py_tp_doc, "Canvas(out, layout='nhwc', threads=0, isa='auto', prefault=None)\n--\n\nBlends tile results into out."},
    {Py_tp_new, Canvas_new},
    {Py_tp_dealloc, Canvas_dealloc},
    {Py_tp_traverse, Canvas_traverse},
    {Py_tp_clear, Canvas_clear},
    {Py_tp_methods, Canvas_methods},
    {Py_tp_getset, Canvas_getset},
    {0, NULL}};

static PyType_Spec Canvas_spec = {"vramguard._native.Canvas", sizeof(Canvas), 0,
                                  Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, Canvas_slots};

int vg_tiler_add_types(PyObject *m, vg_state *st)
{
    st->CanvasType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Canvas_spec, NULL);
    if (st->CanvasType == NULL)
        return -1;
    return PyModule_AddObjectRef(m, "Canvas", (PyObject *)st->CanvasType);
}
