"""python -m vramguard: status, --json, watch, and bad arguments."""
import json
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
    assert "Simulated GPU 0" in r.stdout and "3.50 GiB" in r.stdout  # budget 8-3-1.5
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
    gc_lines = [l for l in (tmp_path / "gc.log").read_text().splitlines() if " GC: " in l]
    assert gc_lines and "fn=upscale" in gc_lines[-1]
    assert str(tmp_path) in r.stdout
