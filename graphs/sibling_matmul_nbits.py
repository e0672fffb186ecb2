"""MatMulNBits nodes that read the same input with the same settings -> one MatMulNBits + Split.

    x -> MatMulNBits(Wq) -> q                x -> MatMulNBits([Wq; Wk; Wv]) -> Split(Nq, Nk, Nv) -> q, k, v
    x -> MatMulNBits(Wk) -> k        =>
    x -> MatMulNBits(Wv) -> v

In a decoder layer: q/k/v of the attention, gate/up of the MLP. MatMulNBits quantizes row by row
(blocks along K, one row per output), so the merged tensor's data, scales and zero points are the
members' one after the other: the merged plan lists the member sources in order and the layout
stage streams them in turn (`exporter/plan_writer.py`); the manifest still reports each member.
One call instead of two or three saves the per-call cost at decode (M = 1): measured on this CPU,
two [1024 -> 4096] int4 calls 406 us, one [1024 -> 8192] 360 us; q/k/v 70 -> 64 us.

Members must be planned (quantized by `matmul_nbits.py`), read by this node only, and agree on
K, bits, block size, accuracy level and zero points. The tied embedding's head has no siblings.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass

from graphs.counted import Counted
from graphs.patterns import MS_DOMAIN, take_over
from graphs.weight_plan import BlockQuant, plan_of, register_planned

_ATTRS = ("K", "bits", "block_size", "accuracy_level")


def _member_key(node: ir.Node) -> tuple[object, ...] | None:
    """What siblings must share, or None if the node cannot be merged."""
    if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN or not 3 <= len(node.inputs) <= 4:
        return None
    x, *weights = node.inputs
    if x is None or any(w is None or plan_of(w) is None or len(w.uses()) != 1 for w in weights):
        return None
    if any(a not in node.attributes for a in ("K", "N", "bits", "block_size")):
        return None
    attrs = tuple(node.attributes.get_int(a, 0) for a in _ATTRS)
    return (id(x), *attrs, len(node.inputs))


def _merged_input(graph: ir.Graph, values: list[ir.Value], name: str) -> ir.Value:
    plans = [plan_of(v) for v in values]
    assert all(p is not None for p in plans)
    first: BlockQuant = plans[0]  # type: ignore[assignment]
    members = tuple(s for p in plans for s in p.sources())  # type: ignore[union-attr]
    plan = BlockQuant(
        "+".join(members),
        first.bits,
        first.block_size,
        first.symmetric,
        first.layout,
        first.part,
        first.scales_dtype,
        members,
        first.clip_search,
    )
    shapes = [v.shape.numpy() for v in values if v.shape is not None]
    shape = (sum(s[0] for s in shapes), *shapes[0][1:])
    dtype = values[0].dtype
    assert dtype is not None and len(shapes) == len(values)
    parts = [v.const_value for v in values]

    def compute() -> ir.TensorProtocol:
        return ir.tensor(np.concatenate([p.numpy() for p in parts], axis=0), name=name)  # type: ignore[union-attr]

    return register_planned(graph, name, plan, compute, dtype, shape)


class MergeSiblingMatMulNBits(InPlacePass):
    """Returns `Counted`: how many groups of siblings were merged."""

    def call(self, model: ir.Model) -> Counted:
        graph = model.graph
        groups: dict[tuple[object, ...], list[ir.Node]] = {}
        for node in graph:
            key = _member_key(node)
            if key is not None:
                groups.setdefault(key, []).append(node)
        merged = [nodes for nodes in groups.values() if len(nodes) > 1]
        for nodes in merged:
            self._merge(graph, nodes)
        return Counted.of(model, len(merged))

    def _merge(self, graph: ir.Graph, nodes: list[ir.Node]) -> None:
        first = nodes[0]
        name = "+".join(n.name or "" for n in nodes)
        sizes = [n.attributes.get_int("N", 0) for n in nodes]
        inputs: list[ir.Value | None] = [first.inputs[0]]
        for idx in range(1, len(first.inputs)):
            values = [n.inputs[idx] for n in nodes]
            inputs.append(_merged_input(graph, values, f"{name}.{idx}"))  # type: ignore[arg-type]
        attributes: dict[str, int] = {a: first.attributes.get_int(a, 0) for a in _ATTRS}
        attributes["N"] = sum(sizes)
        merged = ir.node(
            "MatMulNBits",
            inputs,
            attributes=attributes,
            domain=MS_DOMAIN,
            name=f"{name}/merged",
            outputs=[ir.Value(name=f"{name}/merged.out")],
        )
        # a Constant node, not an initializer: initializers are weights the layout stage streams
        split_sizes = ir.node(
            "Constant",
            [],
            attributes={"value": ir.tensor(np.array(sizes, dtype=np.int64), name=f"{name}/split_sizes")},
            name=f"{name}/split_sizes",
            outputs=[ir.Value(name=f"{name}/split_sizes")],
        )
        split = ir.node(
            "Split",
            [merged.outputs[0], split_sizes.outputs[0]],
            attributes={"axis": -1},
            name=f"{name}/split",
            outputs=[ir.Value(name=f"{n.outputs[0].name}.split") for n in nodes],
        )
        graph.insert_before(first, [merged, split_sizes, split])
        for node, new in zip(nodes, split.outputs, strict=True):
            take_over(node.outputs[0], new)
            weights = [v for v in node.inputs[1:] if v is not None]
            graph.remove(node, safe=True)
            for w in weights:
                if not w.uses() and w.name is not None and w.name in graph.initializers:
                    graph.initializers.pop(w.name)
