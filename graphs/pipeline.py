"""The decoder's graph passes, in order: one list that `export` and `quantize` both run.

    cleanup -> RMSNorm fusion -> residual Add + RMSNorm fusion -> GELU fusion -> Linear -> MatMulNBits
    -> merge sibling MatMulNBits
    -> float tied head as Gemm

Attention (written out as grouped MatMuls) and RoPE (RotaryEmbedding) are not passes: the
exporter's module emits them at trace time (`exporter/gemma4.py`).
"""

from __future__ import annotations

import onnx_ir as ir

from graphs.cleanup import clean
from graphs.fusions.gelu import fuse_gelu
from graphs.fusions.rms_norm import fuse_rms_norm
from graphs.fusions.skip_rms_norm import fuse_skip_rms_norm
from graphs.matmul_nbits import LinearToMatMulNBits
from graphs.recipe import QuantRecipe
from graphs.sibling_matmul_nbits import MergeSiblingMatMulNBits
from graphs.tied_lm_head import TiedLmHeadToGemm


def decoder_passes(model: ir.Model, recipe: QuantRecipe) -> LinearToMatMulNBits:
    """Run every decoder pass in place; returns the quantization pass (what it quantized or kept)."""
    clean(model)  # fold the trace's constants, shape plumbing and no-op casts (weights untouched)
    fuse_rms_norm(model)
    fuse_skip_rms_norm(model)
    fuse_gelu(model)
    quant = LinearToMatMulNBits(recipe)
    quant(model)
    MergeSiblingMatMulNBits()(model)
    TiedLmHeadToGemm()(model)  # a float tied head (--quant none, or kept) reads the embedding as stored
    return quant
