"""A residual add feeding an RMSNorm -> onnxruntime's `SkipSimplifiedLayerNormalization`.

    s = Add(x, y); n = SimplifiedLayerNormalization(s, w)        (s also used later: the residual)
    n, _, _, s = SkipSimplifiedLayerNormalization(x, y, w)       (one kernel; its 4th output is the sum)

In a Gemma layer: `x + post_attn_norm(attn)` followed by `mlp_norm`. onnxscript's rule
(`ort_fusions.skip_normalization`) matches it once `fusions/rms_norm.py` has made the norms
`SimplifiedLayerNormalization`; onnxruntime's own optimizer does not fuse it at load (measured: the
traced decoder keeps its Add + SimplifiedLayerNormalization pairs).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset

from graphs.patterns import MS_DOMAIN


def fuse_skip_rms_norm(model: ir.Model) -> int:
    """Rewrite every Add -> SimplifiedLayerNormalization pair in place; returns how many."""
    count = skip_rms_normalization_ruleset.apply_to_model(model)
    if count:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return int(count)
