"""How each initializer a pass creates gets its bytes: a plan entry, not the bytes themselves.

Passes rewrite only the graph. For every new initializer they record, in `value.meta[PLAN]`, the
checkpoint tensor it comes from and the transform (quantize to `bits` in blocks of `block_size`,
then lay out for MatMulNBits or GatherBlockQuantized, keeping the `part`: data, scales or zero
points). The layout stage executes the plan, streaming the source by rows; the tensor's
`const_value` meanwhile is a `LazyTensor` that computes the same bytes in memory from the source's
own const value, so a pass can be tested on a small in-memory model with onnxruntime before and
after, with no checkpoint at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphs.quant.blockwise import (
    BlockQuantized,
    pack_gather_block_quantized,
    pack_matmul_nbits,
    quantize_blockwise,
)

PLAN = "ple_export.plan"
Layout = Literal["matmul_nbits", "gather_block_quantized"]
Part = Literal["data", "scales", "zero_points"]


@dataclass(frozen=True)
class BlockQuant:
    """Blockwise quantization of a `[rows, K]` source tensor, as one of an op's inputs."""

    source: str  # the source initializer's name (ours: the checkpoint tensor it maps to)
    bits: int
    block_size: int
    symmetric: bool
    layout: Layout
    part: Part
    scales_dtype: str = "float32"
    # a merged tensor (graphs/sibling_matmul_nbits.py): its member sources, whose rows follow one
    # another; `source` is then their names joined by "+"
    members: tuple[str, ...] = ()
    clip_search: bool = False  # each block's range searched for the least error (quant/blockwise.py)

    def sources(self) -> tuple[str, ...]:
        """The source tensors streamed, in order."""
        return self.members or (self.source,)

    def quantize(self, rows: np.ndarray) -> BlockQuantized:
        return quantize_blockwise(
            rows, self.bits, self.block_size, self.symmetric, self.scales_dtype, self.clip_search
        )

    def pack(self, q: BlockQuantized) -> np.ndarray:
        """This part's bytes for the quantized rows `q` (rows stay rows: chunks concatenate)."""
        packed = pack_matmul_nbits(q) if self.layout == "matmul_nbits" else pack_gather_block_quantized(q)
        arrays = dict(zip(("data", "scales", "zero_points"), packed, strict=True))
        out = arrays[self.part]
        assert out is not None, f"{self.source}: no {self.part} when symmetric"
        return out

    def siblings(self) -> tuple[Part, ...]:
        return ("data", "scales") if self.symmetric else ("data", "scales", "zero_points")


def plan_of(value: ir.Value) -> BlockQuant | None:
    entry = value.meta.get(PLAN)
    return entry if isinstance(entry, BlockQuant) else None


def planned_initializer(
    graph: ir.Graph, name: str, plan: BlockQuant, source: ir.Value, dtype: ir.DataType, shape: tuple[int, ...]
) -> ir.Value:
    """Register an initializer whose bytes follow `plan` from `source`."""

    def compute() -> ir.TensorProtocol:  # in memory, for tests and small models
        assert source.const_value is not None
        weight = source.const_value.numpy().astype(np.float32)
        return ir.tensor(plan.pack(plan.quantize(weight)).reshape(shape), name=name)

    return register_planned(graph, name, plan, compute, dtype, shape)


def register_planned(
    graph: ir.Graph,
    name: str,
    plan: BlockQuant,
    compute: Callable[[], ir.TensorProtocol],
    dtype: ir.DataType,
    shape: tuple[int, ...],
) -> ir.Value:
    """Register an initializer with plan `plan` whose in-memory value `compute` makes on demand."""
    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))
    value.const_value = ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape), name=name)
    value.meta[PLAN] = plan
    graph.register_initializer(value)
    return value


def quantized_inputs(
    graph: ir.Graph,
    weight: ir.Value,
    bits: int,
    block_size: int,
    symmetric: bool,
    layout: Layout,
    prefix: str,
    scales_dtype: str = "float32",
    clip_search: bool = False,
    names: dict[str, str] | None = None,
) -> list[ir.Value | None]:
    """The (data, scales, zero_points) initializers for quantizing `weight` `[rows, K]`, named
    `{prefix}.{part}` unless `names` says otherwise; zero_points is None when symmetric."""
    assert weight.shape is not None and weight.name is not None
    rows, k = weight.shape.numpy()
    n_blocks = -(-k // block_size)
    if layout == "matmul_nbits":
        data_shape: tuple[int, ...] = (rows, n_blocks, block_size * bits // 8)
    else:
        data_shape = (rows, k * bits // 8)
    shapes: dict[Part, tuple[tuple[int, ...], ir.DataType]] = {
        "data": (data_shape, ir.DataType.UINT8),
        "scales": ((rows, n_blocks), ir.DataType.FLOAT if scales_dtype == "float32" else ir.DataType.FLOAT16),
        "zero_points": ((rows, -(-n_blocks * bits // 8)), ir.DataType.UINT8),
    }
    out: list[ir.Value | None] = []
    for part in ("data", "scales", "zero_points"):
        if part == "zero_points" and symmetric:
            out.append(None)
            continue
        plan = BlockQuant(
            weight.name,
            bits,
            block_size,
            symmetric,
            layout,  # type: ignore[arg-type]
            part,  # type: ignore[arg-type]
            scales_dtype,
            clip_search=clip_search,
        )
        shape, dtype = shapes[part]  # type: ignore[index]
        name = (names or {}).get(part, f"{prefix}.{part}")
        out.append(planned_initializer(graph, name, plan, weight, dtype, shape))
    return out
