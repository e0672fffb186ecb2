"""`export`: a checkpoint to a bundle, as a chain of stages that each hand a typed result on:

    read checkpoint -> trace (fake weights) -> graph passes -> lay out data files -> manifest -> commit
      Checkpoint       ir.Model x2             PassReport x2   LayoutReport x2      Manifest

Weights are streamed tensor by tensor (big ones in row chunks) from the safetensors shards into the
bundle's data files; nothing holds the whole model. The bundle is assembled in a sibling temp folder
and renamed into place only when complete (`ple_export.outdir`), so a failed or interrupted export
leaves nothing that looks like a bundle.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from exporter import dtypes
from exporter.checkpoint import Checkpoint, read_checkpoint
from exporter.describe import describe, ple_layout, quantization
from exporter.gemma4 import PLEEmbedder, rope_buffers
from exporter.genai_files import with_genai_files
from exporter.plan_writer import LayoutReport, lay_out
from exporter.trace import trace_decoder, trace_embedder
from graphs.pipeline import PassReport, decoder_passes, embedder_passes
from ple_export.bundle.contract import KV_DTYPES
from ple_export.bundle.format import (
    DECODER_DATA_FILE,
    DECODER_FILE,
    DEFAULT_PREFILL_CHUNK,
    EMBEDDER_FILE,
    METADATA_FILES,
    PLE_TABLE_FILE,
    PLE_TABLE_TENSOR,
)
from ple_export.bundle.manifest import Manifest, is_earlier_bundle
from ple_export.bundle.recipe import QuantRecipe
from ple_export.errors import UserError
from ple_export.outdir import staged_output

Progress = Callable[[str, int, int], None]  # (stage, advance, total): bytes, or graphs for "tracing"


@dataclass(frozen=True)
class ExportOptions:
    page_size: int = 16 * 1024  # offsets of page-sized tensors align to this (Android 15+/iOS: 16 KiB)
    ple_dtype: str = "checkpoint"  # checkpoint | bf16 | fp16 | fp32: a float PLE table's dtype
    recipe: QuantRecipe = field(default_factory=QuantRecipe)  # int4 decoder + int8 PLE table
    overwrite: bool = False
    kv_dtype: str = "float32"  # the KV cache's element type: float32 | float16 (half the cache's DRAM)
    genai: bool = True  # also write onnxruntime-genai's model.onnx + genai_config.json (graph only)
    genai_chunk: int = DEFAULT_PREFILL_CHUNK  # the prefill chunk genai_config.json asks for

    def validate(self) -> None:
        if not 4096 <= self.page_size <= 1 << 20 or self.page_size & (self.page_size - 1):
            raise UserError(f"--page-size must be a power of two from 4 KiB to 1 MiB, got {self.page_size}")
        if self.ple_dtype != "checkpoint" and self.ple_dtype not in dtypes.TORCH:
            raise UserError(
                f"--ple-dtype must be one of checkpoint, {', '.join(dtypes.TORCH)}; got {self.ple_dtype!r}"
            )
        if self.kv_dtype not in KV_DTYPES.values():
            raise UserError(
                f"the KV dtype must be one of {', '.join(KV_DTYPES.values())}; got {self.kv_dtype!r}"
            )
        if not 1 <= self.genai_chunk <= 1 << 16:
            raise UserError(f"--genai-chunk must be from 1 to 65536 tokens, got {self.genai_chunk}")
        self.recipe.validate()

    def record(self, ple_dtype: str) -> dict[str, Any]:
        """What the manifest records of the options (how a folder was replaced is not a property of
        the bundle)."""
        options = asdict(self) | {"ple_dtype": ple_dtype, "recipe": self.recipe.to_dict()}
        del options["overwrite"]
        return options


@dataclass
class ExportResult:
    out_dir: Path
    manifest: Manifest
    seconds: float


def export_bundle(
    checkpoint: Path,
    out_dir: Path,
    opts: ExportOptions = ExportOptions(),
    progress: Progress | None = None,
) -> ExportResult:
    t0 = time.perf_counter()
    report = progress or (lambda stage, n, total: None)
    opts.validate()
    ckpt = read_checkpoint(checkpoint)
    ple_dtype = ckpt.ple_dtype if opts.ple_dtype == "checkpoint" else opts.ple_dtype
    src, dst = checkpoint.resolve(), out_dir.resolve()
    if dst == src or src.is_relative_to(dst):
        raise UserError(f"{out_dir}: the output folder would replace the checkpoint {checkpoint}")
    spec, recipe = ckpt.spec, opts.recipe
    with staged_output(
        out_dir, opts.overwrite, is_earlier_bundle, "a ple-export bundle", [checkpoint]
    ) as tmp:
        width = spec.hidden_size_per_layer_input
        quantized_table = recipe.ple != "none" and recipe.ple_block_for(width, spec.ple_dim) is not None
        embedder_dtype = "fp32" if quantized_table else ple_dtype  # a quantized table dequantizes to fp32
        report("tracing", 0, 2)
        embedder = trace_embedder(spec, dtypes.TORCH[embedder_dtype])
        report("tracing", 1, 2)
        decoder = trace_decoder(spec, opts.kv_dtype)
        report("tracing", 1, 2)
        passes = {
            "embedder": embedder_passes(embedder, recipe, width),
            "decoder": decoder_passes(decoder, recipe, spec.family),
        }
        recipe.check_keep([*passes["decoder"].quantized, *passes["decoder"].kept])
        layouts = [
            _lay_out_embedder(embedder, ckpt, tmp, ple_dtype, opts.page_size, report),
            _lay_out_decoder(decoder, ckpt, tmp, opts.page_size, report),
        ]
        for name in METADATA_FILES:
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, tmp / name)
        manifest = _describe(tmp, ckpt, ple_dtype, embedder_dtype, opts, passes, layouts)
        if opts.genai:
            manifest = with_genai_files(tmp, manifest, opts.genai_chunk)
        manifest.write(tmp)  # last: a folder without manifest.json is not a bundle
    return ExportResult(out_dir.absolute(), manifest, time.perf_counter() - t0)


def _lay_out_embedder(
    model: ir.Model, ckpt: Checkpoint, tmp: Path, ple_dtype: str, page_size: int, progress: Progress
) -> LayoutReport:
    """The PLE table (alone at offset 0 of its page-aligned file, for mmap) and its scales."""

    def float_chunks(name: str) -> Iterator[np.ndarray]:
        assert name == PLE_TABLE_TENSOR, name
        return ckpt.ple_rows(ple_dtype)

    layout = lay_out(
        model, tmp, PLE_TABLE_FILE, page_size, float_chunks, ckpt.rows, progress, PLE_TABLE_TENSOR
    )
    assert min(p.offset for p in layout.offsets.values()) == 0  # the table starts the file
    ir.save(model, tmp / EMBEDDER_FILE)
    return layout


def _lay_out_decoder(
    model: ir.Model, ckpt: Checkpoint, tmp: Path, page_size: int, progress: Progress
) -> LayoutReport:
    computed = {k: v.numpy().astype(np.float32) for k, v in rope_buffers(ckpt.spec).items()}

    def float_chunks(name: str) -> Iterator[np.ndarray]:
        if name in computed:
            return iter([computed[name]])
        if name in ckpt.mapping:
            return ckpt.rows(name)
        raise RuntimeError(f"decoder initializer {name} has no source tensor")  # a bug, not bad input

    layout = lay_out(model, tmp, DECODER_DATA_FILE, page_size, float_chunks, ckpt.rows, progress, "decoder")
    ir.save(model, tmp / DECODER_FILE)
    return layout


def _describe(
    tmp: Path,
    ckpt: Checkpoint,
    ple_dtype: str,
    embedder_dtype: str,
    opts: ExportOptions,
    passes: dict[str, PassReport],
    layouts: list[LayoutReport],
) -> Manifest:
    spec = ckpt.spec
    quant = quantization(
        opts.recipe, layouts, passes["decoder"].kept, passes["embedder"].ple_block, spec.ple_dim
    )
    ple = ple_layout(
        rows=int(ckpt.info(PLE_TABLE_TENSOR).shape[0]),
        float_row_bytes=spec.ple_dim * dtypes.ITEMSIZE[ple_dtype],
        float_dtype=dtypes.ONNX_NAME[ple_dtype],
        page_size=opts.page_size,
        quant=quant,
        scale=PLEEmbedder.scale_for(spec.hidden_size_per_layer_input, dtypes.TORCH[embedder_dtype]),
    )
    return describe(
        tmp,
        model=ckpt.model_info(),
        graphs=spec.contract(opts.kv_dtype),
        ple=ple,
        kv_cache=spec.kv_cache(opts.kv_dtype),
        generation=spec.generation(),
        quant=quant,
        layouts=layouts,
        passes=passes,
        export_options=opts.record(ple_dtype),
    )
