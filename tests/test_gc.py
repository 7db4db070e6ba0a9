"""GC triggers: the policy table, hooks around real torch functions, the log, stats, actions."""
import json
import logging
import math

import pytest

import vramguard as vg
from vramguard import _native, gcguard
from vramguard.hooks import HookSet

GiB = 1 << 30


def snap(used_gb, total_gb=8, oom=None, retry=None, budget_gb=None):
    d = {"total": int(total_gb * GiB), "used": int(used_gb * GiB), "free": int((total_gb - used_gb) * GiB)}
    if oom is not None:
        d["oom_count"] = oom
    if retry is not None:
        d["retry_count"] = retry
    if budget_gb is not None:
        d["budget"] = int(budget_gb * GiB)
    return d


# ------------------------------------------------------------------ the policy, table-driven
@pytest.mark.parametrize("policy_kw,snapshot,call_kw,expect", [
    ({}, snap(6), {}, (True, "threshold")),                        # 75 % >= 70
    ({}, snap(5.5), {}, (False, "below-threshold")),               # 68.75 %
    ({"threshold": 50}, snap(4), {}, (True, "threshold")),         # exactly at the threshold
    ({}, snap(1), {"forced": True}, (True, "forced")),
    ({"low_vram": True}, snap(0.1), {}, (True, "low-vram")),       # threshold 0
    ({"low_vram": True, "zluda": True}, snap(1), {}, (False, "below-threshold (low-VRAM not applied: ZLUDA)")),
    ({"low_vram": True, "zluda": True}, snap(7), {}, (True, "threshold")),
    ({}, snap(1, budget_gb=1), {"need": 2 * GiB}, (True, "budget")),
    ({}, snap(1, budget_gb=3), {"need": 2 * GiB}, (False, "below-threshold")),
    ({"threshold": 0}, snap(0), {}, (True, "threshold")),
    ({"threshold": 100}, snap(7.9), {}, (False, "below-threshold")),
])
def test_policy_table(policy_kw, snapshot, call_kw, expect):
    p = _native.Policy(**policy_kw)
    assert p.decide(snapshot, now=100.0, **call_kw) == expect


def test_counters_growth_and_baselines():
    p = _native.Policy(threshold=100)
    assert p.decide(snap(1, oom=3, retry=7), now=10.0) == (False, "below-threshold")  # first sight
    assert p.decide(snap(1, oom=3, retry=7), now=11.0) == (False, "below-threshold")
    assert p.decide(snap(1, oom=4, retry=7), now=12.0) == (True, "oom")
    p.collected(snap(1, oom=4, retry=7), now=12.0)
    assert p.decide(snap(1, oom=4, retry=8), now=12.1) == (True, "retries")  # bypasses hysteresis
    p.collected(snap(1, oom=4, retry=8), now=12.1)
    assert p.decide(snap(1, oom=0, retry=0), now=20.0) == (False, "below-threshold")  # counters reset
    assert p.decide(snap(1, oom=1, retry=0), now=21.0) == (True, "oom")


def test_hysteresis():
    p = _native.Policy(threshold=0, min_interval=1.0)
    assert p.decide(snap(4), now=100.0) == (True, "threshold")
    p.collected(snap(4), now=100.0)
    assert p.decide(snap(4), now=100.5) == (False, "hysteresis")
    assert p.decide(snap(4), now=100.5, forced=True) == (True, "forced")
    assert p.decide(snap(4), now=101.01) == (True, "threshold")
    p.min_interval = 0
    p.collected(now=200.0)
    assert p.decide(snap(4), now=200.0) == (True, "threshold")


def test_effective_threshold_and_low_vram_toggle():
    p = _native.Policy(threshold=80)
    assert p.effective_threshold == 80
    p.low_vram = True
    assert p.effective_threshold == 0
    p.zluda = True
    assert p.effective_threshold == 80


@pytest.mark.parametrize("bad,exc", [(101, ValueError), (-0.5, ValueError), (math.nan, ValueError),
                                     ("70", TypeError), (None, TypeError), (True, TypeError)])
def test_bad_threshold(bad, exc):
    with pytest.raises(exc, match="threshold"):
        _native.Policy(threshold=bad)
    p = _native.Policy()
    with pytest.raises(exc, match="threshold"):
        p.threshold = bad
    if bad is not None:  # None means "leave it as it is" there
        with pytest.raises(exc, match="threshold"):
            vg.configure_gc(threshold=bad)
    assert vg.guard().policy.threshold == 70


def test_bad_stage_names_and_types():
    with pytest.raises(ValueError, match="unknown GC stage 'vae_decod'"):
        vg.gc_check("vae_decod")
    with pytest.raises(TypeError, match="stage name must be str"):
        vg.gc_check(5)
    with pytest.raises(ValueError, match="unknown GC stage"):
        vg.after_stage("nope")
    with pytest.raises(ValueError, match="unknown GC stage"):
        with vg.stage("nope", gc=True):
            pass
    with pytest.raises(ValueError):
        vg.register_stage("bad name with spaces")
    with pytest.raises(TypeError, match="low_vram"):
        vg.configure_gc(low_vram="yes")
    with pytest.raises(ValueError, match="need"):
        vg.gc_check("unet", need=-1)
    with pytest.raises(ValueError):
        vg.configure_gc(min_interval=-1)
    with pytest.raises(ValueError, match="directory does not exist"):
        vg.set_log_file("/nonexistent/dir/gc.jsonl")


def test_decide_rejects_garbage_snapshots():
    p = _native.Policy()
    with pytest.raises(TypeError):
        p.decide(42)
    with pytest.raises(ValueError):
        p.decide({"total": -1})
    with pytest.raises(ValueError):
        p.decide({"total": 10, "used": float("nan")})


# ------------------------------------------------------------------ a guard wired to a simulated device
def test_collection_log_line_parses_back(g, caplog):
    caplog.set_level(logging.DEBUG, logger="vramguard")
    d = vg.gc_check("vae_decode")
    assert d.collect and d.reason == "threshold"
    assert d.saved == GiB // 4 and g.calls == ["release"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GC: ")]
    assert len(lines) == 1
    rec = vg.parse_log_line(lines[0])
    assert rec["fn"] == "vae_decode" and rec["device"] == "cuda" and rec["reason"] == "threshold"
    assert rec["utilization"]["gpu"] == 75 and rec["utilization"]["threshold"] == 70
    assert rec["before"]["gpu"] == 6.0 and rec["after"]["gpu"] == 5.75
    assert rec["gc"]["saved"] == 0.25 and rec["after"]["oom"] == 0 and rec["after"]["retries"] == 0
    assert 0 <= rec["utilization"]["ram"] <= 100 and rec["time"] >= 0
    with pytest.raises(ValueError):
        vg.parse_log_line("GC: nonsense")


def test_skip_is_cheap_and_counted(g):
    vg.update_simulated(0, used="1GB")
    d = vg.gc_check("unet")
    assert not d.collect and d.reason == "below-threshold" and g.calls == []
    st = vg.gc_stats()["unet"]
    assert st["checks"] == 1 and st["collections"] == 0 and st["skipped"] == {"below-threshold": 1}


def test_stats_and_jsonl(g, tmp_path):
    path = tmp_path / "gc.jsonl"
    vg.set_log_file(path)
    vg.gc_check("vae_decode")
    vg.gc_check("vae_decode")
    vg.update_simulated(0, used="1GB")
    vg.gc_check("vae_decode")
    st = vg.gc_stats()["vae_decode"]
    assert st["checks"] == 3 and st["collections"] == 2 and st["saved"] == GiB // 2
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["fn"] == "vae_decode" and rows[0]["saved_bytes"] == GiB // 4
    assert set(rows[0]) >= {"utilization", "gc", "before", "after", "device", "fn", "time", "reason"}


def test_oom_counter_forces_collection_through_hysteresis(g):
    g.policy.min_interval = 60
    g.policy.threshold = 100
    vg.gc_check("unet")                         # first sight: baseline
    vg.update_simulated(0, oom_count=1)
    d = vg.gc_check("unet")
    assert d.collect and d.reason == "oom"
    d = vg.gc_check("unet", forced=True)
    assert d.collect and d.reason == "forced"
    d = vg.gc_check("unet")
    assert not d.collect and d.reason == "hysteresis"


def test_failing_actions_never_propagate(g, caplog):
    def boom():
        raise RuntimeError("driver on fire")

    g.release_cache = boom
    caplog.set_level(logging.WARNING, logger="vramguard")
    for _ in range(3):
        d = vg.gc_check("upscale", forced=True)
        assert d.collect
    warnings = [r for r in caplog.records if "driver on fire" in r.getMessage()]
    assert len(warnings) == 1  # logged once


def test_low_vram_unloads_until_budget_covers_reserve(g):
    vg.set_reserve("2.5GB")
    unloads = []

    def unload(dev, need):
        unloads.append((dev, need))
        vg.update_simulated(0, used="2GB")

    g.unload_models = unload
    vg.configure_gc(low_vram=True)
    vg.update_simulated(0, used="6GB")
    d = vg.gc_check("vae_encode")
    assert d.collect and d.reason == "low-vram"
    assert unloads == [(0, int(2.5 * GiB))]
    assert vg.snapshot(0).budget > 0
    vg.configure_gc(low_vram=False)


def test_disabled_stage_and_global_switch(g):
    vg.configure_gc(stages={"unet": False})
    assert vg.gc_check("unet").reason == "disabled"
    assert vg.gc_check("unet", forced=True).collect  # a node's explicit request still runs
    vg.configure_gc(stages={"unet": True}, enabled=False)
    assert vg.gc_check("vae_decode").reason == "disabled"
    vg.configure_gc(enabled=True)
    assert vg.gc_check("vae_decode").collect


def test_run_summary_logs_info(g, caplog):
    caplog.set_level(logging.INFO, logger="vramguard")
    with vg.run("prompt 7") as guard:
        with vg.stage("vae_decode"):
            vg.update_simulated(0, used="7GB")
    s = guard.run_summary("again")
    assert s["collections"] == 0  # the run above already reported and reset
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("vramguard prompt 7")]
    assert len(msgs) == 1 and "1 GC of 1 checks" in msgs[0] and "'vae_decode': 7.0" in msgs[0]


def test_cpu_only_policy_uses_host_ram():
    if vg.device_count() > 0:
        pytest.skip("a device is present")
    gcguard._guard = None
    try:
        d = vg.gc_check("upscale", forced=True)
        assert d.collect and d.record["device"] == "cpu"
    finally:
        gcguard._guard = None


def test_growth_rule_targets_garbage_not_cache():
    p = _native.Policy(threshold=100, min_interval=0, growth=0.02)
    def s(alloc_gb, used_gb=6):
        return {**snap(used_gb), "framework_allocated": int(alloc_gb * GiB)}
    assert p.decide(s(2.0), stage=3, now=1) == (False, "below-threshold")   # learns the baseline
    assert p.decide(s(2.1), stage=3, now=2) == (False, "below-threshold")   # +0.1 GiB < 2 % of 8
    assert p.decide(s(2.1), stage=4, now=2) == (False, "below-threshold")   # another stage: own baseline
    assert p.decide(s(2.2, used_gb=7.9), stage=3, now=3) == (True, "growth")  # +0.2 GiB > 0.16
    p.collected(s(2.0), now=3)
    assert p.decide(s(2.2), stage=3, now=4) == (False, "below-threshold")   # baselines re-learnt
    assert p.decide(s(2.0, used_gb=7.9), stage=4, now=5) == (False, "below-threshold")  # cache growth is not garbage
    assert p.decide(s(9.0), now=6) == (False, "below-threshold")            # no stage: no growth rule
    with pytest.raises(ValueError, match="stage id"):
        p.decide(s(2), stage=64)
    with pytest.raises(ValueError, match="growth"):
        _native.Policy(growth=1.5)


def test_hook_predicate_decides_per_call(g):
    class Patcher:
        def __init__(self, patches):
            self.patches = patches

        def unpatch_model(self):
            return "ok"

    hs = HookSet("test")
    hs.wrap(Patcher, "unpatch_model", "lora_unload", lambda self: bool(self.patches))
    assert Patcher({}).unpatch_model() == "ok"
    assert "lora_unload" not in vg.gc_stats()          # a plain offload is not a LoRA unload
    assert Patcher({"w": 1}).unpatch_model() == "ok"
    assert vg.gc_stats()["lora_unload"]["checks"] == 1
    hs.uninstall()


# ------------------------------------------------------------------ full collection only on a garbage signal (issue 14)
class _FakeGC:
    """Stands in for the gc module inside gcguard: records the generation of every collect."""

    def __init__(self):
        self.gens = []

    def collect(self, generation=2):
        self.gens.append(generation)
        return 0


def test_full_reasons_are_the_garbage_signals():
    fr = _native.Policy().full_reasons
    assert isinstance(fr, frozenset)
    assert fr == {"forced", "oom", "retries", "budget", "growth"}
    assert not fr & {"threshold", "low-vram", "hysteresis", "below-threshold"}


def test_threshold_crossing_without_growth_is_release_only(g, monkeypatch):
    """Fails on the code before issue 14: a plain threshold crossing ran a full gc.collect()."""
    fake = _FakeGC()
    monkeypatch.setattr(gcguard, "_pygc", fake)
    vg.update_simulated(0, allocated="2GB")
    for _ in range(3):                       # 75 % used, live bytes flat: no garbage signal
        vg.update_simulated(0, used="6GB")   # (the fixture's release lowered it)
        d = vg.gc_check("vae_decode")
        assert d.collect and d.reason == "threshold"
        assert d.record["gc"]["full"] == 0
    assert fake.gens == [1, 1, 1]            # young generation only, never the full heap
    assert g.calls == ["release"] * 3        # the cache is released every time


def test_growth_runs_the_full_collection(g, monkeypatch):
    fake = _FakeGC()
    monkeypatch.setattr(gcguard, "_pygc", fake)
    g.policy.threshold = 100                 # no threshold crossing: only growth can collect
    for alloc in ("2GB", "2.2GB"):
        vg.update_simulated(0, allocated=alloc)
        assert vg.gc_check("vae_decode").reason == "below-threshold"
    vg.update_simulated(0, allocated="2.4GB")  # a second successive rise, 0.4 GB > 2 % of 8 GB
    d = vg.gc_check("vae_decode")
    assert d.collect and d.reason == "growth" and d.record["gc"]["full"] == 1
    assert fake.gens == [2]


def test_growth_needs_accumulation_not_one_step():
    """A model loaded and kept raises live bytes once; sizes that alternate never rise twice."""
    p = _native.Policy(threshold=100, min_interval=0, growth=0.02)

    def s(alloc_gb):
        return {**snap(6), "framework_allocated": int(alloc_gb * GiB)}
    seq = [2.0, 3.0, 3.0, 3.0, 3.0]                    # one step of 1 GiB, then it holds
    assert [p.decide(s(x), stage=1, now=i)[1] for i, x in enumerate(seq)] == ["below-threshold"] * 5
    seq = [2.0, 2.5, 2.0, 2.5, 2.0, 2.5]               # two sizes in turn
    assert [p.decide(s(x), stage=2, now=i)[1] for i, x in enumerate(seq)] == ["below-threshold"] * 6
    seq = [2.0, 2.1, 2.2]                              # garbage piling up: +0.1 GiB twice
    assert [p.decide(s(x), stage=3, now=i)[1] for i, x in enumerate(seq)] == [
        "below-threshold", "below-threshold", "growth"]


def test_release_keeps_growth_baselines_full_collection_resets_them():
    p = _native.Policy(threshold=0, min_interval=0, growth=0.02)

    def s(alloc_gb):
        return {**snap(6), "framework_allocated": int(alloc_gb * GiB)}
    assert p.decide(s(2.0), stage=3, now=1) == (True, "threshold")
    p.collected(s(2.0), now=1, full=False)             # the release: old garbage is still there
    assert p.decide(s(2.1), stage=3, now=2) == (True, "threshold")
    p.collected(s(2.1), now=2, full=False)
    assert p.decide(s(2.2), stage=3, now=3) == (True, "growth")  # the baseline survived the releases
    p.collected(s(2.0), now=3)                                   # full: baselines re-learnt
    assert p.decide(s(2.2), stage=3, now=4) == (True, "threshold")
