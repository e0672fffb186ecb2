"""A small safetensors reader/writer that never memory-maps.

Reading a multi-GB checkpoint through mmap makes every touched page count towards RSS; here data
is read with `os.preadv` into buffers the caller sizes (row chunks), so peak RSS stays near the
largest chunk. Files interoperate with the official `safetensors` package both ways.

Format: u64 little-endian header size N, N bytes of JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}` (offsets
relative to the first byte after the header), then the data. Little-endian hosts only.

Checkpoint folders hold `model.safetensors` (preferred when present, as transformers does) or
`model.safetensors.index.json` plus the shards it names. Tensors found in a named shard but absent
from the index's `weight_map` are included; a tensor name present in two shards is an error; shard
files the index does not name are ignored.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from exporter.errors import UserError
from exporter.jsonfile import read_json_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_MAX_HEADER_BYTES = 100 << 20  # the official library's limit

# safetensors dtype code -> numpy dtype of the raw data (little-endian).
# Every dtype the format defines, for validating headers (a multimodal checkpoint may hold tensors we
# never read); `DTYPES` below are the ones we can read.
ITEMSIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
DTYPES: dict[str, np.dtype[Any]] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the data in `path`
    nbytes: int

    @property
    def itemsize(self) -> int:
        return ITEMSIZES[self.dtype]

    @property
    def num_rows(self) -> int:
        """Length of dim 0 (a 0-d tensor counts as one row)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.itemsize


# ---- reading -------------------------------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Validate one safetensors file's header against its size; tensors in data-offset order."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb", buffering=0) as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise UserError(
                    f"{path}: header size {n} is larger than the file ({size} bytes): truncated or "
                    "not a safetensors file"
                )
            if n > _MAX_HEADER_BYTES:
                raise UserError(f"{path}: header size {n} exceeds 100 MiB: not a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: header is not a JSON object")

    data_start = 8 + n
    infos: list[tuple[int, TensorInfo]] = []
    max_end, max_name = 0, ""
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise UserError(f"{where}: header entry has no 'dtype' string")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise UserError(f"{where}: 'shape' is not a list of non-negative integers ({shape!r})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise UserError(f"{where}: 'data_offsets' is not a pair of integers ({offsets!r})")
        if dtype not in ITEMSIZES:
            raise UserError(f"{where} has unknown dtype {dtype}")
        begin, end = offsets
        need = math.prod(shape) * ITEMSIZES[dtype]
        if not 0 <= begin <= end or end - begin != need:
            raise UserError(
                f"{where}: data_offsets [{begin}, {end}] inconsistent with dtype {dtype} and shape "
                f"{shape} ({need} bytes)"
            )
        if end > max_end:
            max_end, max_name = end, name
        infos.append((begin, TensorInfo(name, dtype, tuple(shape), path, data_start + begin, need)))
    if data_start + max_end > size:
        raise UserError(
            f"{path}: truncated: file is {size} bytes but tensor {max_name} ends at byte "
            f"{data_start + max_end}"
        )
    infos.sort(key=lambda t: t[0])
    return {info.name: info for _, info in infos}


def open_checkpoint(folder: Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint folder (single file or sharded), headers validated."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a directory")
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.is_file():
        return read_header(single)
    if index.is_file():
        return _open_sharded(folder, index)
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
    raise UserError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _open_sharded(folder: Path, index: Path) -> dict[str, TensorInfo]:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index}: no 'weight_map' object mapping tensor names to shard files")
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    out: dict[str, TensorInfo] = {}
    for shard in sorted(by_shard):
        names = by_shard[shard]
        rel = Path(shard)
        if rel.is_absolute() or ".." in rel.parts:
            raise UserError(
                f"{index}: shard path {shard!r} (for tensor {names[0]}) must stay inside {folder}"
            )
        path = folder / rel
        if not path.is_file():
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise UserError(f"{index}: shard {shard} is missing (it should hold tensor {names[0]}{more})")
        tensors = read_header(path)
        for name in names:
            if name not in tensors:
                raise UserError(f"{path}: tensor {name} is listed in {INDEX_FILE} but not in this shard")
        for name, info in tensors.items():
            if name in out:
                raise UserError(f"tensor {name} appears in two shards: {out[name].path.name} and {shard}")
            out[name] = info
    return out


def _check_range(info: TensorInfo, start: int, stop: int) -> None:
    if not 0 <= start <= stop <= info.num_rows:
        raise ValueError(f"rows [{start}, {stop}) out of range for {info.name} with {info.num_rows} rows")


def _pread_into(info: TensorInfo, fd: int, offset: int, buf: memoryview) -> None:
    pos, total = 0, len(buf)
    while pos < total:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [buf[pos:]], offset + pos)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, min(total - pos, 1 << 30), offset + pos)
            got = len(data)
            buf[pos:pos + got] = data
        if got == 0:
            raise UserError(f"{info.path}: truncated while reading tensor {info.name}")
        pos += got


def _open_fd(info: TensorInfo) -> int:
    try:
        return os.open(info.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise UserError(f"{info.path}: cannot open to read tensor {info.name} ({e.strerror or e})") from None


def read_rows(info: TensorInfo, start: int, stop: int, out_dtype: str = "float32") -> np.ndarray:
    """Rows [start, stop) along dim 0 (elements for 1-D tensors), read with pread.

    `out_dtype="float32"` converts (bf16 exactly via a 16-bit shift); `"raw"` returns the stored
    dtype (BF16 as `ml_dtypes.bfloat16`). Shape is `(stop - start, *shape[1:])`.
    """
    if out_dtype not in ("float32", "raw"):
        raise ValueError(f"out_dtype must be 'float32' or 'raw', got {out_dtype!r}")
    _check_range(info, start, stop)
    if info.dtype not in DTYPES:
        raise UserError(
            f"{info.path}: tensor {info.name} has dtype {info.dtype}; only {', '.join(DTYPES)} can be read"
        )
    raw_dtype = DTYPES[info.dtype]
    count = (stop - start) * math.prod(info.shape[1:])
    raw = np.empty(count, dtype=raw_dtype)
    if count:
        fd = _open_fd(info)
        try:
            _pread_into(info, fd, info.offset + start * info.row_bytes, raw.view(np.uint8).data)
        finally:
            os.close(fd)
    raw = raw.reshape((stop - start, *info.shape[1:]))
    if out_dtype == "raw":
        return raw
    if info.dtype == "BF16":
        bits = raw.view(np.uint16).astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    return raw.astype(np.float32, copy=False)


def read_tensor(info: TensorInfo, out_dtype: str = "float32") -> np.ndarray:
    """The whole tensor, shaped as stored."""
    return read_rows(info, 0, info.num_rows, out_dtype).reshape(info.shape)


def iter_row_chunks(info: TensorInfo, max_bytes: int = 64 << 20) -> Iterator[tuple[int, int]]:
    """Row ranges [start, stop) covering the tensor, each at most `max_bytes` raw (at least one row)."""
    rows = max(1, max_bytes // info.row_bytes) if info.row_bytes else info.num_rows or 1
    for start in range(0, info.num_rows, rows):
        yield start, min(start + rows, info.num_rows)


def copy_raw(info: TensorInfo, dst: BinaryIO, chunk_bytes: int = 64 << 20) -> None:
    """Stream the tensor's raw bytes into `dst` at its current position."""
    if not info.nbytes:
        return
    buf = memoryview(bytearray(min(chunk_bytes, info.nbytes)))
    fd = _open_fd(info)
    try:
        for pos in range(0, info.nbytes, len(buf)):
            n = min(len(buf), info.nbytes - pos)
            _pread_into(info, fd, info.offset + pos, buf[:n])
            dst.write(buf[:n])
    finally:
        os.close(fd)


# ---- writing -------------------------------------------------------------------------------------


@dataclass
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    shard: int
    offset: int  # absolute, in the shard file


class SafetensorsWriter:
    """Streaming writer of a (possibly sharded) checkpoint; tensors declared up front, in order.

    `write(name, array)` appends data to the tensor being written, possibly in several row chunks;
    float32 arrays are converted to the declared dtype (BF16 round-to-nearest-even), arrays already
    of that dtype are written as is. `close()` checks everything was written and writes
    `model.safetensors.index.json` when there are several shards (one shard is `model.safetensors`).
    The folder's previous checkpoint files (model.safetensors, the index, model-NNNNN-of-NNNNN
    shards) are removed first. Metadata defaults to `{"format": "pt"}` (transformers wants it).
    Misuse raises ValueError.
    """

    def __init__(
        self,
        folder: Path,
        tensors: Sequence[tuple[str, str, tuple[int, ...]]],
        max_shard_bytes: int = 2 << 30,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        meta = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("safetensors metadata must map str to str")
        self.folder = Path(folder)
        planned: list[tuple[str, str, tuple[int, ...], int]] = []
        seen: set[str] = set()
        for name, dtype, shape in tensors:
            if name in seen or name == "__metadata__":
                raise ValueError(f"tensor name {name!r} declared twice or reserved")
            seen.add(name)
            if dtype not in DTYPES:
                raise ValueError(
                    f"tensor {name}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})"
                )
            shape = tuple(int(d) for d in shape)
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {name}: negative dimension in shape {shape}")
            planned.append((name, dtype, shape, math.prod(shape) * DTYPES[dtype].itemsize))

        # Greedy shard plan in declaration order; a tensor larger than the limit gets its own shard.
        groups: list[list[int]] = [[]]
        size = 0
        for i, (*_, nbytes) in enumerate(planned):
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += nbytes
        n_shards = len(groups)
        self.shard_names = (
            [SINGLE_FILE] if n_shards == 1
            else [f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors" for k in range(n_shards)]
        )
        self.paths = [self.folder / s for s in self.shard_names]
        self.total_size = sum(p[3] for p in planned)

        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.iterdir():
            if old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.fullmatch(old.name):
                old.unlink()
        self._entries: list[_Entry] = []
        for k, group in enumerate(groups):
            header: dict[str, Any] = {"__metadata__": meta}
            begin = 0
            for i in group:
                name, dtype, shape, nbytes = planned[i]
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
                begin += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
            blob += b" " * (-len(blob) % 8)
            with open(self.paths[k], "wb") as f:
                f.write(len(blob).to_bytes(8, "little"))
                f.write(blob)
            data_start = 8 + len(blob)
            for i in group:
                name, dtype, shape, nbytes = planned[i]
                self._entries.append(_Entry(name, dtype, shape, nbytes, k, data_start))
                data_start += nbytes
        self._index = {e.name: i for i, e in enumerate(self._entries)}
        self._pos = 0  # entry being written
        self._done = 0  # bytes of it written so far
        self._file: BinaryIO | None = None
        self._file_shard = -1
        self._closed = False
        self._skip_empty()

    # ---- internals
    def _skip_empty(self) -> None:
        while self._pos < len(self._entries) and self._entries[self._pos].nbytes == 0:
            self._pos += 1
        nxt = self._entries[self._pos].shard if self._pos < len(self._entries) else -1
        if self._file is not None and nxt != self._file_shard:
            self._file.close()
            self._file, self._file_shard = None, -1

    def _convert(self, e: _Entry, array: np.ndarray) -> np.ndarray:
        arr = np.asarray(array)
        want = DTYPES[e.dtype]
        if arr.dtype != want:
            if arr.dtype != np.float32:
                raise ValueError(f"tensor {e.name}: got {arr.dtype} data, expected float32 or {want}")
            arr = arr.astype(want)
        if e.shape:
            if arr.ndim != len(e.shape) or arr.shape[1:] != e.shape[1:]:
                raise ValueError(
                    f"tensor {e.name}: chunk of shape {list(arr.shape)} does not fit rows of shape "
                    f"{list(e.shape)}"
                )
        elif arr.shape not in ((), (1,)):
            raise ValueError(f"tensor {e.name}: scalar tensor given data of shape {list(arr.shape)}")
        return np.ascontiguousarray(arr)

    # ---- public
    def write(self, name: str, array: np.ndarray) -> None:
        """Append `array` (whole rows) to tensor `name`, which must be the one being written."""
        if self._closed:
            raise ValueError(f"write({name!r}) after close()")
        if self._pos >= len(self._entries):
            raise ValueError(f"write({name!r}): every declared tensor is already fully written")
        e = self._entries[self._pos]
        if name != e.name:
            if name not in self._index:
                raise ValueError(f"write({name!r}): tensor was not declared")
            if self._index[name] < self._pos:
                raise ValueError(f"write({name!r}): tensor is already fully written")
            state = f"is only {self._done} of {e.nbytes} bytes written" if self._done else "comes first"
            raise ValueError(f"write({name!r}) out of order: tensor {e.name} {state}")
        arr = self._convert(e, array)
        if self._done + arr.nbytes > e.nbytes:
            raise ValueError(
                f"tensor {name}: {arr.nbytes} more bytes would exceed its {e.nbytes} bytes "
                f"({self._done} already written)"
            )
        if self._file_shard != e.shard:
            if self._file is not None:
                self._file.close()
            self._file = open(self.paths[e.shard], "r+b")  # noqa: SIM115 - kept open across calls
            self._file_shard = e.shard
        assert self._file is not None
        self._file.seek(e.offset + self._done)
        self._file.write(arr.reshape(-1).view(np.uint8).data)
        self._done += arr.nbytes
        if self._done == e.nbytes:
            self._pos += 1
            self._done = 0
            self._skip_empty()

    def close(self) -> None:
        """Check every tensor is complete; write the index when sharded."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._pos < len(self._entries):
            e = self._entries[self._pos]
            left = len(self._entries) - self._pos - 1
            raise ValueError(
                f"close(): tensor {e.name} has {self._done} of {e.nbytes} bytes written"
                + (f" and {left} more tensors were not written" if left else "")
            )
        if len(self.paths) > 1:
            doc = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {e.name: self.shard_names[e.shard] for e in self._entries},
            }
            (self.folder / INDEX_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        """Close file handles without checks; no index is written."""
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
