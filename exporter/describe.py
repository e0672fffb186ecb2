"""The manifest stage: what the earlier stages produced, described as a `Manifest`.

Every value comes from a stage's result (the spec's contract and KV layout, the passes' report, the
layout's file hashes and tensor records); nothing is re-derived from the recipe here but the PLE
table's row format, which the table's quantization defines.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from exporter.plan_writer import LayoutReport
from graphs.pipeline import PassReport
from ple_export.bundle.files import file_entries
from ple_export.bundle.format import FORMAT_VERSION, IR_VERSION, OPSET, PLE_TABLE_FILE
from ple_export.bundle.manifest import (
    Graphs,
    KVCache,
    Manifest,
    ModelInfo,
    Onnx,
    PleLayout,
    PleQuant,
    Quantization,
    TensorRecord,
)
from ple_export.bundle.ple_layout import pages_per_token, table_regions, zero_points_row_bytes
from ple_export.bundle.recipe import QuantRecipe, bits_of

VERSIONED = ("ple-export", "torch", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "safetensors", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def ple_quant(recipe: QuantRecipe, block: int | None, row_width: int) -> PleQuant | None:
    """The quantized table's row format (None: a float table)."""
    if block is None:
        return None
    bits = bits_of(recipe.ple)
    return PleQuant(
        precision=recipe.ple,
        bits=bits,
        block_size=block,
        row_bytes=row_width * bits // 8,
        scales_dtype=recipe.scales_dtype,
        scales_row_bytes=(row_width // block) * (2 if recipe.scales_dtype == "float16" else 4),
    )


def ple_layout(
    rows: int, float_row_bytes: int, float_dtype: str, page_size: int, quant: Quantization, scale: float
) -> PleLayout:
    """Where the PLE table is and what a token reads of it: its codes row plus, when quantized, its
    rows of scales (and zero points), each a page-aligned tensor of the same file."""
    q = quant.ple
    if q is not None:
        row_bytes, dtype, scales = q.row_bytes, q.precision, q.scales_row_bytes
    else:
        row_bytes, dtype, scales = float_row_bytes, float_dtype, 0
    zero_points = zero_points_row_bytes(q, quant.recipe.ple_symmetric)
    table = table_regions(rows, row_bytes, scales, zero_points, page_size)
    return PleLayout(
        file=PLE_TABLE_FILE,
        offset=0,
        dtype=dtype,
        rows=rows,
        row_bytes=row_bytes,
        scales_row_bytes=scales,
        bytes_per_token=row_bytes + scales + zero_points,
        page_size=page_size,
        pages_per_token=pages_per_token(table, page_size),
        scale=scale,
    )


def quantization(
    recipe: QuantRecipe,
    layouts: list[LayoutReport],
    kept: Mapping[str, str],
    ple_block: int | None,
    ple_width: int,
) -> Quantization:
    """The recipe, each source tensor's precision and weight error (sorted by name), the tensors the
    recipe kept float and why, and the PLE table's format."""
    records: dict[str, TensorRecord] = {}
    for layout in layouts:
        records.update(layout.tensors)
    tensors = dict(sorted(records.items()))
    for name, why in kept.items():
        base = tensors.get(name, TensorRecord("", ""))
        tensors[name] = TensorRecord(
            base.precision, base.op, base.block_size, base.rel_weight_error, kept_float_because=why
        )
    return Quantization(recipe, tensors, ple_quant(recipe, ple_block, ple_width))


def describe(
    folder: Path,
    model: ModelInfo,
    graphs: Graphs,
    ple: PleLayout,
    kv_cache: KVCache,
    generation: Any,
    quant: Quantization,
    layouts: list[LayoutReport],
    passes: Mapping[str, PassReport],
    export_options: Mapping[str, Any],
) -> Manifest:
    """The finished folder as a Manifest (its files hashed by the layout stage where it wrote them)."""
    hashes = {layout.file: layout.sha256 for layout in layouts}
    return Manifest(
        format_version=FORMAT_VERSION,
        model=model,
        files=file_entries(folder, hashes),
        graphs=graphs,
        onnx=Onnx(IR_VERSION, OPSET),
        ple=ple,
        quantization=quant,
        kv_cache=kv_cache,
        generation=generation,
        export_options=dict(export_options),
        versions=versions(),
        passes={graph: dict(report.matches) for graph, report in passes.items()},
    )
