"""`ple-export profile` (runtime_harness/profile.py): report structure and invariants on a tiny bundle,
cold-flash eviction, the enforced budget (fit / refused up front / killed or slowed), device
profiles, baseline comparison, plot, and that the runtime stays torch-free. No timing asserts: the
machine is shared."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from exporter.errors import UserError
from exporter.export import export_bundle
from exporter.manifest import row_pages
from exporter.spec import get_preset
from exporter.synth import synth_checkpoint
from runtime_harness import devices, memory
from runtime_harness.budget import PREFIX, CgroupUnavailable, MemoryCgroup
from runtime_harness.profile import (
    ProfileOptions,
    compare_baseline,
    pages_per_token,
    ple_regions,
    plot,
    render_table,
    run_profile,
)
from tests.conftest import ROOT

FAST = {"runs": 2, "warmup": 1, "prompt_tokens": 12, "gen_tokens": 4}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default export (int4 decoder, int8 PLE table with its scales) of the tiny preset."""
    root = tmp_path_factory.mktemp("profile")
    ckpt = synth_checkpoint(get_preset("tiny"), root / "ckpt")
    return export_bundle(ckpt, root / "bundle").out_dir


@pytest.fixture(scope="module")
def report(bundle: Path) -> dict[str, Any]:
    """One full profile: warm, cold and enforced (the device's generous budget), 16 KiB device pages."""
    events: list[tuple[str, int, int]] = []
    opts = ProfileOptions(device="galaxy-s25-ultra", cold=True, enforce=True, **FAST)
    rep = run_profile(bundle, opts, lambda stage, n, total: events.append((stage, n, total)))
    rep["_events"] = events
    return rep


def _manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


def test_report_shape_and_invariants(report: dict[str, Any], bundle: Path) -> None:
    assert report["schema"] == "ple-export-profile/1"
    env = report["environment"]
    for key in ("cpu_info", "n_cpus", "onnxruntime_version", "n_threads", "build_commit", "test_time"):
        assert key in env
    # llama-bench rows: pp and tg per mode, one sample per timed run
    tests = {(s["mode"], s["test"]) for s in report["samples"]}
    assert {("warm", "pp12"), ("warm", "tg4"), ("cold", "pp12"), ("cold", "tg4")} <= tests
    for s in report["samples"]:
        assert len(s["samples_ns"]) == len(s["samples_ts"]) == FAST["runs"]
        assert s["avg_ts"] > 0 and s["n_threads"] >= 1 and s["model_filename"] == str(bundle)
    warm = report["results"]["warm"]
    assert warm["decode_tok_s"]["median"] > 0 and warm["prefill_tok_s"]["median"] > 0
    assert warm["runs_timed"] == FAST["runs"] and len(warm["step_ms_by_index"]) == FAST["gen_tokens"]
    assert warm["load_s"] > 0
    # runtime tuned phone-like, and recorded
    runtime = report["runtime"]
    assert runtime["embedder"] == {"intra_op_num_threads": 1, "session.intra_op.allow_spinning": "0"}
    assert runtime["decoder"]["session.intra_op.allow_spinning"] == "0"
    assert runtime["session_options"]["allow_spinning"] is False
    # progress: every mode reported its runs (load counts as one)
    stages = {stage for stage, _, _ in report["_events"]}
    assert stages == {"warm", "cold", "enforced"}
    assert sum(n for s, n, _ in report["_events"] if s == "warm") == 1 + FAST["warmup"] + FAST["runs"]


def test_memory_split_names_bundle_files(report: dict[str, Any], bundle: Path) -> None:
    listed = {f["path"] for f in _manifest(bundle)["files"]}
    after = report["memory"]["warm"]["after_runs"]
    assert after["anonymous_bytes"] > 0 and after["bundle_file_backed_bytes"] > 0
    assert set(after["file_backed_bytes"]) == listed
    ple = after["file_backed_bytes"]["ple_table.data"]
    assert ple["mapped_bytes"] > 0 and ple["anonymous_bytes"] == 0  # mapped in place, never copied
    verdict = report["verdict"]
    assert verdict["dram_resident_bytes"] == verdict["decoder_dram_bytes"] + verdict["anonymous_peak_bytes"]
    assert verdict["anonymous_peak_bytes"] <= verdict["dram_resident_in_place_bytes"]
    assert verdict["dram_resident_in_place_bytes"] <= verdict["dram_resident_bytes"]
    assert verdict["fits"] and verdict["flash"]["decode_us_per_token"] > 0
    residency = report["ple"]["residency_after_run"]
    assert residency["file_bytes"] == (bundle / "ple_table.data").stat().st_size
    assert 0 <= residency["fraction"] <= 1


@pytest.mark.parametrize("page", [4096, 16384])
def test_logical_ple_pages_match_the_manifest_math(bundle: Path, page: int) -> None:
    manifest = _manifest(bundle)
    ple = manifest["ple"]
    regions = ple_regions(bundle, manifest)
    assert [r.row_bytes for r in regions] == [ple["row_bytes"], ple["scales_row_bytes"]]
    want = row_pages(ple["row_bytes"], page)["mean"] + row_pages(ple["scales_row_bytes"], page)["mean"]
    got = pages_per_token(regions, page)["mean"]
    assert got == pytest.approx(want, abs=1e-3)
    if page == ple["page_size"]:  # the manifest's own figure, at the page size it was exported for
        assert got == pytest.approx(ple["pages_per_token"]["mean"], abs=1e-3)


def test_report_uses_the_device_page_size(report: dict[str, Any], bundle: Path) -> None:
    logical = report["ple"]["logical"]
    assert logical["page_size"] == 16384 == report["device"]["page_size"]["value"]
    manifest = _manifest(bundle)
    ple = manifest["ple"]
    want = row_pages(ple["row_bytes"], 16384)["mean"] + row_pages(ple["scales_row_bytes"], 16384)["mean"]
    assert logical["pages_per_token"]["mean"] == pytest.approx(want, abs=1e-3)
    assert logical["prompt"]["tokens"] == FAST["prompt_tokens"]
    assert logical["generated"]["tokens"] == FAST["gen_tokens"]
    assert logical["all"]["bytes"] == logical["all"]["distinct_rows"] * ple["bytes_per_token"]


def test_cold_mode_evicts_and_counts_faults(report: dict[str, Any], bundle: Path) -> None:
    fs = memory.filesystem_type(bundle)
    if fs in memory.MEMORY_FILESYSTEMS:
        pytest.skip(f"the bundle is on {fs}: the page cache is the file, fadvise cannot evict it")
    cold = report["cold"]
    assert cold["major_faults_decode"] >= 0 and cold["major_faults_prefill"] >= 0
    ev = cold["eviction"]
    assert ev["evictions"] == FAST["runs"] * (1 + FAST["gen_tokens"])
    assert ev["page_cache_pages_after_evict"] < ev["page_cache_pages_before_evict"]
    measured = report["ple"]["measured"]["cold"]
    assert measured["host_pages_per_decode_token"] >= 0
    assert report["results"]["cold"]["decode_tok_s"]["median"] > 0


def _require_cgroup(section: dict[str, Any]) -> None:
    if not section["enforced"]:
        assert "\n" not in section["reason"]
        pytest.skip(f"no memory cgroup here: {section['reason']}")


def test_enforce_generous_budget_fits_and_cleans_up(report: dict[str, Any]) -> None:
    section = report["enforce"]
    _require_cgroup(section)
    assert section["outcome"] == "fit", section["detail"]
    assert section["exit_status"] == 0 and section["cgroup"]["oom_kills"] == 0
    assert 0 < section["cgroup"]["peak_bytes"] <= section["limit_bytes"]
    assert section["cgroup_removed"] and not Path(section["cgroup_path"]).exists()
    assert report["results"]["enforced"]["decode_tok_s"]["median"] > 0


def test_enforce_refuses_an_impossible_budget_up_front(bundle: Path) -> None:
    with pytest.raises(UserError, match="below what this bundle can run in"):
        run_profile(bundle, ProfileOptions(enforce=True, budget_mb=1, **FAST))


def test_enforce_over_budget_is_killed_or_slowed(bundle: Path) -> None:
    """40 MiB: above decoder + KV + the runtime floor, below what Python + onnxruntime + the sessions
    take here (~46 MiB); the outcome must agree with how the process ended."""
    rep = run_profile(bundle, ProfileOptions(enforce=True, budget_mb=40, **FAST))
    section = rep["enforce"]
    _require_cgroup(section)
    assert section["outcome"] in ("fit", "slowed", "killed")
    killed = section["exit_status"] < 0 or section["cgroup"]["oom_kills"] > 0
    assert (section["outcome"] == "killed") == killed, section["detail"]
    if section["outcome"] == "slowed":
        assert section["major_faults_timed"] > 0
    assert section["cgroup_removed"]
    parent = Path(section["cgroup_path"]).parent
    assert not [p for p in parent.iterdir() if p.name.startswith(f"{PREFIX}{os.getpid()}-")]


def _cgroup_parent() -> Path:
    """Where our groups go; skips the test where none can be made."""
    try:
        group = MemoryCgroup.create(64 << 20)
    except CgroupUnavailable as e:
        pytest.skip(f"no memory cgroup here: {e}")
    group.remove()
    return group.path.parent


def test_ctrl_c_during_the_enforced_run_removes_the_group(bundle: Path) -> None:
    parent = _cgroup_parent()

    def interrupt(stage: str, n: int, total: int) -> None:
        if stage == "enforced":  # the child has loaded and sits in the group
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_profile(bundle, ProfileOptions(enforce=True, **FAST), interrupt)
    assert not [p for p in parent.iterdir() if p.name.startswith(f"{PREFIX}{os.getpid()}-")]


def test_without_a_cgroup_residency_is_compared_with_the_budget(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(limit: int) -> MemoryCgroup:
        raise CgroupUnavailable("cgroup v1: the memory controller is not mounted")

    monkeypatch.setattr(MemoryCgroup, "create", staticmethod(unavailable))
    rep = run_profile(bundle, ProfileOptions(enforce=True, **FAST))
    section = rep["enforce"]
    assert section["enforced"] is False and section["outcome"] == "fits"
    assert section["resident_bytes"] > 0 and section["limit_bytes"] == rep["verdict"]["budget_bytes"]
    notes = [n for n in rep["notes"] if n.startswith("budget not enforced")]
    assert len(notes) == 1 and "\n" not in notes[0] and "not mounted" in notes[0]
    assert "enforced" not in rep["results"]


def test_ple_regions_without_the_graph_follow_the_documented_layout(tmp_path: Path) -> None:
    """codes at offset 0, scales at the next page boundary (docs/bundle-format.md)."""
    manifest = {
        "ple": {"rows": 10, "row_bytes": 100, "scales_row_bytes": 8, "page_size": 4096, "offset": 0},
        "graphs": {"embedder": {"file": "missing.onnx"}},
    }
    regions = ple_regions(tmp_path, manifest)
    assert [(r.name, r.offset, r.row_bytes) for r in regions] == [("codes", 0, 100), ("scales", 4096, 8)]
    assert pages_per_token(regions[:1], 4096) == row_pages(100, 4096)


def test_unknown_device_lists_the_known_ones(bundle: Path) -> None:
    with pytest.raises(UserError) as e:
        run_profile(bundle, ProfileOptions(device="nokia-3310", **FAST))
    for name in ("android-4gb", "pixel-8a", "galaxy-s25-ultra", "iphone-15"):
        assert name in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_options_are_user_errors(bundle: Path) -> None:
    for bad in ({"runs": 0}, {"gen_tokens": 0}, {"warmup": -1}, {"budget_mb": -5.0}):
        with pytest.raises(UserError):
            run_profile(bundle, ProfileOptions(**{**FAST, **bad}))


def test_every_device_figure_has_a_source() -> None:
    raw = tomllib.loads(devices.DEVICES_FILE.read_text())
    assert {"android-4gb", "pixel-8a", "galaxy-s25-ultra", "iphone-15"} <= set(raw)
    for name, table in raw.items():
        for key in devices.FIGURES:
            fig = table[key]
            assert isinstance(fig["source"], str) and fig["source"].strip(), f"{name}.{key}"
            if fig.get("estimate"):
                assert fig.get("note", "").strip(), f"{name}.{key} is an estimate without a note"
    rows = devices.list_devices()
    assert {r["name"] for r in rows} == set(raw)
    assert devices.get_device("iphone-15").page_size == 16384
    assert devices.get_device("android-4gb").page_size == 4096


def test_a_figure_without_a_source_is_refused() -> None:
    raw = tomllib.loads(devices.DEVICES_FILE.read_text())
    del raw["pixel-8a"]["ram_mb"]["source"]
    with pytest.raises(UserError, match="needs a source"):
        devices.parse_devices(raw, Path("devices.toml"))


def _with(report: dict[str, Any], tok_s: float, dram: int) -> dict[str, Any]:
    doc = copy.deepcopy(report)
    doc["results"]["warm"]["decode_tok_s"]["median"] = tok_s
    doc["verdict"]["dram_resident_bytes"] = dram
    return doc


def test_baseline_comparison(report: dict[str, Any], tmp_path: Path) -> None:
    base = _with(report, 100.0, 100 << 20)
    assert compare_baseline(base, base) == []
    slower = compare_baseline(_with(report, 80.0, 100 << 20), base, 0.10)
    assert len(slower) == 1 and "decode tok/s" in slower[0]
    assert compare_baseline(_with(report, 95.0, 100 << 20), base, 0.10) == []
    bigger = compare_baseline(_with(report, 100.0, 120 << 20), base, 0.10)
    assert len(bigger) == 1 and "DRAM" in bigger[0]
    assert compare_baseline(_with(report, 100.0, 105 << 20), base, 0.10) == []
    path = tmp_path / "baseline.json"  # a saved --json report works as the baseline
    path.write_text(json.dumps(base))
    assert len(compare_baseline(_with(report, 80.0, 120 << 20), path, 0.10)) == 2
    path.write_text("{}")
    with pytest.raises(UserError, match="not a ple-export profile report"):
        compare_baseline(report, path)


def test_table_and_json(report: dict[str, Any]) -> None:
    console = Console(record=True, width=200)
    console.print(render_table(report))
    text = console.export_text()
    for word in ("TTFT", "decode", "anonymous", "ple_table.data", "verdict", "cold: major faults"):
        assert word in text
    json.dumps({k: v for k, v in report.items() if k != "_events"})  # JSON-ready


def test_plot(report: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "profile.png"
    plot(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runtime_stays_torch_free() -> None:
    code = "import sys, runtime_harness.profile, runtime_harness.budget; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
