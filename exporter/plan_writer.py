"""The layout stage: stream every initializer of a graph into its data file and bind it there.

Float initializers stream from `float_chunks(name)` (checkpoint rows, or computed tables).
Initializers a pass planned (`graphs.weight_plan`) are produced group by group: one pass over the
source tensor's rows quantizes each row chunk once, streams the data part straight to the file,
and keeps the (small) scales and zero points, written right after. Identical byte streams (a tied
embedding's MatMulNBits and GatherBlockQuantized parts) are stored once and bound twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from exporter.layout import DataFileWriter, Placement, bind_external, tensor_nbytes
from graphs.quant.blockwise import dequantize_blockwise
from graphs.weight_plan import BlockQuant, plan_of

Chunks = Callable[[str], Iterator[np.ndarray]]
ByteChunks = Callable[[str], Iterator[np.ndarray | bytes]]
Progress = Callable[[str, int, int], None]


@dataclass
class TensorReport:
    """What became of one source tensor: its precision in the bundle and the weight error."""

    source: str
    precision: str  # int4 | int8 | the float dtype
    op: str  # the op that reads it: MatMulNBits, GatherBlockQuantized, or "float"
    block_size: int | None = None
    rel_error: float | None = None  # ||w - dequant(q(w))|| / ||w||
    _err2: float = 0.0
    _norm2: float = 0.0

    def add(self, w: np.ndarray, w_hat: np.ndarray) -> None:
        w64 = w.astype(np.float64)
        self._err2 += float(np.square(w64 - w_hat.astype(np.float64)).sum())
        self._norm2 += float(np.square(w64).sum())

    def finish(self) -> None:
        self.rel_error = (self._err2**0.5 / self._norm2**0.5) if self._norm2 else 0.0

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"precision": self.precision, "op": self.op}
        if self.block_size is not None:
            d["block_size"] = self.block_size
        if self.rel_error is not None:
            d["rel_weight_error"] = round(self.rel_error, 6)
        return d


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


def write_initializers(
    model: ir.Model,
    writer: DataFileWriter,
    location: str,
    base_dir: Path,
    float_chunks: ByteChunks,
    source_rows: Chunks,
    progress: Progress,
    stage: str,
    reports: dict[str, TensorReport],
) -> dict[str, Placement]:
    inits = list(model.graph.initializers.values())
    total = sum(tensor_nbytes(v) for v in inits)
    done: dict[str, Placement] = {}
    by_key: dict[tuple[object, ...], Placement] = {}

    def tick(chunks: Iterator[np.ndarray | bytes]) -> Iterator[np.ndarray | bytes]:
        for chunk in chunks:
            progress(stage, len(chunk) if isinstance(chunk, bytes) else chunk.nbytes, total)
            yield chunk

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
        bind_external(value, location, placement, base_dir)
        done[value.name] = placement

    for value in inits:
        name = value.name
        assert name is not None
        if name in done:
            continue
        plan = plan_of(value)
        if plan is None:
            place(value, float_chunks(name))
            if name not in reports and value.dtype is not None:
                reports[name] = TensorReport(name, _dtype_name(value.dtype), "float")
            continue
        group: dict[str, ir.Value] = {
            str(p.part): v for v in inits if (p := plan_of(v)) is not None and _group(p) == _group(plan)
        }
        _write_group(group, place, source_rows, reports)
    return done


def _write_group(
    group: dict[str, ir.Value],
    place: Callable[..., None],
    source_rows: Chunks,
    reports: dict[str, TensorReport],
) -> None:
    """Data, then scales, then zero points of one quantized tensor, in one pass over its source (or
    over each member source of a merged tensor in turn: rows are quantized independently)."""
    data = group["data"]
    plan = plan_of(data)
    assert plan is not None and data.shape is not None
    k = _source_k(group)
    kept: dict[str, list[np.ndarray]] = {"scales": [], "zero_points": []}
    measured: list[TensorReport] = []
    for source in plan.sources():  # here, not in data_chunks: aliased bytes never run it
        report = reports.setdefault(
            source, TensorReport(source, f"int{plan.bits}", _op(plan), plan.block_size)
        )
        if report.op != _op(plan):
            report.op = "MatMulNBits+GatherBlockQuantized"

    def data_chunks() -> Iterator[np.ndarray]:
        for source in plan.sources():
            report = reports[source]
            measure = report.rel_error is None and not report._norm2
            for rows in source_rows(source):
                q = plan.quantize(rows)
                if measure:
                    report.add(rows, dequantize_blockwise(q))
                for part in kept:
                    if part in group:
                        kept[part].append(plan_of(group[part]).pack(q))  # type: ignore[union-attr]
                yield plan.pack(q)
            if measure:
                measured.append(report)

    place(data, data_chunks(), _same_bytes_key(plan, k))
    for report in measured:
        report.finish()
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
