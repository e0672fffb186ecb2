"""External-data layout: stream tensors into data files at aligned offsets, bind them to a graph.

Each tensor is written chunk by chunk (never whole in memory), its offset aligned to the page size
when it is at least a page long, so onnxruntime can memory-map it in place. The file's sha256 is
computed while writing, so the manifest needs no second read.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ple_export.bundle.format import aligned

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Placement:
    offset: int
    length: int


class DataFileWriter:
    """Appends tensors to one external-data file. Not thread-safe; use as a context manager."""

    def __init__(self, path: Path, page_size: int, progress: Progress | None = None):
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size must be a power of two, got {page_size}")
        self.path = path
        self.page_size = page_size
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._sha = hashlib.sha256()
        self._pos = 0
        self._progress = progress

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._sha.update(data)
        self._pos += len(data)

    def add(self, name: str, nbytes: int, chunks: Iterable[np.ndarray | bytes]) -> Placement:
        """Append one tensor given as a stream of C-ordered chunks totalling `nbytes`, at the offset
        the bundle format gives it (`format.aligned`)."""
        start = aligned(self._pos, nbytes, self.page_size)
        if start > self._pos:
            self._write(b"\0" * (start - self._pos))
        for chunk in chunks:
            # bytes view without a copy (ml_dtypes' bfloat16 has no buffer format of its own)
            flat = chunk if isinstance(chunk, bytes) else np.ascontiguousarray(chunk).reshape(-1)
            data = flat if isinstance(flat, bytes) else flat.view(np.uint8).data
            self._write(data)
            if self._progress:
                self._progress(len(data))
        written = self._pos - start
        if written != nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, expected {nbytes}")
        return Placement(start, nbytes)

    def close(self) -> tuple[int, str]:
        """Flush to disk; returns (file size, sha256 hex)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        return self._pos, self._sha.hexdigest()

    def __enter__(self) -> DataFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._file.closed:
            self._file.close()


def tensor_nbytes(value: ir.Value) -> int:
    assert value.dtype is not None and value.shape is not None
    return math.prod(value.shape.numpy()) * value.dtype.bitwidth // 8


def bind_external(value: ir.Value, location: str, placement: Placement, base_dir: Path) -> None:
    """Point an initializer at bytes already written to `location` (relative to the model file)."""
    assert value.dtype is not None and value.shape is not None and value.name is not None
    value.const_value = ir.ExternalTensor(
        location,
        placement.offset,
        placement.length,
        value.dtype,
        shape=ir.Shape(value.shape.numpy()),
        name=value.name,
        base_dir=base_dir,
    )
