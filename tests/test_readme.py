"""Every code block in README.md runs as written on a CPU-only machine (issue 15).

Each ```python block runs on its own, in a fresh interpreter with the installed package, in a
scratch folder (so the files a block writes land there); it must exit 0.  A block may opt out
only with `<!-- readme-test: skip: <reason> -->` on the line before it, and the README must say
the same thing next to it (the reason is checked to be non-empty; at most one block opts out).
Shell blocks: every line that starts with `python -m vramguard` runs as written, except that the
placeholder /path/to/ComfyUI becomes a scratch ComfyUI folder; the lines of the other shell
commands (bash scripts, pip, git) are not run here: .ci/run runs the scripts, and
tests/test_packaging.py the install routes."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"(?P<pre>[^\n]*)\n```(?P<lang>[a-z]*)\n(?P<body>.*?)\n```", re.S)
SKIP = re.compile(r"<!-- readme-test: skip: (?P<why>[^>]*\S)\s*-->")


def blocks():
    text = README.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start("body"))
        skip = SKIP.search(m.group("pre"))
        out.append((m.group("lang"), m.group("body"), line + 1, skip.group("why") if skip else None))
    return out


PY_BLOCKS = [b for b in blocks() if b[0] == "python"]
CLI_LINES = [(ln.strip(), line + i) for lang, body, line, _ in blocks() if lang in ("bash", "sh", "shell", "console")
             for i, ln in enumerate(body.splitlines()) if ln.strip().startswith("python -m vramguard")]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMGUARD_") or k == "VRAMGUARD_SANITIZED"}
    env.pop("PYTHONPATH", None)
    env["VRAMGUARD_NVML_LIB"] = "/nonexistent/libnvidia-ml.so.1"  # CPU-only, even on a GPU machine
    env["VRAMGUARD_CUDA_LIB"] = "/nonexistent/libcuda.so.1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _block_env(tmp_path):
    env = _env()
    env["VRAMGUARD_LEDGER_PATH"] = str(tmp_path / "ledger")  # not the shared /dev/shm region
    return env


def test_readme_has_blocks():
    assert len(PY_BLOCKS) >= 6 and len(CLI_LINES) >= 5
    skipped = [b for b in PY_BLOCKS if b[3]]
    assert len(skipped) <= 1, [b[2] for b in skipped]


@pytest.mark.parametrize("lang,body,line,skip", PY_BLOCKS, ids=[f"README.md:{b[2]}" for b in PY_BLOCKS])
def test_python_block_runs(lang, body, line, skip, tmp_path):
    if skip:
        pytest.skip(f"README.md:{line}: {skip}")
    if "import torch" in body:
        pytest.importorskip("torch")
    r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=_block_env(tmp_path), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"README.md:{line} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    # a block shows something: every example prints (or logs) what it demonstrates
    assert (r.stdout + r.stderr).strip(), f"README.md:{line} printed nothing"


@pytest.fixture(scope="module")
def comfy_dir(tmp_path_factory):
    """A scratch ComfyUI folder shared by the README's lines (install, then uninstall)."""
    comfy = tmp_path_factory.mktemp("readme") / "ComfyUI"
    for d in ("custom_nodes", "comfy"):
        (comfy / d).mkdir(parents=True)
    (comfy / "main.py").write_text("")
    return comfy


@pytest.mark.parametrize("cmd,line", CLI_LINES, ids=[f"README.md:{ln}" for _, ln in CLI_LINES])
def test_cli_line_runs(cmd, line, tmp_path, comfy_dir):
    cmd = cmd.split("#", 1)[0].strip()
    if "/path/to/ComfyUI" in cmd:
        cmd = cmd.replace("/path/to/ComfyUI", str(comfy_dir))
    if " demo" in cmd:
        pytest.importorskip("torch")
        pytest.importorskip("PIL")
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "vramguard"]
    r = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"README.md:{line}: {cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
