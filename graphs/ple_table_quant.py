"""The PLE table's lookup -> `com.microsoft.GatherBlockQuantized` over an int8 or int4 table.

    ids --Gather(ple_table [V, L*P] bf16)-->        ids --GatherBlockQuantized(bits, block_size)-->
                                              =>        ple_table.codes [V, L*P*bits/8] uint8,
                                                        ple_table.scales [V, L*P/block]

onnxruntime reads a uint8 GatherBlockQuantized table in place from its memory map (no prepack, no
heap copy: tests/test_bundle.py::test_onnxruntime_maps_the_ple_table_instead_of_copying_it measures
anonymous RSS against a control), so the table stays in flash. With the
default block (int8: the PLE width, one scale per layer slice of a row) a token reads its row's
codes plus one small row of scales. The output takes the scales' type (float32 or float16).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import InPlacePass

from graphs.counted import QuantizedTable
from graphs.patterns import MS_DOMAIN, replace_node, take_over
from graphs.weight_plan import quantized_inputs
from ple_export.bundle.format import PLE_TABLE_TENSOR
from ple_export.bundle.recipe import QuantRecipe, bits_of

TABLE = PLE_TABLE_TENSOR


class PleTableToGatherBlockQuantized(InPlacePass):
    def __init__(self, recipe: QuantRecipe, ple_dim: int):
        super().__init__()
        self.recipe = recipe
        self.ple_dim = ple_dim

    def call(self, model: ir.Model) -> QuantizedTable:
        if self.recipe.ple == "none":
            return QuantizedTable(model, False)
        graph = model.graph
        table = graph.initializers[TABLE]
        assert table.shape is not None
        row = int(table.shape.numpy()[1])
        block = self.recipe.ple_block_for(self.ple_dim, row)
        if block is None:
            return QuantizedTable(model, False)
        bits = bits_of(self.recipe.ple)
        data, scales, zp = quantized_inputs(
            graph,
            table,
            bits,
            block,
            self.recipe.ple_symmetric,
            "gather_block_quantized",
            TABLE,
            self.recipe.scales_dtype,
            names={"data": f"{TABLE}.codes"},  # not `ple_table.data`: that is the file's name
        )
        for use in list(table.uses()):
            gather = use.node
            assert gather.op_type == "Gather" and use.idx == 0, f"unexpected use of the PLE table: {gather}"
            node = ir.node(
                "GatherBlockQuantized",
                [data, gather.inputs[1], scales] + ([zp] if zp is not None else []),
                attributes={"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 1},
                domain=MS_DOMAIN,
                name=f"{TABLE}/GatherBlockQuantized",
                outputs=[ir.Value(name=f"{gather.outputs[0].name}.gbq")],
            )
            replace_node(graph, gather, node)
            # the lookup's output now has the scales' element type
            node.outputs[0].type = scales.type if scales is not None else None
            _drop_noop_casts(graph, node.outputs[0])
        graph.initializers.pop(TABLE)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        return QuantizedTable(model, True, 1, block)


def _drop_noop_casts(graph: ir.Graph, value: ir.Value) -> None:
    """A float table's lookup may be cast to float32 (an fp32 bundle's bf16 table, in `quantize`);
    the quantized lookup already is: that Cast would copy the rows for nothing."""
    for use in list(value.uses()):
        cast = use.node
        to = cast.attributes.get("to") if cast.op_type == "Cast" else None
        if to is not None and value.dtype is not None and to.as_int() == value.dtype.value:
            take_over(cast.outputs[0], value)
            graph.remove(cast, safe=True)
