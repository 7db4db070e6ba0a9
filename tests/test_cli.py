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
