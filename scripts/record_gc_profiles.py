"""Record real garbage profiles from a real ComfyUI run, for bench/gc.py to replay.

    eval "$(bash scripts/comfyui_env.sh)"            # or point the two variables at your own
    python scripts/record_gc_profiles.py [--rounds 3] [--out bench/profiles/comfyui_cpu.json]

ComfyUI (VRAMGUARD_COMFYUI, run by VRAMGUARD_COMFYUI_PYTHON) starts with --cpu (or on its GPU
with --gpu) in a temporary --base-directory: the checkout and its venv are not modified.  This
checkout's vramguard is built into a temporary --target folder put on PYTHONPATH, and installed
into the temporary custom_nodes by its own `install-comfyui` (the pip route); the tiny seeded models
are tests/comfyui's.  A recorder pack (written here, loaded last) hooks vramguard's stage checks
(GCGuard.check: every stage boundary vramguard sees) and the end of every prompt, and records at each:

  rss, rss_peak (VmHWM since the previous boundary; reset through /proc/self/clear_refs),
  gc_count (gc.get_count()), objects (len(gc.get_objects())), tensor_bytes (the storages of every
  live tensor object, each once: on CPU the stand-in for the allocator's "allocated"; on a GPU
  memory_stats has it), and what a collection there finds:
  young_* from gc.collect(1), full_* from gc.collect(2) (objects, tensor bytes: storages counted
  once), with the time each took and the RSS after freeing it.  torch.cuda.memory_stats() where CUDA
  is in use; on CPU "cuda" is null.  tracemalloc is not started: it slows allocation-heavy code
  several times over and would distort the timings.

The recorder collects at every boundary to measure what is there, so the trace is "garbage each
stage leaves behind"; vramguard's own GC is switched off meanwhile (its decisions are recorded).
Workflows per round: txt2img (KSampler + VAE decode), txt2img + a x4 model upscale, and txt2img at
another size; every round has new seeds, so nothing is served from ComfyUI's cache.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HELPERS = REPO / "tests" / "comfyui"

RECORDER = r'''
"""vramguard GC profile recorder (written by scripts/record_gc_profiles.py; test use only)."""
import gc, json, os, sys, time

OUT = os.environ["VG_GCRECORD_OUT"]
NODE_CLASS_MAPPINGS = {}
_t0 = time.monotonic()
_state = {"prompt": 0, "started": False}


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _tensor_bytes(objs):
    torch = sys.modules.get("torch")
    seen, total, n = set(), 0, 0
    if torch is None:
        return 0, 0
    for o in objs:
        if isinstance(o, torch.Tensor):
            n += 1
            try:
                s = o.untyped_storage()
                key = (s.data_ptr(), s.nbytes())
            except Exception:
                continue
            if key not in seen:
                seen.add(key)
                total += key[1]
    return total, n


def _cuda():
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    st = torch.cuda.memory_stats()
    keys = ("allocated_bytes.all.current", "allocated_bytes.all.peak", "reserved_bytes.all.current",
            "reserved_bytes.all.peak", "num_alloc_retries", "num_ooms")
    out = {k: st.get(k) for k in keys}
    torch.cuda.reset_peak_memory_stats()
    return out


def _write(rec):
    with open(OUT, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _types_top(objs, n=20):
    c = {}
    for o in objs:
        t = type(o).__name__
        c[t] = c.get(t, 0) + 1
    return dict(sorted(c.items(), key=lambda kv: -kv[1])[:n])


def _record(kind, stage):
    rec = {"kind": kind, "stage": stage, "prompt": _state["prompt"], "t": round(time.monotonic() - _t0, 4)}
    rec["rss"] = _rss()
    rec["rss_peak"] = _hwm()
    rec["gc_count"] = list(gc.get_count())
    objs = gc.get_objects()
    rec["objects"] = len(objs)
    rec["tensor_bytes"], rec["tensors"] = _tensor_bytes(objs)  # live tensors: the framework's "allocated"
    del objs
    rec["cuda"] = _cuda()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        t = time.perf_counter()
        gc.collect(1)
        rec["young_ms"] = round(1000 * (time.perf_counter() - t), 3)
        young = list(gc.garbage)
        gc.garbage.clear()
        rec["young_objects"] = len(young)
        rec["young_tensor_bytes"], rec["young_tensors"] = _tensor_bytes(young)
        gc.collect(2)
        old = list(gc.garbage)
        gc.garbage.clear()
        rec["full_objects"] = len(young) + len(old)
        tb, tn = _tensor_bytes(young + old)
        rec["full_tensor_bytes"], rec["full_tensors"] = tb, tn
    finally:
        gc.set_debug(0)
    del young, old
    t = time.perf_counter()
    rec["freed"] = gc.collect()  # frees what the two passes found (cycles again unreachable)
    rec["full_ms"] = round(1000 * (time.perf_counter() - t), 3)
    rec["rss_after"] = _rss()
    _reset_hwm()
    rec["t_end"] = round(time.monotonic() - _t0, 4)
    _write(rec)


def _install():
    import vramguard.gcguard as gg
    import execution

    orig_check = gg.GCGuard.check

    def check(self, stage, **kw):
        _record("stage", stage)
        d = orig_check(self, stage, **kw)
        with open(OUT, "a") as f:
            f.write(json.dumps({"kind": "decision", "stage": stage, "collect": d.collect, "reason": d.reason}) + "\n")
        return d

    gg.GCGuard.check = check
    orig_exec = execution.PromptExecutor.execute

    def execute(self, *a, **kw):
        if not _state["started"]:
            _state["started"] = True
            gg.configure_gc(enabled=False)  # ours must not collect while we measure
            gc.collect()
            objs = gc.get_objects()
            t = time.perf_counter()
            gc.collect()
            idle_ms = 1000 * (time.perf_counter() - t)
            _write({"kind": "heap", "objects": len(objs), "types": _types_top(objs),
                    "idle_full_ms": round(idle_ms, 3), "gc_threshold": list(gc.get_threshold()),
                    "python": sys.version.split()[0]})
            del objs
        _state["prompt"] += 1
        gg.configure_gc(enabled=False)
        _record("prompt_start", None)
        try:
            return orig_exec(self, *a, **kw)
        finally:
            _record("prompt_end", None)

    execution.PromptExecutor.execute = execute


_install()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _req(url, data=None):
    body = json.dumps(data).encode() if data is not None else None
    r = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=60) as resp:
        return json.loads(resp.read())


def _txt2img(seed: int, w: int, h: int, steps: int, upscale: bool) -> dict:
    p = {
        "1": {"class_type": "VGTestTinyModel", "inputs": {"seed": 11}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": f"a red cube {seed}"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": f"blurry {seed}"}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "vg_test_vae.safetensors"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": w, "height": h, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": 2.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["6", 0],
            "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["5", 0]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "gcrec"}},
    }
    if upscale:
        p["31"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "vg_test_x4.safetensors"}}
        p["32"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["31", 0], "image": ["11", 0]}}
        p["12"]["inputs"]["images"] = ["32", 0]
    return p


WORKFLOWS = [  # (name, width, height, steps, upscale)
    ("txt2img", 256, 256, 8, False),
    ("txt2img_upscale", 256, 256, 8, True),
    ("txt2img_other_size", 384, 320, 8, False),
]


GiB = 1 << 30


def synthetic(leaky: bool) -> dict:
    """An SDXL-shaped run on a 24 GiB card, in replay rows (made up, not recorded: labelled so).
    Weights stay loaded (CLIP-L+G 1.6, UNet 5.1, VAE 0.16 GiB fp16); 30 steps at 1024x1024 or
    1216x832 in turn; the VAE decode's working set is the largest.  leaky: every VAE decode leaves
    0.25 GiB in reference cycles that survive into the old generation (a custom node's closure
    holding its output, say) and every sampling run 0.05 GiB of young cyclic garbage."""
    weights = int(6.86 * GiB)
    rows = []
    for n in range(1, 10):
        big = n % 2 == 1
        px = 1.0 if big else 0.965  # 1216x832 has 96.5 % of the pixels
        rows.append({"kind": "prompt_start", "stage": None, "prompt": n, "dt": 0.05, "work_peak": weights,
                     "live": weights, "garbage_young": 0, "garbage_old": 0})
        for _ in range(2):
            rows.append({"kind": "stage", "stage": "text_encode", "prompt": n, "dt": 0.08,
                         "work_peak": weights + int(0.3 * GiB), "live": weights + int(0.002 * GiB),
                         "garbage_young": 0, "garbage_old": 0})
        rows.append({"kind": "stage", "stage": "unet", "prompt": n, "dt": 7.5 * px,
                     "work_peak": weights + int(3.6 * px * GiB), "live": weights + int(0.02 * GiB),
                     "garbage_young": int(0.05 * GiB) if leaky else 0, "garbage_old": 0})
        rows.append({"kind": "stage", "stage": "vae_decode", "prompt": n, "dt": 1.1 * px,
                     "work_peak": weights + int(6.4 * px * GiB), "live": weights + int(0.012 * GiB),
                     "garbage_young": 0, "garbage_old": int(0.25 * GiB) if leaky else 0})
        rows.append({"kind": "prompt_end", "stage": None, "prompt": n, "dt": 0.05, "work_peak": weights,
                     "live": weights, "garbage_young": 0, "garbage_old": 0})
    return {"header": {"what": "SYNTHETIC garbage profile (made up, not recorded): " + synthetic.__doc__.split(".")[0],
                       "synthetic": True, "model": " ".join(synthetic.__doc__.split()),
                       "command": "python scripts/record_gc_profiles.py --synthetic",
                       "card_bytes": 24 * GiB, "other_bytes": int(0.5 * GiB), "cache": True,
                       "leaky": leaky},
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", action="store_true",
                    help="write the two synthetic SDXL-shaped profiles into bench/profiles and stop")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "profiles" / "comfyui_cpu.json"))
    ap.add_argument("--gpu", action="store_true", help="let ComfyUI use its GPU (default: --cpu)")
    a = ap.parse_args()
    if a.synthetic:
        for leaky in (False, True):
            out = REPO / "bench" / "profiles" / f"synthetic_sdxl_24g_{'leaky' if leaky else 'clean'}.json"
            out.write_text(json.dumps(synthetic(leaky), indent=1) + "\n")
            print(f"record_gc_profiles: wrote {out}", file=sys.stderr)
        return
    root = os.environ.get("VRAMGUARD_COMFYUI")
    py = os.environ.get("VRAMGUARD_COMFYUI_PYTHON")
    if not root or not py or not Path(root, "main.py").is_file():
        sys.exit("set VRAMGUARD_COMFYUI and VRAMGUARD_COMFYUI_PYTHON (eval \"$(bash scripts/comfyui_env.sh)\")")
    if a.rounds < 1:
        sys.exit(f"--rounds must be >= 1, got {a.rounds}")
    version = Path(root, "comfyui_version.py").read_text().split('"')[1]
    work = Path(tempfile.mkdtemp(prefix="vg_gcrec_"))
    try:
        target = work / "site"
        subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-build-isolation",
                        "--no-deps", "--target", str(target), str(REPO)], check=True)
        env = dict(os.environ, PYTHONPATH=str(target))
        models = work / "models"
        subprocess.run([py, str(HELPERS / "make_models.py"), root, str(models)], check=True, cwd=root, env=env)
        base = work / "base"  # a throw-away --base-directory: the models folder is the one made above
        (base / "user" / "default").mkdir(parents=True)
        (base / "models").symlink_to(models, target_is_directory=True)
        shutil.copytree(HELPERS / "vg_testpack", base / "custom_nodes" / "vg_testpack",
                        ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([py, "-m", "vramguard", "install-comfyui", str(base)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        rec_dir = base / "custom_nodes" / "zz_vg_gcrecord"
        rec_dir.mkdir()
        (rec_dir / "__init__.py").write_text(RECORDER)
        trace = work / "trace.jsonl"
        port = _free_port()
        cmd = [py, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch"] + ([] if a.gpu else ["--cpu"])
        log = open(work / "comfyui.log", "w")
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env, VG_GCRECORD_OUT=str(trace)))
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 240
            while True:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ComfyUI did not start:\n" + (work / "comfyui.log").read_text()[-3000:])
                try:
                    _req(url + "/system_stats")
                    break
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(1)
            order = []
            for r in range(a.rounds):
                for name, w, h, steps, up in WORKFLOWS:
                    pid = _req(url + "/prompt", {"prompt": _txt2img(1000 * r + len(order), w, h, steps, up),
                                                 "client_id": "vg-gcrec"})["prompt_id"]
                    while True:
                        hist = _req(url + f"/history/{pid}")
                        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                            if hist[pid]["status"]["status_str"] != "success":
                                raise RuntimeError(json.dumps(hist[pid]["status"])[-2000:])
                            break
                        time.sleep(0.2)
                    order.append(name)
                    print(f"record_gc_profiles: round {r + 1} {name} done", file=sys.stderr)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()
        rows = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
        heap = next(r for r in rows if r["kind"] == "heap")
        import platform
        doc = {
            "header": {
                "what": "garbage profile recorded from a real ComfyUI run (not synthetic)",
                "command": "python scripts/record_gc_profiles.py " + " ".join(sys.argv[1:]),
                "comfyui_version": version,
                "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                "device": "cuda" if a.gpu else "cpu (ComfyUI --cpu): torch.cuda.memory_stats absent, 'cuda' is null; "
                          "bytes are host RSS and torch tensor storages",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs (timings noisy)",
                "models": "tests/comfyui tiny seeded models (SD1-shaped UNet at 1/10 width, SD VAE, 4x ESRGAN)",
                "workflows": [dict(zip(("name", "width", "height", "steps", "upscale"), w)) for w in WORKFLOWS],
                "prompt_order": order,
                "fields": "rss/rss_after bytes; rss_peak = VmHWM since the previous boundary; tensor_bytes = "
                          "storages of all live tensor objects (each once); young_* = what "
                          "gc.collect(1) finds, full_* = what gc.collect(2) finds (objects, tensor bytes, storages "
                          "once); young_ms/full_ms = time of those collections in this process",
                "heap": heap,
            },
            "rows": [r for r in rows if r["kind"] != "heap"],
        }
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"record_gc_profiles: {len(doc['rows'])} rows, heap {heap['objects']} objects -> {a.out}",
              file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
