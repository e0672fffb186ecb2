"""`quantize`: an fp32 bundle -> a quantized bundle, streamed, through the same passes and layout
stage as `export`:

    read bundle (manifest, sha256, no escapes) -> load graphs (weights stay on disk) -> passes
    -> stream weights through per-tensor transforms into aligned files -> manifest -> commit

Float tensors are copied byte for byte from the source bundle's data files; quantized ones are read
row chunk by row chunk (pread) and quantized as they go. Nothing holds a whole tensor.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from exporter.checkpoint import CHUNK_BYTES
from exporter.describe import ple_layout, quantization, versions
from exporter.export import ExportResult, Progress
from exporter.genai_files import with_genai_files
from exporter.plan_writer import LayoutReport, lay_out
from graphs.pipeline import PassReport, decoder_passes, embedder_passes
from ple_export.bundle.files import file_entries, trusted_bundle
from ple_export.bundle.format import (
    APPENDING_KV_SINCE,
    DECODER_DATA_FILE,
    DEFAULT_PREFILL_CHUNK,
    PLE_TABLE_FILE,
    FileRole,
    Role,
)
from ple_export.bundle.manifest import Manifest, is_earlier_bundle
from ple_export.bundle.members import member_path
from ple_export.bundle.recipe import QuantRecipe
from ple_export.errors import UserError
from ple_export.outdir import staged_output

_NP = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
    ir.DataType.FLOAT16: np.float16,
}


def _external(value: ir.Value) -> ir.ExternalTensor:
    tensor = value.const_value
    if not isinstance(tensor, ir.ExternalTensor):
        raise UserError(f"initializer {value.name!r} is not external data; not a ple-export bundle graph")
    return tensor


def _raw_chunks(tensor: ir.ExternalTensor, max_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    path = Path(tensor.base_dir) / tensor.location
    length = tensor.length if tensor.length is not None else tensor.nbytes
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < length:
            n = min(max_bytes, length - done)
            data = os.pread(fd, n, (tensor.offset or 0) + done)
            if len(data) != n:
                raise UserError(f"{path}: truncated (tensor {tensor.name!r} runs past the end)")
            done += n
            yield data
    finally:
        os.close(fd)


def _float_rows(tensor: ir.ExternalTensor) -> Iterator[np.ndarray]:
    """float32 row chunks of a 2-D float tensor stored in a data file."""
    dtype = _NP.get(tensor.dtype)
    if dtype is None or len(tensor.shape) != 2:
        raise UserError(
            f"tensor {tensor.name!r}: cannot quantize a {tensor.dtype} tensor of shape {tensor.shape}"
        )
    rows, cols = tensor.shape.numpy()
    row_bytes = cols * np.dtype(dtype).itemsize
    per_chunk = max(1, (CHUNK_BYTES // 2) // row_bytes)
    for data in _raw_chunks(tensor, per_chunk * row_bytes):
        yield np.frombuffer(data, dtype=dtype).reshape(-1, cols).astype(np.float32)


def _sources(model: ir.Model) -> dict[str, ir.ExternalTensor]:
    return {name: _external(v) for name, v in model.graph.initializers.items()}


def quantize_bundle(
    src: Path,
    out_dir: Path,
    recipe: QuantRecipe,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    t0 = time.perf_counter()
    recipe.validate()
    report = progress or (lambda stage, n, total: None)
    manifest = Manifest.read(src)
    trusted_bundle(src, manifest, verify_hashes=True)
    prior = manifest.recipe
    if prior.weights != "none" or prior.ple != "none":
        raise UserError(
            f"{src}: already quantized (weights {prior.weights!r}, PLE table {prior.ple!r}); "
            "quantize an fp32 bundle (export --quant none --ple-quant none)"
        )
    if recipe.weights == "none" and recipe.ple == "none":
        raise UserError("nothing to quantize: --quant none and --ple-quant none")
    if not manifest.appends_kv:  # its graphs return whole caches: the output would claim otherwise
        raise UserError(
            f"{src}: a format {manifest.format_version} bundle (its decoder returns whole KV caches); "
            f"quantize takes format {APPENDING_KV_SINCE} on: re-export the checkpoint with --quant none"
        )
    src_real, dst_real = src.resolve(), out_dir.resolve()
    if dst_real == src_real or dst_real.is_relative_to(src_real) or src_real.is_relative_to(dst_real):
        raise UserError(f"{out_dir}: the output would replace or sit inside the bundle it reads ({src})")
    page = manifest.ple.page_size
    if page < 4096 or page & (page - 1):
        raise UserError(f"{src}: manifest ple.page_size {page} is not a power of two >= 4096")
    graphs = manifest.graphs
    with staged_output(out_dir, overwrite, is_earlier_bundle, "a ple-export bundle", inputs=[src]) as tmp:
        embedder = ir.load(member_path(src, graphs.embedder.file, str(src)))
        decoder = ir.load(member_path(src, graphs.decoder.file, str(src)))
        sources = {"embedder": _sources(embedder), "decoder": _sources(decoder)}
        width = int(manifest.model.spec["hidden_size_per_layer_input"])
        passes = {
            "embedder": embedder_passes(embedder, recipe, width),
            "decoder": decoder_passes(decoder, recipe, manifest.model.family),
        }
        recipe.check_keep([*passes["decoder"].quantized, *passes["decoder"].kept])
        layouts = [
            _lay_out(embedder, sources["embedder"], tmp, PLE_TABLE_FILE, graphs.embedder.file, page, report),
            _lay_out(decoder, sources["decoder"], tmp, DECODER_DATA_FILE, graphs.decoder.file, page, report),
        ]
        for entry in manifest.files_with(role=FileRole.METADATA):
            shutil.copyfile(member_path(src, entry.path, str(src)), tmp / entry.path)
        new = _requantized(manifest, tmp, recipe, passes, layouts)
        if _wants_genai(manifest):
            new = with_genai_files(
                tmp, new, int(manifest.export_options.get("genai_chunk", DEFAULT_PREFILL_CHUNK))
            )
        new.write(tmp)
    return ExportResult(out_dir.absolute(), new, time.perf_counter() - t0)


def _wants_genai(manifest: Manifest) -> bool:
    """The source was exported with onnxruntime-genai's files (the default) and can have them (format
    2 on: a decoder with logits_positions)."""
    has_input = manifest.graphs.decoder.input(Role.LOGITS_POSITIONS) is not None
    return has_input and manifest.export_options.get("genai", True) is not False


def _lay_out(
    model: ir.Model,
    sources: dict[str, ir.ExternalTensor],
    tmp: Path,
    data_file: str,
    graph_file: str,
    page_size: int,
    progress: Progress,
) -> LayoutReport:
    """Float tensors copied byte for byte from the source bundle; quantized ones read in row chunks."""

    def float_chunks(name: str) -> Iterator[Any]:
        return _raw_chunks(sources[name])

    def rows(name: str) -> Iterator[np.ndarray]:
        return _float_rows(sources[name])

    layout = lay_out(model, tmp, data_file, page_size, float_chunks, rows, progress, data_file)
    ir.save(model, tmp / graph_file)
    return layout


def _requantized(
    manifest: Manifest,
    tmp: Path,
    recipe: QuantRecipe,
    passes: dict[str, PassReport],
    layouts: list[LayoutReport],
) -> Manifest:
    """The source's manifest with what quantization changed: files, the PLE table's format, the
    quantization record, the options and versions, and what the passes did."""
    spec = manifest.model.spec
    ple_width = int(spec["num_hidden_layers"]) * int(spec["hidden_size_per_layer_input"])
    quant = quantization(recipe, layouts, passes["decoder"].kept, passes["embedder"].ple_block, ple_width)
    old = manifest.ple
    return manifest.replace(
        files=file_entries(tmp, {layout.file: layout.sha256 for layout in layouts}),
        ple=ple_layout(old.rows, old.row_bytes, old.dtype, old.page_size, quant, old.scale),
        quantization=quant,
        export_options=dict(manifest.export_options) | {"recipe": recipe.to_dict()},
        versions=versions(),
        passes=_passes_over_history(manifest.passes, passes),
    )


def _passes_over_history(
    before: Mapping[str, Mapping[str, int]], now: dict[str, PassReport]
) -> dict[str, dict[str, int]]:
    """What each pass matched over the bundle's history: the fp32 export's counts plus this run's (the
    fusions matched at export and match nothing again; the quantizing passes match now)."""
    return {
        graph: {name: before.get(graph, {}).get(name, 0) + n for name, n in report.matches.items()}
        for graph, report in now.items()
    }
