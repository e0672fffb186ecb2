"""Tidy a traced graph with onnxscript's optimizer, without ever reading a weight.

The dynamo tracer leaves a lot of small plumbing: Constant nodes, Reshapes of constants (the
ReduceMean axes), Cast/CastLike to the type a value already has, SplitToSequence/SequenceAt for
`chunk()`, Identity. onnxscript's constant folder and (most of) its default rewrite rules remove
it. Run as is (`onnxscript.optimizer.optimize`), the optimizer would read every initializer: at
pass time those hold fake tensors (tracing under FakeTensorMode), lazily quantized weights, or
external data; it would fold `Transpose(W)` of a weight into a transposed copy (the pattern
`graphs.matmul_nbits` rewrites); and it lifts every constant into a new initializer that the
layout stage has no source for.

So `clean` runs the optimizer's parts with every initializer's value hidden (`const_value` set to
None for the duration, restored by value identity afterwards): a weight is then an opaque input
and nothing that reads one folds. What folds comes only from Constant nodes, and is put back as
Constant nodes, so the graph's initializers stay exactly its weights (minus any left unused), with
their values, names and `meta` (the weight plan, `graphs.weight_plan.PLAN`) untouched. Graph
inputs and outputs keep their names.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
import onnxscript.rewriter
import onnxscript.rewriter.rules.common as common_rules

# Folded tensors larger than this stay unfolded: they come from Constant nodes only (weights are
# hidden), so anything this size would be a table we would rather compute than store.
FOLD_SIZE_LIMIT = 4096
MAX_ROUNDS = 4


def op_counts(model: ir.Model) -> Counter[str]:
    """Node count by op type (`domain::op` outside the default domain), subgraphs included."""
    return Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )


@contextlib.contextmanager
def hidden_initializer_values(graph: ir.Graph) -> Iterator[set[int]]:
    """Every initializer of `graph` looks valueless inside the block; yields their ids.

    Values are restored by identity on exit (also on error), whatever happened to the graph
    meanwhile: an initializer a pass dropped gets its value back too (harmless)."""
    saved = {id(v): (v, v.const_value) for v in graph.initializers.values()}
    for value, _ in saved.values():
        value.const_value = None
    try:
        yield set(saved)
    finally:
        for value, tensor in saved.values():
            value.const_value = tensor


# onnxscript's default rewrite rules (what `optimize` runs) less those for ops the decoder does not
# have (Conv, BatchNorm, Clip, Dropout, ScatterND, ConstantOfShape), those that would turn a
# MatMul into a Gemm, and `slice_split_rule`: it has several output nodes, which the matcher
# searches by trying every node of the graph against every candidate (quadratic: 20 s of 30 on
# the tiny decoder, far worse on e2b).
RULES = (
    common_rules.add_0_rule,
    common_rules.sub_0_rule,
    common_rules.mul_by_1_rule,
    common_rules.div_by_1_rule,
    common_rules.no_op_cast_rule,
    common_rules.cast_cast_rule,
    common_rules.no_op_expand_rule,
    common_rules.no_op_transpose_rule,
    common_rules.transpose_transpose_rule,
    common_rules.reshape_reshape_rule,
    common_rules.materialize_reshape_shape_rule,
    common_rules.flatten_to_reshape_rule,
    common_rules.unsqueeze_unsqueeze_rule,
    common_rules.squeeze_reshape_1d_rule,
    common_rules.collapse_slice_rule,
    common_rules.collapse_slice2_rule,
    common_rules.one_reshape_matmul_reshape_rule,
    common_rules.two_reshapes_matmul_reshape_rule,
)


def _initializers_to_constants(graph: ir.Graph, keep: set[int]) -> int:
    """Turn initializers the optimizer created (folded values) back into Constant nodes, placed
    first in the graph. The initializers in `keep` (the weights) stay."""
    created = [v for v in graph.initializers.values() if id(v) not in keep]
    nodes = []
    for value in created:
        assert value.name is not None and value.const_value is not None
        graph.initializers.pop(value.name)
        node = ir.node(
            "Constant",
            [],
            attributes={"value": value.const_value},
            outputs=[ir.Value(name=value.name, shape=value.shape, type=value.type)],
        )
        node.outputs[0].const_value = value.const_value
        was_output = value.is_graph_output()
        value.replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
        if was_output:  # the graph output keeps its public name
            value.name = f"{value.name}.folded"
        nodes.append(node)
    if nodes and len(graph):
        graph.insert_before(graph[0], nodes)
    else:
        graph.extend(nodes)
    return len(nodes)


def clean(model: ir.Model) -> dict[str, int]:
    """Fold constants, drop no-op casts, Identity and sequence ops, dedupe small Constants and
    remove what is unused, in place. Returns the node count by op type that changed:
    `{op: after - before}` (negative: removed), plus "nodes" (the total change)."""
    graph = model.graph
    before = op_counts(model)
    input_names = [v.name for v in graph.inputs]
    output_names = [v.name for v in graph.outputs]
    with hidden_initializer_values(graph) as weights:

        def should_fold(node: ir.Node) -> bool | None:
            # defense in depth: a node reading a weight never folds, even if a value showed up
            if any(v is not None and id(v) in weights for v in node.inputs):
                return False
            return None

        for _ in range(MAX_ROUNDS):
            folded = onnxscript.optimizer.fold_constants(
                model,
                input_size_limit=FOLD_SIZE_LIMIT,
                output_size_limit=FOLD_SIZE_LIMIT,
                should_fold=should_fold,
            )
            rewritten = onnxscript.rewriter.RewritePass(RULES)(model)
            common_passes.RemoveUnusedNodesPass()(model)
            if not (folded.modified or rewritten.modified):
                break
        _initializers_to_constants(graph, weights)
        common_passes.CommonSubexpressionEliminationPass(size_limit=FOLD_SIZE_LIMIT)(model)
        common_passes.RemoveUnusedNodesPass()(model)
    assert [v.name for v in graph.inputs] == input_names
    assert [v.name for v in graph.outputs] == output_names, "a graph output lost its name"
    after = op_counts(model)
    changes = {op: after[op] - before[op] for op in sorted(before | after) if after[op] != before[op]}
    changes["nodes"] = after.total() - before.total()
    return changes
