"""A regression gate that compares on its first run: two bundles profiled on the same machine, in
turn (base, head, head, base, ...: who goes first alternates), each run in a fresh process, and
judged on the paired ratios. A baseline report saved on another machine is noise; this is not.

    ple-export profile HEAD --baseline-bundle BASE --rounds 5 --max-regression 10%
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ple_export.errors import UserError
from runtime_harness.profile.baseline import compare_baseline, load_headline
from runtime_harness.profile.options import MIB, ProfileOptions
from runtime_harness.profile.report import Headline, ProfileReport
from runtime_harness.profile.run import run_profile

Progress = Callable[[str, int, int], None]
MAX_ROUNDS = 50


@dataclass(frozen=True)
class Versus:
    """Paired rounds of a head bundle against a base bundle."""

    base: Path
    rounds: int
    tolerance: float
    head_runs: list[Headline]
    base_runs: list[Headline]
    decode_ratios: list[float]  # head / base, per round
    dram_ratios: list[float]
    regressions: list[str] = field(default_factory=list)

    @property
    def decode_ratio(self) -> float:
        return statistics.median(self.decode_ratios)

    @property
    def dram_ratio(self) -> float:
        return statistics.median(self.dram_ratios)


def judge_pairs(decode: list[float], dram: list[float], tolerance: float) -> list[str]:
    """Regressions in the medians of paired head/base ratios beyond `tolerance` (a fraction)."""
    out = []
    d, m = statistics.median(decode), statistics.median(dram)
    if d < 1 - tolerance:
        out.append(
            f"decode tok/s x{d:.3f} the base's (median of {len(decode)} paired rounds, "
            f"{min(decode):.3f}-{max(decode):.3f}; tolerance -{tolerance:.0%})"
        )
    if m > 1 + tolerance:
        out.append(
            f"DRAM-resident x{m:.3f} the base's (median of {len(dram)} paired rounds; "
            f"tolerance +{tolerance:.0%})"
        )
    return out


def versus(
    head: Path, base: Path, options: ProfileOptions, rounds: int, tolerance: float, progress: Progress
) -> tuple[ProfileReport, Versus]:
    """Profile `head` and `base` in turn, `rounds` times each (warm runs only), and judge the head on
    the medians of the paired ratios. Returns the head's last report and the comparison."""
    if not 1 <= rounds <= MAX_ROUNDS:
        raise UserError(f"--rounds must be from 1 to {MAX_ROUNDS}, got {rounds}")
    if Path(head).resolve() == Path(base).resolve():
        raise UserError(f"--baseline-bundle {base}: the same bundle as the one profiled")
    # the rounds compare the longest prompt only: a context sweep's shorter prompts are not gated
    plain = replace(options, cold=False, enforce=False, sweep=())
    heads: list[Headline] = []
    bases: list[Headline] = []
    report: ProfileReport | None = None
    for r in range(rounds):
        order = [("base", base), ("head", head)] if r % 2 == 0 else [("head", head), ("base", base)]
        for name, bundle in order:

            def tick(stage: str, n: int, total: int, name: str = name) -> None:
                progress(name, n, total * rounds)  # one bar per bundle over all its rounds

            rep = run_profile(bundle, plain, tick)
            (heads if name == "head" else bases).append(rep.headline())
            if name == "head":
                report = rep
        plain = replace(plain, verify=False)  # the files were hashed in the first round
    assert report is not None
    decode = [h.decode_tok_s / b.decode_tok_s for h, b in zip(heads, bases, strict=True)]
    dram = [h.dram_resident_bytes / b.dram_resident_bytes for h, b in zip(heads, bases, strict=True)]
    result = Versus(base, rounds, tolerance, heads, bases, decode, dram, judge_pairs(decode, dram, tolerance))
    report.regressions = list(result.regressions)
    return report, result


@dataclass(frozen=True)
class Gate:
    """The regression gate a profile runs under: none, a saved report, or a base bundle."""

    baseline: Path | None = None  # a saved `profile --json` report
    baseline_bundle: Path | None = None  # a bundle profiled in turn with the head
    rounds: int = 3
    tolerance: float = 0.10

    def __post_init__(self) -> None:
        if self.baseline is not None and self.baseline_bundle is not None:
            raise UserError("give --baseline (a saved report) or --baseline-bundle (a bundle), not both")


def profile_gated(bundle: Path, options: ProfileOptions, gate: Gate, progress: Progress) -> ProfileReport:
    """`run_profile`, judged against the gate's baseline when there is one (regressions in the report)."""
    if gate.baseline_bundle is not None:
        head, compared = versus(bundle, gate.baseline_bundle, options, gate.rounds, gate.tolerance, progress)
        head.versus = compared
        return head
    saved = load_headline(gate.baseline) if gate.baseline is not None else None  # checked before the runs
    report = run_profile(bundle, options, progress)
    if saved is not None:
        report.regressions = compare_baseline(report.headline(), saved, gate.tolerance)
    return report


def describe(v: Versus) -> str:
    head_dram = statistics.median(h.dram_resident_bytes for h in v.head_runs) / MIB
    base_dram = statistics.median(b.dram_resident_bytes for b in v.base_runs) / MIB
    return (
        f"against {v.base} over {v.rounds} paired round(s): decode x{v.decode_ratio:.3f} "
        f"({min(v.decode_ratios):.3f}-{max(v.decode_ratios):.3f}), DRAM-resident {head_dram:.1f} vs "
        f"{base_dram:.1f} MiB (x{v.dram_ratio:.3f})"
    )
