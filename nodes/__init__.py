"""vramguard's ComfyUI node pack.

Loaded two ways: from a git clone in custom_nodes/ (the repository's __init__.py imports
this package) or, after `pip install vramguard`, from the loader folder that
`python -m vramguard install-comfyui` writes.  Importing registers the nodes, the settings
routes and the web extension, applies saved settings (defaults for those never changed),
installs the prompt hooks, and the stage hooks when that setting is on.
"""
from __future__ import annotations

import logging
import os

from .pack import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

log = logging.getLogger("vramguard")
# absolute, so the pip route's loader folder can re-export it unchanged
WEB_DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]


def _setup() -> None:
    from . import settings

    try:
        in_comfyui = settings.register_routes()
    except Exception as e:  # e.g. `server` imports but no PromptServer was built (>= 0.30 outside a server)
        log.info("vramguard: settings routes not registered (%s); nodes only", e)
        in_comfyui = False
    if not in_comfyui:
        return  # imported outside ComfyUI (tests, tools): registration only
    try:
        # Set Reserve's scope (the rest of the prompt) and the per-prompt summary need the
        # prompt hooks whether or not the automatic stage hooks are on
        from vramguard.adapters import comfyui

        comfyui.install_prompt_hooks()
    except Exception as e:
        log.warning("vramguard: prompt hooks not installed: %s", e)
    try:
        settings.load_saved()
    except Exception as e:  # a bad settings file must not stop ComfyUI from loading
        log.warning("vramguard: settings not applied: %s", e)
    try:
        # ComfyUI has initialised CUDA on this thread by now, so the sampler borrows that
        # context for cheap 10 ms readings (NVML only every 250 ms) and creates none.
        import vramguard as vg

        vg.sampler().start()
    except Exception as e:
        log.warning("vramguard: memory sampler not started: %s", e)
    try:
        # opt-in (VRAMGUARD_LEDGER=1): several ComfyUI instances on one GPU see each other's
        # planned peaks in their budgets
        import vramguard as vg

        joined = vg.ledger.join_from_env()
        if joined is not None:
            log.info("vramguard: shared ledger %s", "joined" if joined.get("joined") else
                     f"not joined: {joined.get('reason')}")
    except Exception as e:
        log.warning("vramguard: shared ledger not joined: %s", e)


_setup()
