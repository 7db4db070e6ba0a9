"""Run by ComfyUI Manager after requirements.txt (and by hand: python install.py [--force]).

Builds and installs vramguard's C core from this folder into the running Python unless the
installed copy was built from these very sources: the build records a hash of what it was
built from (csrc/, setup.py, pyproject.toml, python/, nodes/) in the package (`_source_hash`),
so a `git pull` that changes the C core but keeps the version still rebuilds."""
import hashlib
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
# what a build is made from; setup.py stores source_hash() of these in the built package
SOURCES = ("csrc", "python/vramguard", "nodes", "setup.py", "pyproject.toml")
HASH_FILE = "_source_hash"


def source_hash(root: str = here) -> str:
    """sha256 over the build's inputs (relative path and bytes of each file, in sorted order)."""
    files = []
    for entry in SOURCES:
        p = os.path.join(root, entry)
        if os.path.isfile(p):
            files.append(entry)
        for d, dirs, names in os.walk(p):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__")
            files += [os.path.relpath(os.path.join(d, n), root) for n in names
                      if not n.endswith((".pyc", ".so", ".o"))]
    h = hashlib.sha256()
    for rel in sorted(f.replace(os.sep, "/") for f in files):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def installed_hash():
    """The hash the installed vramguard was built from (None: not installed, or built before hashes)."""
    try:
        from importlib.metadata import distribution

        with open(distribution("vramguard").locate_file("vramguard/" + HASH_FILE), encoding="ascii") as f:
            return f.read().strip()
    except Exception:
        return None


def installed_version():
    try:
        from importlib.metadata import version

        return version("vramguard")
    except Exception:
        return None


if __name__ == "__main__":
    want = source_hash()
    have = installed_hash()
    if have != want or "--force" in sys.argv:
        why = "--force" if "--force" in sys.argv else ("not installed" if installed_version() is None else
                                                        "the sources changed since it was built")
        print(f"vramguard: building from {here} ({why})")
        subprocess.check_call([sys.executable, "-m", "pip", "install", here])
    else:
        print("vramguard: the installed build matches these sources; nothing to build")
    print(f"vramguard {installed_version()} installed for {sys.executable}")
