/* gpulibs.c — loading NVML and the CUDA driver at run time.
 *
 * Owns: dlopen by SONAME (or the path in VRAMGUARD_NVML_LIB / VRAMGUARD_CUDA_LIB), one
 * attempt per process under pthread_once, the symbol tables, the reason a load failed, and
 * the translation of native status codes into text.  No CUDA toolkit is needed to build:
 * the few types we touch are declared in vg_gpulibs.h.
 *
 * We call nvmlInit_v2 (NVML needs no CUDA context).  We never call cuInit: the driver is
 * used only when the host framework has already initialised it, and cuMemGetInfo only when
 * a context is already current (see sources.c). */
#include "vg_gpulibs.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pthread_once_t nvml_once = PTHREAD_ONCE_INIT;
static pthread_once_t cuda_once = PTHREAD_ONCE_INIT;
/* Written only inside the once-routines, read-only afterwards: no lock needed. */
static vg_nvml_api nvml_api;
static vg_cuda_api cuda_api;
static int nvml_ok, cuda_ok;
static char nvml_reason[VG_REASON] = "unavailable: not loaded";
static char cuda_reason[VG_REASON] = "unavailable: not loaded";

static void *open_lib(const char *envvar, const char *soname, char *reason)
{
    const char *path = getenv(envvar);
    if (path == NULL || path[0] == '\0')
        path = soname;
    /* RTLD_LOCAL: keep the driver's symbols out of the global namespace the host uses. */
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        const char *e = dlerror();
        snprintf(reason, VG_REASON, "unavailable: cannot load %s (%s)", path, e ? e : "unknown error");
    }
    return h;
}

#define VG_LOAD_REQ(name, ret, args)                                                     \
    *(void **)(&api->name) = dlsym(h, #name);                                            \
    if (api->name == NULL) {                                                             \
        snprintf(reason, VG_REASON, "unavailable: %s lacks %s (driver too old?)", lib,   \
                 #name);                                                                 \
        goto fail;                                                                       \
    }
#define VG_LOAD_OPT(name, ret, args) *(void **)(&api->name) = dlsym(h, #name);

static void load_nvml(void)
{
    char *reason = nvml_reason;
    const char *lib = "libnvidia-ml.so.1";
    vg_nvml_api *api = &nvml_api;
    void *h = open_lib("VRAMGUARD_NVML_LIB", lib, reason);
    if (h == NULL)
        return;
    VG_NVML_REQUIRED(VG_LOAD_REQ)
    VG_NVML_OPTIONAL(VG_LOAD_OPT)
    int rc = api->nvmlInit_v2();
    if (rc != 0) {
        char msg[VG_REASON - 32];
        vg_nvml_error(rc, "nvmlInit_v2", msg, sizeof msg);
        snprintf(reason, VG_REASON, "unavailable: %s", msg);
        goto fail;
    }
    /* The handle stays open for the life of the process: NVML handles point into it. */
    nvml_ok = 1;
    snprintf(reason, VG_REASON, "ok");
    return;
fail:
    memset(api, 0, sizeof *api);
    dlclose(h);
}

static void load_cuda(void)
{
    char *reason = cuda_reason;
    const char *lib = "libcuda.so.1";
    vg_cuda_api *api = &cuda_api;
    void *h = open_lib("VRAMGUARD_CUDA_LIB", lib, reason);
    if (h == NULL)
        return;
    VG_CUDA_REQUIRED(VG_LOAD_REQ)
    VG_CUDA_OPTIONAL(VG_LOAD_OPT)
    cuda_ok = 1;
    snprintf(reason, VG_REASON, "ok");
    return;
fail:
    memset(api, 0, sizeof *api);
    dlclose(h);
}

#undef VG_LOAD_REQ
#undef VG_LOAD_OPT

const vg_nvml_api *vg_nvml(const char **reason)
{
    pthread_once(&nvml_once, load_nvml);
    if (reason)
        *reason = nvml_reason;
    return nvml_ok ? &nvml_api : NULL;
}

const vg_cuda_api *vg_cuda(const char **reason)
{
    pthread_once(&cuda_once, load_cuda);
    if (reason)
        *reason = cuda_reason;
    return cuda_ok ? &cuda_api : NULL;
}

void vg_nvml_error(int rc, const char *what, char *buf, size_t n)
{
    const char *s = NULL;
    if (nvml_api.nvmlErrorString)
        s = nvml_api.nvmlErrorString(rc);
    snprintf(buf, n, "%s failed: NVML error %d (%s)", what, rc, s ? s : "no description");
}

void vg_cuda_error(int rc, const char *what, char *buf, size_t n)
{
    const char *s = NULL;
    if (cuda_api.cuGetErrorString == NULL || cuda_api.cuGetErrorString(rc, &s) != 0)
        s = NULL;
    snprintf(buf, n, "%s failed: CUDA error %d (%s)", what, rc, s ? s : "no description");
}

int vg_cuda_initialized(void)
{
    const vg_cuda_api *cu = vg_cuda(NULL);
    if (cu == NULL)
        return 0;
    vg_CUcontext ctx = NULL;
    /* CUDA_ERROR_NOT_INITIALIZED (3) until someone calls cuInit; cheap either way. */
    return cu->cuCtxGetCurrent(&ctx) != 3;
}
