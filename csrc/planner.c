/* planner.c — plan the largest tile that fits the budget, as an even grid.
 *
 * Owns plan(): given an image (optionally a video: depth= frames, tiled in time too, cost per
 * voxel), an overlap, an alignment, a cost model (fixed bytes + bytes per input pixel of a
 * tile) and a budget, the fewest tiles that fit; ties go to the smaller tile, then the squarer
 * one.  Positions are spread evenly, multiples of `align`, with every
 * neighbour overlap >= `overlap` and the feather bands of neighbouring pairs disjoint, so the
 * Canvas's 1-D ramps (canvas.c) multiply into weights that sum to one. */
#include "vg.h"

#include <math.h>
#include <string.h>

#define VG_MAX_SIDE ((int64_t)1 << 20) /* 1 Mpx per side: beyond any real image */

/* ================================================================ planner
 *
 * Bounded work.  Everything below runs in align units (len, overlap, tiles are multiples of
 * align).  For n tiles of size T over L, positions are round-half-up(i * (L - T) / (n - 1)), so
 * neighbour gaps are floor or ceil of the stride and a pair of gaps is floor or ceil of twice
 * it: whether a tile size is valid for n tiles is a closed form (axis_tile), not a scan.  The
 * planner then needs only the tile counts where the smallest valid tile shrinks: tiles for n
 * are at least ceil((L - overlap) / n) + overlap, which takes ~2 sqrt(L) distinct values, and
 * a count that does not shrink the tile is never part of a best plan (same tile, more tiles).
 * So a plan costs O(sqrt(W) + sqrt(H)) closed-form evaluations plus O(log) per candidate:
 * microseconds, including the answer "no tile fits".  A plan never has more than
 * VG_PLAN_MAX_TILES tiles. */

#define VG_PLAN_MAX_TILES ((int64_t)1 << 16)
/* tile sizes tried per tile count above the smallest the overlap allows; only feather bands
 * near the tiles' edges (feather ~ 0 with overlaps far above the requested one) need more */
#define VG_PLAN_TRIES 64
/* tile counts tried per run of counts that share the same smallest tile */
#define VG_PLAN_PROBES 4

static int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }
static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; } /* a >= 0, b > 0 */
static int64_t gcd64(int64_t a, int64_t b)
{
    while (b) {
        int64_t t = a % b;
        a = b, b = t;
    }
    return a;
}

typedef struct {
    int64_t L, O, a;  /* length and overlap in align units; align in px */
    int64_t Tmin, Tmax; /* tile bounds in units (Tmin >= 2 * O, >= 1) */
    double f;         /* feather */
} axis_in;

/* min over i of q[i+1] - q[i-1] for q[i] = round-half-up(i * M / N), i = 0..N, N >= 2: the
 * narrowest span of two neighbouring gaps.  It is floor(2M/N) or one more; which one depends
 * on the residues (N + 2jM) mod 2N for j = 0..N-2 (checked against the scan in tests). */
static int64_t pair_min(int64_t M, int64_t N)
{
    int64_t u = (2 * M) / N, R = (4 * M) % (2 * N), mn;
    if (R == 0)
        return u;
    int64_t G = gcd64(M, N);
    if (G >= 2) {
        mn = N % (2 * G); /* j covers a whole period of the residues */
    } else {
        int64_t r0 = N % 2, ex = ((N - 2 * M) % (2 * N) + 2 * N) % (2 * N); /* j = N-1 is missing */
        mn = ex == r0 ? r0 + 2 : r0;
    }
    return u + (mn + R >= 2 * N);
}

/* Smallest valid tile (units) for n >= 2 tiles, or -1.  Valid: the gaps are >= 1 (distinct
 * positions), every neighbour overlap >= O (true from the natural tile up), and the feather
 * bands of neighbouring pairs are disjoint: 2 T f <= (two gaps) (1 + f). */
static int64_t axis_tile(const axis_in *ax, int64_t n)
{
    int64_t N = n - 1;
    int64_t T = ceil_div(ax->L + N * ax->O, n);
    if (T < ax->Tmin)
        T = ax->Tmin;
    for (int k = 0; k < VG_PLAN_TRIES && T <= ax->Tmax && T < ax->L; k++, T++) {
        int64_t M = ax->L - T;
        if (M < N)
            return -1; /* and for every larger T */
        if (n == 2)
            return T;
        double lhs = 2.0 * (double)T * ax->f;
        if (lhs <= (double)pair_min(M, N) * (1.0 + ax->f))
            return T;
        if (lhs > (double)ceil_div(2 * M, N) * (1.0 + ax->f))
            return -1; /* even the wider pair fails, and larger T only make it worse */
    }
    return -1;
}

typedef struct {
    int64_t n, t; /* tile count, tile in px */
} axis_cand;

/* The tile counts at which the smallest valid tile strictly shrinks (every other count is
 * worse than one of these), ascending; at most `cap` of them.  Returns how many. */
static int64_t axis_candidates(const axis_in *ax, int64_t nmax, axis_cand *c, int64_t cap)
{
    int64_t k = 0, best = INT64_MAX;
    if (ax->L <= ax->Tmax && cap > 0) { /* one tile: the whole length, whatever min_tile says */
        c[k++] = (axis_cand){1, ax->L * ax->a};
        best = ax->L;
    }
    int64_t K = ax->L - ax->O;
    if (K <= 0 || ax->Tmax <= ax->O)
        return k; /* every split would need tiles >= the whole length, or no overlap fits */
    /* counts below this need tiles above Tmax */
    int64_t n = ceil_div(K, ax->Tmax - ax->O);
    if (n < 2)
        n = 2;
    while (n <= nmax && k < cap && best > ax->Tmin) {
        int64_t c_nat = ceil_div(K, n), nat = c_nat + ax->O;
        int beyond = nat < ax->Tmin; /* tiles clamp to Tmin from here on */
        /* last count with the same natural tile */
        int64_t n_last = beyond || c_nat <= 1 ? nmax : (K - 1) / (c_nat - 1);
        int64_t target = beyond ? ax->Tmin : nat;
        for (int p = 0; p < VG_PLAN_PROBES && n <= n_last && n <= nmax && k < cap; p++, n++) {
            int64_t t = axis_tile(ax, n);
            if (t < 0) {
                if (beyond)
                    return k; /* more tiles of the minimum size only overlap more */
                continue;
            }
            if (t < best) {
                c[k++] = (axis_cand){n, t * ax->a};
                best = t;
            }
            if (t == target)
                break;
        }
        if (beyond)
            break;
        n = n_last + 1;
    }
    return k;
}

/* Positions (px) of n tiles of t px over len px: the even spread axis_tile assumed. */
static void axis_positions(const axis_in *ax, int64_t n, int64_t t, int64_t *pos)
{
    pos[0] = 0;
    if (n == 1)
        return;
    int64_t N = n - 1, M = ax->L - t / ax->a;
    for (int64_t i = 1; i <= N; i++)
        pos[i] = (2 * i * M + N) / (2 * N) * ax->a;
}

typedef struct {
    int64_t w, h, overlap, align, min_tile, max_tile;
    /* the time axis of a video (d = 0: an image); no max tile: frames are cheap to split */
    int64_t d, d_overlap, d_align, d_min_tile;
    int64_t d_max_tile;
    double feather;
    /* bytes: fixed, per input pixel (voxel) of a tile and per pixel of its width + height (per
     * frame): a layer-synchronous VAE step reads its tile with a halo, so its working set is
     * (tw + 2h)(th + 2h) ~ tw th + 2h (tw + th) per frame: area and perimeter, both per image;
     * and per frame of a tile whatever its area (a video step's K/V of whole frames) */
    double fixed, per_px, per_edge, per_frame;
    int64_t batch, budget;
} plan_in;

typedef struct {
    int fits;
    int64_t tw, th, td, nx, ny, nz, batch;
    double peak;
    char why[VG_REASON];
} plan_out;

/* bytes of one image's tile, without the fixed part */
static double tile_var(const plan_in *in, int64_t tw, int64_t th, int64_t td)
{
    return (in->per_px * (double)tw * (double)th + in->per_edge * (double)(tw + th) + in->per_frame) *
           (double)td;
}

static double tile_cost(const plan_in *in, int64_t tw, int64_t th, int64_t td, int64_t b)
{
    return in->fixed + tile_var(in, tw, th, td) * (double)b;
}

/* The highest tile (px) of width tw and depth td whose cost fits `room` bytes (budget - fixed):
 * td (per_px tw th + per_edge (tw + th) + per_frame) <= room, solved for th. */
static double h_max(const plan_in *in, double room, int64_t tw, int64_t td)
{
    double slope = in->per_px * (double)tw + in->per_edge;
    double left = room / (double)td - in->per_edge * (double)tw - in->per_frame;
    if (left < 0)
        return -1;
    return slope > 0 ? left / slope : INFINITY;
}

static axis_in axis_of(const plan_in *in, int64_t len)
{
    return (axis_in){len / in->align, in->overlap / in->align, in->align, in->min_tile / in->align,
                     in->max_tile / in->align, in->feather};
}

static axis_in depth_axis_of(const plan_in *in)
{
    return (axis_in){in->d / in->d_align, in->d_overlap / in->d_align, in->d_align,
                     in->d_min_tile / in->d_align, in->d_max_tile / in->d_align, in->feather};
}

/* Fewest tiles on one axis when tiles may be up to max_tile: the structural minimum. */
static int64_t axis_min_count(const axis_in *ax)
{
    if (ax->L <= ax->Tmax)
        return 1;
    if (ax->Tmax <= ax->O)
        return -1;
    int64_t n = ceil_div(ax->L - ax->O, ax->Tmax - ax->O);
    return n < 2 ? 2 : n;
}

/* Fewest tiles whose size fits the budget; ties go to the smaller tile (less redundant
 * overlap work), then the squarer one (in space).  cx / cy / cz: room for each axis's
 * candidates.  Counts ascend along each list and tiles shrink, so a count larger than the best
 * product so far ends a loop, and the product of counts never passes VG_PLAN_MAX_TILES: the
 * (x, z) pairs visited are bounded by a harmonic sum of that limit, and an image (one z
 * candidate) visits each x candidate once. */
static void plan_core(const plan_in *in, plan_out *out, axis_cand *cx, int64_t capx, axis_cand *cy,
                      int64_t capy, axis_cand *cz, int64_t capz)
{
    memset(out, 0, sizeof *out);
    double room = (double)in->budget - in->fixed;
    /* the fixed part alone over the budget: nothing fits, whatever the tile (with per_px 0
     * the area bound would otherwise be infinite).  amax bounds the area from above (the
     * perimeter part only adds); h_max gives the exact height for a width. */
    double amax = room < 0 ? -1 : in->per_px > 0 ? room / in->per_px : INFINITY;
    axis_in ax = axis_of(in, in->w), ay = axis_of(in, in->h);
    int64_t kx = axis_candidates(&ax, VG_PLAN_MAX_TILES, cx, capx);
    int64_t ky = axis_candidates(&ay, VG_PLAN_MAX_TILES, cy, capy);
    int64_t kz = 1;
    cz[0] = (axis_cand){1, 1};
    if (in->d > 0) {
        axis_in az = depth_axis_of(in);
        kz = axis_candidates(&az, VG_PLAN_MAX_TILES, cz, capz);
    }
    int64_t best = -1, bw = 0, bh = 0, bd = 0, bnx = 0, bny = 0, bnz = 0;
    double bvol = 0;
    for (int64_t iz = 0; iz < kz && ky > 0; iz++) {
        int64_t nz = cz[iz].n, td = cz[iz].t;
        if (best > 0 && nz > best)
            break;
        double amax_z = in->d > 0 ? amax / (double)td : amax;
        if (kx == 0 || amax_z / (double)cx[kx - 1].t < (double)cy[ky - 1].t)
            continue; /* not even the smallest x and y tiles fit beside this depth */
        /* tiles of at most amax_z px must cover W x H: at least W H / amax_z of them per slab
         * (a lower bound, shaved by 1e-12 so rounding never prunes a tie) */
        double cover = (double)nz * ((double)in->w * (double)in->h / amax_z) * (1 - 1e-12);
        if (cover > (double)VG_PLAN_MAX_TILES || (best > 0 && cover > (double)best))
            continue;
        for (int64_t i = 0; i < kx; i++) {
            int64_t nx = cx[i].n, tw = cx[i].t;
            if ((best > 0 && nx * nz > best) || nx * nz > VG_PLAN_MAX_TILES)
                break;
            double hmax = room < 0 ? -1 : h_max(in, room, tw, td);
            if (hmax > amax_z / (double)tw)
                hmax = amax_z / (double)tw;
            if (hmax < 1 || hmax < (double)cy[ky - 1].t)
                continue; /* not even the smallest y tile fits */
            double cover_x = (double)(nx * nz) * ((double)in->h / hmax) * (1 - 1e-12);
            if (cover_x > (double)VG_PLAN_MAX_TILES || (best > 0 && cover_x > (double)best))
                continue; /* rows of tiles <= hmax px high cannot cover H in fewer */
            /* the first (fewest tiles) y candidate whose tile fits */
            int64_t lo = 0, hi = ky;
            while (lo < hi) {
                int64_t mid = lo + (hi - lo) / 2;
                if ((double)cy[mid].t > hmax)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            int64_t ny = cy[lo].n, th = cy[lo].t;
            if (nx * ny > VG_PLAN_MAX_TILES / nz)
                continue;
            int64_t n = nx * ny * nz;
            double vol = (double)tw * (double)th * (double)td;
            int better = best < 0 || n < best ||
                         (n == best &&
                          (vol < bvol || (vol == bvol && llabs(tw - th) < llabs(bw - bh))));
            if (better)
                best = n, bw = tw, bh = th, bd = td, bnx = nx, bny = ny, bnz = nz, bvol = vol;
        }
    }
    if (best < 0) {
        int64_t tx = in->min_tile < in->w ? in->min_tile : in->w;
        int64_t ty = in->min_tile < in->h ? in->min_tile : in->h;
        int64_t tz = in->d == 0 ? 1 : (in->d_min_tile < in->d ? in->d_min_tile : in->d);
        double need = tile_cost(in, tx, ty, tz, 1);
        if (need <= (double)in->budget)
            snprintf(out->why, VG_REASON,
                     "no tile fits within %lld tiles: the tiles the budget allows (%lld bytes, "
                     "%.0f bytes per px, %.0f per edge px) are too small to cover %lldx%lld px%s "
                     "with overlap %lld",
                     (long long)VG_PLAN_MAX_TILES, (long long)in->budget, in->per_px, in->per_edge,
                     (long long)in->w, (long long)in->h, in->d ? " (and its frames)" : "",
                     (long long)in->overlap);
        else
            snprintf(out->why, VG_REASON,
                     "no tile fits: the smallest tile (%lld px, overlap %lld) needs %.0f bytes, "
                     "budget is %lld",
                     (long long)in->min_tile, (long long)in->overlap, need, (long long)in->budget);
        return;
    }
    out->fits = 1;
    out->tw = bw, out->th = bh, out->td = bd, out->nx = bnx, out->ny = bny, out->nz = bnz;
    int64_t b = 1;
    if (in->per_px > 0 || in->per_edge > 0 || in->per_frame > 0) {
        double per_tile = tile_var(in, bw, bh, bd);
        double fitb = floor(room / per_tile);
        b = fitb < 1 ? 1 : (fitb > (double)in->batch ? in->batch : (int64_t)fitb);
    } else {
        b = in->batch;
    }
    out->batch = b;
    out->peak = tile_cost(in, bw, bh, bd, b);
}

static int64_t get_pos_int(PyObject *kw_or_val, const char *what, int64_t lo, int64_t hi, int *err)
{
    if (PyBool_Check(kw_or_val) || !PyLong_Check(kw_or_val)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %.80s %R", what,
                     Py_TYPE(kw_or_val)->tp_name, kw_or_val);
        *err = 1;
        return 0;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(kw_or_val, &overflow);
    if (overflow || v < lo || v > hi) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "%s must be %lld..%lld, got %R", what, (long long)lo,
                         (long long)hi, kw_or_val);
        *err = 1;
        return 0;
    }
    return (int64_t)v;
}

static PyObject *list_from(const int64_t *v, int64_t n)
{
    PyObject *l = PyList_New((Py_ssize_t)n);
    for (int64_t i = 0; l && i < n; i++) {
        PyObject *x = PyLong_FromLongLong(v[i]);
        if (x == NULL) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, (Py_ssize_t)i, x);
    }
    return l;
}


/* plan(width, height, *, overlap, align, fixed_bytes, per_px_bytes, budget, batch=1,
 *      min_tile=0, max_tile=None, feather=0.5, depth=None, depth_overlap=0, depth_align=1,
 *      depth_min=1) -> dict.  With depth, the frames are tiled too (cost per voxel) and the
 * result has a 3-tuple tile and grid and "zs". */
static PyObject *py_plan(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"width", "height", "overlap", "align", "fixed_bytes", "per_px_bytes",
                             "budget", "batch", "min_tile", "max_tile", "feather", "depth",
                             "depth_overlap", "depth_align", "depth_min", "depth_max",
                             "per_edge_bytes", "per_frame_bytes", NULL};
    PyObject *o[18] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$OOOOOOOOOOOOOOOO:plan", kwlist, &o[0], &o[1], &o[2],
                                     &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11],
                                     &o[12], &o[13], &o[14], &o[15], &o[16], &o[17]))
        return NULL;
    plan_in in = {.overlap = 0, .align = 1, .batch = 1, .feather = 0.5, .d_align = 1, .d_min_tile = 1,
                  .d_max_tile = VG_MAX_SIDE};
    if (o[10] && (vg_parse_double(o[10], "feather", -1e-300, 1.0, &in.feather) < 0))
        return NULL;
    int err = 0;
    in.w = get_pos_int(o[0], "width", 1, VG_MAX_SIDE, &err);
    if (!err)
        in.h = get_pos_int(o[1], "height", 1, VG_MAX_SIDE, &err);
    if (!err && o[2])
        in.overlap = get_pos_int(o[2], "overlap", 0, VG_MAX_SIDE, &err);
    if (!err && o[3])
        in.align = get_pos_int(o[3], "align", 1, 4096, &err);
    if (!err && o[7])
        in.batch = get_pos_int(o[7], "batch", 1, 1 << 20, &err);
    if (!err && o[8])
        in.min_tile = get_pos_int(o[8], "min_tile", 0, VG_MAX_SIDE, &err);
    in.max_tile = VG_MAX_SIDE;
    if (!err && o[9] && o[9] != Py_None)
        in.max_tile = get_pos_int(o[9], "max_tile", 1, VG_MAX_SIDE, &err);
    if (!err && o[11] && o[11] != Py_None)
        in.d = get_pos_int(o[11], "depth", 1, VG_MAX_SIDE, &err);
    if (!err && o[12])
        in.d_overlap = get_pos_int(o[12], "depth_overlap", 0, VG_MAX_SIDE, &err);
    if (!err && o[13])
        in.d_align = get_pos_int(o[13], "depth_align", 1, 4096, &err);
    if (!err && o[14])
        in.d_min_tile = get_pos_int(o[14], "depth_min", 0, VG_MAX_SIDE, &err);
    if (!err && o[15] && o[15] != Py_None)
        in.d_max_tile = get_pos_int(o[15], "depth_max", 1, VG_MAX_SIDE, &err);
    if (err)
        return NULL;
    if (in.d == 0 && ((o[12] && in.d_overlap) || (o[13] && in.d_align != 1) || (o[14] && in.d_min_tile != 1) ||
                      (o[15] && o[15] != Py_None))) {
        PyErr_SetString(PyExc_TypeError, "depth_overlap, depth_align, depth_min and depth_max need depth=");
        return NULL;
    }
    int64_t fixed = 0, per = 0, edge = 0, frame = 0, budget = 0;
    if ((o[4] && vg_parse_bytes(o[4], "fixed_bytes", 1, &fixed) < 0) ||
        (o[5] && vg_parse_bytes(o[5], "per_px_bytes", 1, &per) < 0) ||
        (o[16] && vg_parse_bytes(o[16], "per_edge_bytes", 1, &edge) < 0) ||
        (o[17] && vg_parse_bytes(o[17], "per_frame_bytes", 1, &frame) < 0) ||
        (o[6] == NULL && (PyErr_SetString(PyExc_TypeError, "plan() needs budget="), 1)) ||
        vg_parse_bytes(o[6], "budget", 1, &budget) < 0)
        return NULL;
    in.fixed = (double)fixed;
    in.per_px = o[5] && PyFloat_Check(o[5]) ? PyFloat_AS_DOUBLE(o[5]) : (double)per;
    in.per_edge = o[16] && PyFloat_Check(o[16]) ? PyFloat_AS_DOUBLE(o[16]) : (double)edge;
    in.per_frame = o[17] && PyFloat_Check(o[17]) ? PyFloat_AS_DOUBLE(o[17]) : (double)frame;
    in.budget = budget;
    if (in.w % in.align || in.h % in.align) {
        PyErr_Format(PyExc_ValueError, "image %lldx%lld is not a multiple of align %lld",
                     (long long)in.w, (long long)in.h, (long long)in.align);
        return NULL;
    }
    if (in.overlap % in.align) {
        PyErr_Format(PyExc_ValueError, "overlap %lld is not a multiple of align %lld",
                     (long long)in.overlap, (long long)in.align);
        return NULL;
    }
    if (in.d && (in.d % in.d_align || in.d_overlap % in.d_align)) {
        PyErr_Format(PyExc_ValueError,
                     "depth %lld and depth_overlap %lld must be multiples of depth_align %lld",
                     (long long)in.d, (long long)in.d_overlap, (long long)in.d_align);
        return NULL;
    }
    /* two strides must span a tile (no pixel three deep): tile >= 2 * overlap */
    if (in.min_tile < 2 * in.overlap)
        in.min_tile = 2 * in.overlap;
    if (in.min_tile < in.align)
        in.min_tile = in.align;
    in.min_tile = align_up(in.min_tile, in.align);
    if (in.d) {
        if (in.d_min_tile < 2 * in.d_overlap)
            in.d_min_tile = 2 * in.d_overlap;
        if (in.d_min_tile < in.d_align)
            in.d_min_tile = in.d_align;
        in.d_min_tile = align_up(in.d_min_tile, in.d_align);
        if (in.d_max_tile < in.d_min_tile && in.d_max_tile < in.d) {
            PyErr_Format(PyExc_ValueError, "depth_max %lld is below the smallest depth tile %lld",
                         (long long)in.d_max_tile, (long long)in.d_min_tile);
            return NULL;
        }
    }
    if (in.max_tile < in.min_tile && in.max_tile < in.w && in.max_tile < in.h) {
        PyErr_Format(PyExc_ValueError,
                     "max_tile %lld is below the smallest tile %lld that overlap %lld allows",
                     (long long)in.max_tile, (long long)in.min_tile, (long long)in.overlap);
        return NULL;
    }
    {
        axis_in ax = axis_of(&in, in.w), ay = axis_of(&in, in.h);
        int64_t mx = axis_min_count(&ax), my = axis_min_count(&ay);
        if (mx > 0 && my > 0 && mx > VG_PLAN_MAX_TILES / my) {
            PyErr_Format(PyExc_ValueError,
                         "max_tile %lld with overlap %lld needs at least %lld x %lld tiles for "
                         "%lldx%lld px; a plan may have at most %lld tiles",
                         (long long)in.max_tile, (long long)in.overlap, (long long)mx, (long long)my,
                         (long long)in.w, (long long)in.h, (long long)VG_PLAN_MAX_TILES);
            return NULL;
        }
    }
    /* candidates: at most VG_PLAN_PROBES per distinct natural tile (<= 2 sqrt(L) + 1 of them)
     * plus one tile */
    int64_t capx = VG_PLAN_PROBES * (2 * (int64_t)sqrt((double)(in.w / in.align)) + 4) + 1;
    int64_t capy = VG_PLAN_PROBES * (2 * (int64_t)sqrt((double)(in.h / in.align)) + 4) + 1;
    int64_t capz = in.d ? VG_PLAN_PROBES * (2 * (int64_t)sqrt((double)(in.d / in.d_align)) + 4) + 1 : 1;
    axis_cand *cx = PyMem_Malloc(sizeof(axis_cand) * (size_t)(capx + capy + capz));
    if (cx == NULL)
        return PyErr_NoMemory();
    plan_out out;
    Py_BEGIN_ALLOW_THREADS
    plan_core(&in, &out, cx, capx, cx + capx, capy, cx + capx + capy, capz);
    Py_END_ALLOW_THREADS
    PyMem_Free(cx);
    PyObject *r = NULL;
    if (!out.fits) {
        r = Py_BuildValue("{s:O,s:s,s:L,s:L,s:L}", "fits", Py_False, "why", out.why,
                          "budget_bytes", (long long)in.budget, "min_tile", (long long)in.min_tile,
                          "overlap", (long long)in.overlap);
        if (r && in.d) {
            PyObject *dm = PyLong_FromLongLong(in.d_min_tile);
            if (dm == NULL || PyDict_SetItemString(r, "depth_min_tile", dm) < 0)
                Py_CLEAR(r);
            Py_XDECREF(dm);
        }
        return r;
    }
    int64_t *xs = PyMem_Malloc(sizeof(int64_t) * (size_t)(out.nx + out.ny + out.nz));
    if (xs == NULL)
        return PyErr_NoMemory();
    int64_t *ys = xs + out.nx, *zs = ys + out.ny;
    axis_in ax = axis_of(&in, in.w), ay = axis_of(&in, in.h);
    axis_positions(&ax, out.nx, out.tw, xs);
    axis_positions(&ay, out.ny, out.th, ys);
    if (in.d) {
        axis_in az = depth_axis_of(&in);
        axis_positions(&az, out.nz, out.td, zs);
    }
    PyObject *lx = list_from(xs, out.nx), *ly = list_from(ys, out.ny);
    PyObject *lz = in.d ? list_from(zs, out.nz) : NULL;
    PyObject *tile = NULL, *grid = NULL;
    if (lx && ly && (lz || !in.d)) {
        tile = in.d ? Py_BuildValue("(LLL)", (long long)out.tw, (long long)out.th, (long long)out.td)
                    : Py_BuildValue("(LL)", (long long)out.tw, (long long)out.th);
        grid = in.d ? Py_BuildValue("(LLL)", (long long)out.nx, (long long)out.ny, (long long)out.nz)
                    : Py_BuildValue("(LL)", (long long)out.nx, (long long)out.ny);
    }
    /* "O", not "N": Py_BuildValue steals "N" arguments even when it fails, and these objects
     * are released below on every path */
    if (tile && grid)
        r = Py_BuildValue("{s:O,s:O,s:O,s:L,s:O,s:O,s:d,s:L,s:L,s:L,s:L}", "fits", Py_True, "tile",
                          tile, "grid", grid, "tiles", (long long)(out.nx * out.ny * out.nz), "xs",
                          lx, "ys", ly, "predicted_peak_bytes", out.peak, "budget_bytes",
                          (long long)in.budget, "batch", (long long)out.batch, "overlap",
                          (long long)in.overlap, "min_tile", (long long)in.min_tile);
    if (r && in.d) {
        PyObject *dm = PyLong_FromLongLong(in.d_min_tile), *dov = PyLong_FromLongLong(in.d_overlap);
        if (dm == NULL || dov == NULL || PyDict_SetItemString(r, "zs", lz) < 0 ||
            PyDict_SetItemString(r, "depth_min_tile", dm) < 0 ||
            PyDict_SetItemString(r, "depth_overlap", dov) < 0)
            Py_CLEAR(r);
        Py_XDECREF(dm);
        Py_XDECREF(dov);
    }
    Py_XDECREF(tile);
    Py_XDECREF(grid);
    Py_XDECREF(lx);
    Py_XDECREF(ly);
    Py_XDECREF(lz);
    PyMem_Free(xs);
    return r;
}

PyMethodDef vg_tiler_methods[] = {
    {"plan", (PyCFunction)(void (*)(void))py_plan, METH_VARARGS | METH_KEYWORDS,
     "plan($module, width, height, *, overlap=0, align=1, fixed_bytes=0, per_px_bytes=0, budget, "
     "batch=1, min_tile=0, max_tile=None, feather=0.5, depth=None, depth_overlap=0, depth_align=1, "
     "depth_min=1, depth_max=None, per_edge_bytes=0, per_frame_bytes=0)\n--\n\nThe largest tile that fits the budget, as an "
     "even grid (dict)."},
    {NULL, NULL, 0, NULL}};
