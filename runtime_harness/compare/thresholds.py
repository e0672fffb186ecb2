"""What a bundle must meet, by its recipe class: one classifier, one table for parity against the
PyTorch reference (`verify`) and one for quality on text against the fp32 bundle (`quality`).

Classes: the decoder's weights decide (int4, int8); a float decoder, its PLE table (ple-int8,
ple-int4), then its KV cache (kv-fp16); all float32: fp32. The limits were set from the trained tiny model
(exporter/assets/tiny_trained) with the default recipes, about 2-3x looser than measured there;
docs/quantization.md has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from ple_export.bundle.recipe import QuantRecipe
from runtime_harness.compare.judge import bound

CLASSES = ("fp32", "int8", "int4", "ple-int8", "ple-int4", "kv-fp16")


def recipe_class(recipe: QuantRecipe, kv_dtype: str = "float32") -> str:
    """Which thresholds apply to a bundle of `recipe` whose KV cache is `kv_dtype`: the coarsest
    precision in it decides."""
    if recipe.weights in ("int4", "int8"):
        return recipe.weights
    if recipe.ple in ("int4", "int8"):
        return f"ple-{recipe.ple}"
    if kv_dtype == "float16":
        return "kv-fp16"
    return "fp32"


@dataclass(frozen=True)
class Parity:
    """verify: per step, bundle logits against the reference's, on the reference's greedy path."""

    max_rel_error: float = bound("max_rel_error", "<=")  # max |a - r| / max |r|, per step
    min_cosine: float = bound("min_cosine", ">=")
    min_top1: float = bound("top1_agreement_unambiguous", ">=")  # of the steps that are not near-ties
    max_mean_kl: float = bound("mean_kl", "<=")  # mean over steps of KL(softmax(r) || softmax(a)), nats
    min_topk_overlap: float = bound("mean_topk_overlap", ">=")
    near_tie: float = 0.0  # a reference top-2 margin (logits) below this makes a top-1 mismatch ambiguous


# fp32: the bundle computes what the reference computes (rounding only). Measured on the trained tiny
# model: int4 block 32: max rel 0.15, cosine 0.993, top-1 0.96, KL 0.02, top-5 0.89; block 64
# asymmetric: 0.17, 0.990, 1.0 of unambiguous steps, KL 0.023, top-5 0.91; block 128 asymmetric (RTN):
# 0.13, 0.994, 1.0, KL 0.028, top-5 0.91; the default, block 256 asymmetric with clip search: 0.13,
# 0.995, 1.0, KL 0.025, top-5 0.88; int8: 0.012, 0.99999, 1.0, 0.0002, 0.99.
_PARITY_INT8 = Parity(0.05, 0.999, 0.95, 0.005, 0.9, 0.2)
_PARITY_INT4 = Parity(0.35, 0.98, 0.8, 0.08, 0.75, 0.5)
PARITY = {
    "fp32": Parity(1e-4, 0.99999, 1.0, 1e-6, 1.0, 1e-3),
    "int8": _PARITY_INT8,
    "int4": _PARITY_INT4,
    "ple-int8": _PARITY_INT8,  # judged as strictly as the coarsest precision in the bundle
    "ple-int4": _PARITY_INT4,
    # a float16 KV cache (fp32 weights): measured on the trained tiny model, 6 prompts x 32 steps past
    # the window, against ours and transformers: max rel 2.2e-4, cosine 0.99999999, KL 1.4e-8
    "kv-fp16": Parity(1e-3, 0.99999, 1.0, 1e-6, 1.0, 1e-3),
}


@dataclass(frozen=True)
class Quality:
    """quality: a quantized bundle against the fp32 bundle of the same model, on held-out text."""

    max_perplexity_ratio: float = bound("perplexity_ratio", "<=")
    max_mean_kl: float = bound("mean_kl", "<=")
    min_top1: float = bound("top1_agreement", ">=")
    min_cosine: float = bound("mean_cosine", ">=")


# Measured on the trained tiny model's held-out text: int4 block 256 asymmetric with clip search (the
# default): perplexity x1.021, KL 0.035, top-1 0.84, cosine 0.9958; block 128 asymmetric, plain RTN:
# x1.032, KL 0.036, top-1 0.83, cosine 0.9957; block 64 asymmetric: x1.025, KL 0.030, top-1 0.85,
# cosine 0.9963; block 32 symmetric: x1.038, KL 0.029, top-1 0.83, cosine 0.9966; int8: x1.0008, KL
# 0.0002, top-1 0.986; int8 PLE table alone: x1.0000; int4 PLE table alone: x1.0014, KL 0.0013.
QUALITY = {
    "int4": Quality(1.06, 0.05, 0.78, 0.99),
    "int8": Quality(1.005, 0.002, 0.97, 0.9995),
    "ple-int8": Quality(1.002, 0.0005, 0.99, 0.9999),
    "ple-int4": Quality(1.01, 0.005, 0.95, 0.999),
    # float16 KV cache alone: x1.000014, KL 2.8e-8, top-1 1.0, cosine 1.0 (with int4 weights: x1.0211
    # against int4 alone x1.0213)
    "kv-fp16": Quality(1.0005, 1e-6, 0.995, 0.99999),
}
