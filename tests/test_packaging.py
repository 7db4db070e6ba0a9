"""How vramguard gets installed: a wheel from `pip wheel .` that works in a fresh venv elsewhere,
`python -m vramguard` run from ComfyUI/custom_nodes/ (where the clone folder named vramguard
comes first on sys.path), and install.py rebuilding when the sources changed although the
version did not (issue 15)."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.so", "__pycache__", ".pytest_cache",
                                     "*.egg-info", ".hypothesis", "vramguard_out")


def _install_module():
    spec = importlib.util.spec_from_file_location("vramguard_install_py", REPO / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _custom_nodes(tmp_path: Path) -> Path:
    cn = tmp_path / "ComfyUI" / "custom_nodes"
    cn.mkdir(parents=True)
    (cn / "vramguard").symlink_to(REPO, target_is_directory=True)
    return cn


def test_python_m_vramguard_from_custom_nodes(tmp_path):
    """Fails on 0.1.0: "'vramguard' is a package and cannot be directly executed"."""
    cn = _custom_nodes(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "vramguard", "--version"], cwd=cn, capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    import vramguard

    assert r.stdout.strip() == f"vramguard {vramguard.__version__}"
    r = subprocess.run([sys.executable, "-m", "vramguard", "status", "--json"], cwd=cn, capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0 and '"host"' in r.stdout, r.stderr
    # `import vramguard` there is the installed package too, with its compiled core
    r = subprocess.run([sys.executable, "-c", "import vramguard as vg; print(vg.__file__); vg.snapshot(None)"],
                       cwd=cn, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == Path(vramguard.__file__).resolve()


def test_clone_entry_still_exports_the_pack_under_comfyui_names():
    """ComfyUI imports the clone's __init__.py under a path-made name: the node pack, not the swap."""
    spec = importlib.util.spec_from_file_location("_x_custom_nodes_x_vramguard", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
        for k in [k for k in sys.modules if k.startswith(spec.name + ".")]:
            sys.modules.pop(k)
    from vramguard_nodes import NODE_CLASS_MAPPINGS

    assert set(mod.NODE_CLASS_MAPPINGS) == set(NODE_CLASS_MAPPINGS) and len(NODE_CLASS_MAPPINGS) >= 8
    assert mod.WEB_DIRECTORY and Path(mod.WEB_DIRECTORY, "vramguard.js").is_file()


def test_source_hash_follows_the_c_sources(tmp_path):
    inst = _install_module()
    tree = tmp_path / "tree"
    shutil.copytree(REPO, tree, ignore=COPY_IGNORE)
    h0 = inst.source_hash(str(tree))
    assert h0 == inst.source_hash(str(REPO))                  # the same sources, the same hash
    (tree / "README.md").write_text("changed")                  # not a build input
    assert inst.source_hash(str(tree)) == h0
    with open(tree / "csrc" / "vg.h", "a") as f:
        f.write("\n/* a change that keeps the version */\n")
    h1 = inst.source_hash(str(tree))
    assert h1 != h0
    (tree / "setup.py").write_text((tree / "setup.py").read_text() + "\n# x\n")
    assert inst.source_hash(str(tree)) not in (h0, h1)


def test_the_installed_build_records_its_source_hash():
    """The build under test (scripts/test.sh installs this tree) wrote vramguard/_source_hash,
    which is what install.py compares; a stale install (edited sources, no reinstall) fails here."""
    inst = _install_module()
    have = inst.installed_hash()
    assert have is not None, "the installed vramguard has no _source_hash (built by an older setup.py?)"
    assert have == inst.source_hash(str(REPO)), "the installed build is not from this tree: reinstall"


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VRAMGUARD_SANITIZED") == "1", reason="the plain build is tested in the plain pass")
def test_wheel_in_fresh_venv_and_install_py_rebuilds(tmp_path):
    """pip wheel . -> a fresh venv elsewhere -> import + `python -m vramguard status`; then the
    clone route: install.py skips a build of the same sources and rebuilds after a C change."""
    tree = tmp_path / "ComfyUI" / "custom_nodes" / "vramguard"
    shutil.copytree(REPO, tree, ignore=COPY_IGNORE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VRAMGUARD_", "PYTHON"))}
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(tree)], env=env)
    (whl,) = wheels.glob("vramguard-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(whl)], env=env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _run([py, "-m", "vramguard", "status"], cwd=elsewhere, env=env)
    assert "host RAM" in r.stdout
    r = _run([py, "-c", "import vramguard as vg, vramguard_nodes; print(vg.__file__); "
                        "print(vg.snapshot(None).budget > 0)"], cwd=elsewhere, env=env)
    assert str(venv) in r.stdout and r.stdout.split()[-1] == "True"

    # clone route: same sources as the wheel -> nothing to build
    r = _run([py, "install.py"], cwd=tree, env=env)
    assert "nothing to build" in r.stdout, r.stdout
    # a pull that changes the C core but not the version -> rebuilt
    with open(tree / "csrc" / "vg.h", "a") as f:
        f.write("\n/* changed by a pull that keeps the version */\n")
    r = _run([py, "install.py"], cwd=tree, env=env)
    assert "sources changed" in r.stdout, r.stdout
    r = _run([py, "install.py"], cwd=tree, env=env)
    assert "nothing to build" in r.stdout, r.stdout
    r = _run([py, "-m", "vramguard", "--version"], cwd=tree.parent, env=env)  # from custom_nodes/
    assert r.stdout.startswith("vramguard ")
