/* ledger_reserve.c — the reserve that learns (no Python; ledger_py.c is its face).
 *
 * Owns: per-device tracking of what the OTHER applications use (device used - this process -
 * the other ledger participants' measured use), its peak over a sliding window, and the
 * learned reserve derived from it.  snapshot.c feeds every device reading in and lets the
 * result join the reserve rule's max.
 *
 * The learned reserve keeps room for the others to come back to their recent peak, plus a
 * margin: reserve = max(0, peak - now) + margin.  What they hold now is already missing from
 * `free`, so reserving their whole peak again would count it twice; when they are idle (now =
 * 0) it is the whole peak + margin.
 *
 * The window is kept as NB buckets of window/NB seconds, each the max of its samples; the
 * peak is the max of the buckets not older than the window (O(NB) per sample, no history). */
#include "vg_ledger.h"

#include <stdio.h>
#include <string.h>

#define NB 12

typedef struct {
    int64_t bmax[NB];
    int64_t bepoch[NB]; /* which window/NB period the bucket holds; -1 empty */
    int64_t now, samples;
    double at;
} learn_dev;

static struct {
    pthread_mutex_t lock;
    vg_learn_cfg cfg;
    learn_dev dev[VG_MAX_DEV];
} G = {PTHREAD_MUTEX_INITIALIZER, {0, 600.0, 256LL << 20}, {{{0}}}};

static pthread_once_t G_once = PTHREAD_ONCE_INIT;

static void reset_dev(learn_dev *d)
{
    for (int b = 0; b < NB; b++)
        d->bmax[b] = 0, d->bepoch[b] = -1;
    d->now = 0, d->samples = 0, d->at = 0;
}

static void reset_all(void)
{
    for (int i = 0; i < VG_MAX_DEV; i++)
        reset_dev(&G.dev[i]);
}

static void after_fork_child(void) { pthread_mutex_init(&G.lock, NULL); }

static void init_once(void)
{
    reset_all();
    pthread_atfork(NULL, NULL, after_fork_child);
}

static void lock_g(void)
{
    pthread_once(&G_once, init_once);
    pthread_mutex_lock(&G.lock);
}

/* Lock held. */
static int64_t peak_of(const learn_dev *d, double now)
{
    double bw = G.cfg.window_s / NB;
    int64_t e = (int64_t)(now / bw), p = 0;
    for (int b = 0; b < NB; b++)
        if (d->bepoch[b] >= 0 && d->bepoch[b] > e - NB && d->bepoch[b] <= e && d->bmax[b] > p)
            p = d->bmax[b];
    return p;
}

static int64_t learned_of(const learn_dev *d, double now)
{
    if (!G.cfg.enabled || d->samples == 0)
        return 0;
    int64_t p = peak_of(d, now), room = p > d->now ? p - d->now : 0;
    int64_t r;
    return __builtin_add_overflow(room, G.cfg.margin, &r) ? INT64_MAX : r;
}

int64_t vg_learn_feed(int index, int64_t used, int64_t ours, int64_t participants, double now)
{
    if (index < 0 || index >= VG_MAX_DEV || used < 0 || ours < 0 || !(now >= 0))
        return 0;
    lock_g();
    int64_t r = 0;
    if (G.cfg.enabled) {
        learn_dev *d = &G.dev[index];
        int64_t others = used - ours; /* both >= 0: no overflow */
        if (participants > 0)
            others = others > participants ? others - participants : 0;
        if (others < 0)
            others = 0;
        int64_t e = (int64_t)(now / (G.cfg.window_s / NB));
        int b = (int)(e % NB);
        if (d->bepoch[b] != e)
            d->bepoch[b] = e, d->bmax[b] = others;
        else if (others > d->bmax[b])
            d->bmax[b] = others;
        d->now = others, d->at = now;
        d->samples++;
        r = learned_of(d, now);
    }
    pthread_mutex_unlock(&G.lock);
    return r;
}

void vg_learn_configure(const vg_learn_cfg *cfg)
{
    lock_g();
    if (cfg->window_s != G.cfg.window_s || !cfg->enabled)
        reset_all(); /* buckets of another width mean nothing; off forgets */
    G.cfg = *cfg;
    pthread_mutex_unlock(&G.lock);
}

void vg_learn_reset(void)
{
    lock_g();
    reset_all();
    pthread_mutex_unlock(&G.lock);
}

static double gib(int64_t b) { return (double)b / (double)(1LL << 30); }

void vg_learn_get(int index, vg_learn_view *out, double now)
{
    memset(out, 0, sizeof *out);
    lock_g();
    out->enabled = G.cfg.enabled;
    out->margin = G.cfg.margin;
    out->window_s = G.cfg.window_s;
    if (index >= 0 && index < VG_MAX_DEV) {
        const learn_dev *d = &G.dev[index];
        out->known = d->samples > 0;
        out->samples = d->samples;
        out->now = d->now;
        out->peak = d->samples > 0 ? peak_of(d, now) : 0;
        out->age_s = d->samples > 0 ? now - d->at : -1;
        out->reserve = learned_of(d, now);
    }
    if (!out->enabled)
        snprintf(out->reason, VG_REASON,
                 "off (setting vramguard.LearnReserve, or set_learn_reserve(True))");
    else if (!out->known)
        snprintf(out->reason, VG_REASON,
                 "on, nothing learned yet: no reading of this device told this process's use "
                 "apart from the others'");
    else
        snprintf(out->reason, VG_REASON,
                 "other applications peaked at %.2f GiB in the last %.0f s and use %.2f GiB "
                 "now: keep %.2f GiB for them to come back + %.2f GiB margin",
                 gib(out->peak), out->window_s, gib(out->now),
                 gib(out->peak > out->now ? out->peak - out->now : 0), gib(out->margin));
    pthread_mutex_unlock(&G.lock);
}
