import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vramguard as vg
from vramguard import gcguard

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def clean_state():
    """Every test starts with no simulated device, no limits and no probe."""
    vg.simulate_clear()
    vg.clear_limits()
    vg.register_probe(None)
    yield
    vg.simulate_clear()
    vg.clear_limits()
    vg.register_probe(None)


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory) -> Path:
    """Build tests/fakelibs/fake_nvml.c into a shared library (needs a C compiler)."""
    out = tmp_path_factory.mktemp("fakelibs") / "libfake-nvml.so"
    cc = os.environ.get("CC", "cc")
    try:
        subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(out),
                        str(HERE / "fakelibs" / "fake_nvml.c")], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:  # pragma: no cover
        pytest.skip(f"cannot build the fake NVML library: {e}")
    return out


def run_py(code: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (GPU libraries load once per process)."""
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full, timeout=timeout)


def real_gpu_reason() -> str | None:
    """None when a real NVIDIA GPU is usable, else why not."""
    st = vg.gpu_status()
    if st["simulated"]:
        return "simulation active"
    if st["devices"] == 0:
        return f"no GPU: {st['devices_reason']}"
    return None


@pytest.fixture
def g():
    """A fresh process guard on a simulated 8 GB card whose 'cache release' frees 0.25 GiB."""
    vg.simulate("8GB", "6GB", oom_count=0, retry_count=0)
    gcguard._guard = None
    guard = vg.guard()
    guard.policy.min_interval = 0
    calls = []

    def release():
        calls.append("release")
        s = vg.snapshot(0)
        vg.update_simulated(0, used=max(0, s.used - (1 << 30) // 4))

    guard.release_cache = release
    guard.calls = calls
    yield guard
    gcguard._guard = None


@pytest.fixture
def fresh_stage_peaks():
    """Stage peaks and a Set Reserve override are process-wide: leave none behind for other
    files' tests."""
    yield
    vg.sampler().reset()
    vg.end_override()
