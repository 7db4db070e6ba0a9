/* The NVML and CUDA driver entry points vramguard uses, one line each.
 *
 * X-macro table: VG_NVML(name, ret, args) / VG_CUDA(name, ret, args).  gpulibs.c expands it
 * into function-pointer typedefs, a symbol table struct and the dlsym loop, so adding an
 * entry point is one line here.  Versioned names are spelled out (nvmlInit_v2,
 * cuMemGetInfo_v2) because the unversioned exports are the legacy ABIs.
 *
 * OPTIONAL entries may be missing on older drivers; the code checks the pointer. */

/* ---- NVML (libnvidia-ml.so.1) ---- */
#define VG_NVML_REQUIRED(X)                                                              \
    X(nvmlInit_v2, int, (void))                                                          \
    X(nvmlShutdown, int, (void))                                                         \
    X(nvmlErrorString, const char *, (int))                                              \
    X(nvmlDeviceGetCount_v2, int, (unsigned int *))                                      \
    X(nvmlDeviceGetHandleByIndex_v2, int, (unsigned int, vg_nvmlDevice_t *))             \
    X(nvmlDeviceGetHandleByUUID, int, (const char *, vg_nvmlDevice_t *))                 \
    X(nvmlDeviceGetName, int, (vg_nvmlDevice_t, char *, unsigned int))                   \
    X(nvmlDeviceGetUUID, int, (vg_nvmlDevice_t, char *, unsigned int))                   \
    X(nvmlDeviceGetMemoryInfo, int, (vg_nvmlDevice_t, vg_nvmlMemory_t *))

#define VG_NVML_OPTIONAL(X)                                                              \
    X(nvmlDeviceGetMemoryInfo_v2, int, (vg_nvmlDevice_t, vg_nvmlMemory_v2_t *))          \
    X(nvmlDeviceGetComputeRunningProcesses_v3, int,                                      \
      (vg_nvmlDevice_t, unsigned int *, vg_nvmlProcessInfo_v3_t *))                      \
    X(nvmlDeviceGetComputeRunningProcesses_v2, int,                                      \
      (vg_nvmlDevice_t, unsigned int *, vg_nvmlProcessInfo_v2_t *))                      \
    X(nvmlSystemGetDriverVersion, int, (char *, unsigned int))

/* ---- CUDA driver (libcuda.so.1) ---- */
#define VG_CUDA_REQUIRED(X)                                                              \
    X(cuCtxGetCurrent, int, (vg_CUcontext *))                                            \
    X(cuCtxGetDevice, int, (int *))                                                      \
    X(cuCtxSetCurrent, int, (vg_CUcontext))                                              \
    X(cuMemGetInfo_v2, int, (size_t *, size_t *))                                        \
    X(cuDeviceGet, int, (int *, int))                                                    \
    X(cuDeviceGetCount, int, (int *))                                                    \
    X(cuDevicePrimaryCtxGetState, int, (int, unsigned int *, int *))                     \
    X(cuDevicePrimaryCtxRetain, int, (vg_CUcontext *, int))                              \
    X(cuDevicePrimaryCtxRelease_v2, int, (int))                                          \
    X(cuGetErrorString, int, (int, const char **))

#define VG_CUDA_OPTIONAL(X)                                                              \
    X(cuDeviceGetUuid_v2, int, (vg_CUuuid *, int))                                       \
    X(cuDeviceGetUuid, int, (vg_CUuuid *, int))                                          \
    X(cuDriverGetVersion, int, (int *))
