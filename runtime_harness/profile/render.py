"""The report for people: one table, a section per topic (as llama-bench keeps its printers apart
from the measuring)."""

from __future__ import annotations

from rich.table import Table

from runtime_harness.profile.analysis import fmt_delta
from runtime_harness.profile.report import ProfileReport

MIB = 1 << 20


def size(n: float | None) -> str:
    """Bytes for people: B, KiB, MiB or GiB."""
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def num(x: float | None, fmt: str = ".1f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{fmt}}{unit}"


def _timings(table: Table, report: ProfileReport) -> None:
    for mode, res in report.results.items():
        table.add_section()
        table.add_row(f"{mode}: load", num(res.load_s, ".3f", " s"), "fresh process")
        table.add_row(
            f"{mode}: TTFT",
            num(res.ttft_ms.median, ".2f", " ms"),
            f"p90 {num(res.ttft_ms.p90, '.2f', ' ms')}; prefill of {report.options.prompt_tokens} tokens "
            f"({_chunking(report.prefill_chunk)}) + first token",
        )
        table.add_row(
            f"{mode}: prefill",
            num(res.prefill_tok_s.median, ".1f", " tok/s"),
            f"p90 {num(res.prefill_tok_s.p90, '.1f', ' tok/s')}",
        )
        table.add_row(
            f"{mode}: decode",
            num(res.decode_tok_s.median, ".1f", " tok/s"),
            f"p90 {num(res.decode_tok_s.p90, '.1f', ' tok/s')}; "
            f"step {num(res.decode_step_ms.median, '.3f', ' ms')}, "
            f"lookup {num(res.lookup_step_ms.median, '.3f', ' ms')}",
        )


def _chunking(chunk: int) -> str:
    return "one call" if chunk == 0 else f"chunks of {chunk}"


def _context(table: Table, report: ProfileReport) -> None:
    """The context sweep, one row per prompt length: what a longer prompt costs."""
    if len(report.context) < 2:
        return
    table.add_section()
    first = report.context[0]
    for p in report.context:
        growth = p.rss_peak_bytes - first.rss_peak_bytes
        kv = p.kv_cache_bytes - first.kv_cache_bytes
        table.add_row(
            f"context {p.prompt_tokens}",
            num(p.ttft_ms and p.ttft_ms / 1e3, ".2f", " s TTFT"),
            f"prefill {num(p.prefill_tok_s, '.0f')} tok/s, decode {num(p.decode_tok_s, '.1f')} tok/s; "
            f"peak RSS {size(p.rss_peak_bytes)}"
            + (f" (+{size(growth)} over {first.prompt_tokens}; KV +{size(kv)})" if p is not first else ""),
        )


def _memory(table: Table, report: ProfileReport) -> None:
    warm = report.memory["warm"]
    after = warm.after_runs
    verdict = report.verdict
    table.add_section()
    table.add_row(
        "anonymous", size(after.anonymous_bytes if after else None), "heap, KV cache, prepacked weights"
    )
    table.add_row(
        "anonymous peak",
        size(verdict.anonymous_peak_bytes),
        f"above the interpreter's own {size(verdict.interpreter_anonymous_bytes)}",
    )
    for name, entry in (after.files if after else {}).items():
        if entry.mapped_bytes:
            table.add_row(
                f"file-backed {name}", size(entry.rss_bytes), f"of {size(entry.mapped_bytes)} mapped"
            )
    res = report.ple.residency_after_run
    table.add_row(
        "PLE residency", f"{res.fraction:.1%}", f"{size(res.mapped_rss_bytes)} of {size(res.file_bytes)}"
    )


def _ple(table: Table, report: ProfileReport) -> None:
    logical, measured = report.ple.logical, report.ple.measured
    table.add_section()
    table.add_row(
        "PLE per token (logical)",
        f"{logical.pages_per_token.mean:g} pages",
        f"{logical.bytes_per_token} B of rows; pages of {logical.page_size} B on the device",
    )
    table.add_row(
        "PLE this run (logical)",
        f"{logical.all.pages} pages",
        f"{logical.all.distinct_rows} distinct rows of {logical.all.tokens} tokens",
    )
    table.add_row(
        "PLE per row (host, warm)",
        size(measured.warm.mapped_bytes_per_distinct_row),
        "mapped Rss / distinct rows: host fault-around and folios",
    )
    if measured.cold is not None:
        c = measured.cold
        table.add_row(
            "PLE per token (host, cold)",
            f"{num(c.host_pages_per_decode_token, '.2f')} pages",
            f"of {measured.host_page_size} B, readahead off; {num(c.major_faults_per_decode_token, '.2f')} "
            "major faults",
        )


def _cold_and_enforced(table: Table, report: ProfileReport) -> None:
    cold = report.cold
    if cold is not None:
        table.add_section()
        ev = cold.eviction
        table.add_row(
            "cold: eviction",
            ev.method or "n/a",
            f"page-cache pages {num(ev.page_cache_pages_before_evict, '.1f')} -> "
            f"{num(ev.page_cache_pages_after_evict, '.1f')}",
        )
        table.add_row(
            "cold: major faults",
            str(cold.major_faults_decode),
            f"in decode steps ({num(cold.major_faults_per_decode_token, '.2f')} per token); "
            f"{cold.major_faults_prefill} in prefills",
        )
        table.add_row(
            "cold: added latency",
            fmt_delta(cold.added_decode_step_ms),
            f"per decode step vs warm; TTFT {fmt_delta(cold.added_ttft_ms)}",
        )
    enforce = report.enforce
    if enforce is not None:
        table.add_section()
        table.add_row("enforced budget", enforce.outcome, enforce.detail)
        if enforce.cgroup is not None:
            cg = enforce.cgroup
            table.add_row(
                "cgroup",
                size(cg.peak_bytes),
                f"peak of {size(enforce.limit_bytes)} (v{cg.version}); limit hit {cg.limit_hits}x, "
                f"{cg.major_faults} major faults, {cg.oom_kills} OOM kills",
            )


def _verdict(table: Table, report: ProfileReport) -> None:
    verdict, flash = report.verdict, report.verdict.flash
    table.add_section()
    table.add_row(
        "verdict",
        "fits" if verdict.fits else f"does NOT fit ({verdict.outcome})",
        f"{size(verdict.dram_resident_bytes)} DRAM-resident (anonymous peak + DRAM files mapped) vs "
        f"{size(verdict.budget_bytes)} ({verdict.budget_source})",
    )
    for reason in verdict.reasons:
        table.add_row("", "", reason)
    table.add_row(
        "flash, decode",
        f"{flash.decode_us_per_token / 1e3:.3f} ms/token",
        f"{flash.decode_pages_per_token:g} pages x {flash.page_read_us:g} us"
        + (f"; {flash.decode_fraction_of_step:.1%} of a step here" if flash.decode_fraction_of_step else ""),
    )
    table.add_row(
        "flash, prefill",
        f"{flash.prefill_ms:.2f} ms",
        f"{flash.prefill_pages} pages for {flash.prefill_distinct_tokens} distinct tokens"
        + (f"; {flash.prefill_fraction_of_ttft:.1%} of TTFT here" if flash.prefill_fraction_of_ttft else ""),
    )
    if verdict.decode_bound_tok_s:
        table.add_row(
            "DRAM bound, decode",
            f"{verdict.decode_bound_tok_s:.0f} tok/s",
            f"{report.device['dram_bandwidth_gb_s']:g} GB/s over the decoder weights",
        )


def render_table(report: ProfileReport) -> Table:
    env = report.environment
    table = Table(title=f"profile of {report.model.model_filename}", show_lines=False)
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row("model", report.model.model_type, f"{size(report.model.model_size)} on disk")
    table.add_row(
        "host",
        f"{env.n_threads} threads",
        f"{env.cpu_info}, {env.n_cpus_usable} CPUs, onnxruntime {env.onnxruntime_version}",
    )
    table.add_row("runtime", "phone-like", "no spinning; lookup on 1 thread; decoder on the threads")
    _timings(table, report)
    _context(table, report)
    _memory(table, report)
    _ple(table, report)
    _cold_and_enforced(table, report)
    _verdict(table, report)
    for note in report.notes:
        table.add_row("note", "", note)
    return table
