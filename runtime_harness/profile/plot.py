"""The report as one picture: where memory lives against the budget, decode latency per step, and,
for a context sweep, time to first token and peak memory against prompt length."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

from ple_export.bundle.format import Placement
from ple_export.errors import UserError, os_error
from runtime_harness.profile.report import ProfileReport

MIB = 1 << 20
FORMATS = (".png", ".svg", ".pdf")


def check_plot_path(path: Path) -> None:
    """Before any work: the plot can be drawn (matplotlib) and written there, in a format it knows."""
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"--plot {path}: name a {', '.join(FORMATS)} file (the suffix picks the format)")
    parent = path.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--plot {path}: {parent} is not a folder this user can write to")
    if path.is_dir():
        raise UserError(f"--plot {path}: is a folder")
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'ple-export[plot]'") from None
    return plt


def plot(report: ProfileReport, path: Path) -> None:
    """Memory breakdown (anonymous memory, file-backed memory per bundle file, the DRAM-resident total
    and the budget line) and per-step decode latency, as one picture."""
    plt = _pyplot()
    verdict = report.verdict
    after = report.memory["warm"].after_runs
    placement = {f.path: f.placement for f in report.files}
    bars = [
        ("anonymous\ninterpreter", verdict.interpreter_anonymous_bytes, "tab:gray"),
        ("anonymous\nmodel (peak)", verdict.anonymous_peak_bytes, "tab:red"),
    ]
    for name, entry in (after.files if after else {}).items():
        if entry.mapped_bytes:
            color = "tab:blue" if placement.get(name) == Placement.FLASH else "tab:orange"
            bars.append((f"file-backed\n{name}", entry.rss_bytes, color))
    labels, values, colors = zip(*[(lbl, v / MIB, c) for lbl, v, c in bars], strict=True)
    sweep = len(report.context) > 1
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(19 if sweep else 13, 5.5))
    ax_mem, ax_lat = axes[0], axes[1]
    ax_mem.bar(labels, values, color=colors)
    resident, budget = verdict.dram_resident_bytes / MIB, verdict.budget_bytes / MIB
    ax_mem.axhline(resident, color="black", linestyle=":", label=f"DRAM-resident {resident:.1f} MiB")
    ax_mem.axhline(
        budget, color="green", linestyle="--", label=f"budget {budget:.0f} MiB ({verdict.budget_source})"
    )
    if budget > 20 * max(*values, resident):  # keep the budget line and the small bars both visible
        ax_mem.set_yscale("log")
    ax_mem.set_ylabel("MiB")
    ax_mem.set_title(f"memory after the warm run, vs {verdict.device}", loc="left")
    ax_mem.tick_params(axis="x", labelsize=8)
    ax_mem.legend(fontsize=8, loc="upper left")
    for mode, res in report.results.items():
        if res.step_ms_by_index:
            curve = res.step_ms_by_index
            ax_lat.plot(range(1, len(curve) + 1), curve, marker=".", label=mode)
    ax_lat.set_xlabel("decode step")
    ax_lat.set_ylabel("ms (median over timed runs)")
    ax_lat.set_ylim(bottom=0)
    ax_lat.set_title("decode step latency (this host)")
    ax_lat.legend(fontsize=8)
    if sweep:
        _context(axes[2], report)
    fig.suptitle("\n".join(textwrap.wrap(f"{report.model.model_type}: {verdict.summary}", 150)), fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise os_error(e, path) from None
    finally:
        plt.close(fig)


def _context(ax: Any, report: ProfileReport) -> None:
    """Cost against context: TTFT (left axis) and peak RSS with the KV cache's share (right axis)."""
    points = report.context
    n = [p.prompt_tokens for p in points]
    ax.plot(n, [(p.ttft_ms or 0) / 1e3 for p in points], marker="o", color="tab:purple", label="TTFT (s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"prompt tokens (prefill chunk: {report.prefill_chunk or 'one call'})")
    ax.set_ylabel("time to first token, s")
    ax.set_ylim(bottom=0)
    mem = ax.twinx()
    mem.plot(n, [p.rss_peak_bytes / MIB for p in points], marker="s", color="tab:red", label="peak RSS")
    base = points[0].rss_peak_bytes - points[0].kv_cache_bytes
    kv = [(base + p.kv_cache_bytes) / MIB for p in points]
    mem.plot(n, kv, linestyle=":", color="tab:red", label="first point + KV growth")
    mem.set_ylabel("MiB")
    mem.set_ylim(bottom=0)
    ax.set_title("cost against context (warm)", loc="left")
    lines = ax.get_legend_handles_labels()
    more = mem.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
