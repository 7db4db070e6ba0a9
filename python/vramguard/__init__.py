"""vramguard: a GPU-memory guard for node-graph image pipelines.

    import vramguard
    vramguard.snapshot(0).budget          # bytes this process may still allocate
    with vramguard.stage("vae_decode"):   # per-stage peaks, GC after the stage
        ...
    out = vramguard.tiled(fn, image, scale=4)   # largest tiles that fit, seamless

Importing vramguard never needs a GPU, torch or ComfyUI.
"""
from __future__ import annotations

from ._units import GiB, MiB, fmt_bytes, parse_size
from .accounting import (Host, Snapshot, budget_of, clear_limits, device_count, gpu_status, host,
                         limits, probe, register_probe, set_cap, set_reserve, simulate,
                         simulate_clear, snapshot, snapshot_dict, snapshots, update_simulated)
from .gcguard import (STAGES, Decision, GCGuard, after_stage, configure_gc, gc_check, gc_stats,
                      guard, in_sampling, parse_log_line, register_stage, run, set_log_file, stage)
from .reserve import effective_reserve, end_override, override_limits
from . import ledger
from .ledger import claim as ledger_claim
from .ledger import clear as ledger_clear
from .ledger import join as ledger_join
from .ledger import leave as ledger_leave
from .ledger import participants as ledger_participants
from .ledger import plan as ledger_plan
from .ledger import status as ledger_status
from .ledger import learned_reserve, set_learn_reserve
from .hostram import HostMemoryLow, check_host_room, pinned_host, set_pinned_cap
from .sampling import Sampler, peaks, reset_sampler, sampler, stages, timeline
from .batch import (AllocSim, batch_size, clear_allocators, guarded_batch, prewarm, reserve_for,
                    simulate_allocator, simulated_allocator)
from .tiling import (Cancelled, CostModel, Plan, TilingError, calibrate, cost_model, default_cost,
                     plan_tiles, tiled, tiled_many)

__version__ = "0.1.0"

__all__ = [
    "GiB", "MiB", "fmt_bytes", "parse_size",
    "Host", "Snapshot", "budget_of", "clear_limits", "device_count", "gpu_status", "host", "limits",
    "probe", "register_probe", "set_cap", "set_reserve", "simulate", "simulate_clear", "snapshot",
    "snapshot_dict", "snapshots", "update_simulated",
    "effective_reserve", "end_override", "override_limits",
    "ledger", "ledger_claim", "ledger_clear", "ledger_join", "ledger_leave", "ledger_participants",
    "ledger_plan", "ledger_status",
    "learned_reserve", "set_learn_reserve",
    "HostMemoryLow", "check_host_room", "pinned_host", "set_pinned_cap",
    "Sampler", "peaks", "reset_sampler", "sampler", "stages", "timeline",
    "STAGES", "Decision", "GCGuard", "after_stage", "configure_gc", "gc_check", "gc_stats", "guard",
    "in_sampling", "parse_log_line", "register_stage", "run", "set_log_file", "stage",
    "Cancelled", "CostModel", "Plan", "TilingError", "calibrate", "cost_model", "default_cost",
    "plan_tiles", "tiled", "tiled_many",
    "AllocSim", "batch_size", "clear_allocators", "guarded_batch", "prewarm", "reserve_for",
    "simulate_allocator", "simulated_allocator",
]
