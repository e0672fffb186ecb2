"""A profile as typed values: what each mode measured, where memory lived, what the PLE table cost,
and the one verdict. `ProfileReport.to_json()` is the `--json` document (docs/profiling.md); the
renderers (`render.py`, `plot.py`) and the regression gate (`baseline.py`) read the values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from ple_export.bundle.manifest import FileEntry, PageCounts
from ple_export.bundle.ple_layout import Region
from runtime_harness.measure.budget import CgroupStats
from runtime_harness.measure.devices import Device
from runtime_harness.measure.memory import MemorySplit
from runtime_harness.measure.stats import Spread
from runtime_harness.profile.options import ProfileOptions

SCHEMA = "ple-export-profile/2"


@dataclass(frozen=True)
class ModeSummary:
    """Latency and throughput of one mode over its timed runs."""

    load_s: float | None
    ttft_ms: Spread  # prefill + first token
    prefill_tok_s: Spread
    decode_tok_s: Spread  # decode steps / their summed time, per run
    decode_step_ms: Spread
    lookup_step_ms: Spread  # the PLE lookup alone: where flash faults land
    prefill_lookup_ms: Spread
    major_faults_timed: int
    runs_timed: int
    runs_completed: int
    step_ms_by_index: list[float]  # per decode step, median over timed runs: the plot's curve


@dataclass(frozen=True)
class ContextPoint:
    """One prompt length of the context sweep, warm: what a longer prompt costs (llama-bench's -p)."""

    prompt_tokens: int
    ttft_ms: float | None  # medians over the timed runs
    prefill_tok_s: float | None
    decode_tok_s: float | None
    rss_peak_bytes: int  # the process's VmHWM
    anonymous_peak_bytes: int  # above the interpreter's own
    kv_cache_bytes: int  # the manifest's KV cache after prompt + gen tokens


@dataclass(frozen=True)
class ModeMemory:
    after_load: MemorySplit | None
    after_runs: MemorySplit | None
    anonymous_peak_bytes: int
    interpreter_anonymous_bytes: int
    rss_peak_bytes: int


@dataclass(frozen=True)
class Traffic:
    """What reading some tokens' PLE rows costs a phone: distinct rows, their bytes and pages."""

    tokens: int
    distinct_rows: int
    bytes: int
    pages: int
    page_bytes: int


@dataclass(frozen=True)
class PleLogical:
    """What a phone reads: each distinct row's codes + scales rows, at the device's page size."""

    page_size: int
    regions: list[Region]
    bytes_per_token: int
    pages_per_token: PageCounts
    flash_bytes_per_token: float
    manifest_page_size: int
    manifest_pages_per_token: PageCounts
    prompt: Traffic
    generated: Traffic
    all: Traffic
    note: str = "what a phone reads: each distinct row's codes + scales rows, at the device's page size"


@dataclass(frozen=True)
class PleWarm:
    mapped_rss_after_load_bytes: int
    mapped_rss_after_runs_bytes: int
    page_cache_pages_before_load: int
    page_cache_pages_after_runs: int
    mapped_bytes_per_distinct_row: float
    note: str = (
        "Rss of onnxruntime's mapping of the table after the runs, over the distinct rows read: "
        "fault-around and large folios map more than the rows"
    )


@dataclass(frozen=True)
class PleCold:
    readahead: str
    host_pages_per_decode_token: float | None
    read_bytes_per_decode_token: float | None
    major_faults_per_decode_token: float | None
    host_pages_per_distinct_prompt_token: float | None
    major_faults_per_prefill: float | None
    note: str


@dataclass(frozen=True)
class PleMeasured:
    """What this host did (its kernel maps large folios and reads ahead: not a phone's figures)."""

    host_page_size: int
    warm: PleWarm
    cold: PleCold | None = None


@dataclass(frozen=True)
class Residency:
    file_bytes: int
    mapped_rss_bytes: int
    fraction: float


@dataclass(frozen=True)
class PleReport:
    file: str
    rows: int
    row_bytes: int
    scales_row_bytes: int
    logical: PleLogical
    measured: PleMeasured
    residency_after_run: Residency


@dataclass(frozen=True)
class Eviction:
    method: str | None
    page_cache_pages_before_evict: float | None
    page_cache_pages_after_evict: float | None
    evictions: int


@dataclass(frozen=True)
class ColdReport:
    """The cold run against the warm one: medians of cold minus warm."""

    eviction: Eviction
    major_faults_decode: int
    major_faults_prefill: int
    major_faults_per_decode_token: float | None
    added_decode_step_ms: float | None
    added_lookup_step_ms: float | None
    added_ttft_ms: float | None
    added_ms_per_major_fault: float | None
    note: str = "medians of the cold run minus the warm run; the lookup is where the faults land"


@dataclass(frozen=True)
class EnforceReport:
    """The run inside a memory cgroup limited to the budget."""

    outcome: str  # fit | slowed | killed | skipped
    detail: str
    limit_bytes: int
    exit_status: int | None = None
    cgroup: CgroupStats | None = None
    limit_reached: bool = False
    added_decode_step_ms: float | None = None
    added_ttft_ms: float | None = None
    major_faults_timed: int = 0
    cgroup_path: str | None = None
    cgroup_removed: bool | None = None


@dataclass(frozen=True)
class Environment:
    """llama-bench's environment block, and what of this host shapes the figures."""

    build_commit: str
    ple_export_version: str
    cpu_info: str
    n_cpus: int | None
    n_cpus_usable: int
    n_threads: int
    backends: str
    onnxruntime_version: str
    numpy_version: str
    python_version: str
    kernel: str
    host_page_size: int
    transparent_hugepage: str | None
    bundle_filesystem: str
    bundle_read_ahead_kb: int | None
    load_avg_1m: float
    load_avg_1m_after: float
    test_time: str


@dataclass(frozen=True)
class ModelDesc:
    model_filename: str
    model_type: str
    model_size: int
    model_n_params: int


@dataclass(frozen=True)
class FlashCost:
    """Logical pages x the device's random-read latency for one page; fractions are of this host's
    measured step time or TTFT (the phone's compute time differs)."""

    page_read_us: float
    decode_pages_per_token: float
    decode_us_per_token: float
    decode_fraction_of_step: float | None
    prefill_pages: int
    prefill_distinct_tokens: int
    prefill_ms: float
    prefill_fraction_of_ttft: float | None


class Outcome(StrEnum):
    FITS = "fits"
    EXCEEDS = "exceeds"  # by arithmetic or by measured residency
    KILLED = "killed"  # the enforced run was OOM-killed


@dataclass(frozen=True)
class Verdict:
    """The one judgement of a report, and the exit code that follows it (0 fits, 4 otherwise)."""

    outcome: Outcome
    device: str
    budget_bytes: int
    budget_source: str  # the device's app budget, or --budget-mb
    dram_resident_bytes: int  # anonymous peak above the interpreter + the DRAM files still mapped
    anonymous_peak_bytes: int  # the model's: the process' peak minus the interpreter's own
    process_anonymous_peak_bytes: int
    interpreter_anonymous_bytes: int
    dram_mapped_bytes: int  # what onnxruntime maps of the DRAM files (it unmaps what it prepacked)
    decoder_dram_bytes: int  # the DRAM files on disk
    floor_bytes: int  # the least any run needs: DRAM files + KV cache + the runtime's own
    headroom_bytes: int
    reasons: list[str]
    flash: FlashCost
    decode_bound_tok_s: float | None
    summary: str
    note: str

    @property
    def fits(self) -> bool:
        return self.outcome == Outcome.FITS

    @property
    def exit_code(self) -> int:
        return 0 if self.fits else 4


@dataclass(frozen=True)
class Headline:
    """The figures a regression gate compares."""

    decode_tok_s: float
    dram_resident_bytes: float


@dataclass
class ProfileReport:
    environment: Environment
    model: ModelDesc
    files: tuple[FileEntry, ...]
    options: ProfileOptions
    runtime: dict[str, Any]  # the session options, for the record
    device: Device
    samples: list[dict[str, Any]]  # llama-bench's rows
    results: dict[str, ModeSummary]
    memory: dict[str, ModeMemory]
    ple: PleReport
    cold: ColdReport | None
    enforce: EnforceReport | None
    verdict: Verdict
    context: list[ContextPoint] = field(default_factory=list)  # ascending prompt lengths; the last is warm's
    prefill_chunk: int = 0  # prompt tokens per prefill call (0: one call)
    notes: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)
    versus: Any = None  # `versus.Versus`: the paired rounds against --baseline-bundle, when asked

    @property
    def exit_code(self) -> int:
        return 4 if self.regressions else self.verdict.exit_code

    def headline(self) -> Headline:
        decode = self.results["warm"].decode_tok_s.median
        return Headline(float(decode or 0.0), float(self.verdict.dram_resident_bytes))

    def to_json(self) -> dict[str, Any]:
        verdict = asdict(self.verdict) | {"fits": self.verdict.fits, "exit_code": self.verdict.exit_code}
        return {
            "schema": SCHEMA,
            "environment": asdict(self.environment),
            "model": asdict(self.model),
            "files": [
                {"path": f.path, "bytes": f.bytes, "placement": str(f.placement), "role": str(f.role)}
                for f in self.files
            ],
            "options": asdict(self.options),
            "runtime": self.runtime,
            "device": self.device.to_dict(),
            "samples": self.samples,
            "results": {mode: asdict(s) for mode, s in self.results.items()},
            "memory": {mode: _memory_json(m) for mode, m in self.memory.items()},
            "ple": asdict(self.ple),
            "cold": asdict(self.cold) if self.cold else None,
            "enforce": asdict(self.enforce) if self.enforce else None,
            "verdict": verdict,
            "prefill_chunk": self.prefill_chunk,
            "context": [asdict(p) for p in self.context],
            "notes": self.notes,
            "regressions": self.regressions,
            "versus": asdict(self.versus) | {"base": str(self.versus.base)} if self.versus else None,
            "exit_code": self.exit_code,
        }


def _split_json(split: MemorySplit | None) -> dict[str, Any] | None:
    if split is None:
        return None
    return asdict(split) | {"bundle_file_backed_bytes": split.bundle_file_backed_bytes}


def _memory_json(m: ModeMemory) -> dict[str, Any]:
    return asdict(m) | {"after_load": _split_json(m.after_load), "after_runs": _split_json(m.after_runs)}
