/* vg_gpulibs.h — the NVML and CUDA driver entry points, loaded at run time (gpulibs.c).
 *
 * Bottom layer: plain C, no Python.  Only the few driver types we touch are declared, so no
 * CUDA toolkit is needed to build.  Per-struct versions are spelled out (NVML's _v2 memory
 * struct, the two process-info layouts) because drivers fill the layout they were built for. */
#ifndef VG_GPULIBS_H
#define VG_GPULIBS_H

#include <stddef.h>
#include <stdint.h>

#define VG_REASON 256 /* bytes for "unavailable: why" strings */
#define VG_NAME 96

typedef struct vg_nvmlDevice_st *vg_nvmlDevice_t;
typedef struct { unsigned long long total, free, used; } vg_nvmlMemory_t;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} vg_nvmlMemory_v2_t;
/* nvmlProcessInfo_v2_t: 24 bytes.  What nvmlDeviceGetComputeRunningProcesses_v2 and, on
 * current drivers, _v3 fill. */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} vg_nvmlProcessInfo_v2_t;
/* The 32-byte layout with usedGpuCcProtectedMemory that nvml.h briefly shipped for _v3. */
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

#endif
