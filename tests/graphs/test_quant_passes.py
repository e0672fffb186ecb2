"""LinearToMatMulNBits and PleTableToGatherBlockQuantized on small in-memory models: onnxruntime runs
the graph before and after the pass (its own optimizations off); the output after must equal the
float graph run on the dequantized weights (what the pass promises), stay near the float output
(what quantization costs), and use the ops the pass names."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphs.counted import QuantizedTable, QuantizedWeights
from graphs.matmul_nbits import LinearToMatMulNBits
from graphs.ple_table_quant import PleTableToGatherBlockQuantized
from graphs.quant.blockwise import dequantize_blockwise, quantize_blockwise
from ple_export.bundle.recipe import QuantRecipe
from tests.graphs.helpers import run_unoptimized

RNG = np.random.default_rng(0)


def _init(graph_inits: list[ir.Value], name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
    value.const_value = ir.tensor(array, name=name)
    graph_inits.append(value)
    return value


def linear_model(weights: dict[str, np.ndarray], tied: np.ndarray | None = None) -> ir.Model:
    """x [B, S, K] -> chain of Linear layers (MatMul over Transpose(W), as torch traces them);
    with `tied` [V, K]: ids -> Gather(E) added to x first, and a final LM head MatMul(., E^T)."""
    inits: list[ir.Value] = []
    k = next(iter(weights.values())).shape[1]
    x = ir.Value(name="x", shape=ir.Shape(["b", "s", k]), type=ir.TensorType(ir.DataType.FLOAT))
    inputs = [x]
    nodes: list[ir.Node] = []
    h = x
    if tied is not None:
        ids = ir.Value(name="ids", shape=ir.Shape(["b", "s"]), type=ir.TensorType(ir.DataType.INT64))
        inputs.append(ids)
        emb = _init(inits, "embed.weight", tied)
        gather = ir.node("Gather", [emb, ids], outputs=[ir.Value(name="looked_up")])
        add = ir.node("Add", [h, gather.outputs[0]], outputs=[ir.Value(name="h_in")])
        nodes += [gather, add]
        h = add.outputs[0]
    for name, w in weights.items():
        wv = _init(inits, name, w)
        t = ir.node("Transpose", [wv], attributes={"perm": [1, 0]}, outputs=[ir.Value(name=f"{name}_t")])
        mm = ir.node("MatMul", [h, t.outputs[0]], outputs=[ir.Value(name=f"{name}_out")])
        nodes += [t, mm]
        h = mm.outputs[0]
    if tied is not None:
        t = ir.node("Transpose", [emb], attributes={"perm": [1, 0]}, outputs=[ir.Value(name="embed_t")])
        mm = ir.node("MatMul", [h, t.outputs[0]], outputs=[ir.Value(name="logits")])
        nodes += [t, mm]
        h = mm.outputs[0]
    graph = ir.Graph(inputs, [h], nodes=nodes, initializers=inits, opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


def _dequantized(
    w: np.ndarray, bits: int, block: int, symmetric: bool, clip_search: bool = True
) -> np.ndarray:
    """What the passes store, dequantized (decoder weights: the recipe's clip search, on by default;
    the PLE table: always round-to-nearest)."""
    return dequantize_blockwise(quantize_blockwise(w, bits, block, symmetric, clip_search=clip_search))


def _ops(model: ir.Model) -> list[str]:
    return sorted(n.op_type for n in model.graph)


@pytest.mark.parametrize("clip_search", [True, False], ids=["clip", "rtn"])
@pytest.mark.parametrize("quant, symmetric", [("int4", True), ("int4", False), ("int8", True)])
def test_linears_become_matmul_nbits(quant: str, symmetric: bool, clip_search: bool) -> None:
    bits = {"int4": 4, "int8": 8}[quant]
    weights = {
        "l1": RNG.normal(0, 0.1, (96, 64)).astype(np.float32),
        "l2": RNG.normal(0, 0.1, (64, 96)).astype(np.float32),
    }
    x = RNG.normal(0, 1, (2, 3, 64)).astype(np.float32)
    before = run_unoptimized(linear_model(weights), {"x": x})[0]

    model = linear_model(weights)
    recipe = QuantRecipe(
        weights=quant, block_size=32, symmetric=symmetric, accuracy_level=0, clip_search=clip_search
    )
    result = LinearToMatMulNBits(recipe)(model)
    assert result.modified
    assert _ops(model) == ["MatMulNBits", "MatMulNBits"]  # no Transpose, no float MatMul left
    assert "l1" not in model.graph.initializers  # the float weight is gone
    after = run_unoptimized(model, {"x": x})[0]

    dq = {n: _dequantized(w, bits, 32, symmetric, clip_search) for n, w in weights.items()}
    expected = run_unoptimized(linear_model(dq), {"x": x})[0]
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-5)
    rel = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert rel < (0.15 if bits == 4 else 0.02), rel
    assert rel > 1e-6  # it did quantize


def test_tied_embedding_is_quantized_once_for_lookup_and_head() -> None:
    emb = RNG.normal(0, 0.1, (128, 64)).astype(np.float32)
    weights = {"l1": RNG.normal(0, 0.1, (64, 64)).astype(np.float32)}
    x = RNG.normal(0, 1, (1, 4, 64)).astype(np.float32)
    ids = RNG.integers(0, 128, (1, 4))
    model = linear_model(weights, tied=emb)
    LinearToMatMulNBits(QuantRecipe(weights="int4", block_size=32, symmetric=True, accuracy_level=0))(model)
    assert _ops(model) == ["Add", "GatherBlockQuantized", "MatMulNBits", "MatMulNBits"]
    after = run_unoptimized(model, {"x": x, "ids": ids})[0]
    dq = _dequantized(emb, 4, 32, True)
    expected = run_unoptimized(
        linear_model({"l1": _dequantized(weights["l1"], 4, 32, True)}, tied=dq), {"x": x, "ids": ids}
    )[0]
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-5)
    # the lookup's and the head's bytes are the same: the layout stage stores them once
    inits = model.graph.initializers
    gbq, nbits = inits["embed.weight.gbq.data"], inits["embed.weight.nbits.data"]
    assert gbq.const_value is not None and nbits.const_value is not None
    assert gbq.const_value.tobytes() == nbits.const_value.tobytes()
    assert (
        inits["embed.weight.gbq.scales"].const_value.tobytes()
        == inits[  # type: ignore[union-attr]
            "embed.weight.nbits.scales"
        ].const_value.tobytes()
    )  # type: ignore[union-attr]


def test_kept_and_indivisible_weights_stay_float() -> None:
    weights = {
        "keep_me": RNG.normal(0, 0.1, (64, 64)).astype(np.float32),
        "odd": RNG.normal(0, 0.1, (64, 64)).astype(np.float32),
    }
    weights["odd"] = RNG.normal(0, 0.1, (40, 64)).astype(np.float32)
    weights["tail"] = RNG.normal(0, 0.1, (32, 40)).astype(
        np.float32
    )  # K=40: no power-of-two block >= 16 divides it
    model = linear_model(weights)
    result = LinearToMatMulNBits(QuantRecipe(keep=("keep_me",)))(model)
    assert isinstance(result, QuantizedWeights)
    assert set(result.kept) == {"keep_me", "tail"} and set(result.quantized) == {"odd"}
    assert result.matches == 1
    assert _ops(model).count("MatMul") == 2 and _ops(model).count("MatMulNBits") == 1


def test_recipe_none_changes_nothing() -> None:
    model = linear_model({"l1": RNG.normal(0, 0.1, (32, 32)).astype(np.float32)})
    assert not LinearToMatMulNBits(QuantRecipe.none())(model).modified
    assert _ops(model) == ["MatMul", "Transpose"]


def _ple_embedder(table: np.ndarray, to: ir.DataType = ir.DataType.FLOAT) -> ir.Model:
    inits: list[ir.Value] = []
    ids = ir.Value(name="input_ids", shape=ir.Shape(["b", "s"]), type=ir.TensorType(ir.DataType.INT64))
    t = _init(inits, "ple_table", table)
    gather = ir.node("Gather", [t, ids], outputs=[ir.Value(name="embedding")])
    cast = ir.node("Cast", [gather.outputs[0]], attributes={"to": to}, outputs=[ir.Value(name="out")])
    graph = ir.Graph(
        [ids], [cast.outputs[0]], nodes=[gather, cast], initializers=inits, opset_imports={"": 18}
    )
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("ple, block, bits", [("int8", 64, 8), ("int4", 32, 4)])
def test_ple_table_becomes_gather_block_quantized(ple: str, block: int, bits: int) -> None:
    table = RNG.normal(0, 0.5, (256, 4 * 64)).astype(np.float32)  # 4 layers x PLE width 64
    ids = RNG.integers(0, 256, (2, 5))
    before = run_unoptimized(_ple_embedder(table), {"input_ids": ids})[0]
    model = _ple_embedder(table)
    result = PleTableToGatherBlockQuantized(QuantRecipe(ple=ple), ple_dim=64)(model)
    assert isinstance(result, QuantizedTable)
    assert result.modified and result.block_size == block and result.matches == 1
    # the codes are not named like the file they live in (ple_table.data)
    assert set(model.graph.initializers) == {"ple_table.codes", "ple_table.scales"}
    # the Cast to float32 was a copy of what the quantized lookup already gives: gone, its name kept
    assert _ops(model) == ["GatherBlockQuantized"] and model.graph.outputs[0].name == "out"
    after = run_unoptimized(model, {"input_ids": ids})[0]
    expected = _dequantized(table, bits, block, True, clip_search=False)[ids]
    np.testing.assert_array_equal(after, expected)
    rel = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert 1e-6 < rel < (0.15 if bits == 4 else 0.01), rel


def test_a_float_bundles_gemm_head_becomes_matmul_nbits() -> None:
    """An fp32 bundle's tied head is Gemm(x, E, transB=1) (tied_lm_head.py): `quantize` meets it."""
    emb = RNG.normal(0, 0.1, (96, 64)).astype(np.float32)
    inits: list[ir.Value] = []
    x = ir.Value(name="x", shape=ir.Shape(["n", 64]), type=ir.TensorType(ir.DataType.FLOAT))
    e = _init(inits, "embed.weight", emb)
    gemm = ir.node("Gemm", [x, e], attributes={"transB": 1}, outputs=[ir.Value(name="logits")])
    graph = ir.Graph([x], [gemm.outputs[0]], nodes=[gemm], initializers=inits, opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    xs = RNG.normal(0, 1, (3, 64)).astype(np.float32)
    LinearToMatMulNBits(QuantRecipe(weights="int8", block_size=32, symmetric=True, accuracy_level=0))(model)
    assert _ops(model) == ["MatMulNBits"] and model.graph.outputs[0].name == "logits"
    expected = xs @ _dequantized(emb, 8, 32, True).T
    np.testing.assert_allclose(run_unoptimized(model, {"x": xs})[0], expected, rtol=1e-4, atol=1e-5)


def test_a_cast_to_another_type_stays() -> None:
    table = RNG.normal(0, 0.5, (256, 4 * 64)).astype(np.float32)
    ids = RNG.integers(0, 256, (2, 5))
    model = _ple_embedder(table, to=ir.DataType.FLOAT16)
    PleTableToGatherBlockQuantized(QuantRecipe(ple="int8"), ple_dim=64)(model)
    assert _ops(model) == ["Cast", "GatherBlockQuantized"]
    out = run_unoptimized(model, {"input_ids": ids})[0]
    assert out.dtype == np.float16
