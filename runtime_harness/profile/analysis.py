"""From what the workers measured to the report's sections: timings per mode, llama-bench rows, the
PLE table's traffic, the cold and enforced runs against the warm one, and the one verdict."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from ple_export.bundle.format import FileRole, Placement
from ple_export.bundle.manifest import Manifest
from ple_export.bundle.ple_layout import distinct_pages, lookup_rows, manifest_regions, pages_per_token
from runtime_harness.loop import decode_rate
from runtime_harness.measure import memory
from runtime_harness.measure.budget import CgroupStats
from runtime_harness.measure.devices import Device
from runtime_harness.measure.stats import Spread, mean_or_none
from runtime_harness.profile.options import MIB
from runtime_harness.profile.report import (
    ColdReport,
    ContextPoint,
    EnforceReport,
    Eviction,
    FlashCost,
    ModelDesc,
    ModeMemory,
    ModeSummary,
    Outcome,
    PleCold,
    PleLogical,
    PleMeasured,
    PleReport,
    PleWarm,
    Residency,
    Traffic,
    Verdict,
)
from runtime_harness.profile.worker import WorkerResult

# The least the measured process needs besides the model: Python with numpy and onnxruntime imported
# holds ~27 MiB anonymous here (~36 MiB with onnx too, as the child has).
RUNTIME_FLOOR_BYTES = 32 * MIB
BUDGET_FLAG = "--budget-mb"  # a budget's source when the user gave it


def budget_of(device: Device, budget_mb: float | None) -> tuple[int, str]:
    """The budget in bytes and where it came from: --budget-mb, or the device's app budget."""
    if budget_mb is not None:
        return int(budget_mb * MIB), BUDGET_FLAG
    return device.app_budget_bytes, f"{device.name} app_budget_mb"


def summarize(result: WorkerResult, n_prompt: int, n_gen: int) -> ModeSummary:
    """Latency and throughput of one mode over its timed runs."""
    runs = result.timed
    ttft = [r.prefill.s for r in runs]
    steps = [s for r in runs for s in r.steps]
    return ModeSummary(
        load_s=result.load_s,
        ttft_ms=Spread.of([t * 1e3 for t in ttft], "high"),
        prefill_tok_s=Spread.of([n_prompt / r.prefill_s for r in runs], "low"),
        decode_tok_s=Spread.of([decode_rate([s.s for s in r.steps]) for r in runs], "low"),
        decode_step_ms=Spread.of([s.s * 1e3 for s in steps], "high"),
        lookup_step_ms=Spread.of([s.lookup_s * 1e3 for s in steps], "high"),
        prefill_lookup_ms=Spread.of([r.prefill.lookup_s * 1e3 for r in runs], "high"),
        major_faults_timed=sum(r.prefill.major_faults + sum(s.major_faults for s in r.steps) for r in runs),
        runs_timed=len(runs),
        runs_completed=len(result.runs),
        step_ms_by_index=[float(np.median([r.steps[i].s * 1e3 for r in runs])) for i in range(n_gen)]
        if runs
        else [],
    )


def context_point(result: WorkerResult, n_prompt: int, n_gen: int, manifest: Manifest) -> ContextPoint:
    """A warm run at one prompt length, as a point of the context sweep."""
    s = summarize(result, n_prompt, n_gen)
    return ContextPoint(
        prompt_tokens=n_prompt,
        ttft_ms=s.ttft_ms.median,
        prefill_tok_s=s.prefill_tok_s.median,
        decode_tok_s=s.decode_tok_s.median,
        rss_peak_bytes=result.rss_peak_bytes,
        anonymous_peak_bytes=max(result.anonymous_peak_bytes - result.baseline_anonymous_bytes, 0),
        kv_cache_bytes=manifest.kv_cache.bytes_after(n_prompt + n_gen),
    )


def mode_memory(result: WorkerResult) -> ModeMemory:
    return ModeMemory(
        after_load=result.memory_after_load,
        after_runs=result.memory_after_runs,
        anonymous_peak_bytes=result.anonymous_peak_bytes,
        interpreter_anonymous_bytes=result.baseline_anonymous_bytes,
        rss_peak_bytes=result.rss_peak_bytes,
    )


def model_desc(bundle: Path, manifest: Manifest) -> ModelDesc:
    weights = manifest.recipe.weights
    params = manifest.model.num_parameters
    return ModelDesc(
        model_filename=str(bundle),
        model_type=f"{manifest.model.family} {params / 1e6:.3g}M, decoder "
        f"{'fp32' if weights == 'none' else weights}, PLE {manifest.ple.dtype}",
        model_size=sum(f.bytes for f in manifest.files),
        model_n_params=params,
    )


def llama_bench_samples(
    mode: str, result: WorkerResult, model: ModelDesc, n_prompt: int, n_gen: int, threads: int
) -> list[dict[str, object]]:
    """llama-bench's JSON rows: one `pp` (prompt processing: the prefill, first token included) and one
    `tg` (text generation: `n_gen` decode steps) per mode, with per-run samples."""
    runs = result.timed
    rows: list[dict[str, object]] = []
    for test, n_p, n_g, secs in (
        ("pp", n_prompt, 0, [r.prefill_s for r in runs]),
        ("tg", 0, n_gen, [sum(s.s for s in r.steps) for r in runs]),
    ):
        if not secs:
            continue
        ns = [int(s * 1e9) for s in secs]
        ts = [(n_p + n_g) / s for s in secs]
        rows.append(
            {
                "mode": mode,
                "test": f"{test}{n_p + n_g}",
                "model_filename": model.model_filename,
                "model_type": model.model_type,
                "model_size": model.model_size,
                "model_n_params": model.model_n_params,
                "n_threads": threads,
                "n_prompt": n_p,
                "n_gen": n_g,
                "avg_ns": int(statistics.fmean(ns)),
                "stddev_ns": int(statistics.stdev(ns)) if len(ns) > 1 else 0,
                "avg_ts": statistics.fmean(ts),
                "stddev_ts": statistics.stdev(ts) if len(ts) > 1 else 0.0,
                "median_ts": float(np.median(ts)),
                "p90_ts": float(np.percentile(ts, 10)),
                "samples_ns": ns,
                "samples_ts": ts,
            }
        )
    return rows


def ple_report(
    bundle: Path,
    manifest: Manifest,
    device: Device,
    prompt: list[int],
    generated: list[int],
    warm: WorkerResult,
    cold: WorkerResult | None,
) -> PleReport:
    """What the table costs: logically (at the device's page size, the manifest's one page model)
    and as this host measured it."""
    ple = manifest.ple
    regions = manifest_regions(manifest)
    page, host = device.page_size, memory.PAGE
    per_token = pages_per_token(regions, page)

    def traffic(ids: list[int]) -> Traffic:
        rows = lookup_rows(ids, ple.rows)
        n_pages = distinct_pages(regions, rows, page)
        return Traffic(len(ids), len(rows), len(rows) * ple.bytes_per_token, n_pages, n_pages * page)

    distinct_all = lookup_rows(prompt + generated, ple.rows)
    after = warm.ple_mapped_rss_after_runs
    file_bytes = (bundle / ple.file).stat().st_size
    return PleReport(
        file=ple.file,
        rows=ple.rows,
        row_bytes=ple.row_bytes,
        scales_row_bytes=ple.scales_row_bytes,
        logical=PleLogical(
            page_size=page,
            regions=regions,
            bytes_per_token=ple.bytes_per_token,
            pages_per_token=per_token,
            flash_bytes_per_token=per_token.mean * page,
            manifest_page_size=ple.page_size,
            manifest_pages_per_token=ple.pages_per_token,
            prompt=traffic(prompt),
            generated=traffic(generated),
            all=traffic(prompt + generated),
        ),
        measured=PleMeasured(
            host_page_size=host,
            warm=PleWarm(
                mapped_rss_after_load_bytes=warm.ple_mapped_rss_after_load,
                mapped_rss_after_runs_bytes=after,
                page_cache_pages_before_load=warm.page_cache_pages_before_load,
                page_cache_pages_after_runs=warm.page_cache_pages_after_runs,
                mapped_bytes_per_distinct_row=after / max(len(distinct_all), 1),
            ),
            cold=_ple_cold(cold, len(lookup_rows(prompt, ple.rows)), host) if cold is not None else None,
        ),
        residency_after_run=Residency(file_bytes, after, after / file_bytes if file_bytes else 0.0),
    )


def _ple_cold(cold: WorkerResult, distinct_prompt: int, host: int) -> PleCold:
    runs = cold.timed
    steps = [s for r in runs for s in r.steps]
    prefills = [r.prefill for r in runs]
    return PleCold(
        readahead="off: MADV_RANDOM on onnxruntime's mappings of the table "
        f"({cold.madv_random_mappings} mappings)",
        host_pages_per_decode_token=mean_or_none([float(s.ple_pages_after or 0) for s in steps]),
        read_bytes_per_decode_token=mean_or_none(
            [float(s.read_bytes) for s in steps if s.read_bytes is not None]
        ),
        major_faults_per_decode_token=mean_or_none([float(s.major_faults) for s in steps]),
        host_pages_per_distinct_prompt_token=mean_or_none(
            [(p.ple_pages_after or 0) / max(distinct_prompt, 1) for p in prefills]
        ),
        major_faults_per_prefill=mean_or_none([float(p.major_faults) for p in prefills]),
        note=f"host pages of {host} B in the page cache after each step (the table was evicted before it), "
        "bytes the process read from storage, and its major faults",
    )


def _delta(warm: Spread, other: Spread) -> float | None:
    return None if warm.median is None or other.median is None else other.median - warm.median


def cold_report(cold: WorkerResult, warm_summary: ModeSummary, cold_summary: ModeSummary) -> ColdReport:
    runs = cold.timed
    events = [r.prefill.evicted for r in runs] + [s.evicted for r in runs for s in r.steps]
    before = [float(e["before_pages"]) for e in events if e]
    after_evict = [float(e["after_pages"]) for e in events if e]
    steps = [s for r in runs for s in r.steps]
    faults = sum(s.major_faults for s in steps)
    added_step = _delta(warm_summary.decode_step_ms, cold_summary.decode_step_ms)
    return ColdReport(
        eviction=Eviction(
            method=str(events[0]["method"]) if events and events[0] else None,
            page_cache_pages_before_evict=mean_or_none(before),
            page_cache_pages_after_evict=mean_or_none(after_evict),
            evictions=len(before),
        ),
        major_faults_decode=faults,
        major_faults_prefill=sum(r.prefill.major_faults for r in runs),
        major_faults_per_decode_token=faults / len(steps) if steps else None,
        added_decode_step_ms=added_step,
        added_lookup_step_ms=_delta(warm_summary.lookup_step_ms, cold_summary.lookup_step_ms),
        added_ttft_ms=_delta(warm_summary.ttft_ms, cold_summary.ttft_ms),
        added_ms_per_major_fault=added_step / (faults / len(steps)) if added_step and faults else None,
    )


def fmt_delta(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:+.3f} ms"


def _enforced_outcome(faults: int, reached: bool, added_step: float | None) -> tuple[str, str]:
    """`slowed` only when the group reached its limit and the timed runs read pages again; faults in
    a group that never reached it are first reads after the page-cache drop (e.g. `--warmup 0`)."""
    if faults > 0 and reached:
        return "slowed", (
            f"slowed: {faults} major fault(s) in the timed runs (pages reclaimed under the limit were read "
            f"again); decode step {fmt_delta(added_step)} vs the unconstrained run"
        )
    if faults > 0:
        return "fit", (
            f"fit: the group never reached its limit ({faults} major fault(s) in the timed runs were first "
            "reads of the files after the page cache was dropped: no warm-up run read them before)"
        )
    if reached:
        return "fit", (
            "fit: the group reached its limit, but no page the timed runs needed was reclaimed "
            "(no major faults in them)"
        )
    return "fit", "fit: the group never reached its limit"


def enforce_report(
    status: int,
    result: WorkerResult | None,
    stats: CgroupStats,
    warm_summary: ModeSummary,
    limit: int,
    n_prompt: int,
    n_gen: int,
) -> EnforceReport:
    """The enforced run: `fit` (no page the timed runs needed was reclaimed), `slowed` (the group
    reached its limit and the timed runs read pages again) or `killed` (OOM: what cannot be reclaimed
    exceeded the limit). The page cache is dropped before the run, so with `--warmup 0` the first
    timed run reads the files from disk: major faults in a group that never reached its limit are
    those first reads, not reclaim."""
    peak = stats.peak_bytes
    # failcnt stays 0 on some kernels even when reclaim ran: a peak at the limit says it too
    reached = bool(stats.limit_hits) or (peak is not None and peak >= limit - (256 << 10))
    if status == -9:
        phase = result.phase if result else "start"
        runs = len(result.runs) if result else 0
        return EnforceReport(
            outcome="killed",
            detail=f"killed by SIGKILL ({stats.oom_kills} OOM kill(s) in the group) during {phase}, "
            f"after {runs} run(s): what cannot be reclaimed (anonymous memory; there is no swap) "
            "exceeded the limit",
            limit_bytes=limit,
            exit_status=status,
            cgroup=stats,
            limit_reached=reached,
        )
    assert result is not None
    summary = summarize(result, n_prompt, n_gen)
    faults = summary.major_faults_timed
    added_step = _delta(warm_summary.decode_step_ms, summary.decode_step_ms)
    outcome, detail = _enforced_outcome(faults, reached, added_step)
    return EnforceReport(
        outcome=outcome,
        detail=detail,
        limit_bytes=limit,
        exit_status=status,
        cgroup=stats,
        limit_reached=reached,
        added_decode_step_ms=added_step,
        added_ttft_ms=_delta(warm_summary.ttft_ms, summary.ttft_ms),
        major_faults_timed=faults,
    )


def floor_bytes(manifest: Manifest, positions: int) -> int:
    """The least any run of the bundle needs in DRAM: its DRAM files (mapped, or prepacked copies of
    them), the KV cache after `positions` tokens, and the runtime itself."""
    return manifest.dram_bytes + manifest.kv_cache.bytes_after(positions) + RUNTIME_FLOOR_BYTES


def _residency(manifest: Manifest, warm: WorkerResult) -> tuple[int, int]:
    """(the model's anonymous peak above the interpreter's own, the DRAM files still mapped after the
    runs: each file's pages counted once)."""
    anon_model = max(warm.anonymous_peak_bytes - warm.baseline_anonymous_bytes, 0)
    after = warm.memory_after_runs.files if warm.memory_after_runs else {}
    mapped = sum(after[f.path].mapped_bytes for f in manifest.files_with(Placement.DRAM) if f.path in after)
    return anon_model, mapped


def _reasons(
    budget: int, manifest: Manifest, positions: int, resident: int, floor: int, killed: bool
) -> list[str]:
    """Why a bundle does not fit, each in a line (none: it fits)."""
    reasons = []
    if killed:
        reasons.append(f"the run inside a {budget / MIB:.0f} MiB cgroup was killed")
    if floor > budget:
        reasons.append(
            f"by arithmetic: decoder DRAM {manifest.dram_bytes / MIB:.1f} MiB + KV cache "
            f"{manifest.kv_cache.bytes_after(positions) / MIB:.1f} MiB + {RUNTIME_FLOOR_BYTES // MIB} MiB "
            f"for the runtime = {floor / MIB:.1f} MiB > {budget / MIB:.1f} MiB"
        )
    if resident > budget:
        reasons.append(f"measured: {resident / MIB:.1f} MiB DRAM-resident > {budget / MIB:.1f} MiB")
    return reasons


def _summary(
    fits: bool,
    budget_name: str,
    headroom: int,
    resident: int,
    reasons: list[str],
    flash: FlashCost,
    prompt_tokens: int,
) -> str:
    return (
        f"{'fits' if fits else 'does NOT fit'} {budget_name} "
        f"({resident / MIB:.1f} MiB DRAM-resident, {headroom / MIB:+.1f} MiB to spare"
        + (f"; {reasons[0]}" if reasons else "")
        + f"); flash adds {flash.decode_us_per_token / 1e3:.3f} ms per decoded token"
        + (f" ({flash.decode_fraction_of_step:.1%} of a step here)" if flash.decode_fraction_of_step else "")
        + f" and {flash.prefill_ms:.2f} ms to a {prompt_tokens}-token prefill"
    )


def verdict(
    device: Device,
    budget: int,
    budget_source: str,
    manifest: Manifest,
    positions: int,
    warm: WorkerResult,
    warm_summary: ModeSummary,
    ple: PleReport,
    enforced: EnforceReport | None,
) -> Verdict:
    """The one verdict. DRAM-resident = the model's anonymous peak (heap, KV cache, weights onnxruntime
    prepacked) + what it still maps of the DRAM files after the runs (the weights it reads in place).
    It fits when that and the arithmetic floor are within the budget and no enforced run was killed."""
    anon_model, mapped = _residency(manifest, warm)
    resident, floor = anon_model + mapped, floor_bytes(manifest, positions)
    killed = enforced is not None and enforced.outcome == "killed"
    reasons = _reasons(budget, manifest, positions, resident, floor, killed)
    outcome = Outcome.KILLED if killed else Outcome.EXCEEDS if reasons else Outcome.FITS
    flash = _flash(device, ple, warm_summary)
    weights = sum(f.bytes for f in manifest.files_with(role=FileRole.DECODER_WEIGHTS))
    budget_name = (
        f"the {budget / MIB:.0f} MiB budget of --budget-mb"
        if budget_source == BUDGET_FLAG
        else f"{device.name}'s {budget / MIB:.0f} MiB app budget"
    )
    return Verdict(
        outcome=outcome,
        device=device.name,
        budget_bytes=budget,
        budget_source=budget_source,
        dram_resident_bytes=resident,
        anonymous_peak_bytes=anon_model,
        process_anonymous_peak_bytes=warm.anonymous_peak_bytes,
        interpreter_anonymous_bytes=warm.baseline_anonymous_bytes,
        dram_mapped_bytes=mapped,
        decoder_dram_bytes=manifest.dram_bytes,
        floor_bytes=floor,
        headroom_bytes=budget - resident,
        reasons=reasons,
        flash=flash,
        decode_bound_tok_s=device["dram_bandwidth_gb_s"] * 1e9 / weights if weights else None,
        summary=_summary(
            outcome == Outcome.FITS,
            budget_name,
            budget - resident,
            resident,
            reasons,
            flash,
            ple.logical.prompt.tokens,
        ),
        note=VERDICT_NOTE,
    )


VERDICT_NOTE = (
    "DRAM-resident = the anonymous peak above the interpreter's own (heap, KV cache, weights onnxruntime "
    "prepacked) + the DRAM files onnxruntime still maps after the runs (weights read in place), each "
    "file's pages counted once. floor = DRAM files + KV cache + the runtime: no run needs less. "
    "decode_bound_tok_s: the device's DRAM bandwidth over the decoder weight bytes"
)


def _flash(device: Device, ple: PleReport, warm: ModeSummary) -> FlashCost:
    page_us = device.page_read_us()
    per_token = ple.logical.pages_per_token.mean
    decode_us = per_token * page_us
    prompt_pages = ple.logical.prompt.pages
    prefill_ms = prompt_pages * page_us / 1e3
    step_ms, ttft_ms = warm.decode_step_ms.median, warm.ttft_ms.median
    return FlashCost(
        page_read_us=page_us,
        decode_pages_per_token=per_token,
        decode_us_per_token=decode_us,
        decode_fraction_of_step=decode_us / 1e3 / step_ms if step_ms else None,
        prefill_pages=prompt_pages,
        prefill_distinct_tokens=ple.logical.prompt.distinct_rows,
        prefill_ms=prefill_ms,
        prefill_fraction_of_ttft=prefill_ms / ttft_ms if ttft_ms else None,
    )
