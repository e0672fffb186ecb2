"""A small safetensors reader/writer that never memory-maps.

Reading a multi-GB checkpoint through mmap makes every touched page count towards RSS; here data
is read with `os.preadv` into buffers the caller sizes (row chunks), so peak RSS stays near the
largest chunk. Files interoperate with the official `safetensors` package both ways.

Format: u64 little-endian header size N, N bytes of JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}` (offsets
relative to the first byte after the header), then the data. Little-endian hosts only.

Headers are validated as the official library does (`SafeTensors::read_metadata` and
`Metadata::validate` in huggingface/safetensors `safetensors/src/tensor.rs`, serde_json for the JSON;
checked against safetensors 0.8.0), reading only the header, never tensor data:
- N <= 100,000,000 and 8 + N <= file size;
- the header is UTF-8 JSON (serde_json's dialect: JSON whitespace may lead and trail, so a header
  padded with spaces is fine; no NaN/Infinity; no lone UTF-16 surrogate escapes; `-0` and integers
  beyond 2**64 - 1 are not integers) holding an object;
- `__metadata__`, if present, is null or an object of strings;
- every other key is a tensor: `dtype` one of the format's dtypes, `shape` a list of integers in
  [0, 2**64), `data_offsets` a list of two such integers;
- sorted by offsets, the tensors tile the data exactly: each begins where the previous one ends (the
  first at 0; no gap, no overlap), ends at or after its begin, and its byte size equals the element
  count (a running product that must stay below 2**64) times the dtype's bit size (below 2**64 too,
  a whole number of bytes) divided by 8; the last end is exactly the data length
  (file size - 8 - N: nothing may follow the data).
Stricter than the official library, which reads these headers but the format forbids or never
writes them: duplicate keys anywhere (the format forbids them; the official library keeps the
last), a tensor entry that is not an object with exactly the keys dtype, shape and data_offsets (the
official library ignores other keys and reads an array `[dtype, shape, data_offsets]`), and a dtype
that is not a JSON string (serde reads `{"F32": null}` as F32). Headers with any of the format's
dtypes open; only BF16, F16 and F32 tensors can be read (`DTYPES`), others raise UserError.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import ml_dtypes
import numpy as np

from ple_export.errors import UserError
from ple_export.jsonfile import loads_bounded, read_json_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MAX_HEADER_BYTES = 100_000_000  # the official library's limit (MAX_HEADER_SIZE)
_U64_MAX = (1 << 64) - 1  # the official library's usize, on the 64-bit hosts it supports
_TENSOR_KEYS = ("dtype", "shape", "data_offsets")
_SURROGATE = re.compile("[\ud800-\udfff]")

# Every dtype the format defines (`Dtype::bitsize` in the official library), for validating headers: a
# multimodal checkpoint may hold tensors we never read. `DTYPES` below are the ones we can read.
BITSIZES: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
# Bytes per element of the dtypes that take whole bytes.
ITEMSIZES: dict[str, int] = {code: bits // 8 for code, bits in BITSIZES.items() if bits % 8 == 0}
# safetensors dtype code -> numpy dtype of the raw data (little-endian).
DTYPES: dict[str, np.dtype[Any]] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
}


_SHOWN = 200  # characters of a name, dtype or value quoted in a message


def _q(name: str) -> str:
    """A tensor name or key for a one-line message: its repr (control characters escaped), bounded."""
    return repr(name) if len(name) <= _SHOWN else repr(name[:_SHOWN]) + "..."


def _show(text: object) -> str:
    """A path or dtype for a one-line message: as is when plainly printable, else its repr; bounded."""
    s = str(text)
    if len(s) > _SHOWN:
        return repr(s[:_SHOWN]) + "..."
    return s if s and s.isprintable() and s.strip() == s else repr(s)


def _plain(x: Any) -> Any:
    return (
        {k: _plain(v) for k, v in x}
        if isinstance(x, _JsonObject)
        else ([_plain(v) for v in x] if isinstance(x, list) else x)
    )


def _brief(x: object) -> str:
    """A parsed JSON value as JSON text for a one-line message, bounded."""
    text = json.dumps(_plain(x))
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


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
        if self.dtype not in ITEMSIZES:
            raise UserError(
                f"{_show(self.path)}: tensor {_q(self.name)} has dtype {self.dtype} of "
                f"{BITSIZES[self.dtype]} bits per element; it cannot be read by rows"
            )
        return ITEMSIZES[self.dtype]

    @property
    def num_rows(self) -> int:
        """Length of dim 0 (a 0-d tensor counts as one row)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.itemsize


# ---- reading -------------------------------------------------------------------------------------


class _JsonObject(list[tuple[str, Any]]):
    """A JSON object as parsed: its (key, value) pairs in order, duplicate keys kept (then refused)."""


def _parse_int(text: str) -> int | float:
    # serde_json reads `-0` and integers beyond u64 as floats, which no integer field accepts
    return float(text) if text == "-0" or len(text) > 20 else int(text)


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def _is_usize(x: object) -> bool:
    return type(x) is int and 0 <= x <= _U64_MAX


def _kind(x: object) -> str:
    """The JSON type of a parsed value, for messages."""
    if isinstance(x, _JsonObject):
        return "an object"
    if isinstance(x, list):
        return "an array"
    if isinstance(x, str):
        return "a string"
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, int):
        return f"the integer {x}"
    return f"the number {_brief(x)}"


def _fields(obj: _JsonObject, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj:
        if key in out:
            raise UserError(f"{where} has duplicate key {_q(key)} (the format forbids duplicate keys)")
        out[key] = value
    return out


def _check_text(text: str, where: str, what: str) -> None:
    if _SURROGATE.search(text):
        raise UserError(
            f"{where}: {what} {_q(text)} holds a lone UTF-16 surrogate escape (not valid in JSON)"
        )


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    """Up to `n` bytes at `offset`; fewer only at the end of the file."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = os.pread(fd, n - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


@dataclass
class _HeaderEntry:
    name: str
    dtype: str
    shape: list[int]
    begin: int
    end: int


def _parse_entry(p: str, name: str, entry: object) -> _HeaderEntry:
    t = f"{p}: tensor {_q(name)}"
    _check_text(name, p, "tensor name")
    if not isinstance(entry, _JsonObject):
        raise UserError(f"{t}: header entry is {_kind(entry)}, not an object with dtype, shape, data_offsets")
    fields = _fields(entry, t)
    missing = [k for k in _TENSOR_KEYS if k not in fields]
    if missing:
        raise UserError(f"{t}: header entry has no {', '.join(missing)}")
    extra = [k for k in fields if k not in _TENSOR_KEYS]
    if extra:
        raise UserError(
            f"{t}: header entry has unexpected key {_q(extra[0])} (allowed: dtype, shape, data_offsets)"
        )
    dtype, shape, offsets = (fields[k] for k in _TENSOR_KEYS)
    if not isinstance(dtype, str):
        raise UserError(f"{t}: 'dtype' is not a string ({_kind(dtype)})")
    if dtype not in BITSIZES:
        raise UserError(f"{t} has unknown dtype {_show(dtype)}")
    if type(shape) is not list or not all(_is_usize(d) for d in shape):
        raise UserError(f"{t}: 'shape' is not a list of integers in [0, 2**64) ({_brief(shape)})")
    if type(offsets) is not list or len(offsets) != 2 or not all(_is_usize(o) for o in offsets):
        raise UserError(f"{t}: 'data_offsets' is not a pair of integers in [0, 2**64) ({_brief(offsets)})")
    return _HeaderEntry(name, dtype, shape, offsets[0], offsets[1])


def _nbytes(t: str, e: _HeaderEntry) -> int:
    """Byte size from shape and dtype, refusing what overflows the official library's u64 arithmetic."""
    count = 1
    for d in e.shape:
        count *= d  # a running product, as the official check: [2**40, 2**40, 0] overflows, [0, ...] not
        if count > _U64_MAX:
            raise UserError(f"{t}: shape {_brief(e.shape)} has 2**64 or more elements")
    bits = count * BITSIZES[e.dtype]
    if bits > _U64_MAX:
        raise UserError(f"{t}: shape {_brief(e.shape)} of dtype {e.dtype} takes 2**64 or more bits")
    if bits % 8:
        raise UserError(f"{t}: {count} elements of dtype {e.dtype} do not fill a whole number of bytes")
    return bits // 8


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Validate one safetensors file's header (see the module docstring); tensors in data-offset order.

    Reads the 8-byte size and the header with pread, nothing of the data; every violation is a
    one-line UserError naming the file and, where there is one, the tensor.
    """
    path = Path(path)
    p = _show(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            size = os.fstat(fd).st_size
            head = _pread_exact(fd, 8, 0)
            if len(head) < 8:
                raise UserError(f"{p}: truncated: {size} bytes, too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise UserError(
                    f"{p}: header size {n} exceeds the format's limit of {MAX_HEADER_BYTES} bytes: "
                    "not a safetensors file"
                )
            if n > size - 8:
                raise UserError(
                    f"{p}: header size {n} is larger than the file ({size} bytes): truncated or "
                    "not a safetensors file"
                )
            raw = _pread_exact(fd, n, 8)
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror or e})") from None
    if len(raw) < n:
        raise UserError(f"{p}: truncated while reading its {n}-byte header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: header is not valid JSON (invalid UTF-8 at byte {8 + e.start})") from None
    header = loads_bounded(
        text,
        f"{p}: header",
        object_pairs_hook=_JsonObject,
        parse_int=_parse_int,
        parse_constant=_refuse_constant,
    )
    if not isinstance(header, _JsonObject):
        raise UserError(f"{p}: header is {_kind(header)}, not a JSON object")
    top = _fields(header, f"{p}: header")

    meta = top.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, _JsonObject):
            raise UserError(f"{p}: __metadata__ is {_kind(meta)}, not an object of strings")
        for key, value in _fields(meta, f"{p}: __metadata__").items():
            _check_text(key, f"{p}: __metadata__", "key")
            if not isinstance(value, str):
                raise UserError(f"{p}: __metadata__ value for {_q(key)} is {_kind(value)}, not a string")
            _check_text(value, f"{p}: __metadata__", f"value for {_q(key)}")

    entries = [_parse_entry(p, name, entry) for name, entry in top.items()]
    entries.sort(key=lambda e: (e.begin, e.end))  # stable, as the official sort_by_key(data_offsets)
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    end, last = 0, ""
    for ent in entries:
        t = f"{p}: tensor {_q(ent.name)}"
        where = f"{t}: data_offsets [{ent.begin}, {ent.end}]"
        if ent.end < ent.begin:
            raise UserError(f"{where} end before they begin")
        if ent.begin < end:
            raise UserError(f"{where} overlap tensor {_q(last)}, which ends at {end}")
        if ent.begin > end:
            after = f"tensor {_q(last)} ends at {end}" if infos else "the data begins at 0"
            raise UserError(f"{where} leave a gap: {after} (tensors must be contiguous)")
        need = _nbytes(t, ent)
        if ent.end - ent.begin != need:
            raise UserError(
                f"{where} inconsistent with dtype {ent.dtype} and shape {_brief(ent.shape)} ({need} bytes)"
            )
        infos[ent.name] = TensorInfo(
            ent.name, ent.dtype, tuple(ent.shape), path, data_start + ent.begin, need
        )
        end, last = ent.end, ent.name
    data_len = size - data_start
    if end > data_len:
        raise UserError(
            f"{p}: truncated: file is {size} bytes but tensor {_q(last)} ends at byte {data_start + end}"
        )
    if end < data_len:
        after = f"the end of tensor {_q(last)}" if infos else "the header, which lists no tensors"
        raise UserError(
            f"{p}: {data_len - end} stray bytes after {after} (file is {size} bytes; the format requires "
            "the tensors to cover the data exactly)"
        )
    return infos


def open_checkpoint(folder: Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint folder (single file or sharded), headers validated."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{_show(folder)}: not a directory")
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.is_file():
        return read_header(single)
    if index.is_file():
        return _open_sharded(folder, index)
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
    raise UserError(f"{_show(folder)}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _open_sharded(folder: Path, index: Path) -> dict[str, TensorInfo]:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{_show(index)}: no 'weight_map' object mapping tensor names to shard files")
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    out: dict[str, TensorInfo] = {}
    for shard in sorted(by_shard):
        names = by_shard[shard]
        rel = Path(shard)
        if rel.is_absolute() or ".." in rel.parts:
            raise UserError(
                f"{_show(index)}: shard path {_q(shard)} (for tensor {_show(names[0])}) must stay inside "
                f"{_show(folder)}"
            )
        path = folder / rel
        if not path.is_file():
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise UserError(
                f"{_show(index)}: shard {_show(shard)} is missing (it should hold tensor "
                f"{_show(names[0])}{more})"
            )
        tensors = read_header(path)
        for name in names:
            if name not in tensors:
                raise UserError(
                    f"{_show(path)}: tensor {_show(name)} is listed in {INDEX_FILE} but not in this shard"
                )
        for name, info in tensors.items():
            if name in out:
                raise UserError(
                    f"tensor {_show(name)} appears in two shards: {_show(out[name].path.name)} and "
                    f"{_show(shard)}"
                )
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
            buf[pos : pos + got] = data
        if got == 0:
            raise UserError(f"{_show(info.path)}: truncated while reading tensor {_show(info.name)}")
        pos += got


def _open_fd(info: TensorInfo) -> int:
    try:
        return os.open(info.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise UserError(
            f"{_show(info.path)}: cannot open to read tensor {_show(info.name)} ({e.strerror or e})"
        ) from None


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
            f"{_show(info.path)}: tensor {_show(info.name)} has dtype {info.dtype}; only "
            f"{', '.join(DTYPES)} can be read"
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
    try:
        raw = raw.reshape((stop - start, *info.shape[1:]))
    except ValueError:  # no elements, but a dimension or their product beyond what numpy can index
        raise UserError(
            f"{_show(info.path)}: tensor {_show(info.name)} has shape {_brief(list(info.shape))}, "
            "which numpy cannot hold"
        ) from None
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
