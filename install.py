"""Run by ComfyUI Manager after requirements.txt (and by hand: python install.py).

Builds and installs vramguard's C core from this folder into the running Python unless the
installed copy is already this version."""
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))


def installed_version():
    try:
        from importlib.metadata import version

        return version("vramguard")
    except Exception:
        return None


def this_version():
    import re

    with open(os.path.join(here, "pyproject.toml"), encoding="utf-8") as f:
        m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    return m.group(1) if m else None


if __name__ == "__main__":
    if installed_version() != this_version() or "--force" in sys.argv:
        subprocess.check_call([sys.executable, "-m", "pip", "install", here])
    print(f"vramguard {installed_version()} installed for {sys.executable}")
