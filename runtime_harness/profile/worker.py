"""The measured child of `profile`: load the bundle, warm up, run the one decode loop with a probe on
every forward call, and write what it saw after every phase (so a run the budget killed still says
how far it got). The parent reads it back with `WorkerResult.read`.

    python -m runtime_harness.profile.worker CONFIG.json

Modes: `warm`; `cold` (the PLE table evicted before every call, readahead off on its mapping, so
each lookup faults from disk); `enforced` (the warm run, started inside a memory cgroup).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ple_export.errors import UserError
from runtime_harness.measure import memory
from runtime_harness.measure.memory import FileMemory, MemorySplit


@dataclass(frozen=True)
class WorkerConfig:
    mode: str  # warm | cold | enforced
    bundle: str
    ple_file: str
    files: dict[str, str]  # manifest path -> path on disk
    prompt: list[int]
    gen_tokens: int
    runs: int
    warmup: int
    threads: int
    result: str  # where the worker writes its result
    prefill_chunk: int = 0  # prompt tokens per prefill call (0: one call)

    @property
    def cold(self) -> bool:
        return self.mode == "cold"


@dataclass
class Call:
    """One forward call: the prefill, or a decode step."""

    s: float  # forward + pick
    lookup_s: float  # the PLE lookup's share
    major_faults: int
    read_bytes: int | None  # bytes read from storage (readahead included)
    evicted: dict[str, Any] | None = None  # cold: how the table was evicted before the call
    ple_pages_after: int | None = None  # cold: page-cache pages of the table after the call


@dataclass
class Run:
    warmup: bool
    prefill: Call  # the prompt's forward and the first pick: time to first token
    steps: list[Call]
    tokens: list[int]
    prefill_s: float  # the prompt's forward alone


@dataclass
class WorkerResult:
    mode: str
    phase: str = "load"  # load | runs | done
    complete: bool = False
    runs: list[Run] = field(default_factory=list)
    baseline_anonymous_bytes: int = 0  # the interpreter's own, before any session
    page_cache_pages_before_load: int = 0
    load_s: float | None = None
    session_options: dict[str, Any] = field(default_factory=dict)
    memory_after_load: MemorySplit | None = None
    memory_after_runs: MemorySplit | None = None
    ple_mapped_rss_after_load: int = 0
    ple_mapped_rss_after_runs: int = 0
    page_cache_pages_after_load: int = 0
    page_cache_pages_after_runs: int = 0
    madv_random_mappings: int = 0
    anonymous_peak_bytes: int = 0
    rss_peak_bytes: int = 0
    error: str | None = None

    @property
    def timed(self) -> list[Run]:
        return [r for r in self.runs if not r.warmup]

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> WorkerResult | None:
        """What a worker wrote, or None if it wrote nothing (it died before)."""
        if not path.exists():
            return None
        doc = json.loads(path.read_text())

        def split(d: dict[str, Any] | None) -> MemorySplit | None:
            if d is None:
                return None
            return MemorySplit(**(d | {"files": {n: FileMemory(**f) for n, f in d["files"].items()}}))

        def run(d: dict[str, Any]) -> Run:
            return Run(
                d["warmup"],
                Call(**d["prefill"]),
                [Call(**s) for s in d["steps"]],
                d["tokens"],
                d["prefill_s"],
            )

        return cls(
            **doc
            | {
                "runs": [run(r) for r in doc["runs"]],
                "memory_after_load": split(doc["memory_after_load"]),
                "memory_after_runs": split(doc["memory_after_runs"]),
            }
        )


def _emit(stage: str, n: int, total: int) -> None:
    """A progress event for the parent, on stdout."""
    print(json.dumps({"stage": stage, "n": n, "total": total}), flush=True)


class _Probe:
    """The loop's step hook: evicts the table before a call (cold), records each call after it."""

    def __init__(self, session: Any, config: WorkerConfig, result: WorkerResult):
        self.session, self.config, self.result = session, config, result
        self.ple = Path(config.ple_file)
        self.calls: list[Call] = []

    def before(self, step: int) -> None:
        self.evicted = memory.evict(self.ple) if self.config.cold else None
        self.session.lookup_seconds = 0.0
        self.faults, self.read = memory.major_faults(), memory.io_read_bytes()

    def after(self, step: int, seconds: float, logits: np.ndarray) -> None:
        call = Call(
            s=seconds,
            lookup_s=self.session.lookup_seconds,
            major_faults=memory.major_faults() - self.faults,
            read_bytes=memory.io_read_bytes() - self.read if self.read >= 0 else None,
        )
        if self.config.cold:
            call.evicted = dict(self.evicted) if self.evicted else None
            call.ple_pages_after = memory.page_cache_pages(self.ple)[0]
        self.calls.append(call)
        self.result.anonymous_peak_bytes = max(self.result.anonymous_peak_bytes, memory.anonymous_bytes())


def work(config: WorkerConfig) -> WorkerResult:
    import onnx  # noqa: F401  imported by the session's trust check: part of the baseline, not the model

    from runtime_harness import loop
    from runtime_harness.session import BundleSession

    out = Path(config.result)
    files = {name: Path(p) for name, p in config.files.items()}
    ple = Path(config.ple_file)
    result = WorkerResult(config.mode)
    result.baseline_anonymous_bytes = memory.anonymous_bytes()
    result.page_cache_pages_before_load = memory.page_cache_pages(ple)[0]
    result.write(out)

    t0 = time.perf_counter()
    session = BundleSession(
        Path(config.bundle), threads=config.threads, check=False, allow_spinning=False, embedder_threads=1
    )
    result.load_s = time.perf_counter() - t0
    result.session_options = dict(session.options)
    result.memory_after_load = memory.memory_split(files)
    result.ple_mapped_rss_after_load = memory.mapped_rss(ple)
    result.page_cache_pages_after_load = memory.page_cache_pages(ple)[0]
    if config.cold:  # BundleSession advised MADV_RANDOM: a fault reads its page, not a read-around window
        result.madv_random_mappings = session.ple_advised
    result.anonymous_peak_bytes = memory.anonymous_bytes()
    result.phase = "runs"
    result.write(out)
    total = 1 + config.warmup + config.runs
    _emit(config.mode, 1, total)

    for i in range(config.warmup + config.runs):
        probe = _Probe(session, config, result)
        gen = loop.generate(
            session,
            config.prompt,
            config.gen_tokens + 1,
            stop_at_eos=False,
            hook=probe,
            prefill_chunk=config.prefill_chunk,
        )
        result.runs.append(
            Run(i < config.warmup, probe.calls[0], probe.calls[1:], gen.tokens, gen.prefill_seconds)
        )
        result.write(out)
        _emit(config.mode, 1, total)

    result.memory_after_runs = memory.memory_split(files)
    result.ple_mapped_rss_after_runs = memory.mapped_rss(ple)
    result.page_cache_pages_after_runs = memory.page_cache_pages(ple)[0]
    result.rss_peak_bytes = memory.status().get("VmHWM", 0)
    result.phase, result.complete = "done", True
    result.write(out)
    return result


def main(argv: list[str]) -> int:
    config = WorkerConfig(**json.loads(Path(argv[0]).read_text()))
    try:
        work(config)
    except UserError as e:
        failed = WorkerResult.read(Path(config.result)) or WorkerResult(config.mode)
        failed.error = str(e)
        failed.write(Path(config.result))
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m runtime_harness.profile.worker CONFIG.json (use `ple-export profile`)")
    sys.exit(main(sys.argv[1:]))
