"""manifest.json: everything a runtime needs to run the bundle, and nothing it must guess.

Schema: docs/bundle-format.md. Written last, so a folder without it is not a bundle.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.errors import UserError
from exporter.jsonfile import read_json_object
from exporter.spec import Gemma4Spec

if TYPE_CHECKING:
    from exporter.export import Checkpoint

OPSET = 18
IR_VERSION = 10  # onnx 1.23 writes 14 by default; onnxruntime 1.31 loads at most 13
FORMAT = "ple-export-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"

_ROLES = {
    "embedder.onnx": ("flash", "embedder_graph"),
    "ple_table.data": ("flash", "ple_table"),
    "decoder.onnx": ("dram", "decoder_graph"),
    "decoder.data": ("dram", "decoder_weights"),
}


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    ]
    dec_out = [_io("logits", "float32", ["batch", "sequence", spec.vocab_size], "logits")]
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


def _versions() -> dict[str, str]:
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


def build(
    bundle: Path,
    ckpt: Checkpoint,
    ple_dtype: str,
    options: dict[str, Any],
    hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    from exporter import dtypes  # torch: needed to write a manifest, not to read one (runtimes)
    from exporter.gemma4 import PLEEmbedder

    hashes = hashes or {}
    spec = ckpt.spec
    files = []
    for path in sorted(p for p in bundle.iterdir() if p.is_file() and p.name != MANIFEST_FILE):
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
    table = ckpt.info("ple_table")
    row_bytes = spec.ple_dim * dtypes.ITEMSIZE[ple_dtype]
    page = int(options["page_size"])
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
        "files": files,
        "graphs": graph_io(spec),
        "onnx": {"ir_version": IR_VERSION, "opset": OPSET},
        "ple": {
            "file": "ple_table.data",
            "offset": 0,
            "dtype": dtypes.ONNX_NAME[ple_dtype],
            "rows": int(table.shape[0]),
            "row_bytes": row_bytes,
            "page_size": page,
            "pages_per_token": row_pages(row_bytes, page),
            "scale": PLEEmbedder.scale_for(spec.hidden_size_per_layer_input, dtypes.TORCH[ple_dtype]),
            "out_of_range_ids": "read row 0",
        },
        "kv_cache": kv_cache(spec),
        "positions": "position_ids are the absolute 0-based positions of the new tokens (past length + i)",
        "generation": {
            "vocab_size": spec.vocab_size,
            "bos_token_id": spec.bos_token_id,
            "eos_token_ids": list(spec.eos_token_id),
            "pad_token_id": spec.pad_token_id,
            "final_logit_softcapping": spec.final_logit_softcapping,
        },
        "export_options": options,
        "versions": _versions(),
    }


def write(bundle: Path, manifest: dict[str, Any]) -> None:
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def load(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{bundle}: no {MANIFEST_FILE} (not a ple-export bundle, or an unfinished export)")
    manifest = read_json_object(path)
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a ple-export manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: format_version {manifest.get('format_version')} is not supported "
            f"(this ple-export reads {FORMAT_VERSION})"
        )
    for key in _REQUIRED:
        node: Any = manifest
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise UserError(f"{path}: malformed manifest, missing {key!r}")
            node = node[part]
    return manifest


# what the CLI and runtime_harness read; a manifest without them is refused up front
_REQUIRED = (
    "files",
    "model.spec",
    "model.num_parameters",
    "model.family",
    "graphs.embedder.file",
    "graphs.embedder.inputs",
    "graphs.embedder.outputs",
    "graphs.decoder.file",
    "graphs.decoder.inputs",
    "graphs.decoder.outputs",
    "ple.rows",
    "ple.row_bytes",
    "ple.dtype",
    "ple.page_size",
    "ple.pages_per_token.min",
    "ple.pages_per_token.mean",
    "ple.pages_per_token.max",
    "kv_cache.layers",
    "generation.eos_token_ids",
)
