"""python -m vramguard: status, --json, watch, and bad arguments."""
import json
import re
import subprocess
import sys

import pytest

GiB = 1 << 30


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vramguard", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_status_json_simulated():
    r = cli("status", "--simulate", "8GB", "--used", "3GB", "--reserve", "1GB", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) >= {"devices", "host"}
    (d,) = data["devices"]
    for k in ("total", "free", "used", "process_used", "framework_reserved", "framework_allocated",
              "evictable", "reserve", "budget"):
        assert k in d
    assert d["total"] == 8 * GiB and d["used"] == 3 * GiB and d["reserve"] == GiB
    assert d["budget"] == 4 * GiB
    assert data["host"]["total"] > 0 and data["host"]["available"] > 0


def test_status_text():
    r = cli("status", "--simulate", "8GB", "--used", "3GB", "--reserve", "1.5")
    assert r.returncode == 0, r.stderr
    assert "Simulated GPU 0" in r.stdout and r.stdout.split("\n")[1].endswith(" 3.50G")  # budget 8-3-1.5
    assert "host RAM" in r.stdout


def test_status_without_gpu_says_why():
    r = cli("status")
    assert r.returncode == 0
    assert ("no GPU: " in r.stdout) or ("GPU" in r.stdout.splitlines()[0])


@pytest.mark.parametrize("args", [["status", "--reserve", "-1"], ["status", "--simulate", "nan"],
                                  ["status", "--simulate", "8GB", "--used", "abc"],
                                  ["watch", "--interval", "0"], ["nonsense"]])
def test_bad_arguments_exit_2(args):
    r = cli(*args)
    assert r.returncode == 2
    assert "error" in r.stderr


def test_used_beyond_total():
    r = cli("status", "--simulate", "2GB", "--used", "3GB")
    assert r.returncode != 0 and "exceeds" in r.stderr


def test_watch_refreshes():
    r = cli("watch", "--simulate", "8GB", "--count", "3", "--interval", "0.05")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Simulated GPU 0") == 3


def test_plan_json_keys_and_numbers():
    r = cli("plan", "--size", "4096x4096", "--scale", "4", "--model-mb", "64", "--card", "8GB",
            "--reserve", "1.5", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) >= {"tile", "tiles", "predicted_peak_bytes", "budget_bytes"}
    assert d["budget_bytes"] == int(6.5 * GiB)
    assert d["predicted_peak_bytes"] <= d["budget_bytes"]
    assert d["tiles"] == d["grid"][0] * d["grid"][1] > 1
    bigger = json.loads(cli("plan", "--size", "4096x4096", "--scale", "4", "--model-mb", "64", "--card", "24GB",
                            "--reserve", "1.5", "--json").stdout)
    assert bigger["tiles"] < d["tiles"]


def test_plan_text_and_no_fit():
    r = cli("plan", "--size", "2048x2048", "--scale", "4", "--card", "8GB", "--reserve", "1")
    assert r.returncode == 0 and "tile" in r.stdout and "predicted peak" in r.stdout
    r = cli("plan", "--size", "2048x2048", "--scale", "4", "--card", "1GB", "--reserve", "1")
    assert r.returncode == 1 and "does not fit" in r.stdout


@pytest.mark.parametrize("args", [["plan", "--size", "0x10", "--card", "8GB"], ["plan", "--size", "abc"],
                                  ["plan", "--size", "10x10", "--scale", "nan"],
                                  ["plan", "--size", "10x10", "--card", "-3GB"]])
def test_plan_bad_arguments(args):
    r = cli(*args)
    assert r.returncode == 2 and "error" in r.stderr


def test_demo_writes_its_files(tmp_path):
    pytest.importorskip("torch", reason="the demo runs a torch network")
    pytest.importorskip("PIL", reason="the demo writes PNGs")
    from PIL import Image
    r = cli("demo", "--out", str(tmp_path), "--size", "128", timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("upscaled.png", "input.png", "timeline.png", "gc.log", "gc.jsonl", "plan.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert Image.open(tmp_path / "upscaled.png").size == (512, 512)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["run"]["tiles"] >= 1 and plan["run"]["retries"] == 0
    log_lines = (tmp_path / "gc.log").read_text().splitlines()
    gc_lines = [l for l in log_lines if " GC: " in l]
    assert gc_lines and "fn=upscale" in gc_lines[-1]
    # the run summary comes after the forced collection it summarises, in human units
    (summary,) = [i for i, l in enumerate(log_lines) if "vramguard demo:" in l]
    assert summary > log_lines.index(gc_lines[-1]), log_lines
    assert "1 GC of" in log_lines[summary] and re.search(r"saved (\d+ B|[\d.]+ [KMG]iB|nothing)", log_lines[summary])
    assert re.search(r"'upscale': [\d.]+ [KMG]iB", log_lines[summary]), log_lines[summary]
    assert str(tmp_path) in r.stdout


# ------------------------------------------------------------------ hostile arguments (issue 10/15)
def _one_clean_line(r):
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    return err


@pytest.mark.parametrize("args,needle", [
    (["demo", "--size", "99999999"], "--size"),
    (["demo", "--size", "0"], "--size"),
    (["demo", "--reserve", "nan"], "--reserve"),
    (["demo", "--device", "tpu"], "--device"),
    (["plan", "--size", "100x100", "--overlap", "100"], "--overlap"),
    (["plan", "--size", "100x100", "--overlap", "500"], "--overlap"),
    (["plan", "--size", "100x100", "--overlap", "-1"], "--overlap"),
    (["plan", "--size", "100x100", "--scale", "1e-300"], "--scale"),
    (["plan", "--size", "100x100", "--scale", "1000"], "--scale"),
    (["plan", "--size", "100x100", "--batch", "0"], "--batch"),
    (["plan", "--size", "100x100", "--align", "0"], "--align"),
    (["plan", "--size", "100x100", "--model-mb", "-5"], "--model-mb"),
    (["plan", "--size", "100x100", "--per-px", "nan"], "--per-px"),
    (["plan", "--size", "100x100", "--max-tile", "0"], "--max-tile"),
    (["plan", "--size", "100x100", "--budget", "9" * 400], "--budget"),
    (["watch", "--count", "-1"], "--count"),
    (["watch", "--count", "0"], "--count"),
    (["status", "--used", "9GB", "--simulate", "8GB"], "--used"),
    (["status", "--simulate", "1e400"], "--simulate"),
    (["status", "--simulate", "0"], "--simulate"),
])
def test_nonsense_arguments_exit_2_with_one_line(args, needle):
    r = cli(*args)
    err = _one_clean_line(r)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    last = err.splitlines()[-1]
    assert "error" in last and needle in last and len(last) < 300, err


def test_demo_on_cuda_without_cuda_exits_2():
    torch = pytest.importorskip("torch", reason="the demo runs a torch network")
    pytest.importorskip("PIL", reason="the demo writes PNGs")
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA: the demo would run")
    r = cli("demo", "--device", "cuda", "--size", "32")
    err = _one_clean_line(r)
    assert r.returncode == 2 and "cuda" in err.lower() and len(err.splitlines()) == 1, err


def test_version():
    import vramguard
    r = cli("--version")
    assert r.returncode == 0 and vramguard.__version__ in r.stdout


def test_status_and_watch_fit_80_columns():
    r = cli("status", "--simulate", "8GB", "--used", "3GB", "--reserve", "1.5", "--cap", "6")
    assert r.returncode == 0, r.stderr
    r2 = cli("watch", "--simulate", "24GB", "--used", "23.5GB", "--count", "1", "--interval", "0.01")
    r3 = cli("status")  # no GPU here: the reason line wraps too
    for out in (r.stdout, r2.stdout, r3.stdout):
        assert max(len(l) for l in out.splitlines()) <= 80, out
    assert "Simulated GPU 0" in r.stdout and "cap" in r.stdout


def test_plan_no_fit_in_human_units():
    r = cli("plan", "--size", "2048x2048", "--scale", "4", "--card", "1GB", "--reserve", "1")
    assert r.returncode == 1 and "does not fit" in r.stdout
    import re
    assert not re.search(r"\d{5,}", r.stdout), r.stdout  # no raw byte counts
    assert "MiB" in r.stdout or "GiB" in r.stdout


def test_plan_says_where_its_budget_comes_from():
    import vramguard as vg
    r = cli("plan", "--size", "512x512")
    assert r.returncode in (0, 1)
    if vg.device_count() == 0:
        assert "host RAM" in r.stdout
    r = cli("plan", "--size", "512x512", "--card", "8GB")
    assert "8.00 GiB card" in r.stdout
    d = json.loads(cli("plan", "--size", "512x512", "--card", "8GB", "--json").stdout)
    assert "8.00 GiB card" in d["budget_source"]


def test_ignored_options_warn():
    import vramguard as vg
    r = cli("status", "--used", "3GB")
    assert r.returncode == 0 and "--used" in r.stderr and "ignored" in r.stderr
    if vg.device_count() == 0:
        for opt in ("--reserve", "--cap"):
            r = cli("status", opt, "1GB")
            assert r.returncode == 0 and opt in r.stderr and "ignored" in r.stderr
    r = cli("status", "--simulate", "8GB", "--used", "3GB", "--reserve", "1GB")
    assert r.returncode == 0 and r.stderr == ""


def test_cap_zero_documented():
    r = cli("status", "--help")
    assert "0 = no cap" in " ".join(r.stdout.split())


def test_broken_pipe_is_quiet():
    """`python -m vramguard watch | head -1`: no '[Errno 32] Broken pipe', no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "vramguard", "watch", "--simulate", "8GB", "--interval", "0.01"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()
    try:
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read().decode()
    assert err == "" and rc == 0, (rc, err)
