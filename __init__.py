"""Entry point when this repository is cloned into ComfyUI/custom_nodes/.

The C core must be installed first (`pip install -r requirements.txt` does it, as the
ComfyUI Manager and Registry do; or run install.py).  Without it, ComfyUI still starts and
the log says what to run.
"""
import logging

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY
except ImportError as e:  # vramguard (the compiled package) not installed
    import os
    import sys

    logging.getLogger("vramguard").error(
        "vramguard: the compiled package is not installed (%s). Run: %s -m pip install %s", e,
        sys.executable, os.path.dirname(os.path.abspath(__file__)))
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
    WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
