"""A memory cgroup that holds one child process to a phone's app budget.

Under the limit the kernel does what a phone does: it reclaims clean file-backed pages (the mmapped
PLE table, mapped weights) and reads them again on the next touch (major faults), and when anonymous
memory alone exceeds the limit it kills the process (OOM, SIGKILL). There is no swap here, as on a
phone without zram.

cgroup v2 (`memory.max`) is used where a writable v2 hierarchy with the memory controller exists;
otherwise cgroup v1 (`memory.limit_in_bytes` under the v1 memory mount). The group is created inside
the caller's own memory cgroup, so the caller's limits still apply, and removed afterwards (also on
Ctrl-C: use it as a context manager). Needs root (or a delegated hierarchy).

    with MemoryCgroup.create(limit_bytes) as group:
        proc = subprocess.Popen(group.wrap(argv))
        ...
        stats = group.stats()
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "ple-profile-"
# The child joins the group before exec, so everything it maps or allocates is charged there.
_JOIN = 'echo $$ > "$1" && shift && exec "$@"'


class CgroupUnavailable(Exception):
    """No memory cgroup can be made here; the message says why in one line."""


@dataclass
class CgroupStats:
    version: int
    limit_bytes: int
    peak_bytes: int | None  # v1 memory.max_usage_in_bytes, v2 memory.peak (None if the kernel lacks it)
    limit_hits: int  # v1 memory.failcnt, v2 memory.events "max": how often usage hit the limit
    oom_kills: int
    major_faults: int  # memory.stat pgmajfault of the group
    stat: dict[str, int] = field(default_factory=dict)  # the memory.stat figures worth keeping


_STAT_KEYS = ("cache", "rss", "mapped_file", "file", "anon", "file_mapped", "pgmajfault", "pgfault")


def _kept(stat: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stat.items() if k in _STAT_KEYS}


def _read_kv(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of the cgroup mounts."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, opts = (right.split() + ["", "", ""])[:3]
            if fstype in ("cgroup", "cgroup2"):
                found.append((left.split()[4], fstype, opts))
    return found


def _own_cgroup(controller: str | None) -> str:
    """The caller's cgroup path: v1 for `controller`, or v2 (`controller=None`)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            names = controllers.split(",") if controllers else []
            if (controller is None and not controllers) or (controller in names):
                return path
    return "/"


def _remove_stale(parent: Path) -> None:
    """Groups left by a run that was SIGKILLed: empty, named after a process that is gone."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            if not entry.name.startswith(PREFIX):
                continue
            pid = entry.name.removeprefix(PREFIX).split("-")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    entry.rmdir()


class MemoryCgroup:
    def __init__(self, path: Path, version: int, limit_bytes: int):
        self.path, self.version, self.limit_bytes = path, version, limit_bytes
        self.removed = False

    @classmethod
    def create(cls, limit_bytes: int) -> MemoryCgroup:
        """A fresh group limited to `limit_bytes`, or CgroupUnavailable saying why not."""
        reasons = []
        for make in (cls._create_v2, cls._create_v1):
            try:
                return make(limit_bytes)
            except CgroupUnavailable as e:
                reasons.append(str(e))
        raise CgroupUnavailable("; ".join(reasons))

    @classmethod
    def _name(cls) -> str:
        return f"{PREFIX}{os.getpid()}-{time.monotonic_ns() % 10**9}"

    @classmethod
    def _create_v2(cls, limit_bytes: int) -> MemoryCgroup:
        mounts = [m for m in _mounts() if m[1] == "cgroup2"]
        usable = [m for m in mounts if "memory" in _controllers(Path(m[0]))]
        if not usable:
            raise CgroupUnavailable("cgroup v2: no hierarchy with the memory controller")
        root = Path(usable[0][0])
        parent = root / _own_cgroup(None).lstrip("/")
        if "memory" not in _controllers(parent):
            raise CgroupUnavailable(f"cgroup v2: memory controller not delegated to {parent}")
        _remove_stale(parent)
        path = parent / cls._name()
        try:
            path.mkdir()
        except OSError as e:
            raise CgroupUnavailable(f"cgroup v2: cannot create a group in {parent} ({e.strerror})") from None
        group = cls(path, 2, limit_bytes)
        try:
            if "memory" not in _controllers(path):  # enable it for children of our group
                (parent / "cgroup.subtree_control").write_text("+memory")
            (path / "memory.max").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):
                (path / "memory.swap.max").write_text("0")
        except OSError as e:
            group.remove()
            raise CgroupUnavailable(f"cgroup v2: cannot set memory.max in {path} ({e.strerror})") from None
        return group

    @classmethod
    def _create_v1(cls, limit_bytes: int) -> MemoryCgroup:
        mounts = [m for m in _mounts() if m[1] == "cgroup" and "memory" in m[2].split(",")]
        if not mounts:
            raise CgroupUnavailable("cgroup v1: the memory controller is not mounted")
        parent = Path(mounts[0][0]) / _own_cgroup("memory").lstrip("/")
        _remove_stale(parent)
        path = parent / cls._name()
        try:
            path.mkdir()
        except OSError as e:
            raise CgroupUnavailable(f"cgroup v1: cannot create a group in {parent} ({e.strerror})") from None
        group = cls(path, 1, limit_bytes)
        try:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):  # no swap accounting: nothing to limit
                (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        except OSError as e:
            group.remove()
            raise CgroupUnavailable(
                f"cgroup v1: cannot set memory.limit_in_bytes in {path} ({e.strerror})"
            ) from None
        return group

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run by a shell that first moves itself into the group, then execs it."""
        return ["/bin/sh", "-c", _JOIN, "sh", str(self.path / "cgroup.procs"), *argv]

    def stats(self) -> CgroupStats:
        p = self.path
        stat = _read_kv(p / "memory.stat")
        if self.version == 1:
            oom = _read_kv(p / "memory.oom_control")
            return CgroupStats(
                version=1,
                limit_bytes=self.limit_bytes,
                peak_bytes=int((p / "memory.max_usage_in_bytes").read_text()),
                limit_hits=int((p / "memory.failcnt").read_text()),
                oom_kills=oom.get("oom_kill", 0),
                major_faults=stat.get("total_pgmajfault", stat.get("pgmajfault", 0)),
                stat=_kept(stat),
            )
        events = _read_kv(p / "memory.events")
        peak = p / "memory.peak"
        return CgroupStats(
            version=2,
            limit_bytes=self.limit_bytes,
            peak_bytes=int(peak.read_text()) if peak.exists() else None,
            limit_hits=events.get("max", 0),
            oom_kills=events.get("oom_kill", 0),
            major_faults=stat.get("pgmajfault", 0),
            stat=_kept(stat),
        )

    def remove(self, timeout_s: float = 5.0) -> bool:
        """rmdir the group, retried while its last task is being reaped; False if it is still there
        (a task outlived the wait: the next run removes it once that process is gone)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    return False
                time.sleep(0.05)

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.removed = self.remove()


def _controllers(path: Path) -> list[str]:
    try:
        return (path / "cgroup.controllers").read_text().split()
    except OSError:
        return []
