/* A stand-in libnvidia-ml.so.1 for tests on machines without a GPU.
 *
 * Exercises vramguard's real NVML code path (dlopen by override, symbol table, mapping,
 * CUDA_VISIBLE_DEVICES, memory and process queries).  Devices come from the environment:
 *   FAKE_NVML_DEVICES="total:used,total:used"   bytes, one entry per device
 *   FAKE_NVML_PROC_USED=<bytes>                  this process's usage on every device
 *   FAKE_NVML_PROC_OTHERS=<n>                    other processes listed before ours (default 1)
 *   FAKE_NVML_PROC_LAYOUT=24|32                  element size nvmlDeviceGetComputeRunningProcesses_v3
 *                                                fills: 24 = nvmlProcessInfo_v2_t, what current
 *                                                drivers fill (default); 32 = the R535 layout with
 *                                                usedGpuCcProtectedMemory
 *   FAKE_NVML_PROC_DELAY_MS=<ms>                 the process list takes this long (it costs
 *                                                milliseconds on real drivers)
 *   FAKE_NVML_USED_FILE=<path>                   re-read "used,used,..." (bytes, per device) from
 *                                                this file on every memory query: other
 *                                                applications' use changing over time
 *   FAKE_NVML_INIT_FAIL=<code>                   nvmlInit_v2 returns this code
 *   FAKE_NVML_NO_V2=1                            hide nvmlDeviceGetMemoryInfo_v2's data path
 * fake_nvml_calls counts memory queries, fake_nvml_proc_calls process-list queries (exported
 * for the "NVML polled rarely" tests). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct { unsigned long long total, free, used; } mem_v1;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } mem_v2;
typedef struct { unsigned int pid; unsigned long long used; unsigned int gi, ci; } proc_v2; /* 24 bytes */
typedef struct { unsigned int pid; unsigned long long used; unsigned int gi, ci; unsigned long long cc; } proc_v3; /* 32 */

static int ndev = -1;
static unsigned long long tot[8], use[8];
static int dev_ids[8];
long fake_nvml_calls, fake_nvml_proc_calls;

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
/* Also answers to the UUID the fake CUDA driver reports for device i (tests/fakelibs/fake_cuda.c). */
int nvmlDeviceGetHandleByUUID(const char *u, void **h)
{
    load();
    for (int i = 0; i < ndev; i++) {
        char b[64], c[64];
        nvmlDeviceGetUUID(&dev_ids[i], b, sizeof b);
        snprintf(c, sizeof c, "GPU-%02x000000-0000-0000-0000-000000000000", i);
        if (strcmp(b, u) == 0 || strcmp(c, u) == 0) {
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
/* FAKE_NVML_USED_FILE: the devices' used figures as they are now. */
static void reload_used(void)
{
    const char *p = getenv("FAKE_NVML_USED_FILE");
    FILE *f = p ? fopen(p, "r") : NULL;
    if (f == NULL)
        return;
    for (int i = 0; i < ndev; i++) {
        unsigned long long u;
        if (fscanf(f, i ? ",%llu" : "%llu", &u) != 1)
            break;
        use[i] = u <= tot[i] ? u : tot[i];
    }
    fclose(f);
}

int nvmlDeviceGetMemoryInfo(void *h, mem_v1 *m)
{
    int i = *(int *)h;
    reload_used();
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
    reload_used();
    fake_nvml_calls++;
    m->total = tot[i], m->reserved = 0, m->used = use[i], m->free = tot[i] - use[i];
    return 0;
}
/* Fills `*n` elements of the layout real drivers use: the caller's pointer type says nothing
 * about what the driver writes. */
int nvmlDeviceGetComputeRunningProcesses_v3(void *h, unsigned int *n, void *out)
{
    (void)h;
    fake_nvml_proc_calls++;
    const char *d = getenv("FAKE_NVML_PROC_DELAY_MS");
    if (d) {
        long ms = atol(d);
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    const char *u = getenv("FAKE_NVML_PROC_USED");
    if (!u) {
        *n = 0;
        return 0;
    }
    const char *o = getenv("FAKE_NVML_PROC_OTHERS");
    const char *l = getenv("FAKE_NVML_PROC_LAYOUT");
    unsigned int others = o ? (unsigned int)atoi(o) : 1, want = others + 1;
    int wide = l && atoi(l) == 32;
    if (*n < want) {
        *n = want;
        return 7; /* INSUFFICIENT_SIZE */
    }
    *n = want;
    for (unsigned int k = 0; k < want; k++) {
        unsigned int pid = k < others ? 1000 + k : (unsigned int)getpid();
        unsigned long long used = k < others ? 12345ULL * (k + 1) : strtoull(u, NULL, 10);
        if (wide) {
            proc_v3 *p = (proc_v3 *)out + k;
            memset(p, 0, sizeof *p);
            p->pid = pid, p->used = used, p->gi = p->ci = 0xFFFFFFFFu, p->cc = 0;
        } else {
            proc_v2 *p = (proc_v2 *)out + k;
            memset(p, 0, sizeof *p);
            p->pid = pid, p->used = used, p->gi = p->ci = 0xFFFFFFFFu;
        }
    }
    return 0;
}
int nvmlSystemGetDriverVersion(char *buf, unsigned int n) { snprintf(buf, n, "fake-1.0"); return 0; }
