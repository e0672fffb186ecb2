"""The graph passes, in order: one list per graph that `export` and `quantize` both run.

    decoder   cleanup -> RMSNorm fusion -> residual Add + RMSNorm fusion -> GELU fusion
              -> Linear -> MatMulNBits -> merge sibling MatMulNBits -> float tied head as Gemm
    embedder  PLE table -> GatherBlockQuantized

Each pass returns a `Counted` result; the pipeline keeps every count (the manifest records them, so
a fusion that matched nothing shows as 0) and what the quantizing passes decided. Attention
(written out as grouped MatMuls) and RoPE (RotaryEmbedding) are not passes: the exporter's module
emits them at trace time (`exporter/gemma4.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from graphs.cleanup import clean
from graphs.counted import Counted, QuantizedTable, QuantizedWeights
from graphs.fusions.gelu import fuse_gelu
from graphs.fusions.rms_norm import fuse_rms_norm
from graphs.fusions.skip_rms_norm import fuse_skip_rms_norm
from graphs.matmul_nbits import LinearToMatMulNBits
from graphs.ple_table_quant import PleTableToGatherBlockQuantized
from graphs.sibling_matmul_nbits import MergeSiblingMatMulNBits
from graphs.tied_lm_head import TiedLmHeadToGemm
from ple_export.bundle.recipe import FAMILY_FLOAT, QuantRecipe


@dataclass(frozen=True)
class PassReport:
    """What the passes of one graph did."""

    matches: dict[str, int] = field(default_factory=dict)  # pass -> rewrites (0: matched nothing)
    quantized: dict[str, int] = field(default_factory=dict)  # weight -> block size
    kept: dict[str, str] = field(default_factory=dict)  # weight -> why it stayed float
    ple_block: int | None = None  # the PLE table's block size (None: a float table)


def _counted(fuse: Callable[[ir.Model], int]) -> Callable[[ir.Model], Counted]:
    return lambda model: Counted.of(model, fuse(model))


def _cleanup(model: ir.Model) -> Counted:
    """Constant folding and plumbing removal; its count is the nodes it removed."""
    return Counted.of(model, -clean(model)["nodes"])


def decoder_passes(model: ir.Model, recipe: QuantRecipe, family: str = "gemma4") -> PassReport:
    """Run every decoder pass in place, in order."""
    steps: tuple[tuple[str, Callable[[ir.Model], Any]], ...] = (
        # fold the trace's constants, shape plumbing and no-op casts (weights untouched)
        ("cleanup", _cleanup),
        ("rms_norm", _counted(fuse_rms_norm)),
        ("skip_rms_norm", _counted(fuse_skip_rms_norm)),
        ("gelu", _counted(fuse_gelu)),
        ("matmul_nbits", LinearToMatMulNBits(recipe, FAMILY_FLOAT.get(family, ()))),
        ("sibling_matmul_nbits", MergeSiblingMatMulNBits()),
        # a float tied head (--quant none, or kept) reads the embedding as stored
        ("tied_lm_head", TiedLmHeadToGemm()),
    )
    matches: dict[str, int] = {}
    quantized: dict[str, int] = {}
    kept: dict[str, str] = {}
    for name, run in steps:
        result = run(model)
        assert isinstance(result, Counted), name
        matches[name] = result.matches
        if isinstance(result, QuantizedWeights):
            quantized, kept = result.quantized, result.kept
    return PassReport(matches, quantized, kept)


def embedder_passes(model: ir.Model, recipe: QuantRecipe, ple_width: int) -> PassReport:
    """Run the embedder's pass in place: the PLE table quantized as the recipe says."""
    result: QuantizedTable = PleTableToGatherBlockQuantized(recipe, ple_width)(model)  # type: ignore[assignment]
    return PassReport({"ple_table_quant": result.matches}, ple_block=result.block_size)
