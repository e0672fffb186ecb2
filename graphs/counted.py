"""What a pass did, as a value: onnx-ir's `PassResult` plus how many times its rewrite applied.

Every decoder and embedder pass returns one of these (or a subclass carrying more), so the pipeline
can report every pass's count in the manifest: a fusion that matched nothing shows as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir
from onnx_ir.passes import PassResult


@dataclass
class Counted(PassResult):
    matches: int = 0  # rewrites applied (a fusion's matches, weights quantized, nodes removed)

    @classmethod
    def of(cls, model: ir.Model, matches: int) -> Counted:
        return cls(model, matches > 0, matches)


@dataclass
class QuantizedWeights(Counted):
    """The MatMulNBits pass: which weights it quantized (block size) and which it kept float (why)."""

    quantized: dict[str, int] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)


@dataclass
class QuantizedTable(Counted):
    """The PLE table pass: the block size it quantized the table with (None: kept float)."""

    block_size: int | None = None
