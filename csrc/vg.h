/* vramguard internal header: the one place where the C files meet.
 *
 * Everything here is internal to the extension; the only exported symbol is
 * PyInit__native (module.c).  Conventions: functions return -1 / NULL with a Python
 * exception set when they hold the GIL; GIL-free helpers return a status and write a
 * reason into a caller buffer, and the caller raises after re-acquiring the GIL. */
#ifndef VG_H
#define VG_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stddef.h>

#define VG_MAX_DEV 64
#define VG_REASON 256 /* bytes for "unavailable: why" strings */
#define VG_NAME 96

/* ---------------------------------------------------------------- GPU libraries */

typedef struct vg_nvmlDevice_st *vg_nvmlDevice_t;
typedef struct { unsigned long long total, free, used; } vg_nvmlMemory_t;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} vg_nvmlMemory_v2_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} vg_nvmlProcessInfo_v2_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
    unsigned long long usedGpuCcProtectedMemory;
} vg_nvmlProcessInfo_v3_t;
typedef struct vg_CUctx_st *vg_CUcontext;
typedef struct { char bytes[16]; } vg_CUuuid;

#include "gpusyms.h"

#define VG_DECL_PTR(name, ret, args) ret(*name) args;
typedef struct { VG_NVML_REQUIRED(VG_DECL_PTR) VG_NVML_OPTIONAL(VG_DECL_PTR) } vg_nvml_api;
typedef struct { VG_CUDA_REQUIRED(VG_DECL_PTR) VG_CUDA_OPTIONAL(VG_DECL_PTR) } vg_cuda_api;
#undef VG_DECL_PTR

/* Load once (thread-safe).  Returns the table, or NULL and the reason ("unavailable: ...").
 * Safe without the GIL. */
const vg_nvml_api *vg_nvml(const char **reason);
const vg_cuda_api *vg_cuda(const char **reason);
/* The one place NVML / CUDA status codes become text. */
void vg_nvml_error(int rc, const char *what, char *buf, size_t n);
void vg_cuda_error(int rc, const char *what, char *buf, size_t n);
/* Whether libcuda has been initialised by someone in this process (cuInit ran).  We never
 * call cuInit ourselves. */
int vg_cuda_initialized(void);

/* ---------------------------------------------------------------- accounting */

typedef struct {
    int index;
    char name[VG_NAME];
    char uuid[VG_NAME];
    const char *source; /* static string: "simulated", "nvml", "cuda+nvml", ... */
    int64_t total, free, used, process_used;
    int64_t framework_reserved, framework_allocated, framework_active;
    int64_t evictable, reserve, cap, budget;
    int64_t oom_count, retry_count;
    double timestamp; /* CLOCK_MONOTONIC seconds */
} vg_snap;

typedef struct {
    int64_t total, available, process_rss, cgroup_limit;
    double timestamp;
} vg_host;

/* A simulated device.  `script` makes used/process_used follow a piecewise-constant
 * timeline from `t0` (monotonic seconds). */
typedef struct {
    char name[VG_NAME];
    int64_t total, used, process_used;
    int64_t fw_reserved, fw_allocated, oom_count, retry_count;
    double t0;
    Py_ssize_t nscript;
    double *script_t;
    int64_t *script_used, *script_proc;
} vg_simdev;

typedef struct {
    int64_t reserve; /* bytes; -1 = follow the default */
    int64_t cap;     /* bytes; 0 = none, -1 = follow the default */
} vg_devcfg;

typedef struct vg_state {
    PyTypeObject *SnapshotType, *HostType, *SamplerType, *PolicyType, *CanvasType;
    PyObject *probe; /* framework probe callable or NULL */

    /* Everything below is read by sampler threads without the GIL: guarded by `lock`. */
    pthread_mutex_t lock;
    vg_devcfg defcfg;
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

    /* /proc files kept open (pread is cheap; open is not), reopened after fork */
    pid_t fd_pid;
    int fd_meminfo, fd_statm, fd_cg_max, fd_cg_cur;
} vg_state;

vg_state *vg_get_state(PyObject *module);
vg_state *vg_state_from_type(PyTypeObject *tp);
double vg_now(void);

int vg_accounting_init(vg_state *st);
void vg_accounting_free(vg_state *st);

/* GIL-free readers.  Return 0, or -1 with `reason` filled. */
int vg_device_count_nogil(vg_state *st, int *n, char *reason);
int vg_device_read_nogil(vg_state *st, int index, vg_snap *s, char *reason);
int vg_host_read_nogil(vg_state *st, vg_host *h, int fresh, char *reason);
int64_t vg_process_rss_nogil(vg_state *st);

/* The budget: computed here and nowhere else (see README "The budget"). */
int64_t vg_budget(const vg_snap *s);

/* With the GIL: device read + probe + config -> full snapshot.  -1 with exception. */
int vg_snapshot(vg_state *st, int index, vg_snap *s);
PyObject *vg_snap_to_py(vg_state *st, const vg_snap *s);
int vg_snap_from_py(vg_state *st, PyObject *obj, vg_snap *s);

/* Parsing helpers shared by all Python-facing functions. */
int vg_parse_bytes(PyObject *obj, const char *what, int allow_zero, int64_t *out);
int vg_parse_index(vg_state *st, PyObject *obj, int *out);
/* A finite float with lo < x <= hi; errors name `what` and the value. */
int vg_parse_double(PyObject *obj, const char *what, double lo, double hi, double *out);

/* ---------------------------------------------------------------- types and functions per file */
extern PyType_Spec vg_snapshot_spec, vg_host_spec; /* structseq descs live in accounting.c */
int vg_accounting_add_types(PyObject *m, vg_state *st);
extern PyMethodDef vg_accounting_methods[];

int vg_sampler_add_type(PyObject *m, vg_state *st);
int vg_policy_add_type(PyObject *m, vg_state *st);
int vg_tiler_add_types(PyObject *m, vg_state *st);
extern PyMethodDef vg_tiler_methods[];

#endif
