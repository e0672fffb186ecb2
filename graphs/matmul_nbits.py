"""Decoder Linear weights -> `com.microsoft.MatMulNBits`; a tied embedding's lookup ->
`com.microsoft.GatherBlockQuantized` over the same quantized bytes.

Traced, a Linear is `MatMul(x, Transpose(W))` with `W` `[N, K]` as HF stores it: exactly the layout
MatMulNBits quantizes (blocks along K, one row per output), so no transpose is ever materialised.

    x [.., K] --MatMul--> [.., N]          x [.., K] --MatMulNBits(K, N, bits, block_size)--> [.., N]
    W [N, K] --Transpose-^          =>     W.q [N, n_blocks, blob], W.scales [N, n_blocks] -^

A tied embedding `E` `[V, H]` is also read by `Gather(E, ids)`; that Gather becomes
`GatherBlockQuantized(E.q, ids, E.scales)`. When H is a multiple of the block size, its data,
scales and zero points are byte for byte the MatMulNBits ones: the layout stage stores them once.
Weights a recipe keeps, or whose K no block size divides, stay float (and are reported).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import InPlacePass

from graphs.counted import QuantizedWeights
from graphs.patterns import MS_DOMAIN, replace_node, transposed_initializer
from graphs.weight_plan import quantized_inputs
from ple_export.bundle.recipe import QuantRecipe, bits_of


def linear_weights(graph: ir.Graph) -> dict[str, list[tuple[ir.Node, ir.Node | None]]]:
    """Initializers `W` [N, K] used as a Linear's weight: name -> [(the MatMul or Gemm to replace,
    the Transpose feeding it or None)]. Patterns: `MatMul(x, Transpose(W, perm=[1, 0]))` (traced)
    and `Gemm(x, W, transB=1)` without bias (an fp32 bundle's tied head, see tied_lm_head.py)."""
    found: dict[str, list[tuple[ir.Node, ir.Node | None]]] = {}
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        weight = transposed_initializer(node)
        if weight is not None:
            uses = list(node.outputs[0].uses())
            if uses and all(u.node.op_type == "MatMul" and u.idx == 1 for u in uses) and weight.name:
                found.setdefault(weight.name, []).extend((u.node, node) for u in uses)
        elif node.op_type == "Gemm" and len(node.inputs) == 2:
            weight = node.inputs[1]
            attrs = node.attributes
            plain = attrs.get_int("transA", 0) == 0 and attrs.get_float("alpha", 1.0) == 1.0
            if (
                weight is not None
                and weight.is_initializer()
                and weight.name
                and plain
                and attrs.get_int("transB", 0) == 1
            ):
                found.setdefault(weight.name, []).append((node, None))
    return found


class LinearToMatMulNBits(InPlacePass):
    """Returns `QuantizedWeights`: the weights quantized (with their block size) and those kept float
    (with why)."""

    def __init__(self, recipe: QuantRecipe, always_float: tuple[str, ...] = ()):
        super().__init__()
        self.recipe = recipe
        self.always_float = QuantRecipe(keep=always_float)  # the model family's (recipe.FAMILY_FLOAT)

    def call(self, model: ir.Model) -> QuantizedWeights:
        result = QuantizedWeights(model, False)
        if self.recipe.weights == "none":
            return result
        graph = model.graph
        bits = bits_of(self.recipe.weights)
        for name, uses in linear_weights(graph).items():
            weight = graph.initializers[name]
            assert weight.shape is not None
            n, k = weight.shape.numpy()
            if self.recipe.keeps(name):
                result.kept[name] = "kept by --keep"
                continue
            if self.always_float.keeps(name):
                result.kept[name] = "kept float by the model family"
                continue
            block = self.recipe.block_for(k)
            if block is None:
                result.kept[name] = f"no power-of-two block size >= 16 divides K={k}"
                continue
            data, scales, zp = quantized_inputs(
                graph,
                weight,
                bits,
                block,
                self.recipe.symmetric,
                "matmul_nbits",
                f"{name}.nbits",
                clip_search=self.recipe.clip_search,
            )
            removed: set[int] = set()
            for linear, transpose in uses:
                x = linear.inputs[0]
                node = ir.node(
                    "MatMulNBits",
                    [x, data, scales, zp] if zp is not None else [x, data, scales],
                    attributes={
                        "K": int(k),
                        "N": int(n),
                        "bits": bits,
                        "block_size": block,
                        "accuracy_level": self.recipe.accuracy_level,
                    },
                    domain=MS_DOMAIN,
                    name=f"{name}/MatMulNBits",
                    outputs=[ir.Value(name=f"{linear.outputs[0].name}.nbits")],
                )
                replace_node(graph, linear, node)
                if transpose is not None and id(transpose) not in removed and not transpose.outputs[0].uses():
                    graph.remove(transpose, safe=True)
                    removed.add(id(transpose))
            self._quantize_lookups(graph, weight, bits, block)
            if not weight.uses():
                graph.initializers.pop(name)
            result.quantized[name] = block
        result.matches = len(result.quantized)
        result.modified = bool(result.quantized)
        if result.modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return result

    def _quantize_lookups(self, graph: ir.Graph, weight: ir.Value, bits: int, block: int) -> None:
        """`Gather(W, ids)` (axis 0) of a quantized, tied weight -> GatherBlockQuantized."""
        gathers = [
            u.node
            for u in weight.uses()
            if u.node.op_type == "Gather" and u.idx == 0 and u.node.attributes.get_int("axis", 0) == 0
        ]
        if not gathers:
            return
        data, scales, zp = quantized_inputs(
            graph,
            weight,
            bits,
            block,
            self.recipe.symmetric,
            "gather_block_quantized",
            f"{weight.name}.gbq",
            clip_search=self.recipe.clip_search,
        )
        for gather in gathers:
            ids = gather.inputs[1]
            inputs = [data, ids, scales] + ([zp] if zp is not None else [])
            node = ir.node(
                "GatherBlockQuantized",
                inputs,
                attributes={"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 1},
                domain=MS_DOMAIN,
                name=f"{weight.name}/GatherBlockQuantized",
                outputs=[ir.Value(name=f"{gather.outputs[0].name}.gbq")],
            )
            replace_node(graph, gather, node)
