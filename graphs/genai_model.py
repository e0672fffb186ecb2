"""One graph for onnxruntime-genai: the embedder spliced in front of the decoder, graph only.

onnxruntime-genai runs one decoder model per step (`input_ids`, `position_ids`, past KV -> logits,
present KV). A bundle has two graphs, so this builds a third, small file from them:

    input_ids -> [embedder's nodes, names prefixed] -> per_layer_inputs --+
    input_ids, position_ids, past KV ------------------------------------+-> decoder's nodes -> ...
    logits_positions = Shape(input_ids)[1:2] - 1   (the last position only: logits [batch, 1, vocab])

- every initializer keeps its external-data reference (`decoder.data`, `ple_table.data`): no weight
  is copied, and the PLE table is still memory-mapped from its own file;
- the embedder's node and internal value names are prefixed (both graphs were traced alone and both
  use `val_N`, `node_Shape_5`); its input is the decoder's `input_ids`;
- `logits_positions` stops being an input: computed from the ids' length, it asks for the last
  position, and the logits output is declared `[batch, 1, vocab]`, which onnxruntime-genai reads as
  a pruned model (it never runs the LM head over a whole prompt chunk);
- the presents become whole caches again (`whole_presents`): onnxruntime-genai (with
  `past_present_share_buffer` off) feeds each present back as the next past, so each one is
  `Concat(past, new positions)`, a sliding layer's cut to its last window - 1 positions; the decoder
  returns the new positions only and our runtime appends them in place;
- everything else (RotaryEmbedding, MatMulNBits, GatherBlockQuantized, attention over past and new
  keys without a copy) is the decoder as exported.

The result must be saved in the bundle's folder: onnxruntime refuses external data outside the
model's folder.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

PREFIX = "embedder/"


def _value(graph: ir.Graph, name: str, side: str) -> ir.Value:
    values = graph.inputs if side == "input" else graph.outputs
    found = [v for v in values if v.name == name]
    if len(found) != 1:
        raise ValueError(f"graph {graph.name!r} has no {side} {name!r}")
    return found[0]


def _constant(name: str, values: list[int]) -> ir.Node:
    tensor = ir.tensor(np.array(values, dtype=np.int64), name=name)
    return ir.node("Constant", [], attributes={"value": tensor}, outputs=[ir.Value(name=name)])


def _last_position(ids: ir.Value) -> tuple[list[ir.Node], ir.Value]:
    """`Shape(ids)[1:2] - 1`: the index of the last new token, as the 1-D logits_positions."""
    length = ir.node(
        "Shape", [ids], attributes={"start": 1, "end": 2}, outputs=[ir.Value(name="genai/sequence")]
    )
    one = _constant("genai/one", [1])
    last = ir.node(
        "Sub", [length.outputs[0], one.outputs[0]], outputs=[ir.Value(name="genai/logits_positions")]
    )
    last.outputs[0].dtype = ir.DataType.INT64
    last.outputs[0].shape = ir.Shape([1])
    return [length, one, last], last.outputs[0]


def splice(
    embedder: ir.Model,
    decoder: ir.Model,
    ids: str,
    per_layer_inputs: str,
    logits_positions: str,
    logits: str,
) -> ir.Model:
    """The decoder with the embedder's nodes in front and the last position's logits (names are the
    contract's). Takes both models apart: use fresh loads."""
    emb, dec = embedder.graph, decoder.graph
    emb_ids, emb_out = _value(emb, ids, "input"), _value(emb, per_layer_inputs, "output")
    dec_ids, dec_pli = _value(dec, ids, "input"), _value(dec, per_layer_inputs, "input")
    dec_lp, dec_logits = _value(dec, logits_positions, "input"), _value(dec, logits, "output")
    emb_ids.replace_all_uses_with(dec_ids)
    emb.outputs.clear()
    nodes = list(emb)
    for node in nodes:
        emb.remove(node)
        node.name = PREFIX + (node.name or node.op_type)
        for out in node.outputs:
            out.name = PREFIX + (out.name or "")
    initializers = list(emb.initializers.values())
    emb.initializers.clear()
    for init in initializers:
        init.name = PREFIX + (init.name or "")
        dec.register_initializer(init)
    lp_nodes, last = _last_position(dec_ids)
    for node in reversed(nodes + lp_nodes):  # one by one: onnx-ir names unnamed nodes in this order
        dec.insert_before(dec[0], node)
    dec_pli.replace_all_uses_with(emb_out)
    dec_lp.replace_all_uses_with(last)
    dec.inputs.remove(dec_pli)
    dec.inputs.remove(dec_lp)
    assert dec_logits.shape is not None and len(dec_logits.shape) == 3
    dec_logits.shape = ir.Shape([dec_logits.shape[0], 1, dec_logits.shape[2]])
    for domain, version in embedder.opset_imports.items():
        if decoder.opset_imports.setdefault(domain, version) != version:
            raise ValueError(f"the graphs import {domain or 'ai.onnx'} at different versions")
    return decoder


def whole_presents(model: ir.Model, kv: list[tuple[str, str, int | None, tuple[object, ...]]]) -> ir.Model:
    """Each (past input, present output, max_length, whole-cache dims) pair: the present, the new
    positions only, becomes `Concat(past, new)` over the positions axis, its last `max_length` where
    one is given, under the present's name and declared with the whole cache's dims."""
    graph = model.graph
    for past_name, present_name, max_length, dims in kv:
        past, new = _value(graph, past_name, "input"), _value(graph, present_name, "output")
        new.name = f"genai/{present_name}/new"
        whole = ir.node("Concat", [past, new], attributes={"axis": 2}, outputs=[ir.Value(name=present_name)])
        added = [whole]
        if max_length is not None:
            start = _constant(f"genai/{present_name}/start", [-max_length])
            end = _constant(f"genai/{present_name}/end", [np.iinfo(np.int64).max])
            axis = _constant(f"genai/{present_name}/axis", [2])
            whole.outputs[0].name = f"genai/{present_name}/whole"
            cut = ir.node(
                "Slice",
                [whole.outputs[0], start.outputs[0], end.outputs[0], axis.outputs[0]],
                outputs=[ir.Value(name=present_name)],
            )
            added += [start, end, axis, cut]
        out = added[-1].outputs[0]
        assert new.dtype is not None
        out.dtype, out.shape = new.dtype, ir.Shape(list(dims))  # type: ignore[arg-type]
        for node in added:
            graph.append(node)
        graph.outputs[graph.outputs.index(new)] = out
    return model
