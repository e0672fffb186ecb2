"""Where a process' memory lives, read from /proc, and the page-cache tools cold-flash runs need.

- `memory_split`: anonymous memory (heap, KV cache, onnxruntime's arena and prepacked weight copies)
  vs file-backed memory per bundle file (Rss of the mappings whose path is that file).
- `page_cache_pages`: how much of a file is in the page cache, by `mincore` on a mapping of our own
  (mapping a file does not read it; the mapping is gone before anyone looks at smaps again).
- `evict`: drop a file's pages from this process' mappings (`MADV_PAGEOUT`, or `MADV_DONTNEED` on a
  clean mapping) and from the page cache (`POSIX_FADV_DONTNEED`), so the next lookup faults from disk.
  fadvise alone cannot drop a page some mapping still maps, and onnxruntime maps the PLE table.
- `advise_random`: `MADV_RANDOM` on this process' mappings of a file: a fault then reads the faulting
  page only, without the kernel's read-around (this host reads up to `read_ahead_kb` per fault).

Linux only. Everything here is about the calling process (`/proc/self`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")
MADV_RANDOM, MADV_DONTNEED, MADV_PAGEOUT = 1, 4, 21
_PROT_READ, _MAP_SHARED = 1, 1
_MAP_FAILED = ctypes.c_void_p(-1).value


@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    path: str  # "" for anonymous mappings; "[heap]", "[stack]"... for special ones
    fields: dict[str, int] = field(default_factory=dict)  # smaps fields in bytes (Rss, Anonymous...)
    offset: int = 0  # where in the file the mapping starts


@dataclass(frozen=True)
class FileMemory:
    """One file's share of this process' memory, each page counted once however often it is mapped."""

    rss_bytes: int  # pages of the file mapped and present in some mapping
    mapped_bytes: int  # bytes of the file covered by some mapping
    anonymous_bytes: int  # private (copy-on-write) copies in its mappings: 0 when read in place


def smaps(path: str = "/proc/self/smaps") -> list[Mapping]:
    """Every mapping of the process with its smaps fields (kB converted to bytes)."""
    mappings: list[Mapping] = []
    with open(path) as f:
        for line in f:
            head, _, rest = line.partition(" ")
            if head.endswith(":"):  # a field of the current mapping
                if mappings:
                    parts = rest.split()
                    if parts and parts[0].isdigit():
                        unit = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
                        mappings[-1].fields[head[:-1]] = int(parts[0]) * unit
                continue
            parts = line.rstrip("\n").split(None, 5)  # start-end perms offset dev inode [path]
            lo, _, hi = parts[0].partition("-")
            name = parts[5].strip() if len(parts) == 6 else ""
            mappings.append(
                Mapping(
                    int(lo, 16),
                    int(hi, 16),
                    parts[1],
                    name.removesuffix(" (deleted)"),
                    offset=int(parts[2], 16),
                )
            )
    return mappings


def _kv_file(path: str) -> dict[str, int]:
    """`Key: value [kB]` lines of a /proc file, values in bytes where a unit is given."""
    out = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def rollup() -> dict[str, int]:
    """/proc/self/smaps_rollup: the process' totals (Rss, Anonymous, Pss_File...), in bytes."""
    return _kv_file("/proc/self/smaps_rollup")


def anonymous_bytes() -> int:
    return rollup().get("Anonymous", 0)


def status() -> dict[str, int]:
    """/proc/self/status sizes (VmRSS, VmHWM, RssAnon, RssFile...) in bytes."""
    return {k: v for k, v in _kv_file("/proc/self/status").items() if k.startswith(("Vm", "Rss"))}


def io_read_bytes() -> int:
    """Bytes this process caused to be read from storage (readahead included); -1 if not available."""
    try:
        return _kv_file("/proc/self/io").get("read_bytes", -1)
    except OSError:
        return -1


def major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def _present(start: int, end: int) -> np.ndarray:
    """Which pages of [start, end) are mapped and present in RAM (/proc/self/pagemap bit 63)."""
    n = (end - start) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        entries = np.frombuffer(os.pread(f.fileno(), n * 8, start // PAGE * 8), dtype="<u8")
    return (entries >> np.uint64(63)).astype(bool)


def file_memory(mappings: list[Mapping], size: int) -> FileMemory:
    """A file's resident and mapped bytes over the union of its mappings (two mappings of the same
    part of the file count its pages once), never more than the file."""
    pages = -(-size // PAGE)
    mapped = np.zeros(pages, dtype=bool)
    resident = np.zeros(pages, dtype=bool)
    anonymous = 0
    for m in mappings:
        first = m.offset // PAGE
        count = min((m.end - m.start) // PAGE, max(pages - first, 0))
        if count <= 0:
            continue
        mapped[first : first + count] = True
        try:
            resident[first : first + count] |= _present(m.start, m.start + count * PAGE)
        except OSError:  # no pagemap: fall back to the mapping's own Rss, as a count of its first pages
            resident[first : first + min(count, m.fields.get("Rss", 0) // PAGE)] = True
        anonymous += m.fields.get("Anonymous", 0)
    return FileMemory(
        rss_bytes=min(int(resident.sum()) * PAGE, size),
        mapped_bytes=min(int(mapped.sum()) * PAGE, size),
        anonymous_bytes=anonymous,
    )


@dataclass(frozen=True)
class MemorySplit:
    """Resident memory by where it lives."""

    anonymous_bytes: int
    files: dict[str, FileMemory]  # bundle files by manifest path
    other_file_backed_bytes: int  # the interpreter, shared libraries
    rss_bytes: int
    rss_peak_bytes: int

    @property
    def bundle_file_backed_bytes(self) -> int:
        return sum(f.rss_bytes for f in self.files.values())


def memory_split(files: dict[str, Path]) -> MemorySplit:
    """Resident memory by where it lives: anonymous vs file-backed per bundle file (`files`: manifest
    path -> file on disk) vs other files (the interpreter, shared libraries)."""
    real = {os.path.realpath(p): name for name, p in files.items()}
    by_file: dict[str, list[Mapping]] = {name: [] for name in files}
    other_file = 0
    for m in smaps():
        if m.path in real:
            by_file[real[m.path]].append(m)
        elif m.path.startswith("/"):
            other_file += m.fields.get("Rss", 0)
    totals = rollup()
    return MemorySplit(
        anonymous_bytes=totals.get("Anonymous", 0),
        files={name: file_memory(maps, os.path.getsize(files[name])) for name, maps in by_file.items()},
        other_file_backed_bytes=other_file,
        rss_bytes=totals.get("Rss", 0),
        rss_peak_bytes=status().get("VmHWM", 0),
    )


def mapped_rss(path: Path) -> int:
    """Resident bytes of this process' mappings of `path`, each page of the file counted once."""
    return file_memory(_own_mappings(path), os.path.getsize(path)).rss_bytes


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = libc
    return _libc


def _mincore(path: Path) -> bytes:
    """One byte per host page of `path`, bit 0 set where the page is in the page cache."""
    size = os.path.getsize(path)
    if size == 0:
        return b""
    c = _c()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = c.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr is None or addr == _MAP_FAILED:
        raise OSError(ctypes.get_errno(), "mmap failed", str(path))
    try:
        vec = (ctypes.c_ubyte * -(-size // PAGE))()
        if c.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed", str(path))
        return bytes(vec)
    finally:
        c.munmap(addr, size)


def page_cache_pages(path: Path) -> tuple[int, int]:
    """(host pages of `path` in the page cache, host pages of the file)."""
    vec = _mincore(path)
    return sum(v & 1 for v in vec), len(vec)


def _own_mappings(path: Path) -> list[Mapping]:
    real = os.path.realpath(path)
    return [m for m in smaps() if m.path == real]


def advise_random(path: Path) -> int:
    """`MADV_RANDOM` on this process' mappings of `path`; returns how many mappings were advised."""
    c = _c()
    advised = 0
    for m in _own_mappings(path):
        if c.madvise(m.start, m.end - m.start, MADV_RANDOM) == 0:
            advised += 1
    return advised


def fadvise_dontneed(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Files out of the page cache (where no mapping holds them), so the next reader faults them in
    from storage: every measured run starts from the same state."""
    for path in paths:
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                fadvise_dontneed(path)


def evict(path: Path) -> dict[str, int | str]:
    """Drop `path` from this process' mappings and from the page cache; returns page-cache pages
    before and after and the method that worked.

    `MADV_PAGEOUT` (Linux 5.4+) reclaims the pages of our mappings without changing their contents.
    Where it is refused, `MADV_DONTNEED` is used, but only on mappings holding no private (anonymous)
    pages: on a clean file mapping it just unmaps, and the next access maps the file's page again."""
    before, _ = page_cache_pages(path)
    c = _c()
    method = "fadvise"
    mappings = _own_mappings(path)
    if mappings:
        method = "pageout+fadvise"
        for m in mappings:
            if c.madvise(m.start, m.end - m.start, MADV_PAGEOUT) != 0:
                method = "dontneed+fadvise"
                if m.fields.get("Anonymous", 0) == 0:
                    c.madvise(m.start, m.end - m.start, MADV_DONTNEED)
    fadvise_dontneed(path)
    after, _ = page_cache_pages(path)
    return {"before_pages": before, "after_pages": after, "method": method}


def filesystem_type(path: Path) -> str:
    """The file system type of the mount holding `path` (from /proc/self/mountinfo), e.g. ext4, tmpfs."""
    real = os.path.realpath(path)
    best, fstype = "", "unknown"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            mount_point = fields[4].encode().decode("unicode_escape") if len(fields) > 4 else ""
            inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, fstype = mount_point, right.split()[0]
    return fstype


def read_ahead_kb(path: Path) -> int | None:
    """The read-ahead window of the block device holding `path` (what one fault may read here)."""
    dev = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for queue in (base / "queue", base / ".." / "queue"):  # a disk, or a partition of one
        try:
            return int((queue / "read_ahead_kb").read_text())
        except (OSError, ValueError):
            continue
    return None


# Page-cache eviction is a no-op where the page cache is the file itself.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs", "devtmpfs"})
