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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from exporter import manifest as manifest_mod
from exporter.bundle_files import member_path, trusted_bundle
from exporter.errors import UserError
from exporter.export import CHUNK_BYTES, DECODER_DATA_FILE, PLE_TABLE_FILE, ExportResult, Progress
from exporter.layout import DataFileWriter
from exporter.outdir import staged_output
from exporter.plan_writer import TensorReport, write_initializers
from graphs.matmul_nbits import LinearToMatMulNBits
from graphs.pipeline import decoder_passes
from graphs.ple_table_quant import PleTableToGatherBlockQuantized
from graphs.recipe import QuantRecipe

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
    manifest = manifest_mod.load(src)
    trusted_bundle(src, manifest, verify_hashes=True)
    prior = manifest.get("quantization", {}).get("recipe") or {"weights": "none", "ple": "none"}
    if prior.get("weights") != "none" or prior.get("ple") != "none":
        raise UserError(
            f"{src}: already quantized (weights {prior.get('weights')!r}, PLE table {prior.get('ple')!r}); "
            "quantize an fp32 bundle (export --quant none --ple-quant none)"
        )
    if recipe.weights == "none" and recipe.ple == "none":
        raise UserError("nothing to quantize: --quant none and --ple-quant none")
    src_real, dst_real = src.resolve(), out_dir.resolve()
    if dst_real == src_real or dst_real.is_relative_to(src_real) or src_real.is_relative_to(dst_real):
        raise UserError(f"{out_dir}: the output would replace or sit inside the bundle it reads ({src})")
    graphs = manifest["graphs"]
    with staged_output(
        out_dir, overwrite, manifest_mod.is_earlier_bundle, "a ple-export bundle", inputs=[src]
    ) as tmp:
        reports: dict[str, TensorReport] = {}
        spec = manifest["model"]["spec"]
        page = int(manifest["ple"]["page_size"])
        if page < 4096 or page & (page - 1):
            raise UserError(f"{src}: manifest ple.page_size {page} is not a power of two >= 4096")
        embedder = ir.load(member_path(src, graphs["embedder"]["file"], str(src)))
        ple_pass = PleTableToGatherBlockQuantized(recipe, int(spec["hidden_size_per_layer_input"]))
        _write(embedder, ple_pass, tmp, PLE_TABLE_FILE, graphs["embedder"]["file"], page, report, reports)
        decoder = ir.load(member_path(src, graphs["decoder"]["file"], str(src)))
        passes: list[LinearToMatMulNBits] = []
        run = lambda model: passes.append(decoder_passes(model, recipe))  # noqa: E731
        _write(decoder, run, tmp, DECODER_DATA_FILE, graphs["decoder"]["file"], page, report, reports)
        nbits = passes[0]
        recipe.check_keep(list(nbits.quantized) + list(nbits.kept))
        for entry in manifest["files"]:
            if entry["role"] == "metadata":
                shutil.copyfile(member_path(src, entry["path"], str(src)), tmp / entry["path"])
        new = _updated_manifest(manifest, tmp, recipe, reports, nbits.kept, ple_pass.block_size)
        manifest_mod.write(tmp, new)
    return ExportResult(out_dir.absolute(), new, time.perf_counter() - t0)


def _write(
    model: ir.Model,
    quant_pass: Any,
    tmp: Path,
    data_file: str,
    graph_file: str,
    page_size: int,
    progress: Progress,
    reports: dict[str, TensorReport],
) -> None:
    sources = _sources(model)
    quant_pass(model)

    def float_chunks(name: str) -> Iterator[Any]:
        return _raw_chunks(sources[name])

    rows: Callable[[str], Iterator[np.ndarray]] = lambda name: _float_rows(sources[name])  # noqa: E731
    with DataFileWriter(tmp / data_file, page_size) as w:
        write_initializers(model, w, data_file, tmp, float_chunks, rows, progress, data_file, reports)
        w.close()
    ir.save(model, tmp / graph_file)


def _updated_manifest(
    manifest: dict[str, Any],
    tmp: Path,
    recipe: QuantRecipe,
    reports: dict[str, TensorReport],
    kept: dict[str, str],
    ple_block: int | None,
) -> dict[str, Any]:
    spec = manifest["model"]["spec"]
    ple_row = int(spec["num_hidden_layers"]) * int(spec["hidden_size_per_layer_input"])
    quantization = manifest_mod.quantization_section(recipe, reports, kept, ple_block, ple_row)
    old_ple = manifest["ple"]
    new = dict(manifest)
    new["files"] = manifest_mod.files_section(tmp)
    new["ple"] = manifest_mod.ple_section(
        int(old_ple["rows"]),
        int(old_ple["row_bytes"]),
        str(old_ple["dtype"]),
        int(old_ple["page_size"]),
        quantization,
        float(old_ple.get("scale", 1.0)),
    )
    new["quantization"] = quantization
    new["export_options"] = dict(manifest.get("export_options") or {}) | {"recipe": recipe.to_dict()}
    new["versions"] = manifest_mod.versions()
    return new
