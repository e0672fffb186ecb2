"""A streaming, sharded safetensors writer (what `synth` writes checkpoints with): tensors declared up
front, data appended in row chunks, never a whole tensor in memory. Files interoperate with the
official `safetensors` package (tests/test_safetensors_io.py reads them back with it)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from exporter.safetensors_io import _SHARD_RE, DTYPES, INDEX_FILE, SINGLE_FILE


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
            [SINGLE_FILE]
            if n_shards == 1
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
