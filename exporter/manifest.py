"""manifest.json: everything a runtime needs to run the bundle, and nothing it must guess.

Schema: docs/bundle-format.md. Written last, so a folder without it is not a bundle.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.bundle_files import member_path, sha256_file
from exporter.errors import UserError
from exporter.jsonfile import read_json_object
from exporter.outdir import OWNER_FILE
from exporter.spec import Gemma4Spec

if TYPE_CHECKING:
    from exporter.export import Checkpoint
    from exporter.plan_writer import TensorReport
    from graphs.recipe import QuantRecipe

OPSET = 18
IR_VERSION = 10  # onnx 1.23 writes 14 by default; onnxruntime 1.31 loads at most 13
FORMAT = "ple-export-bundle"
FORMAT_VERSION = 2  # 2: the decoder's logits_positions input (1: logits at every new token)
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"

_ROLES = {
    "embedder.onnx": ("flash", "embedder_graph"),
    "ple_table.data": ("flash", "ple_table"),
    "decoder.onnx": ("dram", "decoder_graph"),
    "decoder.data": ("dram", "decoder_weights"),
}


__all__ = ["sha256_file", "load", "write", "build"]


def _io(name: str, dtype: str, shape: list[int | str], role: str, layer: int | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "dtype": dtype, "shape": shape, "role": role}
    if layer is not None:
        entry["layer"] = layer
    return entry


def graph_io(spec: Gemma4Spec) -> dict[str, Any]:
    L, P = spec.num_hidden_layers, spec.hidden_size_per_layer_input
    embedder = {
        "file": "embedder.onnx",
        "inputs": [_io("input_ids", "int64", ["batch", "sequence"], "input_ids")],
        "outputs": [_io("per_layer_inputs", "float32", ["batch", "sequence", L, P], "per_layer_inputs")],
    }
    dec_in = [
        _io("input_ids", "int64", ["batch", "sequence"], "input_ids"),
        _io("per_layer_inputs", "float32", ["batch", "sequence", L, P], "per_layer_inputs"),
        _io("position_ids", "int64", ["batch", "sequence"], "position_ids"),
        _io("logits_positions", "int64", ["logits"], "logits_positions"),
    ]
    dec_out = [_io("logits", "float32", ["batch", "logits", spec.vocab_size], "logits")]
    for i in spec.kv_layers:
        kvh, hd = spec.layer_kv_heads(i), spec.layer_head_dim(i)
        past = f"past_sequence_{i}"
        present = (
            f"min({past} + sequence, {spec.sliding_window - 1})"
            if spec.is_sliding(i)
            else f"{past} + sequence"
        )
        for kv in ("key", "value"):
            dec_in.append(_io(f"past_{kv}.{i}", "float32", ["batch", kvh, past, hd], f"past_{kv}", i))
            dec_out.append(
                _io(f"present_{kv}.{i}", "float32", ["batch", kvh, present, hd], f"present_{kv}", i)
            )
    return {"embedder": embedder, "decoder": {"file": "decoder.onnx", "inputs": dec_in, "outputs": dec_out}}


def kv_cache(spec: Gemma4Spec) -> dict[str, Any]:
    layers = []
    for i in spec.kv_layers:
        layers.append(
            {
                "layer": i,
                "type": spec.layer_types[i],
                "kv_heads": spec.layer_kv_heads(i),
                "head_dim": spec.layer_head_dim(i),
                # sliding layers return only the last window-1 positions: the cache never grows past that
                "max_length": spec.sliding_window - 1 if spec.is_sliding(i) else None,
                "shared_by": [j for j in range(spec.num_hidden_layers) if j != i and spec.kv_source(j) == i],
            }
        )
    return {
        "dtype": "float32",
        "layers": layers,
        "initial_past_length": 0,
        "update": "feed each present_* output back as the matching past_* input on the next call",
    }


def row_pages(row_bytes: int, page: int) -> dict[str, float]:
    """Pages one PLE row touches (a row may straddle page boundaries), over the table's rows.

    Row r spans bytes [r*row_bytes, (r+1)*row_bytes) of a page-aligned table; the pattern repeats
    every page / gcd(row_bytes, page) rows, so one period gives the exact min/mean/max."""
    period = page // math.gcd(row_bytes, page)
    counts = [((r + 1) * row_bytes - 1) // page - (r * row_bytes) // page + 1 for r in range(period)]
    return {"min": min(counts), "mean": round(sum(counts) / period, 4), "max": max(counts)}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in (
        "ple-export",
        "torch",
        "onnx",
        "onnxruntime",
        "onnx-ir",
        "onnxscript",
        "safetensors",
        "numpy",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def files_section(bundle: Path, hashes: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every file of the finished bundle folder but the manifest: bytes, sha256, placement, role."""
    hashes = hashes or {}
    files = []
    for path in sorted(
        p for p in bundle.iterdir() if p.is_file() and p.name not in (MANIFEST_FILE, OWNER_FILE)
    ):
        placement, role = _ROLES.get(path.name, ("none", "metadata"))
        files.append(
            {
                "path": path.name,
                "bytes": path.stat().st_size,
                "sha256": hashes.get(path.name) or sha256_file(path),
                "placement": placement,
                "role": role,
            }
        )
    return files


def ple_section(
    rows: int, float_row_bytes: int, float_dtype: str, page: int, quantization: dict[str, Any], scale: float
) -> dict[str, Any]:
    """Where the PLE table is and what a token reads of it: its codes row plus, when quantized, its
    row of scales (a separate page-aligned tensor in the same file)."""
    ple_quant = quantization.get("ple")
    if ple_quant:
        row_bytes, dtype, scale_row = (
            ple_quant["row_bytes"],
            ple_quant["precision"],
            ple_quant["scales_row_bytes"],
        )
        pages, scale_pages = row_pages(row_bytes, page), row_pages(scale_row, page)
        pages = {k: round(pages[k] + scale_pages[k], 4) for k in pages}
    else:
        row_bytes, dtype, scale_row = float_row_bytes, float_dtype, 0
        pages = row_pages(row_bytes, page)
    return {
        "file": "ple_table.data",
        "offset": 0,
        "dtype": dtype,
        "rows": rows,
        "row_bytes": row_bytes,
        "scales_row_bytes": scale_row,
        "bytes_per_token": row_bytes + scale_row,
        "page_size": page,
        "pages_per_token": pages,
        "scale": scale,
        "out_of_range_ids": "read row 0",
    }


def build(
    bundle: Path,
    ckpt: Checkpoint,
    ple_dtype: str,
    options: dict[str, Any],
    hashes: dict[str, str] | None = None,
    quantization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from exporter import dtypes  # torch: needed to write a manifest, not to read one (runtimes)
    from exporter.gemma4 import PLEEmbedder

    quantization = quantization or {}
    spec = ckpt.spec
    traced = "fp32" if quantization.get("ple") else ple_dtype  # the embedder's float dtype
    scale = PLEEmbedder.scale_for(spec.hidden_size_per_layer_input, dtypes.TORCH[traced])
    ple = ple_section(
        int(ckpt.info("ple_table").shape[0]),
        spec.ple_dim * dtypes.ITEMSIZE[ple_dtype],
        dtypes.ONNX_NAME[ple_dtype],
        int(options["page_size"]),
        quantization,
        scale,
    )
    source_dtypes = sorted({ckpt.tensors[n].dtype for n in ckpt.mapping.values()})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "family": "gemma4",
            "spec": spec.to_dict(),
            "num_parameters": spec.num_parameters(),
            "source": {"dtypes": source_dtypes, "num_tensors": len(ckpt.mapping)},
        },
        "files": files_section(bundle, hashes),
        "graphs": graph_io(spec),
        "onnx": {"ir_version": IR_VERSION, "opset": OPSET},
        "ple": ple,
        "quantization": quantization,
        "kv_cache": kv_cache(spec),
        "positions": "position_ids are the absolute 0-based positions of the new tokens (past length + i); "
        "logits_positions index the new tokens (0..sequence-1) whose logits the decoder computes",
        "generation": {
            "vocab_size": spec.vocab_size,
            "bos_token_id": spec.bos_token_id,
            "eos_token_ids": list(spec.eos_token_id),
            "pad_token_id": spec.pad_token_id,
            "final_logit_softcapping": spec.final_logit_softcapping,
        },
        "export_options": options,
        "versions": versions(),
    }


def quantization_section(
    recipe: QuantRecipe,
    reports: dict[str, TensorReport],
    kept: dict[str, str],
    ple_block: int | None,
    ple_row: int,
) -> dict[str, Any]:
    """The recipe, each source tensor's precision and weight error, and the PLE table's format."""
    from graphs.recipe import bits_of

    tensors = {name: r.to_dict() for name, r in sorted(reports.items())}
    for name, why in kept.items():
        tensors.setdefault(name, {})["kept_float_because"] = why
    section: dict[str, Any] = {"recipe": recipe.to_dict(), "tensors": tensors}
    if ple_block is not None:
        bits = bits_of(recipe.ple)
        row = ple_row
        section["ple"] = {
            "precision": recipe.ple,
            "bits": bits,
            "block_size": ple_block,
            "row_bytes": row * bits // 8,
            "scales_dtype": recipe.scales_dtype,
            "scales_row_bytes": (row // ple_block) * (2 if recipe.scales_dtype == "float16" else 4),
            "op": "com.microsoft.GatherBlockQuantized",
        }
    return section


def write(bundle: Path, manifest: dict[str, Any]) -> None:
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def load(bundle: Path) -> dict[str, Any]:
    """Read and type-check manifest.json: every field a command or runtime reads is present and of
    the right type, and every file path stays inside the bundle. One-line UserError otherwise."""
    path = bundle / MANIFEST_FILE
    try:
        if path.is_symlink():
            raise UserError(f"{path}: is a symlink; a bundle's manifest must be inside its folder")
        if not path.is_file():
            raise UserError(
                f"{bundle}: no {MANIFEST_FILE} (not a ple-export bundle, or an unfinished export)"
            )
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    manifest = read_json_object(path)
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a ple-export manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise UserError(
            f"{path}: format_version {version!r} is not supported "
            f"(this ple-export reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    for key, kind in _REQUIRED.items():
        _typed(manifest, key, kind, path)
    for i, entry in enumerate(manifest["files"]):
        for key, kind in _FILE_ENTRY.items():
            _typed(entry, key, kind, path, f"files[{i}].")
        member_path(bundle, entry["path"], str(path))
        if not _SHA256.match(entry["sha256"]):
            raise UserError(f"{path}: files[{i}].sha256 is not a sha256 hex digest")
        if entry["placement"] not in PLACEMENTS:
            raise UserError(f"{path}: files[{i}].placement {entry['placement']!r} is not one of {PLACEMENTS}")
    names = [f["path"] for f in manifest["files"]]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: a file is listed twice")
    for graph in ("embedder", "decoder"):
        for side in ("inputs", "outputs"):
            for i, io in enumerate(manifest["graphs"][graph][side]):
                for key, kind in _IO_ENTRY.items():
                    _typed(io, key, kind, path, f"graphs.{graph}.{side}[{i}].")
                if "layer" in io:
                    _typed(io, "layer", "int", path, f"graphs.{graph}.{side}[{i}].")
    for i, layer in enumerate(manifest["kv_cache"]["layers"]):
        _typed(layer, "layer", "int", path, f"kv_cache.layers[{i}].")
    quant = manifest.get("quantization")
    if quant:  # optional (bundles of format 1 before quantization have none)
        for key, kind in {"recipe": "dict", "tensors": "dict"}.items():
            _typed(manifest, f"quantization.{key}", kind, path)
        if not all(isinstance(t, dict) for t in quant["tensors"].values()):
            raise UserError(f"{path}: malformed manifest, quantization.tensors entries must be objects")
    if not all(_is_int(t) for t in manifest["generation"]["eos_token_ids"]):
        raise UserError(f"{path}: generation.eos_token_ids must be a list of integers")
    return manifest


def is_earlier_bundle(folder: Path) -> bool:
    """May `--overwrite` replace `folder`? Only if it is a ple-export bundle holding nothing but
    manifest.json and (a subset of) the regular files its manifest lists."""
    try:
        listed = {f["path"] for f in load(folder)["files"]} | {MANIFEST_FILE}
        return all(e.name in listed and e.is_file(follow_symlinks=False) for e in os.scandir(folder))
    except (UserError, OSError):
        return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_KINDS: dict[str, Any] = {
    "int": _is_int,
    "count": lambda v: _is_int(v) and 0 <= v < 1 << 62,
    "positive": lambda v: _is_int(v) and 0 < v < 1 << 62,
    "number": lambda v: (_is_int(v) or isinstance(v, float)) and v == v and abs(v) < 1e18,
    "str": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
}


def _typed(doc: dict[str, Any], key: str, kind: str, path: Path, prefix: str = "") -> None:
    node: Any = doc
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"{path}: malformed manifest, missing {prefix + key!r}")
        node = node[part]
    if not _KINDS[kind](node):
        raise UserError(f"{path}: malformed manifest, {prefix + key!r} must be a {kind}, got {node!r:.60}")


PLACEMENTS = ("flash", "dram", "none")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# what the CLI and runtime_harness read, with their types; a manifest without them is refused up front
_REQUIRED = {
    "files": "list",
    "model.spec": "dict",
    "model.spec.num_hidden_layers": "positive",
    "model.spec.hidden_size": "positive",
    "model.num_parameters": "count",
    "model.family": "str",
    "graphs.embedder.file": "str",
    "graphs.embedder.inputs": "list",
    "graphs.embedder.outputs": "list",
    "graphs.decoder.file": "str",
    "graphs.decoder.inputs": "list",
    "graphs.decoder.outputs": "list",
    "ple.rows": "count",
    "ple.row_bytes": "positive",
    "ple.dtype": "str",
    "ple.page_size": "positive",
    "ple.pages_per_token.min": "number",
    "ple.pages_per_token.mean": "number",
    "ple.pages_per_token.max": "number",
    "kv_cache.layers": "list",
    "generation.eos_token_ids": "list",
}
_FILE_ENTRY = {"path": "str", "bytes": "count", "sha256": "str", "placement": "str", "role": "str"}
_IO_ENTRY = {"name": "str", "dtype": "str", "shape": "list", "role": "str"}
