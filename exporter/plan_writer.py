"""The layout stage: stream every initializer of a graph into its data file and bind it there.

Float initializers stream from `float_chunks(name)` (checkpoint rows, or computed tables).
Initializers a pass planned (`graphs.weight_plan`) are produced group by group: one pass over the
source tensor's rows quantizes each row chunk once, streams the data part straight to the file,
and keeps the (small) scales and zero points, written right after. Identical byte streams (a tied
embedding's MatMulNBits and GatherBlockQuantized parts) are stored once and bound twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from exporter.layout import DataFileWriter, Placement, bind_external, tensor_nbytes
from graphs.quant.blockwise import ErrorMeter, dequantize_blockwise
from graphs.weight_plan import BlockQuant, plan_of
from ple_export.bundle.manifest import TensorRecord

Chunks = Callable[[str], Iterator[np.ndarray]]
ByteChunks = Callable[[str], Iterator[np.ndarray | bytes]]
Progress = Callable[[str, int, int], None]


@dataclass
class _Measured:
    """One source tensor as it is written: its precision, the op reading it, and its weight error."""

    precision: str  # int4 | int8 | the float dtype
    op: str  # the op that reads it: MatMulNBits, GatherBlockQuantized, or "float"
    block_size: int | None = None
    done: bool = False  # the error is measured once, over the first stream of the source's rows
    error: ErrorMeter = field(default_factory=ErrorMeter)

    def record(self) -> TensorRecord:
        return TensorRecord(
            self.precision, self.op, self.block_size, round(self.error.value, 6) if self.done else None
        )


@dataclass(frozen=True)
class LayoutReport:
    """One data file as written, and what became of each source tensor in it."""

    file: str
    size: int
    sha256: str
    offsets: dict[str, Placement]  # initializer -> its bytes in the file
    tensors: dict[str, TensorRecord]  # source tensor (our name) -> precision, op, weight error


def _same_bytes_key(plan: BlockQuant, k: int) -> tuple[object, ...]:
    """Plans whose bytes are identical share a key: the MatMulNBits and GatherBlockQuantized
    layouts coincide when K is a multiple of the block (no padding), and always for scales and
    zero points."""
    layout = plan.layout if (plan.part == "data" and k % plan.block_size) else "any"
    return (
        plan.source,
        plan.bits,
        plan.block_size,
        plan.symmetric,
        plan.scales_dtype,
        plan.clip_search,
        plan.part,
        layout,
    )


def lay_out(
    model: ir.Model,
    folder: Path,
    data_file: str,
    page_size: int,
    float_chunks: ByteChunks,
    source_rows: Chunks,
    progress: Progress,
    stage: str,
) -> LayoutReport:
    """Write every initializer of `model` into `folder / data_file` and bind it there."""
    inits = list(model.graph.initializers.values())
    total = sum(tensor_nbytes(v) for v in inits)
    done: dict[str, Placement] = {}
    by_key: dict[tuple[object, ...], Placement] = {}
    measured: dict[str, _Measured] = {}

    def tick(chunks: Iterator[np.ndarray | bytes]) -> Iterator[np.ndarray | bytes]:
        for chunk in chunks:
            progress(stage, len(chunk) if isinstance(chunk, bytes) else chunk.nbytes, total)
            yield chunk

    with DataFileWriter(folder / data_file, page_size) as writer:

        def place(
            value: ir.Value, chunks: Iterator[np.ndarray | bytes], key: tuple[object, ...] | None = None
        ) -> None:
            assert value.name is not None
            if key is not None and key in by_key:
                placement = by_key[key]
                progress(stage, tensor_nbytes(value), total)
            else:
                placement = writer.add(value.name, tensor_nbytes(value), tick(chunks))
                if key is not None:
                    by_key[key] = placement
            bind_external(value, data_file, placement, folder)
            done[value.name] = placement

        for value in inits:
            name = value.name
            assert name is not None
            if name in done:
                continue
            plan = plan_of(value)
            if plan is None:
                place(value, float_chunks(name))
                if name not in measured and value.dtype is not None:
                    measured[name] = _Measured(_dtype_name(value.dtype), "float")
                continue
            group: dict[str, ir.Value] = {
                str(p.part): v for v in inits if (p := plan_of(v)) is not None and _group(p) == _group(plan)
            }
            _write_group(group, place, source_rows, measured)
        size, sha256 = writer.close()
    tensors = {name: m.record() for name, m in measured.items()}
    return LayoutReport(data_file, size, sha256, done, tensors)


def _write_group(
    group: dict[str, ir.Value],
    place: Callable[..., None],
    source_rows: Chunks,
    measured: dict[str, _Measured],
) -> None:
    """Data, then scales, then zero points of one quantized tensor, in one pass over its source (or
    over each member source of a merged tensor in turn: rows are quantized independently)."""
    data = group["data"]
    plan = plan_of(data)
    assert plan is not None and data.shape is not None
    k = _source_k(group)
    kept: dict[str, list[np.ndarray]] = {"scales": [], "zero_points": []}
    for source in plan.sources():  # here, not in data_chunks: aliased bytes never run it
        m = measured.setdefault(source, _Measured(f"int{plan.bits}", _op(plan), plan.block_size))
        if m.op != _op(plan):
            m.op = "MatMulNBits+GatherBlockQuantized"

    def data_chunks() -> Iterator[np.ndarray]:
        for source in plan.sources():
            m = measured[source]
            measure = not m.done
            for rows in source_rows(source):
                q = plan.quantize(rows)
                if measure:
                    m.error.add(rows, dequantize_blockwise(q))
                for part in kept:
                    if part in group:
                        kept[part].append(plan_of(group[part]).pack(q))  # type: ignore[union-attr]
                yield plan.pack(q)
            m.done = True

    place(data, data_chunks(), _same_bytes_key(plan, k))
    for part, arrays in kept.items():
        if part in group:
            value = group[part]
            p = plan_of(value)
            assert p is not None
            place(value, (np.concatenate(a, axis=0) for a in [arrays]), _same_bytes_key(p, k))


def _group(plan: BlockQuant) -> tuple[object, ...]:
    return (plan.source, plan.layout, plan.bits, plan.block_size)


def _source_k(group: dict[str, ir.Value]) -> int:
    data = group["data"]
    plan = plan_of(data)
    assert plan is not None and data.shape is not None
    dims = data.shape.numpy()
    if plan.layout == "matmul_nbits":
        # [N, n_blocks, blob]: K is not stored; the consumer node's K attribute has it
        for use in data.uses():
            k_attr = use.node.attributes.get("K")
            if k_attr is not None:
                return int(k_attr.as_int())
        return int(dims[1] * plan.block_size)
    return int(dims[1] * 8 // plan.bits)


def _op(plan: BlockQuant) -> str:
    return "MatMulNBits" if plan.layout == "matmul_nbits" else "GatherBlockQuantized"


def _dtype_name(dtype: ir.DataType) -> str:
    return {ir.DataType.FLOAT: "fp32", ir.DataType.BFLOAT16: "bf16", ir.DataType.FLOAT16: "fp16"}.get(
        dtype, dtype.name.lower()
    )
