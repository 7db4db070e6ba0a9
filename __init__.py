"""Entry point when this repository is cloned into ComfyUI/custom_nodes/.

The C core must be installed first (`pip install -r requirements.txt` does it, as the
ComfyUI Manager and Registry do; or run install.py).  Without it, ComfyUI still starts and
the log says what to run.

ComfyUI imports this file under a name made from its path, never as `vramguard`.  It is
imported as `vramguard` only when Python finds the clone folder first on sys.path: `python -m
vramguard ...` or `import vramguard` run from custom_nodes/.  Then the installed package is
loaded in its place (a module may replace itself in sys.modules while it is imported), so the
CLI and the API work there as anywhere else.
"""
import logging
import os
import sys


def _installed_package():
    """The installed vramguard's spec, looked up on sys.path without the folder holding this clone."""
    import importlib.machinery

    here = os.path.dirname(os.path.abspath(__file__))
    parent = os.path.realpath(os.path.dirname(here))
    path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != parent]
    return importlib.machinery.PathFinder.find_spec("vramguard", path)


if __name__ == "vramguard":
    import importlib.util

    _spec = _installed_package()
    if _spec is None or _spec.loader is None:
        raise ImportError(
            "the vramguard package is not installed (this folder is the ComfyUI node pack, which needs it). "
            f"Run: {sys.executable} -m pip install {os.path.dirname(os.path.abspath(__file__))}")
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["vramguard"] = _mod
    _spec.loader.exec_module(_mod)
else:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY
    except ImportError as e:  # vramguard (the compiled package) not installed
        logging.getLogger("vramguard").error(
            "vramguard: the compiled package is not installed (%s). Run: %s -m pip install %s", e,
            sys.executable, os.path.dirname(os.path.abspath(__file__)))
        NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
        WEB_DIRECTORY = None

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
