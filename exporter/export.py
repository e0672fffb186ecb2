"""The export pipeline, stage by stage:

    read checkpoint -> trace (fake weights) -> graph passes -> lay out data files -> manifest -> commit

Weights are streamed tensor by tensor (big ones in row chunks) from the safetensors shards into the
bundle's data files; nothing holds the whole model. The bundle is assembled in a sibling temp folder
and renamed into place only when complete (`exporter.outdir`), so a failed or interrupted export
leaves nothing that looks like a bundle.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from exporter import dtypes
from exporter import manifest as manifest_mod
from exporter.errors import UserError
from exporter.gemma4 import rope_buffers
from exporter.layout import DataFileWriter
from exporter.outdir import staged_output
from exporter.plan_writer import TensorReport, write_initializers
from exporter.safetensors_io import TensorInfo, iter_row_chunks, open_checkpoint, read_rows
from exporter.spec import Gemma4Spec
from exporter.trace import trace_decoder, trace_embedder
from exporter.weights import map_checkpoint
from graphs.matmul_nbits import LinearToMatMulNBits
from graphs.pipeline import decoder_passes
from graphs.ple_table_quant import PleTableToGatherBlockQuantized
from graphs.recipe import QuantRecipe

EMBEDDER_FILE = "embedder.onnx"
PLE_TABLE_FILE = "ple_table.data"
DECODER_FILE = "decoder.onnx"
DECODER_DATA_FILE = "decoder.data"
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
)
CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class ExportOptions:
    page_size: int = 16 * 1024  # offsets of page-sized tensors align to this (Android 15+/iOS: 16 KiB)
    ple_dtype: str = "checkpoint"  # checkpoint | bf16 | fp16 | fp32: a float PLE table's dtype
    recipe: QuantRecipe = field(default_factory=QuantRecipe)  # int4 decoder + int8 PLE table
    overwrite: bool = False

    def validate(self) -> None:
        if not 4096 <= self.page_size <= 1 << 20 or self.page_size & (self.page_size - 1):
            raise UserError(f"--page-size must be a power of two from 4 KiB to 1 MiB, got {self.page_size}")
        if self.ple_dtype != "checkpoint" and self.ple_dtype not in dtypes.TORCH:
            raise UserError(
                f"--ple-dtype must be one of checkpoint, {', '.join(dtypes.TORCH)}; got {self.ple_dtype!r}"
            )
        self.recipe.validate()


@dataclass
class Checkpoint:
    path: Path
    spec: Gemma4Spec
    tensors: dict[str, TensorInfo]
    mapping: dict[str, str]  # our name -> HF name

    def info(self, our_name: str) -> TensorInfo:
        return self.tensors[self.mapping[our_name]]


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict
    seconds: float


Progress = Callable[[str, int, int], None]  # (stage, advance bytes, total bytes)


def read_checkpoint(path: Path) -> Checkpoint:
    spec = Gemma4Spec.from_checkpoint_dir(path)
    tensors = open_checkpoint(path)
    mapping = map_checkpoint(spec, tensors)
    for hf_name in mapping.values():
        if tensors[hf_name].dtype not in dtypes.FROM_SAFETENSORS:
            raise UserError(
                f"tensor {hf_name} has dtype {tensors[hf_name].dtype} (weights must be bf16, fp16 or fp32)"
            )
    return Checkpoint(path, spec, tensors, mapping)


def _fp32_chunks(info: TensorInfo) -> Iterator[np.ndarray]:
    for start, stop in iter_row_chunks(info, CHUNK_BYTES // 2):
        yield read_rows(info, start, stop, "float32")


def _ple_chunks(info: TensorInfo, target: str) -> Iterator[np.ndarray]:
    """The PLE table's rows in the target dtype; bytes pass through untouched when dtypes agree."""
    source = dtypes.FROM_SAFETENSORS[info.dtype]
    for start, stop in iter_row_chunks(info, CHUNK_BYTES):
        if source == target:
            yield read_rows(info, start, stop, "raw")
        else:
            rows = read_rows(info, start, stop, "float32")
            yield (
                torch.from_numpy(rows)
                .to(dtypes.TORCH[target])
                .view(torch.uint16 if target != "fp32" else torch.float32)
                .numpy()
            )


def _write_embedder(
    ckpt: Checkpoint,
    tmp: Path,
    ple_dtype: str,
    opts: ExportOptions,
    progress: Progress,
    hashes: dict[str, str],
    reports: dict[str, TensorReport],
) -> int | None:
    """Trace the lookup-only embedder, quantize its table if the recipe says so, and stream the
    table (alone at offset 0 of its page-aligned file) and its scales. Returns the PLE block size
    (None: a float table)."""
    progress("tracing", 0, 2)
    quantized = opts.recipe.ple != "none"
    model = trace_embedder(ckpt.spec, dtypes.TORCH["fp32" if quantized else ple_dtype])
    progress("tracing", 1, 2)
    ple_pass = PleTableToGatherBlockQuantized(opts.recipe, ckpt.spec.hidden_size_per_layer_input)
    ple_pass(model)
    info = ckpt.info("ple_table")

    def float_chunks(name: str) -> Iterator[np.ndarray]:
        assert name == "ple_table", name
        return _ple_chunks(info, ple_dtype)

    with DataFileWriter(tmp / PLE_TABLE_FILE, opts.page_size) as w:
        placements = write_initializers(
            model, w, PLE_TABLE_FILE, tmp, float_chunks, _source_rows(ckpt), progress, "ple_table", reports
        )
        hashes[PLE_TABLE_FILE] = w.close()[1]
    table = "ple_table.data" if quantized and ple_pass.block_size else "ple_table"
    assert placements[table].offset == 0  # the table starts the file: page-aligned for mmap
    ir.save(model, tmp / EMBEDDER_FILE)
    return ple_pass.block_size


def _source_rows(ckpt: Checkpoint) -> Callable[[str], Iterator[np.ndarray]]:
    """float32 row chunks of a checkpoint tensor, by our name (what quantization reads)."""
    return lambda name: _fp32_chunks(ckpt.info(name))


def _write_decoder(
    ckpt: Checkpoint,
    tmp: Path,
    opts: ExportOptions,
    progress: Progress,
    hashes: dict[str, str],
    reports: dict[str, TensorReport],
) -> LinearToMatMulNBits:
    model = trace_decoder(ckpt.spec)
    progress("tracing", 1, 2)
    quant = decoder_passes(model, opts.recipe)
    opts.recipe.check_keep(list(quant.quantized) + list(quant.kept))
    computed = {k: v.numpy() for k, v in rope_buffers(ckpt.spec).items()}

    def float_chunks(name: str) -> Iterator[np.ndarray]:
        if name in computed:
            return iter([computed[name].astype(np.float32)])
        if name in ckpt.mapping:
            return _fp32_chunks(ckpt.info(name))
        raise RuntimeError(f"decoder initializer {name} has no source tensor")  # a bug, not bad input

    with DataFileWriter(tmp / DECODER_DATA_FILE, opts.page_size) as w:
        write_initializers(
            model, w, DECODER_DATA_FILE, tmp, float_chunks, _source_rows(ckpt), progress, "decoder", reports
        )
        hashes[DECODER_DATA_FILE] = w.close()[1]
    ir.save(model, tmp / DECODER_FILE)
    return quant


def export_bundle(
    checkpoint: Path,
    out_dir: Path,
    opts: ExportOptions = ExportOptions(),
    progress: Progress | None = None,
) -> ExportResult:
    t0 = time.perf_counter()
    opts.validate()
    ckpt = read_checkpoint(checkpoint)
    ple_source = dtypes.FROM_SAFETENSORS[ckpt.info("ple_table").dtype]
    ple_dtype = ple_source if opts.ple_dtype == "checkpoint" else opts.ple_dtype
    report = progress or (lambda stage, n, total: None)

    src, dst = checkpoint.resolve(), out_dir.resolve()
    if dst == src or src.is_relative_to(dst):
        raise UserError(f"{out_dir}: the output folder would replace the checkpoint {checkpoint}")
    with staged_output(
        out_dir, opts.overwrite, manifest_mod.is_earlier_bundle, "a ple-export bundle", inputs=[checkpoint]
    ) as tmp:
        hashes: dict[str, str] = {}  # data files, hashed while written
        reports: dict[str, TensorReport] = {}
        ple_block = _write_embedder(ckpt, tmp, ple_dtype, opts, report, hashes, reports)
        quant = _write_decoder(ckpt, tmp, opts, report, hashes, reports)
        for name in COPIED_FILES:
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, tmp / name)
        options = asdict(opts) | {"ple_dtype": ple_dtype, "recipe": opts.recipe.to_dict()}
        del options["overwrite"]  # how the folder was replaced is not a property of the bundle
        quantization = manifest_mod.quantization_section(
            opts.recipe, reports, quant.kept, ple_block, ckpt.spec.ple_dim
        )
        manifest = manifest_mod.build(tmp, ckpt, ple_dtype, options, hashes, quantization)
        manifest_mod.write(tmp, manifest)  # last: a folder without manifest.json is not a bundle
    return ExportResult(out_dir.absolute(), manifest, time.perf_counter() - t0)
