/* A stand-in libnvidia-ml.so.1 for tests on machines without a GPU.
 *
 * Exercises vramguard's real NVML code path (dlopen by override, symbol table, mapping,
 * CUDA_VISIBLE_DEVICES, memory and process queries).  Devices come from the environment:
 *   FAKE_NVML_DEVICES="total:used,total:used"   bytes, one entry per device
 *   FAKE_NVML_PROC_USED=<bytes>                  this process's usage on every device
 *   FAKE_NVML_INIT_FAIL=<code>                   nvmlInit_v2 returns this code
 *   FAKE_NVML_NO_V2=1                            hide nvmlDeviceGetMemoryInfo_v2's data path
 * FAKE_NVML_CALLS counts queries (exported for the "NVML polled rarely" test). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct { unsigned long long total, free, used; } mem_v1;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } mem_v2;
typedef struct { unsigned int pid; unsigned long long used; unsigned int gi, ci; unsigned long long cc; } proc_v3;

static int ndev = -1;
static unsigned long long tot[8], use[8];
static int dev_ids[8];
long fake_nvml_calls;

static void load(void)
{
    if (ndev >= 0)
        return;
    ndev = 0;
    const char *s = getenv("FAKE_NVML_DEVICES");
    while (s && *s && ndev < 8) {
        unsigned long long t, u;
        if (sscanf(s, "%llu:%llu", &t, &u) != 2)
            break;
        tot[ndev] = t, use[ndev] = u, dev_ids[ndev] = ndev;
        ndev++;
        s = strchr(s, ',');
        if (s)
            s++;
    }
}

int nvmlInit_v2(void)
{
    const char *f = getenv("FAKE_NVML_INIT_FAIL");
    load();
    return f ? atoi(f) : 0;
}
int nvmlShutdown(void) { return 0; }
const char *nvmlErrorString(int rc) { return rc == 9 ? "Driver Not Loaded" : "Unknown Error"; }
int nvmlDeviceGetCount_v2(unsigned int *n) { load(); *n = (unsigned int)ndev; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int i, void **h)
{
    load();
    if ((int)i >= ndev)
        return 2;
    *h = &dev_ids[i];
    return 0;
}
int nvmlDeviceGetUUID(void *h, char *buf, unsigned int n)
{
    snprintf(buf, n, "GPU-0000000%d-fake-uuid", *(int *)h);
    return 0;
}
int nvmlDeviceGetHandleByUUID(const char *u, void **h)
{
    load();
    for (int i = 0; i < ndev; i++) {
        char b[64];
        nvmlDeviceGetUUID(&dev_ids[i], b, sizeof b);
        if (strcmp(b, u) == 0) {
            *h = &dev_ids[i];
            return 0;
        }
    }
    return 6;
}
int nvmlDeviceGetName(void *h, char *buf, unsigned int n)
{
    snprintf(buf, n, "Fake GPU %d", *(int *)h);
    return 0;
}
int nvmlDeviceGetMemoryInfo(void *h, mem_v1 *m)
{
    int i = *(int *)h;
    fake_nvml_calls++;
    m->total = tot[i], m->used = use[i], m->free = tot[i] - use[i];
    return 0;
}
int nvmlDeviceGetMemoryInfo_v2(void *h, mem_v2 *m)
{
    if (getenv("FAKE_NVML_NO_V2"))
        return 3; /* NOT_SUPPORTED: caller falls back to v1 */
    if (m->version != (unsigned int)(sizeof *m | (2u << 24)))
        return 25; /* ARGUMENT_VERSION_MISMATCH */
    int i = *(int *)h;
    fake_nvml_calls++;
    m->total = tot[i], m->reserved = 0, m->used = use[i], m->free = tot[i] - use[i];
    return 0;
}
int nvmlDeviceGetComputeRunningProcesses_v3(void *h, unsigned int *n, proc_v3 *p)
{
    (void)h;
    const char *u = getenv("FAKE_NVML_PROC_USED");
    if (!u) {
        *n = 0;
        return 0;
    }
    if (*n < 2) {
        *n = 2;
        return 7; /* INSUFFICIENT_SIZE */
    }
    *n = 2;
    memset(p, 0, 2 * sizeof *p);
    p[0].pid = 1, p[0].used = 12345; /* someone else */
    p[1].pid = (unsigned int)getpid(), p[1].used = strtoull(u, NULL, 10);
    return 0;
}
int nvmlSystemGetDriverVersion(char *buf, unsigned int n) { snprintf(buf, n, "fake-1.0"); return 0; }
