/* A stand-in libcuda.so.1 for tests on machines without a GPU.
 *
 * Just enough of the driver for vramguard's "borrow the framework's context" path: every
 * thread starts with device 0's primary context current (as if the host framework had
 * initialised CUDA), the primary context is active, and UUIDs match the fake NVML's
 * (GPU-<index as 2 hex digits>000000-0000-0000-0000-000000000000).
 *   FAKE_CUDA_TOTAL=<bytes>            cuMemGetInfo total (default 8 GiB; free = half)
 *   FAKE_CUDA_SETCURRENT_FAIL=1        cuCtxSetCurrent(non-NULL) fails (CUDA_ERROR_INVALID_CONTEXT)
 * fake_cuda_retains / fake_cuda_releases count primary-context retains and releases. */
#include <stdlib.h>
#include <string.h>

typedef struct { char bytes[16]; } uuid_t16;

static int prim_ctx; /* its address is the context handle */
static __thread void *current = &prim_ctx;
long fake_cuda_retains, fake_cuda_releases;

int cuCtxGetCurrent(void **ctx) { *ctx = current; return 0; }
int cuCtxGetDevice(int *dev)
{
    if (current == NULL)
        return 201; /* INVALID_CONTEXT */
    *dev = 0;
    return 0;
}
int cuCtxSetCurrent(void *ctx)
{
    if (ctx != NULL && getenv("FAKE_CUDA_SETCURRENT_FAIL"))
        return 201;
    current = ctx;
    return 0;
}
int cuMemGetInfo_v2(size_t *fr, size_t *tot)
{
    const char *t = getenv("FAKE_CUDA_TOTAL");
    size_t total = t ? (size_t)strtoull(t, NULL, 10) : ((size_t)8 << 30);
    *tot = total, *fr = total / 2;
    return 0;
}
int cuDeviceGet(int *dev, int i) { *dev = i; return i == 0 ? 0 : 101; }
int cuDeviceGetCount(int *n) { *n = 1; return 0; }
int cuDevicePrimaryCtxGetState(int dev, unsigned int *flags, int *active)
{
    (void)dev;
    *flags = 0, *active = 1;
    return 0;
}
int cuDevicePrimaryCtxRetain(void **ctx, int dev)
{
    (void)dev;
    __atomic_add_fetch(&fake_cuda_retains, 1, __ATOMIC_SEQ_CST);
    *ctx = &prim_ctx;
    return 0;
}
int cuDevicePrimaryCtxRelease_v2(int dev)
{
    (void)dev;
    __atomic_add_fetch(&fake_cuda_releases, 1, __ATOMIC_SEQ_CST);
    return 0;
}
int cuGetErrorString(int rc, const char **s) { *s = rc == 201 ? "invalid context" : "unknown"; return 0; }
int cuDeviceGetUuid_v2(uuid_t16 *u, int dev)
{
    memset(u, 0, sizeof *u);
    u->bytes[0] = (char)dev;
    return 0;
}
int cuDriverGetVersion(int *v) { *v = 12080; return 0; }
