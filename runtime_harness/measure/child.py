"""A measured child process: `profile`'s workers and the benchmarks' engines each run in one.

    record = run_measured(argv, stderr=log, on_line=progress)

The command runs under a slim middleman (`python -S -E` this file: the standard library only), which
samples the child's /proc/PID/status every `sample_s` (RssAnon, RssFile, VmRSS peaks), reaps it with
wait4 (its ru_maxrss) and enforces the time bound. The middleman exists because Linux carries the
forking process' RSS high-water mark into a child's ru_maxrss across exec: forked straight from a
parent with numpy, onnx or torch loaded, every child would report at least the parent's peak.

The child's stdout comes back line by line (`on_line`: progress events), its stderr goes to a file.
Ctrl-C or an error in the parent kills the middleman's whole process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile")


@dataclass(frozen=True)
class ChildRecord:
    """How a measured child ended and what it peaked at (bytes)."""

    status: int  # os.waitstatus_to_exitcode: the exit code, or -signal
    wall_s: float
    peak_rss_bytes: int  # ru_maxrss from wait4
    sampled_peak_bytes: dict[str, int] = field(default_factory=dict)  # VmRSS/RssAnon/RssFile maxima
    timed_out: bool = False

    @property
    def killed_by(self) -> signal.Signals | None:
        return signal.Signals(-self.status) if self.status < 0 else None


def read_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of a process, bytes ({} once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in STATUS_KEYS:
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def _middleman(job: dict[str, Any]) -> dict[str, Any]:
    """In the slim process: run the command, sample it, reap it."""
    peaks = dict.fromkeys(STATUS_KEYS, 0)
    argv: list[str] = [str(a) for a in job["argv"]]
    env: dict[str, str] = dict(job["env"])
    cwd: str | None = job["cwd"]
    with open(str(job["stderr"]), "ab") as stderr:
        t0 = time.perf_counter()
        # the child's stdout is the middleman's own: the parent reads it
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stderr=stderr)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for key, value in read_status(proc.pid).items():
                    peaks[key] = max(peaks[key], value)
                stop.wait(float(job["sample_s"]))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(float(job["timeout_s"]), expire)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return asdict(ChildRecord(proc.returncode, wall, usage.ru_maxrss * 1024, peaks, timed_out.is_set()))


def run_measured(
    argv: Sequence[str | os.PathLike[str]],
    stderr: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    sample_s: float = 0.02,
    timeout_s: float = 3600.0,
) -> ChildRecord:
    """Run `argv` as a measured child; its stdout lines go to `on_line`, its stderr to `stderr`."""
    with tempfile.TemporaryDirectory(prefix="ple-measure-") as tmp:
        job_path, record_path = Path(tmp) / "job.json", Path(tmp) / "record.json"
        job = {
            "argv": [str(a) for a in argv],
            "env": env if env is not None else dict(os.environ),
            "cwd": str(cwd) if cwd is not None else None,
            "stderr": str(stderr),
            "sample_s": sample_s,
            "timeout_s": timeout_s,
            "record": str(record_path),
        }
        job_path.write_text(json.dumps(job))
        proc = subprocess.Popen(
            [sys.executable, "-S", "-E", __file__, str(job_path)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: killed as one below
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if on_line is not None:
                    on_line(line)
            proc.wait()
        finally:
            if proc.poll() is None:  # Ctrl-C or an error here: the middleman and its child go too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.returncode != 0 or not record_path.exists():
            raise RuntimeError(f"the measuring process failed (exit status {proc.returncode})")
        record = json.loads(record_path.read_text())
    return ChildRecord(**record)


if __name__ == "__main__":
    _job = json.loads(Path(sys.argv[1]).read_text())
    Path(str(_job["record"])).write_text(json.dumps(_middleman(_job)))
