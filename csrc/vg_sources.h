/* vg_sources.h — every source of memory figures: NVML, the CUDA driver, /proc + cgroups
 * (host RAM), simulated devices, and the visible-index -> NVML device map (sources.c).
 *
 * Plain C, no Python objects: everything here runs without the GIL, from Python threads and
 * from sampler threads alike, so all shared state sits behind vg_sources.lock.  Readers
 * return 0, or -1 with `reason` (VG_REASON bytes) filled; the caller raises with the GIL. */
#ifndef VG_SOURCES_H
#define VG_SOURCES_H

#include "vg_gpulibs.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

#define VG_MAX_DEV 64
#define VG_HOST (-1) /* the device index that names host RAM */

/* What one source knows at one instant; -1 = unknown for the optional fields. */
typedef struct {
    int index; /* VG_HOST for host RAM */
    char name[VG_NAME];
    char uuid[VG_NAME];
    const char *source; /* static string: "simulated", "nvml", "cuda+nvml", "host" */
    int64_t total, free, used, process_used;
    int64_t framework_reserved, framework_allocated, oom_count, retry_count;
    double timestamp; /* CLOCK_MONOTONIC seconds */
    /* fragmentation (issue 16): the allocator's free blocks beside live ones, the largest
     * block a request could get now, expandable segments on (1) / off (0); -1 = unknown */
    int64_t inactive_split, largest_free;
    int expandable;
} vg_reading;

typedef struct {
    int64_t total, available, process_rss, cgroup_limit;
    double timestamp;
    int64_t locked, pinned; /* this process's VmLck / VmPin (bytes), -1 unknown */
} vg_host;

/* A simulated device.  `script` makes used/process_used follow a piecewise-constant
 * timeline from `t0` (monotonic seconds). */
typedef struct {
    char name[VG_NAME];
    int64_t total, used, process_used;
    int64_t fw_reserved, fw_allocated, oom_count, retry_count;
    double t0;
    int64_t nscript;
    double *script_t;
    int64_t *script_used, *script_proc;
    int64_t inactive_split, largest_free; /* driven by an AllocSim (allocsim.c); -1 = none */
    int expandable;
} vg_simdev;

typedef struct {
    int64_t reserve; /* bytes; -1 = follow the default */
    int64_t cap;     /* bytes; 0 = none, -1 = follow the default */
} vg_devcfg;

typedef struct {
    pthread_mutex_t lock;
    /* Configured limits live beside the sources because sampler threads read them under the
     * same lock; the rule that applies them is the snapshot layer's (snapshot.c). */
    vg_devcfg defcfg;  /* the default for every GPU */
    vg_devcfg hostcfg; /* host RAM: its own, never the GPU default */
    vg_devcfg cfg[VG_MAX_DEV];
    int nsim;
    vg_simdev sim[VG_MAX_DEV];
    /* visible device index -> NVML index, built on first use */
    int map_built, map_by_uuid, nmap;
    unsigned int map[VG_MAX_DEV];
    char map_name[VG_MAX_DEV][VG_NAME];
    char map_uuid[VG_MAX_DEV][VG_NAME];
    char map_reason[VG_REASON];
    /* cached NVML per-process figure: refreshed at most every proc_interval seconds */
    double proc_interval;
    double proc_at[VG_MAX_DEV];
    int64_t proc_used[VG_MAX_DEV];
    /* system RAM figures change slowly and cost ~5 us to format: reused for host_interval s */
    double host_interval, host_at;
    vg_host host_cache;
    double pinned_at; /* when VmLck/VmPin were last read (their own, slower interval) */
    int64_t locked_cache, pinned_cache;
    /* /proc files kept open (pread is cheap; open is not), reopened after fork */
    atomic_uint fd_gen; /* fork generation the fds were opened in; 0 = not open */
    int fd_meminfo, fd_statm, fd_cg_max, fd_cg_cur;
    int fd_status; /* /proc/self/status: VmLck, VmPin (pinned host memory) */
} vg_sources;

double vg_now(void);

int vg_sources_init(vg_sources *src); /* 0, or an errno value */
void vg_sources_free(vg_sources *src);
/* In a forked child: the parent's sampler threads may have held the lock. */
void vg_sources_after_fork(vg_sources *src);
/* Forget the device map and cached process figures (devices changed). */
void vg_sources_refresh(vg_sources *src);
/* Whether simulated devices replace real ones; whether the map matched CUDA's by UUID. */
int vg_sources_simulated(vg_sources *src);
int vg_sources_by_uuid(vg_sources *src);

int vg_device_count_nogil(vg_sources *src, int *n, char *reason);
/* index >= 0: a device (simulated or real); VG_HOST: host RAM as a source. */
int vg_source_read_nogil(vg_sources *src, int index, vg_reading *r, char *reason);
/* fresh: 0 = the cached figures when younger than host_interval; VG_HOST_FRESH = MemAvailable
 * etc. now; VG_HOST_FRESH_PINNED = also VmLck/VmPin now (otherwise at most every
 * VG_PINNED_INTERVAL seconds: the kernel formats all of /proc/self/status for them). */
#define VG_HOST_FRESH 1
#define VG_HOST_FRESH_PINNED 2
#define VG_PINNED_INTERVAL 1.0
int vg_host_read_nogil(vg_sources *src, vg_host *h, int fresh, char *reason);
int64_t vg_process_rss_nogil(vg_sources *src);

void vg_simdev_free_script(vg_simdev *d);

#endif
