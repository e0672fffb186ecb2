"""Gemma's RMSNorm -> onnxruntime's `SimplifiedLayerNormalization`.

`exporter.gemma4.RMSNorm` computes `x * (mean(x^2) + eps)^-0.5 * weight` in fp32 (Gemma 4 scales
by `weight` itself, not `1 + weight`). Traced by dynamo at opset 18 it reads

    xf = Cast(x, to=FLOAT)                      only when x is not fp32
    inv = Pow(Add(ReduceMean(Pow(xf, 2), axes=[-1], keepdims=1), eps), -0.5)
    out = Mul(Mul(xf, inv), w)                  w: a [D] weight (Cast to FLOAT when not fp32);
                                                absent in the weightless v_norm
    out = CastLike(out, x)                      `type_as(x)`: a no-op for fp32 x (or Cast(to=...))

onnxscript's stock `fuse_rms_normalization` wants `Reciprocal(Sqrt(..))`, so it matches none of
these. The rules below match that graph, raw from the tracer or after `graphs.cleanup.clean`
(the axes then are a Constant instead of a Reshape of one, the no-op CastLike is gone), and write

    SimplifiedLayerNormalization(x, w, axis=-1, epsilon=eps, stash_type=1)

(in the default domain in onnxruntime, usable at opset 18; `RMSNormalization` needs opset 23).
The weightless norm gets a Constant of ones as its scale, one per (width, dtype), so the graph's
initializers stay the checkpoint's weights. No initializer's value is ever read: the constants
checked (2, -0.5, eps, axes) must come from Constant nodes or in-memory tensors.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import MatchResult, pattern

SLN = "SimplifiedLayerNormalization"
_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_ONES_TAG = "ple_export.rms_norm.ones"  # Value.meta key marking the ones-scale constants made here
Final = Literal["none", "cast", "castlike"]


def small_constant(value: ir.Value | None, max_size: int = 64) -> np.ndarray | None:
    """The elements of a small constant, flattened, or None when not known without reading a weight.

    Known: the output of a Constant node, or Identity or Reshape of one (the tracer's ReduceMean
    axes are a Reshape of a Constant); a non-initializer value carrying an in-memory tensor. An
    initializer is never read, whatever backs it (fake, lazy or external at export time)."""
    if value is None:
        return None
    node = value.producer()
    if node is not None and node.domain in ("", "ai.onnx"):
        if node.op_type == "Constant":
            return _constant_attr(node, max_size)
        if node.op_type in ("Identity", "Reshape"):
            return small_constant(node.inputs[0], max_size)
    tensor = value.const_value
    if value.is_initializer() or tensor is None or not _in_memory(tensor) or tensor.size > max_size:
        return None
    return tensor.numpy().reshape(-1)


def _in_memory(tensor: ir.TensorProtocol) -> bool:
    """A tensor whose bytes are at hand: numpy-backed, or a TensorProto's own data (not a torch,
    possibly fake, tensor; not lazy; not external)."""
    if isinstance(tensor, ir.TensorProtoTensor):
        return True
    return type(tensor) is ir.Tensor and isinstance(tensor.raw, np.ndarray)


def _constant_attr(node: ir.Node, max_size: int) -> np.ndarray | None:
    for name, attr in node.attributes.items():
        if name == "value":
            tensor = attr.as_tensor()
            if tensor.size > max_size or not _in_memory(tensor):
                return None
            return tensor.numpy().reshape(-1)
        if name in ("value_float", "value_int"):
            return np.array([attr.value])
        if name in ("value_floats", "value_ints"):
            return np.array(list(attr.value)).reshape(-1)
    return None


def _is_scalar(value: ir.Value | None, expected: float) -> bool:
    array = small_constant(value, max_size=1)
    return array is not None and array.size == 1 and float(array[0]) == expected


class GemmaRmsNorm(pattern.RewriteRuleClassBase):
    """One shape of the traced norm: with or without a weight, and its last op (none: the weight Mul
    or the normalizing Mul; `cast`/`castlike`: a Cast back to x's type)."""

    def __init__(self, scaled: bool, final: Final, weight_first: bool = False):
        order = "_wx" if weight_first else ""
        super().__init__(f"GemmaRmsNorm{'' if scaled else 'Weightless'}_{final}{order}")
        self.scaled = scaled
        self.final = final
        self.weight_first = weight_first

    def pattern(self, op: Any, x: Any, two: Any, axes: Any, eps: Any, neg_half: Any, scale: Any) -> Any:
        xf = pattern.OrValue([op.Cast(x, _outputs=["x_cast"]), x])
        mean = op.ReduceMean(op.Pow(xf, two), axes, _outputs=["mean"])
        inv = op.Pow(op.Add(mean, eps), neg_half)
        out = op.Mul(xf, inv)
        if self.scaled:
            weight = pattern.OrValue([op.Cast(scale, _outputs=["scale_cast"]), scale])
            out = op.Mul(weight, out) if self.weight_first else op.Mul(out, weight)
        if self.final == "cast":
            return op.Cast(out, _outputs=["result"])
        if self.final == "castlike":
            return op.CastLike(out, x, _outputs=["result"])
        return out

    def check(  # the first argument is the match context (the base class calls it `op`)
        self,
        op: Any,
        x: ir.Value,
        two: ir.Value,
        axes: ir.Value,
        eps: ir.Value,
        neg_half: ir.Value,
        mean: ir.Value,
        scale: ir.Value | None = None,
        x_cast: ir.Value | None = None,
        scale_cast: ir.Value | None = None,
        **_: Any,
    ) -> MatchResult:
        result = MatchResult()
        if not (_is_scalar(two, 2.0) and _is_scalar(neg_half, -0.5)):
            return result.fail("not Pow(mean(x^2) + eps, -0.5)")
        epsilon = small_constant(eps, max_size=1)
        if epsilon is None or epsilon.size != 1 or not np.issubdtype(epsilon.dtype, np.floating):
            return result.fail("eps is not a known float scalar", eps)
        if x.dtype not in _FLOATS or x.shape is None or x.shape.rank() < 1:
            return result.fail("x is not a float tensor of known rank", x)
        reduce_mean = mean.producer()
        assert reduce_mean is not None
        rank = x.shape.rank()
        reduced = small_constant(axes, max_size=rank)
        if reduced is None or [int(a) % rank for a in reduced] != [rank - 1]:
            return result.fail("ReduceMean is not over the last axis", axes)
        attrs = reduce_mean.attributes
        if attrs.get_int("keepdims", 1) != 1 or attrs.get_int("noop_with_empty_axes", 0) != 0:
            return result.fail("ReduceMean drops the reduced axis", reduce_mean)
        # the arithmetic runs in fp32: that is stash_type=1
        compute = _cast_to(x_cast) if x_cast is not None else x.dtype
        if compute != ir.DataType.FLOAT:
            return result.fail("the norm is not computed in fp32", x)
        width = x.shape[-1]
        if self.scaled:
            assert scale is not None
            if scale_cast is not None and _cast_to(scale_cast) != ir.DataType.FLOAT:
                return result.fail("the weight is not cast to fp32", scale)
            if scale.shape is None or scale.shape.rank() != 1 or not isinstance(width, int):
                return result.fail("the weight is not 1-D over a known last axis", scale)
            if scale.shape[0] != width:
                return result.fail(f"weight of {scale.shape[0]} over a last axis of {width}", scale)
            if scale.dtype != x.dtype:
                return result.fail("weight and x differ in dtype", scale)
        elif not isinstance(width, int):
            return result.fail("the last axis of x is not static (the ones scale needs it)", x)
        out = op.output_values[0]
        if out.dtype != x.dtype:
            return result.fail("the output's dtype is not x's", out)
        return result

    def rewrite(self, op: Any, x: ir.Value, eps: ir.Value, scale: ir.Value | None = None, **_: Any) -> Any:
        epsilon = small_constant(eps, max_size=1)
        assert epsilon is not None and x.shape is not None and x.dtype is not None
        if not self.scaled:
            width = x.shape[-1]
            assert isinstance(width, int)  # checked
            ones = ir.tensor(np.ones(width, dtype=x.dtype.numpy()))
            scale = op.Constant(value=ones)
            scale.meta[_ONES_TAG] = True
        return op.SimplifiedLayerNormalization(
            x, scale, axis=-1, epsilon=float(epsilon[0]), stash_type=int(ir.DataType.FLOAT)
        )


def _cast_to(cast_output: ir.Value) -> ir.DataType | None:
    node = cast_output.producer()
    assert node is not None
    return ir.DataType(node.attributes.get_int("to")) if "to" in node.attributes else None


# Passes in this order: a weighted norm contains the weightless pattern, and a norm followed by its
# cast back contains the one without: the longer match must come first.
RULE_PASSES = [
    [
        GemmaRmsNorm.rule(scaled=True, final=f, weight_first=w)
        for f in ("castlike", "cast")
        for w in (False, True)
    ],
    [GemmaRmsNorm.rule(scaled=True, final="none", weight_first=w) for w in (False, True)],
    [GemmaRmsNorm.rule(scaled=False, final=f) for f in ("castlike", "cast")],
    [GemmaRmsNorm.rule(scaled=False, final="none")],
]


def apply_rules(model: ir.Model, rules: list[pattern.RewriteRule]) -> int:
    """Apply `rules` to the model's graph; the number of rewrites. (Not `commute=True`: in
    onnxscript 0.7.2 it fails on patterns holding an `OrValue`.)"""
    return pattern.RewriteRuleSet(rules).apply_to_model(model)


def fuse_rms_norm(model: ir.Model) -> int:
    """Rewrite every Gemma RMSNorm in `model` in place; returns how many were fused."""
    count = sum(apply_rules(model, rules) for rules in RULE_PASSES)
    if count:
        _share_ones(model.graph)
        RemoveUnusedNodesPass()(model)  # the matched norms' Constants (2, -0.5, eps, axes)
    return count


def _share_ones(graph: ir.Graph) -> None:
    """One ones-scale Constant per (width, dtype), at the top of the graph."""
    kept: dict[tuple[object, ...], ir.Value] = {}
    for node in list(graph):
        value = node.outputs[0] if node.op_type == "Constant" else None
        if value is None or not value.meta.get(_ONES_TAG):
            continue
        key = (value.dtype, tuple(value.shape or ()))
        if key in kept:
            value.replace_all_uses_with(kept[key])
            graph.remove(node, safe=True)
            continue
        kept[key] = value
        assert value.dtype is not None and value.shape is not None
        value.name = f"rms_norm.ones.{value.dtype.name.lower()}.{value.shape[0]}"
        graph.remove(node)
        graph.insert_before(graph[0], node) if len(graph) else graph.append(node)
