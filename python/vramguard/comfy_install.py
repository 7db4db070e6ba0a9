"""`python -m vramguard install-comfyui PATH`: the pip route into ComfyUI.

ComfyUI does not discover pip-installed packs; it imports folders in custom_nodes/.  This
writes a minimal loader folder that imports the installed pack (vramguard_nodes).  It is
idempotent, never overwrites a folder it did not write, and --uninstall removes only that.
"""
from __future__ import annotations

import os
import shutil

LOADER = "vramguard_loader"
MARKER = "# vramguard loader: written by `python -m vramguard install-comfyui`"
CONTENT = f'''{MARKER}; remove with --uninstall.
# The node pack itself lives in the pip-installed package vramguard_nodes.
from vramguard_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
'''


def _custom_nodes(comfyui: str) -> str:
    if not isinstance(comfyui, (str, os.PathLike)):
        raise TypeError(f"ComfyUI path must be a path, got {type(comfyui).__name__}")
    root = os.path.abspath(os.fspath(comfyui))
    if not os.path.isdir(root):
        raise ValueError(f"not a folder: {root}")
    cn = os.path.join(root, "custom_nodes")
    checkout = os.path.isfile(os.path.join(root, "main.py")) and os.path.isdir(os.path.join(root, "comfy"))
    # a --base-directory folder: custom_nodes beside models/ or user/
    base_dir = os.path.isdir(cn) and (os.path.isdir(os.path.join(root, "models")) or os.path.isdir(os.path.join(root, "user")))
    if not (checkout or base_dir):
        raise ValueError(f"{root} does not look like ComfyUI (no main.py and comfy/) or a ComfyUI "
                         "--base-directory (custom_nodes/ with models/ or user/)")
    if not os.path.isdir(cn):
        raise ValueError(f"{root} has no custom_nodes folder")
    return cn


def _ours(folder: str) -> bool:
    init = os.path.join(folder, "__init__.py")
    try:
        with open(init, encoding="utf-8") as f:
            return f.read().startswith(MARKER)
    except OSError:
        return False


def install_loader(comfyui: str) -> str:
    """Write custom_nodes/vramguard_loader into a ComfyUI folder (or a --base-directory);
    return what was done."""
    import importlib.util

    if importlib.util.find_spec("vramguard_nodes") is None:  # the loader would import nothing
        raise RuntimeError("vramguard_nodes is not installed in this Python; run `pip install vramguard` first")

    cn = _custom_nodes(comfyui)
    folder = os.path.join(cn, LOADER)
    init = os.path.join(folder, "__init__.py")
    if os.path.exists(folder) and not _ours(folder):
        raise ValueError(f"{folder} exists and was not written by vramguard; not touching it")
    clones = [d for d in os.listdir(cn) if d != LOADER and os.path.isfile(os.path.join(cn, d, "nodes", "pack.py"))
              and os.path.isfile(os.path.join(cn, d, "csrc", "vg.h"))]
    if os.path.isfile(init):
        with open(init, encoding="utf-8") as f:
            if f.read() == CONTENT:
                return f"already installed: {folder}"
    os.makedirs(folder, exist_ok=True)
    tmp = init + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(CONTENT)
    os.replace(tmp, init)
    msg = f"installed: {folder}"
    if clones:
        msg += f"\nnote: a git clone of vramguard is also in custom_nodes ({', '.join(clones)}); keep one of the two"
    return msg


def uninstall_loader(comfyui: str) -> str:
    cn = _custom_nodes(comfyui)
    folder = os.path.join(cn, LOADER)
    if not os.path.exists(folder):
        return f"not installed: {folder}"
    if not _ours(folder):
        raise ValueError(f"{folder} was not written by vramguard; not removing it")
    shutil.rmtree(folder)
    return f"removed: {folder}"
