"""`ple-export profile`: how fast a bundle runs, where its memory lives, what the PLE table costs in
flash, and whether it fits a phone's budget.

Every measurement runs in a fresh child process (`python -m runtime_harness.profile --worker`), so
page-cache state, arenas and peaks do not leak from one into the next:

    warm       load, `warmup` untimed runs, `runs` timed runs (prefill + `gen_tokens` decode steps)
    cold       the same, with the PLE table evicted (page cache and mappings) before the prefill and
               before every decode step, readahead off on its mapping: each lookup faults from disk
    enforced   the warm run inside a memory cgroup limited to the budget (runtime_harness/budget.py)

onnxruntime is tuned as a phone app would run it: no spinning of idle pool threads, the PLE lookup on
one thread, the decoder on `threads`. The report (a dict, JSON-ready) mirrors llama-bench's JSON in
its `environment` block and `samples` list, and adds memory, PLE traffic, cold/enforced results and
a verdict against a device profile (runtime_harness/devices.toml). docs/profiling.md reads one.

CLI entry points: `run_profile`, `render_table`, `compare_baseline`, `plot`, `load_report`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter import manifest as manifest_mod
from exporter.bundle_files import trusted_bundle
from exporter.errors import UserError
from runtime_harness import memory
from runtime_harness.budget import CgroupUnavailable, MemoryCgroup
from runtime_harness.devices import Device, get_device

if TYPE_CHECKING:
    from rich.table import Table

SCHEMA = "ple-export-profile/1"
MIB = 1 << 20
# The least the measured process needs besides the model: Python with numpy and onnxruntime imported
# holds ~27 MiB anonymous here (~36 MiB with onnx too, as the child has). `enforce` refuses a budget
# below decoder DRAM bytes + KV cache + this, which no run can fit.
RUNTIME_FLOOR_BYTES = 32 * MIB
RUNTIME_NOTE = (
    "onnxruntime tuned phone-like: session.intra_op.allow_spinning=0 (idle pool threads sleep instead "
    "of burning a core after each call), PLE lookup (embedder) on 1 thread, decoder on `threads`"
)
HOST_NOTE = (
    "measured PLE figures are this host's: its kernel maps large folios and reads ahead on a fault, so "
    "pages mapped or read here exceed what a phone reads; the logical figures (manifest rows at the "
    "device's page size) are what a phone would read"
)

Progress = Callable[[str, int, int], None]


@dataclass
class ProfileOptions:
    """One field per `ple-export profile` flag that shapes the measurement. Output flags (`--json`,
    `--plot PNG`, `--baseline JSON`, `--max-regression`) are the CLI's: it calls `render_table`,
    `plot` and `compare_baseline` on the report."""

    device: str = "pixel-8a"
    prompt_tokens: int = 64
    gen_tokens: int = 32  # timed decode steps after the prefill's first token
    runs: int = 5
    warmup: int = 1
    threads: int = 0  # decoder intra-op threads; 0: every CPU this process may run on
    cold: bool = False
    enforce: bool = False
    budget_mb: float | None = None  # MiB; default: the device's app budget
    seed: int = 0  # prompt token ids are drawn from it
    verify: bool = True  # sha256 every file first; the files are then dropped from the page cache again

    def validate(self) -> None:
        for name in ("prompt_tokens", "gen_tokens", "runs"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise UserError("--warmup and --threads must be 0 or more")
        if self.budget_mb is not None and not (self.budget_mb > 0 and math.isfinite(self.budget_mb)):
            raise UserError(f"--budget-mb must be a positive number of MiB, got {self.budget_mb}")


# ---------------------------------------------------------------------------------------------------
# What the manifest says a token reads


@dataclass(frozen=True)
class Region:
    """A per-row tensor inside the PLE file: row r occupies [offset + r*row_bytes, +row_bytes)."""

    name: str
    offset: int
    row_bytes: int

    def pages(self, row: int, page: int) -> range:
        first = (self.offset + row * self.row_bytes) // page
        last = (self.offset + (row + 1) * self.row_bytes - 1) // page
        return range(first, last + 1)


def ple_regions(bundle: Path, manifest: dict[str, Any]) -> list[Region]:
    """The codes and (when quantized) scales of the PLE table, with their offsets in its file: read
    from the embedder graph's external-data entries, else laid out as docs/bundle-format.md says
    (codes at offset 0, scales at the next page boundary)."""
    ple = manifest["ple"]
    rows, file = int(ple["rows"]), ple.get("file", "ple_table.data")
    graph = bundle / manifest["graphs"]["embedder"]["file"]
    if graph.is_file() and rows:
        import onnx

        found = []
        for t in onnx.load(str(graph), load_external_data=False).graph.initializer:
            ext = {e.key: e.value for e in t.external_data}
            if ext.get("location") == file:
                found.append((int(ext.get("offset", 0)), int(ext.get("length", 0)) // rows))
        if found:
            return [
                Region("codes" if i == 0 else "scales", off, rb) for i, (off, rb) in enumerate(sorted(found))
            ]
    regions = [Region("codes", int(ple.get("offset", 0)), int(ple["row_bytes"]))]
    scales = int(ple.get("scales_row_bytes") or 0)
    if scales:
        page = int(ple["page_size"])
        regions.append(Region("scales", -(-rows * int(ple["row_bytes"]) // page) * page, scales))
    return regions


def pages_per_token(regions: list[Region], page: int) -> dict[str, float]:
    """Pages of `page` bytes one row touches (codes row + scales row), min/mean/max over rows.
    Row offsets repeat their alignment every page / gcd(row_bytes, page) rows."""
    period = 1
    for r in regions:
        period = math.lcm(period, page // math.gcd(r.row_bytes, page))
    period = min(period, 1 << 16)
    counts = [sum(len(r.pages(row, page)) for r in regions) for row in range(period)]
    return {"min": min(counts), "mean": round(sum(counts) / len(counts), 4), "max": max(counts)}


def distinct_pages(regions: list[Region], rows: set[int], page: int) -> int:
    """Pages of the file that reading `rows` touches (rows sharing a page share it)."""
    pages: set[int] = set()
    for r in regions:
        for row in rows:
            pages.update(r.pages(row, page))
    return len(pages)


def kv_cache_bytes(manifest: dict[str, Any], positions: int) -> int:
    """The KV cache after `positions` tokens (batch 1, float32): sliding layers stop at their window."""
    total = 0
    for layer in manifest["kv_cache"]["layers"]:
        length = positions if layer.get("max_length") is None else min(positions, int(layer["max_length"]))
        total += 2 * int(layer["kv_heads"]) * int(layer["head_dim"]) * length * 4
    return total


# ---------------------------------------------------------------------------------------------------
# The measured child process


class _Timed:
    """Wraps the session's PLE lookup to time it apart from the decoder."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        out = self.fn(ids)
        self.seconds += time.perf_counter() - t
        return out


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _emit(stage: str, n: int, total: int) -> None:
    print(json.dumps({"stage": stage, "n": n, "total": total}), flush=True)


def _worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child: load, warm up, time; writes its result after every phase, so a run killed
    by the budget still tells how far it got."""
    import onnx  # noqa: F401  imported by the session's trust check: part of the baseline, not the model

    from runtime_harness.session import BundleSession

    mode, out = config["mode"], Path(config["result"])
    bundle, ple_path = Path(config["bundle"]), Path(config["ple_file"])
    files = {name: Path(p) for name, p in config["files"].items()}
    prompt = np.asarray([config["prompt"]], dtype=np.int64)
    n_gen, cold = int(config["gen_tokens"]), mode == "cold"
    total = 1 + config["warmup"] + config["runs"]
    result: dict[str, Any] = {"mode": mode, "phase": "load", "complete": False, "runs": []}
    result["baseline_anonymous_bytes"] = memory.anonymous_bytes()
    result["page_cache_pages_before_load"] = memory.page_cache_pages(ple_path)[0]
    _write_json(out, result)

    t0 = time.perf_counter()
    session = BundleSession(
        bundle, threads=config["threads"], check=False, allow_spinning=False, embedder_threads=1
    )
    result["load_s"] = time.perf_counter() - t0
    result["session_options"] = dict(session.options)
    result["memory_after_load"] = memory.memory_split(files)
    result["ple_mapped_rss_after_load"] = memory.mapped_rss(ple_path)
    result["page_cache_pages_after_load"] = memory.page_cache_pages(ple_path)[0]
    if cold:  # BundleSession advised MADV_RANDOM: a fault reads its page, not a read-around window
        result["madv_random_mappings"] = session.ple_advised
    lookup = _Timed(session.per_layer_inputs)
    setattr(session, "per_layer_inputs", lookup)  # noqa: B010  instance attribute shadows the method
    anon_peak = memory.anonymous_bytes()
    result["phase"] = "runs"
    _write_json(out, result)
    _emit(mode, 1, total)

    def call(ids: np.ndarray, cache: Any) -> tuple[int, dict[str, Any]]:
        nonlocal anon_peak
        evicted = memory.evict(ple_path) if cold else None
        lookup.seconds = 0.0
        faults, read = memory.major_faults(), memory.io_read_bytes()
        t = time.perf_counter()
        token = int(session.forward(ids, cache, last_only=True)[0, -1].argmax())
        seconds = time.perf_counter() - t
        rec: dict[str, Any] = {
            "s": seconds,
            "lookup_s": lookup.seconds,
            "major_faults": memory.major_faults() - faults,
            "read_bytes": memory.io_read_bytes() - read if read >= 0 else None,
        }
        if cold:
            rec["evicted"] = evicted
            rec["ple_pages_after"] = memory.page_cache_pages(ple_path)[0]
        anon_peak = max(anon_peak, memory.anonymous_bytes())
        return token, rec

    for i in range(config["warmup"] + config["runs"]):
        cache = session.new_cache(1)
        token, prefill = call(prompt, cache)
        tokens, steps = [token], []
        for _ in range(n_gen):
            token, rec = call(np.array([[token]], dtype=np.int64), cache)
            tokens.append(token)
            steps.append(rec)
        result["runs"].append(
            {"warmup": i < config["warmup"], "prefill": prefill, "steps": steps, "tokens": tokens}
        )
        result["anonymous_peak_bytes"] = anon_peak
        _write_json(out, result)
        _emit(mode, 1, total)

    result["memory_after_runs"] = memory.memory_split(files)
    result["ple_mapped_rss_after_runs"] = memory.mapped_rss(ple_path)
    result["page_cache_pages_after_runs"] = memory.page_cache_pages(ple_path)[0]
    result["rss_peak_bytes"] = memory.status().get("VmHWM", 0)
    result["phase"], result["complete"] = "done", True
    _write_json(out, result)
    return result


def _worker_main(argv: list[str]) -> int:
    config = json.loads(Path(argv[0]).read_text())
    try:
        _worker(config)
    except UserError as e:
        _write_json(Path(config["result"]), {"error": str(e)})
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


# ---------------------------------------------------------------------------------------------------
# The parent: spawn, collect, judge


def _spawn(
    config: dict[str, Any], workdir: Path, progress: Progress, group: MemoryCgroup | None
) -> tuple[dict[str, Any] | None, int, str]:
    """Run one worker; returns (its result file or None, exit status, last stderr line)."""
    config_path = workdir / f"{config['mode']}.json"
    config_path.write_text(json.dumps(config))
    argv = [sys.executable, "-m", "runtime_harness.profile", "--worker", str(config_path)]
    if group is not None:
        argv = group.wrap(argv)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])  # importable from a checkout without install
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    stderr_path = workdir / f"{config['mode']}.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                    progress(str(event["stage"]), int(event["n"]), int(event["total"]))
                except (ValueError, KeyError, TypeError):
                    continue
            status = proc.wait()
        finally:
            if proc.poll() is None:  # Ctrl-C or an error here: the child goes too
                proc.kill()
                proc.wait()
    lines = stderr_path.read_text(errors="replace").strip().splitlines()
    result_path = Path(config["result"])
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    return result, status, lines[-1] if lines else ""


def _measure(
    mode: str, base: dict[str, Any], workdir: Path, progress: Progress, group: MemoryCgroup | None = None
) -> tuple[dict[str, Any] | None, int, str]:
    config = {**base, "mode": mode, "result": str(workdir / f"{mode}.result.json")}
    result, status, last = _spawn(config, workdir, progress, group)
    if result is not None and "error" in result:
        raise UserError(result["error"])
    if status in (130, -signal.SIGINT):  # Ctrl-C reached the child first
        raise KeyboardInterrupt
    # under a budget, SIGKILL is the OOM killer's verdict, to be reported; anything else is a failure
    killed_by_budget = group is not None and status == -signal.SIGKILL
    if not killed_by_budget and (status != 0 or result is None or not result.get("complete")):
        why = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        raise RuntimeError(f"the {mode} measurement failed ({why}): {last}")
    return result, status, last


def _spread(values: list[float], tail: str) -> dict[str, Any]:
    """median and p90 of `values`; tail 'high' for latencies (p90 = 90th percentile), 'low' for rates
    (p90 = the rate 90% of samples reach, i.e. the 10th percentile)."""
    if not values:
        return {"median": None, "p90": None, "n": 0}
    q = 90 if tail == "high" else 10
    return {
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, q)),
        "n": len(values),
    }


def _timed_runs(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in result.get("runs", []) if not r["warmup"]]


def _summarize(result: dict[str, Any], n_prompt: int, n_gen: int) -> dict[str, Any]:
    """Latency and throughput of one mode over its timed runs."""
    runs = _timed_runs(result)
    ttft = [r["prefill"]["s"] for r in runs]
    decode_s = [sum(s["s"] for s in r["steps"]) for r in runs]
    steps = [s for r in runs for s in r["steps"]]
    return {
        "load_s": result.get("load_s"),
        "ttft_ms": _spread([t * 1e3 for t in ttft], "high"),
        "prefill_tok_s": _spread([n_prompt / t for t in ttft], "low"),
        "decode_tok_s": _spread([n_gen / t for t in decode_s if t > 0], "low"),
        "decode_step_ms": _spread([s["s"] * 1e3 for s in steps], "high"),
        "lookup_step_ms": _spread([s["lookup_s"] * 1e3 for s in steps], "high"),
        "prefill_lookup_ms": _spread([r["prefill"]["lookup_s"] * 1e3 for r in runs], "high"),
        "major_faults_timed": sum(
            r["prefill"]["major_faults"] + sum(s["major_faults"] for s in r["steps"]) for r in runs
        ),
        "runs_timed": len(runs),
        "runs_completed": len(result.get("runs", [])),
        # per step index, median over timed runs: the latency curve of the plot
        "step_ms_by_index": [float(np.median([r["steps"][i]["s"] * 1e3 for r in runs])) for i in range(n_gen)]
        if runs
        else [],
    }


def _llama_bench_samples(
    mode: str, result: dict[str, Any], model: dict[str, Any], n_prompt: int, n_gen: int, threads: int
) -> list[dict[str, Any]]:
    """llama-bench's JSON rows: one `pp` (prompt processing: the prefill, first token included) and one
    `tg` (text generation: `n_gen` decode steps) per mode, with per-run samples."""
    runs = _timed_runs(result)
    rows = []
    for test, n_p, n_g, secs in (
        ("pp", n_prompt, 0, [r["prefill"]["s"] for r in runs]),
        ("tg", 0, n_gen, [sum(s["s"] for s in r["steps"]) for r in runs]),
    ):
        if not secs:
            continue
        ns = [int(s * 1e9) for s in secs]
        ts = [(n_p + n_g) / s for s in secs]
        rows.append(
            {
                "mode": mode,
                "test": f"{test}{n_p + n_g}",
                **model,
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


def _environment(bundle: Path, threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    root = Path(__file__).resolve().parents[1]
    commit = "unknown"
    if (root / ".git").exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            git = ["git", "-C", str(root), "rev-parse", "--short", "HEAD"]
            commit = subprocess.run(git, capture_output=True, text=True, timeout=10).stdout.strip() or commit

    def sysfs(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    return {
        "build_commit": commit,
        "ple_export_version": version("ple-export"),
        "cpu_info": cpu,
        "n_cpus": os.cpu_count(),
        "n_cpus_usable": len(os.sched_getaffinity(0)),
        "n_threads": threads,
        "backends": "CPU (onnxruntime CPUExecutionProvider)",
        "onnxruntime_version": version("onnxruntime"),
        "numpy_version": version("numpy"),
        "python_version": platform.python_version(),
        "kernel": f"{platform.system()} {platform.release()}",
        "host_page_size": memory.PAGE,
        "transparent_hugepage": sysfs("/sys/kernel/mm/transparent_hugepage/enabled"),
        "bundle_filesystem": memory.filesystem_type(bundle),
        "bundle_read_ahead_kb": memory.read_ahead_kb(bundle),
        "load_avg_1m": os.getloadavg()[0],
        "test_time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _model_info(bundle: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    recipe = (manifest.get("quantization") or {}).get("recipe") or {}
    weights = recipe.get("weights", "none")
    weights = "fp32" if weights == "none" else weights
    params = int(manifest["model"]["num_parameters"])
    return {
        "model_filename": str(bundle),
        "model_type": f"{manifest['model']['family']} {params / 1e6:.3g}M, decoder {weights}, "
        f"PLE {manifest['ple']['dtype']}",
        "model_size": sum(int(f["bytes"]) for f in manifest["files"]),
        "model_n_params": params,
    }


def _ple_section(
    bundle: Path,
    manifest: dict[str, Any],
    device: Device,
    prompt: list[int],
    generated: list[int],
    warm: dict[str, Any],
    cold: dict[str, Any] | None,
) -> dict[str, Any]:
    ple = manifest["ple"]
    regions = ple_regions(bundle, manifest)
    page, host = device.page_size, memory.PAGE
    per_token = pages_per_token(regions, page)
    file_bytes = (bundle / ple.get("file", "ple_table.data")).stat().st_size
    rows = int(ple["rows"])

    def clip(ids: list[int]) -> set[int]:  # ids outside the table read row 0 (manifest out_of_range_ids)
        return {t if 0 <= t < rows else 0 for t in ids}

    def traffic(ids: list[int]) -> dict[str, Any]:
        distinct = clip(ids)
        n_pages = distinct_pages(regions, distinct, page)
        return {
            "tokens": len(ids),
            "distinct_rows": len(distinct),
            "bytes": len(distinct) * int(ple["bytes_per_token"]),
            "pages": n_pages,
            "page_bytes": n_pages * page,
        }

    distinct_all = clip(prompt + generated)
    logical = {
        "page_size": page,
        "regions": [asdict(r) for r in regions],
        "bytes_per_token": int(ple["bytes_per_token"]),
        "pages_per_token": per_token,
        "flash_bytes_per_token": per_token["mean"] * page,
        "manifest_page_size": int(ple["page_size"]),
        "manifest_pages_per_token": ple["pages_per_token"],
        "prompt": traffic(prompt),
        "generated": traffic(generated),
        "all": traffic(prompt + generated),
        "note": "what a phone reads: each distinct row's codes + scales rows, at the device's page size",
    }
    after = warm.get("ple_mapped_rss_after_runs", 0)
    measured: dict[str, Any] = {
        "host_page_size": host,
        "warm": {
            "mapped_rss_after_load_bytes": warm.get("ple_mapped_rss_after_load"),
            "mapped_rss_after_runs_bytes": after,
            "page_cache_pages_before_load": warm.get("page_cache_pages_before_load"),
            "page_cache_pages_after_runs": warm.get("page_cache_pages_after_runs"),
            "mapped_bytes_per_distinct_row": after / max(len(distinct_all), 1),
            "note": "Rss of onnxruntime's mapping of the table after the runs, over the distinct rows "
            "read: fault-around and large folios map more than the rows",
        },
    }
    if cold is not None:
        measured["cold"] = _cold_ple(cold, len(clip(prompt)), host)
    residency = {
        "file_bytes": file_bytes,
        "mapped_rss_bytes": after,
        "fraction": after / file_bytes if file_bytes else 0.0,
    }
    return {
        "file": ple.get("file", "ple_table.data"),
        "rows": rows,
        "row_bytes": int(ple["row_bytes"]),
        "scales_row_bytes": int(ple.get("scales_row_bytes") or 0),
        "logical": logical,
        "measured": measured,
        "residency_after_run": residency,
    }


def _cold_ple(cold: dict[str, Any], distinct_prompt: int, host: int) -> dict[str, Any]:
    runs = _timed_runs(cold)
    steps = [s for r in runs for s in r["steps"]]
    prefills = [r["prefill"] for r in runs]

    def mean(xs: list[float]) -> float | None:
        return statistics.fmean(xs) if xs else None

    return {
        "readahead": "off: MADV_RANDOM on onnxruntime's mappings of the table "
        f"({cold.get('madv_random_mappings', 0)} mappings)",
        "host_pages_per_decode_token": mean([s["ple_pages_after"] for s in steps]),
        "read_bytes_per_decode_token": mean([s["read_bytes"] for s in steps if s["read_bytes"] is not None]),
        "major_faults_per_decode_token": mean([s["major_faults"] for s in steps]),
        "host_pages_per_distinct_prompt_token": mean(
            [p["ple_pages_after"] / max(distinct_prompt, 1) for p in prefills]
        ),
        "major_faults_per_prefill": mean([p["major_faults"] for p in prefills]),
        "note": f"host pages of {host} B in the page cache after each step (the table was evicted "
        "before it), bytes the process read from storage, and its major faults",
    }


def _cold_section(
    cold: dict[str, Any], warm_summary: dict[str, Any], cold_summary: dict[str, Any]
) -> dict[str, Any]:
    runs = _timed_runs(cold)
    events = [r["prefill"]["evicted"] for r in runs] + [s["evicted"] for r in runs for s in r["steps"]]
    before = [e["before_pages"] for e in events if e]
    after_evict = [e["after_pages"] for e in events if e]
    steps = [s for r in runs for s in r["steps"]]
    faults = sum(s["major_faults"] for s in steps)

    def delta(key: str) -> float | None:
        w, c = warm_summary[key]["median"], cold_summary[key]["median"]
        return None if w is None or c is None else c - w

    added_step = delta("decode_step_ms")
    return {
        "eviction": {
            "method": events[0]["method"] if events and events[0] else None,
            "page_cache_pages_before_evict": statistics.fmean(before) if before else None,
            "page_cache_pages_after_evict": statistics.fmean(after_evict) if after_evict else None,
            "evictions": len(before),
        },
        "major_faults_decode": faults,
        "major_faults_prefill": sum(r["prefill"]["major_faults"] for r in runs),
        "major_faults_per_decode_token": faults / len(steps) if steps else None,
        "added_decode_step_ms": added_step,
        "added_lookup_step_ms": delta("lookup_step_ms"),
        "added_ttft_ms": delta("ttft_ms"),
        "added_ms_per_major_fault": added_step / (faults / len(steps)) if added_step and faults else None,
        "note": "medians of the cold run minus the warm run; the lookup is where the faults land",
    }


def _enforced_section(
    status: int,
    result: dict[str, Any] | None,
    stats: dict[str, Any],
    warm_summary: dict[str, Any],
    limit: int,
    n_prompt: int,
    n_gen: int,
) -> dict[str, Any]:
    killed = status == -signal.SIGKILL
    peak = stats.get("peak_bytes")
    section: dict[str, Any] = {
        "enforced": True,
        "limit_bytes": limit,
        "exit_status": status,
        "cgroup": stats,
        # failcnt stays 0 on some kernels even when reclaim ran: a peak at the limit says it too
        "limit_reached": bool(stats.get("limit_hits")) or (peak is not None and peak >= limit - (256 << 10)),
    }
    if killed:
        phase = (result or {}).get("phase", "start")
        section["outcome"] = "killed"
        section["detail"] = (
            f"killed by SIGKILL ({stats.get('oom_kills', 0)} OOM kill(s) in the group) during {phase}, after "
            f"{len((result or {}).get('runs', []))} run(s): what cannot be reclaimed (anonymous memory; "
            "there is no swap) exceeded the limit"
        )
        return section
    assert result is not None
    summary = _summarize(result, n_prompt, n_gen)
    faults = summary["major_faults_timed"]

    def delta(key: str) -> float | None:
        w, e = warm_summary[key]["median"], summary[key]["median"]
        return None if w is None or e is None else e - w

    section["added_decode_step_ms"] = delta("decode_step_ms")
    section["added_ttft_ms"] = delta("ttft_ms")
    section["major_faults_timed"] = faults
    if faults > 0:
        section["outcome"] = "slowed"
        section["detail"] = (
            f"slowed: {faults} major fault(s) in the timed runs (pages reclaimed under the limit were "
            f"read again); decode step {_fmt_delta(section['added_decode_step_ms'])} vs the unconstrained run"
        )
    else:
        section["outcome"] = "fit"
        section["detail"] = (
            "fit: the group reached its limit, but no page the timed runs needed was reclaimed "
            "(no major faults in them)"
            if section["limit_reached"]
            else "fit: the group never reached its limit"
        )
    return section


def _fmt_delta(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:+.3f} ms"


def _verdict(
    device: Device,
    budget: int,
    budget_source: str,
    manifest: dict[str, Any],
    warm: dict[str, Any],
    warm_summary: dict[str, Any],
    ple: dict[str, Any],
) -> dict[str, Any]:
    dram_files = sum(int(f["bytes"]) for f in manifest["files"] if f["placement"] == "dram")
    weights = sum(int(f["bytes"]) for f in manifest["files"] if f["role"] == "decoder_weights")
    anon_peak = int(warm.get("anonymous_peak_bytes", 0))
    interpreter = int(warm.get("baseline_anonymous_bytes", 0))
    anon_model = max(anon_peak - interpreter, 0)
    resident = dram_files + anon_model
    # what onnxruntime still maps of the DRAM files after the runs: the tensors it reads in place (it
    # unmaps those it prepacked into anonymous copies); at most the file, even where it is mapped twice
    after = (warm.get("memory_after_runs") or {}).get("file_backed_bytes") or {}
    dram_sizes = {f["path"]: int(f["bytes"]) for f in manifest["files"] if f["placement"] == "dram"}
    in_place = sum(min(int(e["mapped_bytes"]), dram_sizes[n]) for n, e in after.items() if n in dram_sizes)
    resident_in_place = anon_model + in_place
    logical = ple["logical"]
    page_us = device.page_read_us()
    decode_us = logical["pages_per_token"]["mean"] * page_us
    prompt_pages = logical["prompt"]["pages"]
    prefill_ms = prompt_pages * page_us / 1e3
    step_ms = warm_summary["decode_step_ms"]["median"]
    ttft_ms = warm_summary["ttft_ms"]["median"]
    fits = resident <= budget
    flash = {
        "page_read_us": page_us,
        "decode_pages_per_token": logical["pages_per_token"]["mean"],
        "decode_us_per_token": decode_us,
        "decode_fraction_of_step": decode_us / 1e3 / step_ms if step_ms else None,
        "prefill_pages": prompt_pages,
        "prefill_distinct_tokens": logical["prompt"]["distinct_rows"],
        "prefill_ms": prefill_ms,
        "prefill_fraction_of_ttft": prefill_ms / ttft_ms if ttft_ms else None,
        "note": "logical pages x the device's random-read latency; fractions are of this host's "
        "measured step time (the phone's compute time differs)",
    }
    bandwidth = device["dram_bandwidth_gb_s"] * 1e9
    summary = (
        f"{'fits' if fits else 'does NOT fit'} {device.name}'s {budget / MIB:.0f} MiB budget "
        f"({resident / MIB:.1f} MiB DRAM-resident, {(budget - resident) / MIB:+.1f} MiB to spare"
        + (
            ""
            if (resident_in_place <= budget) == fits
            else f"; {resident_in_place / MIB:.1f} MiB counting "
            "only the weights onnxruntime reads in place, which "
            + ("fits" if resident_in_place <= budget else "does not fit")
        )
        + f"); flash adds {decode_us / 1e3:.3f} ms per decoded token"
        + (f" ({flash['decode_fraction_of_step']:.1%} of a step here)" if step_ms else "")
        + f" and {prefill_ms:.2f} ms to a {logical['prompt']['tokens']}-token prefill"
    )
    return {
        "device": device.name,
        "budget_bytes": budget,
        "budget_source": budget_source,
        "decoder_dram_bytes": dram_files,
        "anonymous_peak_bytes": anon_model,
        "process_anonymous_peak_bytes": anon_peak,
        "interpreter_anonymous_bytes": interpreter,
        "dram_resident_bytes": resident,
        "fits": fits,
        "headroom_bytes": budget - resident,
        "dram_in_place_bytes": in_place,
        "dram_resident_in_place_bytes": resident_in_place,
        "fits_in_place": resident_in_place <= budget,
        "flash": flash,
        "decode_bound_tok_s": bandwidth / weights if weights else None,
        "summary": summary,
        "note": "DRAM-resident = decoder DRAM files + anonymous peak above the interpreter's own: what "
        "cannot be evicted, counting weights onnxruntime prepacked twice (file and anonymous copy), an "
        "upper bound. The in-place figure counts instead only the DRAM files onnxruntime still maps after "
        "the runs. decode_bound_tok_s: the device's DRAM bandwidth over the decoder weight bytes",
    }


def _drop_page_cache(files: dict[str, Path]) -> None:
    """Bundle files out of the page cache, so a cgroup run faults them in and is charged for them (a
    v1 memory cgroup charges a page to the group that first read it)."""
    for path in files.values():
        with contextlib.suppress(OSError):
            memory.fadvise_dontneed(path)


def run_profile(bundle: Path, options: ProfileOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Measure `bundle` in fresh processes and judge it against `options.device`. `progress(stage, n,
    total)` is called as runs finish: stages `warm`, `cold`, `enforced`, counted in runs (the load
    counts as one). Raises UserError for bad input before anything runs."""
    progress = progress or (lambda stage, n, total: None)
    options.validate()
    device = get_device(options.device)
    bundle = Path(bundle)
    manifest = manifest_mod.load(bundle)
    trusted_bundle(bundle, manifest, verify_hashes=options.verify)
    files = {f["path"]: bundle / f["path"] for f in manifest["files"]}
    if options.verify:  # hashing read every byte: residency must start from a cold cache again
        _drop_page_cache(files)
    ple_file = bundle / manifest["ple"].get("file", "ple_table.data")
    from runtime_harness.generate import context_length

    limit = context_length(manifest)
    positions = options.prompt_tokens + options.gen_tokens
    if limit is not None and positions > limit:
        raise UserError(
            f"--prompt-tokens + --gen-tokens ({positions}) exceeds the bundle's context of {limit} tokens"
        )
    budget = int(options.budget_mb * MIB) if options.budget_mb is not None else device.app_budget_bytes
    budget_source = "--budget-mb" if options.budget_mb is not None else f"{device.name} app_budget_mb"
    dram = sum(int(f["bytes"]) for f in manifest["files"] if f["placement"] == "dram")
    kv = kv_cache_bytes(manifest, positions)
    floor = dram + kv + RUNTIME_FLOOR_BYTES
    if options.enforce and budget < floor:
        raise UserError(
            f"a budget of {budget / MIB:.1f} MiB is below what this bundle can run in: decoder DRAM "
            f"{dram / MIB:.1f} MiB + KV cache {kv / MIB:.1f} MiB + {RUNTIME_FLOOR_BYTES // MIB} MiB for the "
            f"runtime = {floor / MIB:.1f} MiB"
        )
    if options.cold and memory.filesystem_type(ple_file) in memory.MEMORY_FILESYSTEMS:
        raise UserError(
            f"{ple_file}: on {memory.filesystem_type(ple_file)}, where the page cache is the file itself: "
            "cold mode cannot evict it; put the bundle on a disk-backed file system"
        )
    threads = options.threads or len(os.sched_getaffinity(0))
    vocab = int(manifest["generation"]["vocab_size"])
    prompt = [int(t) for t in np.random.default_rng(options.seed).integers(0, vocab, options.prompt_tokens)]
    base = {
        "bundle": str(bundle),
        "ple_file": str(ple_file),
        "files": {name: str(p) for name, p in files.items()},
        "prompt": prompt,
        "gen_tokens": options.gen_tokens,
        "runs": options.runs,
        "warmup": options.warmup,
        "threads": threads,
    }
    environment = _environment(bundle, threads)
    model = _model_info(bundle, manifest)
    notes = [RUNTIME_NOTE, HOST_NOTE]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ple-profile-") as tmp:
        workdir = Path(tmp)
        results["warm"] = _measure("warm", base, workdir, progress)[0] or {}
        if options.cold:
            results["cold"] = _measure("cold", base, workdir, progress)[0] or {}
        enforced, enforced_result = (
            _enforce(options, base, workdir, progress, files, budget, results["warm"], notes)
            if options.enforce
            else (None, None)
        )
        if enforced_result is not None:
            results["enforced"] = enforced_result

    warm = results["warm"]
    n_prompt, n_gen = options.prompt_tokens, options.gen_tokens
    summaries = {mode: _summarize(r, n_prompt, n_gen) for mode, r in results.items()}
    looked_up = warm["runs"][-1]["tokens"][:n_gen]  # each decode step reads the previous token's row
    ple = _ple_section(bundle, manifest, device, prompt, looked_up, warm, results.get("cold"))
    samples = [
        row
        for mode, r in results.items()
        for row in _llama_bench_samples(mode, r, model, n_prompt, n_gen, threads)
    ]
    environment["load_avg_1m_after"] = os.getloadavg()[0]
    load = max(environment["load_avg_1m"], environment["load_avg_1m_after"])
    if load > environment["n_cpus_usable"] + 1:
        notes.append(
            f"1-min load average reached {load:.1f} on {environment['n_cpus_usable']} CPUs: other "
            "processes competed for the cores; the timings are unreliable"
        )
    return {
        "schema": SCHEMA,
        "environment": environment,
        "model": model,
        "files": [{k: f[k] for k in ("path", "bytes", "placement", "role")} for f in manifest["files"]],
        "options": asdict(options),
        "runtime": {
            "embedder": {"intra_op_num_threads": 1, "session.intra_op.allow_spinning": "0"},
            "decoder": {"intra_op_num_threads": threads, "session.intra_op.allow_spinning": "0"},
            "graph_optimization": "all",
            "session_options": warm.get("session_options"),
            "note": RUNTIME_NOTE,
        },
        "device": device.to_dict(),
        "samples": samples,
        "results": summaries,
        "memory": {mode: _memory_of(r) for mode, r in results.items()},
        "ple": ple,
        "cold": _cold_section(results["cold"], summaries["warm"], summaries["cold"])
        if options.cold
        else None,
        "enforce": enforced,
        "verdict": _verdict(device, budget, budget_source, manifest, warm, summaries["warm"], ple),
        "notes": notes,
    }


def _memory_of(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "after_load": result.get("memory_after_load"),
        "after_runs": result.get("memory_after_runs"),
        "anonymous_peak_bytes": result.get("anonymous_peak_bytes"),
        "interpreter_anonymous_bytes": result.get("baseline_anonymous_bytes"),
        "rss_peak_bytes": result.get("rss_peak_bytes"),
    }


def _enforce(
    options: ProfileOptions,
    base: dict[str, Any],
    workdir: Path,
    progress: Progress,
    files: dict[str, Path],
    budget: int,
    warm: dict[str, Any],
    notes: list[str],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The enforced run: (its section of the report, its worker result unless it was killed). Where no
    cgroup can be made, one note and the measured residency compared with the budget instead."""
    try:
        group = MemoryCgroup.create(budget)
    except CgroupUnavailable as e:
        notes.append(f"budget not enforced ({e}); measured residency is compared with the budget instead")
        after = warm.get("memory_after_runs") or {}
        resident = int(after.get("anonymous_bytes", 0)) + int(after.get("bundle_file_backed_bytes", 0))
        return {
            "enforced": False,
            "reason": str(e),
            "limit_bytes": budget,
            "resident_bytes": resident,
            "outcome": "fits" if resident <= budget else "exceeds",
            "detail": f"not enforced: resident {resident / MIB:.1f} MiB vs budget {budget / MIB:.1f} MiB",
        }, None
    with group:
        _drop_page_cache(files)  # charged to the group when the child reads them again
        result, status, _ = _measure("enforced", base, workdir, progress, group)
        stats = group.stats().to_dict()
    warm_summary = _summarize(warm, options.prompt_tokens, options.gen_tokens)
    section = _enforced_section(
        status, result, stats, warm_summary, budget, options.prompt_tokens, options.gen_tokens
    )
    section["cgroup_path"] = str(group.path)
    section["cgroup_removed"] = group.removed
    return section, (result if section["outcome"] != "killed" else None)


# ---------------------------------------------------------------------------------------------------
# Reading a report: table, baseline comparison, plot


def _mib(n: float | None) -> str:
    """Bytes for people: B, KiB, MiB or GiB."""
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _num(x: float | None, fmt: str = ".1f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{fmt}}{unit}"


def render_table(report: dict[str, Any]) -> Table:
    """The report for people: one table, a section per topic."""
    from rich.table import Table

    env, verdict, ple = report["environment"], report["verdict"], report["ple"]
    table = Table(title=f"profile of {report['model']['model_filename']}", show_lines=False)
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row("model", report["model"]["model_type"], f"{_mib(report['model']['model_size'])} on disk")
    table.add_row(
        "host",
        f"{env['n_threads']} threads",
        f"{env['cpu_info']}, {env['n_cpus_usable']} CPUs, onnxruntime {env['onnxruntime_version']}",
    )
    table.add_row("runtime", "phone-like", "no spinning; lookup on 1 thread; decoder on the threads")
    for mode, res in report["results"].items():
        table.add_section()
        table.add_row(f"{mode}: load", _num(res["load_s"], ".3f", " s"), "fresh process")
        table.add_row(
            f"{mode}: TTFT",
            _num(res["ttft_ms"]["median"], ".2f", " ms"),
            f"p90 {_num(res['ttft_ms']['p90'], '.2f', ' ms')}; prefill of "
            f"{report['options']['prompt_tokens']} tokens + first token",
        )
        table.add_row(
            f"{mode}: prefill",
            _num(res["prefill_tok_s"]["median"], ".1f", " tok/s"),
            f"p90 {_num(res['prefill_tok_s']['p90'], '.1f', ' tok/s')}",
        )
        table.add_row(
            f"{mode}: decode",
            _num(res["decode_tok_s"]["median"], ".1f", " tok/s"),
            f"p90 {_num(res['decode_tok_s']['p90'], '.1f', ' tok/s')}; step "
            f"{_num(res['decode_step_ms']['median'], '.3f', ' ms')}, lookup "
            f"{_num(res['lookup_step_ms']['median'], '.3f', ' ms')}",
        )
    warm_mem = report["memory"]["warm"]["after_runs"] or {}
    table.add_section()
    table.add_row(
        "anonymous", _mib(warm_mem.get("anonymous_bytes")), "heap, KV cache, arena, prepacked weights"
    )
    table.add_row(
        "anonymous peak",
        _mib(verdict["anonymous_peak_bytes"]),
        f"above the interpreter's own {_mib(verdict['interpreter_anonymous_bytes'])}",
    )
    for name, entry in (warm_mem.get("file_backed_bytes") or {}).items():
        if entry["mapped_bytes"]:
            table.add_row(
                f"file-backed {name}", _mib(entry["rss_bytes"]), f"of {_mib(entry['mapped_bytes'])} mapped"
            )
    res = ple["residency_after_run"]
    table.add_row(
        "PLE residency",
        f"{res['fraction']:.1%}",
        f"{_mib(res['mapped_rss_bytes'])} of {_mib(res['file_bytes'])}",
    )
    logical = ple["logical"]
    table.add_section()
    table.add_row(
        "PLE per token (logical)",
        f"{logical['pages_per_token']['mean']:g} pages",
        f"{logical['bytes_per_token']} B of rows; pages of {logical['page_size']} B on the device",
    )
    table.add_row(
        "PLE this run (logical)",
        f"{logical['all']['pages']} pages",
        f"{logical['all']['distinct_rows']} distinct rows of {logical['all']['tokens']} tokens",
    )
    measured = ple["measured"]
    table.add_row(
        "PLE per row (host, warm)",
        _mib(measured["warm"]["mapped_bytes_per_distinct_row"]),
        "mapped Rss / distinct rows: host fault-around and folios",
    )
    if "cold" in measured:
        c = measured["cold"]
        table.add_row(
            "PLE per token (host, cold)",
            f"{_num(c['host_pages_per_decode_token'], '.2f')} pages",
            f"of {measured['host_page_size']} B, readahead off; "
            f"{_num(c['major_faults_per_decode_token'], '.2f')} major faults",
        )
    cold = report.get("cold")
    if cold:
        table.add_section()
        ev = cold["eviction"]
        table.add_row(
            "cold: eviction",
            ev["method"] or "n/a",
            f"page-cache pages {_num(ev['page_cache_pages_before_evict'], '.1f')} -> "
            f"{_num(ev['page_cache_pages_after_evict'], '.1f')}",
        )
        table.add_row(
            "cold: major faults",
            str(cold["major_faults_decode"]),
            f"in decode steps ({_num(cold['major_faults_per_decode_token'], '.2f')} per token); "
            f"{cold['major_faults_prefill']} in prefills",
        )
        table.add_row(
            "cold: added latency",
            _fmt_delta(cold["added_decode_step_ms"]),
            f"per decode step vs warm; TTFT {_fmt_delta(cold['added_ttft_ms'])}",
        )
    enforce = report.get("enforce")
    if enforce:
        table.add_section()
        table.add_row("enforced budget", enforce["outcome"], enforce["detail"])
        if enforce.get("enforced"):
            cg = enforce["cgroup"]
            table.add_row(
                "cgroup",
                _mib(cg["peak_bytes"]),
                f"peak of {_mib(cg['limit_bytes'])} (v{cg['version']}); limit hit {cg['limit_hits']}x, "
                f"{cg['major_faults']} major faults, {cg['oom_kills']} OOM kills",
            )
    table.add_section()
    flash = verdict["flash"]
    table.add_row(
        "verdict",
        "fits" if verdict["fits"] else "does NOT fit",
        f"{_mib(verdict['dram_resident_bytes'])} DRAM-resident (decoder files + anonymous peak) vs "
        f"{_mib(verdict['budget_bytes'])} ({verdict['budget_source']})",
    )
    table.add_row(
        "verdict, in place",
        "fits" if verdict["fits_in_place"] else "does NOT fit",
        f"{_mib(verdict['dram_resident_in_place_bytes'])}: anonymous peak + the "
        f"{_mib(verdict['dram_in_place_bytes'])} of DRAM files onnxruntime still maps",
    )
    table.add_row(
        "flash, decode",
        f"{flash['decode_us_per_token'] / 1e3:.3f} ms/token",
        f"{flash['decode_pages_per_token']:g} pages x {flash['page_read_us']:g} us"
        + (
            f"; {flash['decode_fraction_of_step']:.1%} of a step here"
            if flash["decode_fraction_of_step"]
            else ""
        ),
    )
    table.add_row(
        "flash, prefill",
        f"{flash['prefill_ms']:.2f} ms",
        f"{flash['prefill_pages']} pages for {flash['prefill_distinct_tokens']} distinct tokens"
        + (
            f"; {flash['prefill_fraction_of_ttft']:.1%} of TTFT here"
            if flash["prefill_fraction_of_ttft"]
            else ""
        ),
    )
    if verdict.get("decode_bound_tok_s"):
        table.add_row(
            "DRAM bound, decode",
            f"{verdict['decode_bound_tok_s']:.0f} tok/s",
            f"{report['device']['dram_bandwidth_gb_s']['value']:g} GB/s over the decoder weights",
        )
    for note in report["notes"]:
        table.add_row("note", "", note)
    return table


def load_report(path: Path) -> dict[str, Any]:
    """A saved `--json` report (e.g. a baseline); UserError if it is not one."""
    from exporter.jsonfile import read_json_object

    doc = read_json_object(Path(path))
    if doc.get("schema") != SCHEMA:
        raise UserError(f"{path}: not a ple-export profile report (schema {SCHEMA})")
    return doc


def _decode_tok_s(report: dict[str, Any]) -> float | None:
    try:
        value = report["results"]["warm"]["decode_tok_s"]["median"]
    except (KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) else None


def _dram_bytes(report: dict[str, Any]) -> float | None:
    try:
        value = report["verdict"]["dram_resident_bytes"]
    except (KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) else None


def compare_baseline(
    report: dict[str, Any], baseline: dict[str, Any] | Path, max_regression: float = 0.10
) -> list[str]:
    """Regressions of `report` against `baseline` beyond `max_regression` (a fraction): warm decode
    tok/s (lower is worse) and DRAM-resident bytes (higher is worse). Empty: no regression."""
    if not (0 <= max_regression < 10 and math.isfinite(max_regression)):
        raise UserError(f"--max-regression must be a fraction >= 0 (0.10 = 10%), got {max_regression}")
    if not isinstance(baseline, dict):
        baseline = load_report(baseline)
    regressions = []
    new, old = _decode_tok_s(report), _decode_tok_s(baseline)
    if new is None or old is None:
        raise UserError("the baseline or the report has no warm decode tok/s to compare")
    if old > 0 and new < old * (1 - max_regression):
        regressions.append(
            f"decode tok/s {old:.2f} -> {new:.2f} ({new / old - 1:+.1%}, tolerance -{max_regression:.0%})"
        )
    new, old = _dram_bytes(report), _dram_bytes(baseline)
    if new is None or old is None:
        raise UserError("the baseline or the report has no DRAM-resident bytes to compare")
    if old > 0 and new > old * (1 + max_regression):
        regressions.append(
            f"DRAM-resident {old / MIB:.2f} -> {new / MIB:.2f} MiB ({new / old - 1:+.1%}, "
            f"tolerance +{max_regression:.0%})"
        )
    return regressions


def plot(report: dict[str, Any], png_path: Path) -> None:
    """Memory breakdown (anonymous memory, file-backed memory per bundle file, the DRAM-resident total
    and the budget line) and per-step decode latency, as one PNG. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    import textwrap

    verdict = report["verdict"]
    mem = report["memory"]["warm"]["after_runs"] or {}
    placement = {f["path"]: f["placement"] for f in report.get("files", [])}
    bars = [
        ("anonymous\ninterpreter", verdict["interpreter_anonymous_bytes"], "tab:gray"),
        ("anonymous\nmodel (peak)", verdict["anonymous_peak_bytes"], "tab:red"),
    ]
    for name, entry in (mem.get("file_backed_bytes") or {}).items():
        if entry["mapped_bytes"]:
            color = "tab:blue" if placement.get(name) == "flash" else "tab:orange"
            bars.append((f"file-backed\n{name}", entry["rss_bytes"], color))
    labels, values, colors = zip(*[(lbl, v / MIB, c) for lbl, v, c in bars], strict=True)
    fig, (ax_mem, ax_lat) = plt.subplots(1, 2, figsize=(13, 5.5))
    ax_mem.bar(labels, values, color=colors)
    resident, budget = verdict["dram_resident_bytes"] / MIB, verdict["budget_bytes"] / MIB
    ax_mem.axhline(resident, color="black", linestyle=":", label=f"DRAM-resident {resident:.1f} MiB")
    in_place = verdict["dram_resident_in_place_bytes"] / MIB
    ax_mem.axhline(
        in_place, color="black", linestyle="-.", label=f"DRAM-resident, in place {in_place:.1f} MiB"
    )
    ax_mem.axhline(budget, color="green", linestyle="--", label=f"budget {budget:.0f} MiB")
    if budget > 20 * max(*values, resident):  # keep the budget line and the small bars both visible
        ax_mem.set_yscale("log")
    ax_mem.set_ylabel("MiB")
    ax_mem.set_title(f"memory after the warm run, vs {verdict['device']}", loc="left")
    ax_mem.tick_params(axis="x", labelsize=8)
    ax_mem.legend(fontsize=8, loc="upper left")
    for mode, res in report["results"].items():
        curve = res.get("step_ms_by_index") or []
        if curve:
            ax_lat.plot(range(1, len(curve) + 1), curve, marker=".", label=mode)
    ax_lat.set_xlabel("decode step")
    ax_lat.set_ylabel("ms (median over timed runs)")
    ax_lat.set_ylim(bottom=0)
    ax_lat.set_title("decode step latency (this host)")
    ax_lat.legend(fontsize=8)
    title = f"{report['model']['model_type']}: {verdict['summary']}"
    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(png_path, dpi=110)
    except OSError as e:
        from exporter.errors import os_error

        raise os_error(e, png_path) from None
    finally:
        plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m runtime_harness.profile --worker CONFIG.json (use `ple-export profile`)")
