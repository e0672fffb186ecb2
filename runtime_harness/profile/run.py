"""`ple-export profile`: run the measured workers in fresh processes and assemble the report.

    warm       load, `warmup` untimed runs, `runs` timed runs (prefill + `gen_tokens` decode steps)
    cold       the same, the PLE table evicted before every call: each lookup faults from disk
    enforced   the warm run inside a memory cgroup limited to the budget
    warm@N     the warm run with an N-token prompt, for each shorter prompt of a context sweep
               (`--prompt-tokens 128,1024,4096`): cost against context, as llama-bench's -p grid

Every prompt is prefilled in chunks of the device's `prefill_chunk` tokens (or `--prefill-chunk`).

onnxruntime is tuned as a phone app would run it: no spinning of idle pool threads, the PLE lookup on
one thread, the decoder on `threads`. Each worker runs under the measuring core's child runner
(`runtime_harness/measure/child.py`); its progress events come back on its stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from ple_export.bundle.files import trusted_bundle
from ple_export.bundle.manifest import Manifest
from ple_export.errors import UserError, host_memory, out_of_memory
from runtime_harness.measure import memory
from runtime_harness.measure.budget import CgroupUnavailable, MemoryCgroup
from runtime_harness.measure.child import run_measured
from runtime_harness.measure.devices import Device, get_device
from runtime_harness.profile import analysis
from runtime_harness.profile.options import MIB, ProfileOptions
from runtime_harness.profile.report import EnforceReport, Environment, ProfileReport
from runtime_harness.profile.worker import WorkerConfig, WorkerResult

Progress = Callable[[str, int, int], None]
ROOT = Path(__file__).resolve().parents[2]  # importable from a checkout without install
RUNTIME_NOTE = (
    "onnxruntime tuned phone-like: session.intra_op.allow_spinning=0 (idle pool threads sleep instead "
    "of burning a core after each call), PLE lookup (embedder) on 1 thread, decoder on `threads`"
)
HOST_NOTE = (
    "measured PLE figures are this host's: its kernel maps large folios and reads ahead on a fault, so "
    "pages mapped or read here exceed what a phone reads; the logical figures (manifest rows at the "
    "device's page size) are what a phone would read"
)


def _measure(
    config: WorkerConfig, workdir: Path, progress: Progress, group: MemoryCgroup | None = None
) -> tuple[WorkerResult | None, int]:
    """One worker in a fresh measured process: (what it wrote, its exit status)."""
    config_path = workdir / f"{config.mode}.json"
    config_path.write_text(json.dumps(asdict(config)))
    argv = [sys.executable, "-m", "runtime_harness.profile.worker", str(config_path)]
    if group is not None:
        argv = group.wrap(argv)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)

    def on_line(line: str) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            event = json.loads(line)
            progress(str(event["stage"]), int(event["n"]), int(event["total"]))

    stderr = workdir / f"{config.mode}.stderr"
    record = run_measured(argv, stderr, env=env, on_line=on_line)
    result = WorkerResult.read(Path(config.result))
    if result is not None and result.error:
        raise UserError(result.error)
    if record.status in (130, -2):  # Ctrl-C reached the child first
        raise KeyboardInterrupt
    # under a budget, SIGKILL is the OOM killer's verdict, to be reported; anything else is a failure
    killed_by_budget = group is not None and record.status == -9
    if not killed_by_budget and (record.status != 0 or result is None or not result.complete):
        lines = stderr.read_text(errors="replace").strip().splitlines()
        why = f"killed by signal {-record.status}" if record.status < 0 else f"exit status {record.status}"
        if lines and out_of_memory(lines[-1]):
            raise host_memory(f"in the {config.mode} measurement")
        raise UserError(
            f"the {config.mode} measurement failed ({why}): {lines[-1] if lines else 'no message'}"
        )
    return result, record.status


def _environment(bundle: Path, threads: int, load_before: float) -> Environment:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Hardware")):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    commit = "unknown"
    if (ROOT / ".git").exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            git = ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]
            commit = subprocess.run(git, capture_output=True, text=True, timeout=10).stdout.strip() or commit
    thp = None
    with contextlib.suppress(OSError):
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    return Environment(
        build_commit=commit,
        ple_export_version=version("ple-export"),
        cpu_info=cpu,
        n_cpus=os.cpu_count(),
        n_cpus_usable=len(os.sched_getaffinity(0)),
        n_threads=threads,
        backends="CPU (onnxruntime CPUExecutionProvider)",
        onnxruntime_version=version("onnxruntime"),
        numpy_version=version("numpy"),
        python_version=platform.python_version(),
        kernel=f"{platform.system()} {platform.release()}",
        host_page_size=memory.PAGE,
        transparent_hugepage=thp,
        bundle_filesystem=memory.filesystem_type(bundle),
        bundle_read_ahead_kb=memory.read_ahead_kb(bundle),
        load_avg_1m=load_before,
        load_avg_1m_after=os.getloadavg()[0],
        test_time=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def _enforce(
    opts: ProfileOptions,
    config: WorkerConfig,
    workdir: Path,
    progress: Progress,
    files: dict[str, Path],
    budget: int,
    floor: int,
    warm_summary: analysis.ModeSummary,
) -> tuple[EnforceReport, WorkerResult | None]:
    if floor > budget:
        detail = f"not run: the bundle needs at least {floor / MIB:.1f} MiB, over the {budget / MIB:.1f} MiB"
        return EnforceReport("skipped", detail, budget), None
    try:
        group = MemoryCgroup.create(budget)
    except CgroupUnavailable as e:  # checked up front; the host changed since
        raise UserError(f"--enforce needs a memory cgroup, and none can be made here: {e}") from None
    with group:
        # out of the page cache: a v1 memory cgroup charges a page to the group that first reads it
        memory.drop_page_cache(files.values())
        result, status = _measure(config, workdir, progress, group)
        stats = group.stats()
    report = analysis.enforce_report(
        status, result, stats, warm_summary, budget, opts.prompt_tokens, opts.gen_tokens
    )
    report = replace(report, cgroup_path=str(group.path), cgroup_removed=group.removed)
    return report, (result if report.outcome != "killed" else None)


def _check_cgroup(budget: int) -> None:
    """--enforce needs a memory cgroup: say in one line why there is none, before any work."""
    try:
        with MemoryCgroup.create(budget):
            pass
    except CgroupUnavailable as e:
        raise UserError(f"--enforce needs a memory cgroup, and none can be made here: {e}") from None


@dataclass(frozen=True)
class _Plan:
    """What a profile will run, checked before anything runs."""

    bundle: Path
    options: ProfileOptions
    device: Device
    manifest: Manifest
    files: dict[str, Path]
    budget: int
    budget_source: str
    floor: int
    threads: int
    prompt: list[int]  # the longest prompt; a sweep's shorter ones are its prefixes
    chunk: int  # prompt tokens per prefill call (0: one call)

    @property
    def positions(self) -> int:
        return self.options.prompt_tokens + self.options.gen_tokens

    def config(self, mode: str, workdir: Path, prompt_tokens: int | None = None) -> WorkerConfig:
        return WorkerConfig(
            mode=mode,
            bundle=str(self.bundle),
            ple_file=str(self.bundle / self.manifest.ple.file),
            files={name: str(p) for name, p in self.files.items()},
            prompt=self.prompt[:prompt_tokens],
            gen_tokens=self.options.gen_tokens,
            runs=self.options.runs,
            warmup=self.options.warmup,
            threads=self.threads,
            result=str(workdir / f"{mode}.result.json"),
            prefill_chunk=self.chunk,
        )


def _plan(bundle: Path, options: ProfileOptions) -> _Plan:
    """Every check a profile needs, before any work: options, device, the bundle's trust, its
    context, the cgroup --enforce needs, a file system cold mode can evict."""
    options.validate()
    device = get_device(options.device)
    manifest = Manifest.read(bundle)
    positions = options.prompt_tokens + options.gen_tokens  # from the manifest alone: before hashing
    manifest.model.check_context(positions, "--prompt-tokens + --gen-tokens")
    budget, source = analysis.budget_of(device, options.budget_mb)
    floor = analysis.floor_bytes(manifest, positions)
    _check_prompt_fits(manifest, options, budget, source, floor)
    trusted_bundle(bundle, manifest, verify_hashes=options.verify)
    if options.enforce and floor <= budget:
        _check_cgroup(budget)
    ple_file = bundle / manifest.ple.file
    if options.cold and memory.filesystem_type(ple_file) in memory.MEMORY_FILESYSTEMS:
        raise UserError(
            f"{ple_file}: on {memory.filesystem_type(ple_file)}, where the page cache is the file itself: "
            "cold mode cannot evict it; put the bundle on a disk-backed file system"
        )
    vocab = manifest.generation.vocab_size
    prompt = [int(t) for t in np.random.default_rng(options.seed).integers(0, vocab, options.prompt_tokens)]
    threads = options.threads or len(os.sched_getaffinity(0))
    files = {f.path: bundle / f.path for f in manifest.files}
    chunk = device.prefill_chunk if options.prefill_chunk is None else options.prefill_chunk
    return _Plan(bundle, options, device, manifest, files, budget, source, floor, threads, prompt, chunk)


def _check_prompt_fits(
    manifest: Manifest, options: ProfileOptions, budget: int, source: str, floor: int
) -> None:
    """A prompt whose KV cache alone pushes a bundle that fits over the budget is bad input, said
    before any work: which limit, by how much, and the longest prompt that fits. (A bundle that
    does not fit even with a one-token prompt is the verdict's to report.)"""
    shortest = analysis.floor_bytes(manifest, 1 + options.gen_tokens)
    if floor <= budget or shortest > budget:
        return
    fits = 1
    lo, hi = 1, options.prompt_tokens  # the longest prompt whose floor fits: floor grows with it
    while lo <= hi:
        mid = (lo + hi) // 2
        if analysis.floor_bytes(manifest, mid + options.gen_tokens) <= budget:
            fits, lo = mid, mid + 1
        else:
            hi = mid - 1
    kv = manifest.kv_cache.bytes_after(options.prompt_tokens + options.gen_tokens)
    raise UserError(
        f"--prompt-tokens {options.prompt_tokens}: its KV cache ({kv / MIB:.1f} MiB) puts the bundle "
        f"{(floor - budget) / MIB:.1f} MiB over the {budget / MIB:.1f} MiB budget ({source}), chunked or "
        f"not; the longest prompt that fits is {fits} tokens"
    )


def _run_modes(
    plan: _Plan, progress: Progress
) -> tuple[dict[str, WorkerResult], dict[int, WorkerResult], EnforceReport | None]:
    """The warm run, the cold one if asked, a warm run per shorter prompt of a sweep, the enforced
    one if asked: each in a fresh process."""
    opts = plan.options
    with tempfile.TemporaryDirectory(prefix="ple-profile-") as tmp:
        workdir = Path(tmp)
        results: dict[str, WorkerResult] = {}
        sweep: dict[int, WorkerResult] = {}
        for mode in ("warm", "cold") if opts.cold else ("warm",):
            result, _ = _measure(plan.config(mode, workdir), workdir, progress)
            assert result is not None  # outside a cgroup, a run that wrote nothing raised
            results[mode] = result
        for n in opts.sweep:  # shorter prompts: cost against context, one fresh warm process each
            result, _ = _measure(plan.config(f"warm@{n}", workdir, n), workdir, progress)
            assert result is not None
            sweep[n] = result
        if not opts.enforce:
            return results, sweep, None
        warm_summary = analysis.summarize(results["warm"], opts.prompt_tokens, opts.gen_tokens)
        enforced, result = _enforce(
            opts,
            plan.config("enforced", workdir),
            workdir,
            progress,
            plan.files,
            plan.budget,
            plan.floor,
            warm_summary,
        )
        if result is not None:
            results["enforced"] = result
        return results, sweep, enforced


def run_profile(bundle: Path, options: ProfileOptions, progress: Progress | None = None) -> ProfileReport:
    """Measure `bundle` in fresh processes and judge it against `options.device`. `progress(stage, n,
    total)` is called as runs finish: stages `warm`, `cold`, `enforced` and `warm@N` (a context
    sweep's shorter prompts), counted in runs (the load counts as one). Raises UserError for bad
    input before anything runs."""
    progress = progress or (lambda stage, n, total: None)
    plan = _plan(Path(bundle), options)
    if options.verify:  # hashing read every byte: residency must start from a cold cache again
        memory.drop_page_cache(plan.files.values())
    load_before = os.getloadavg()[0]
    results, sweep, enforced = _run_modes(plan, progress)
    return _report(plan, results, sweep, enforced, _environment(plan.bundle, plan.threads, load_before))


def _report(
    plan: _Plan,
    results: dict[str, WorkerResult],
    sweep: dict[int, WorkerResult],
    enforced: EnforceReport | None,
    environment: Environment,
) -> ProfileReport:
    n_prompt, n_gen, manifest = plan.options.prompt_tokens, plan.options.gen_tokens, plan.manifest
    summaries = {mode: analysis.summarize(r, n_prompt, n_gen) for mode, r in results.items()}
    warm = results["warm"]
    model = analysis.model_desc(plan.bundle, manifest)
    looked_up = warm.runs[-1].tokens[:n_gen]  # each decode step reads the previous token's row
    ple = analysis.ple_report(
        plan.bundle, manifest, plan.device, plan.prompt, looked_up, warm, results.get("cold")
    )
    cold = results.get("cold")
    return ProfileReport(
        environment=environment,
        model=model,
        files=manifest.files,
        options=plan.options,
        runtime=_runtime(plan.threads, warm),
        device=plan.device,
        samples=[
            row
            for mode, r in results.items()
            for row in analysis.llama_bench_samples(mode, r, model, n_prompt, n_gen, plan.threads)
        ],
        results=summaries,
        memory={mode: analysis.mode_memory(r) for mode, r in results.items()},
        ple=ple,
        cold=analysis.cold_report(cold, summaries["warm"], summaries["cold"]) if cold is not None else None,
        enforce=enforced,
        context=[
            analysis.context_point(r, n, n_gen, manifest)
            for n, r in sorted({**sweep, n_prompt: warm}.items())
        ],
        prefill_chunk=plan.chunk,
        verdict=analysis.verdict(
            plan.device,
            plan.budget,
            plan.budget_source,
            manifest,
            plan.positions,
            warm,
            summaries["warm"],
            ple,
            enforced,
        ),
        notes=_notes(environment),
    )


def _runtime(threads: int, warm: WorkerResult) -> dict[str, object]:
    return {
        "embedder": {"intra_op_num_threads": 1, "session.intra_op.allow_spinning": "0"},
        "decoder": {"intra_op_num_threads": threads, "session.intra_op.allow_spinning": "0"},
        "graph_optimization": "all",
        "session_options": warm.session_options,
        "note": RUNTIME_NOTE,
    }


def _notes(environment: Environment) -> list[str]:
    notes = [RUNTIME_NOTE, HOST_NOTE]
    load = max(environment.load_avg_1m, environment.load_avg_1m_after)
    if load > environment.n_cpus_usable + 1:
        notes.append(
            f"1-min load average reached {load:.1f} on {environment.n_cpus_usable} CPUs: other "
            "processes competed for the cores; the timings are unreliable"
        )
    return notes
