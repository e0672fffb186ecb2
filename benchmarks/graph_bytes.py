"""Where a graph's weight bytes go per decode token: initializers read whole by a MatMul-like op
(`streamed`: every byte per token) against those read by a Gather-like input (`gathered`: a few rows
per token, e.g. the PLE and embedding tables), external data never loaded."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

Json = dict[str, Any]
# (op, input index) that read only a few rows of an initializer per token; None: any input
ROW_READERS: dict[str, set[int] | None] = {
    "Gather": None,
    "GatherBlockQuantized": None,
    "GatherElements": None,
    "GatherND": None,
    "GroupQueryAttention": {7, 8},  # cos_cache, sin_cache
    "RotaryEmbedding": {2, 3},  # cos_cache, sin_cache
}


def _initializer_bytes(init: Any) -> tuple[int, tuple[Any, ...]]:
    """(bytes, identity): external data is identified by (file, offset, length), so two initializers
    viewing the same bytes (our tied embedding: one copy for MatMulNBits and GatherBlockQuantized)
    count once."""
    import onnx

    ext = {entry.key: entry.value for entry in init.external_data}
    if "length" in ext:
        return int(ext["length"]), ("ext", ext.get("location"), int(ext.get("offset", 0)), int(ext["length"]))
    if init.raw_data:
        return len(init.raw_data), ("own", id(init))
    n = 1
    for d in init.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize, ("own", id(init))


def _row_reader(op: str, index: int) -> bool:
    if op not in ROW_READERS:
        return False
    indices = ROW_READERS[op]
    return indices is None or index in indices


def graph_bytes(paths: list[Path]) -> Json:
    """Initializer bytes of ONNX graphs (external data not loaded), split into `streamed` (read whole by
    a MatMul-like op: every byte read per decode token) and `gathered` (read only by Gather-like inputs,
    e.g. the PLE / embedding tables or GQA's cos/sin caches: a few rows per token), plus the bytes by
    consuming op type. Bytes shared by several initializers count once."""
    import onnx

    uses: dict[tuple[Any, ...], set[tuple[str, int]]] = defaultdict(set)
    sizes: dict[tuple[Any, ...], int] = {}
    for path in paths:
        model = onnx.load(str(path), load_external_data=False)
        consumers: dict[str, set[tuple[str, int]]] = defaultdict(set)
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                consumers[name].add((node.op_type, i))
        for init in model.graph.initializer:
            n, ident = _initializer_bytes(init)
            if ident[0] == "ext":
                ident = (str(path.parent), *ident)
            sizes[ident] = n
            uses[ident] |= consumers.get(init.name, set())
    out: Json = {"streamed": 0, "gathered": 0, "by_consumer": defaultdict(int)}
    for ident, n in sizes.items():
        ops = uses[ident]
        gathered = bool(ops) and all(_row_reader(op, i) for op, i in ops)
        out["gathered" if gathered else "streamed"] += n
        out["by_consumer"]["+".join(sorted({op for op, _ in ops})) or "unused"] += n
    out["by_consumer"] = dict(sorted(out["by_consumer"].items(), key=lambda kv: -kv[1]))
    return out


def bundle_bytes(bundle: Path) -> Json:
    from ple_export.bundle.format import FileRole, Placement
    from ple_export.bundle.manifest import Manifest

    manifest = Manifest.read(bundle)
    return {
        "dram": manifest.bytes_in(Placement.DRAM),
        "flash": manifest.bytes_in(Placement.FLASH),
        "total": sum(f.bytes for f in manifest.files),
        "decoder_weights": sum(f.bytes for f in manifest.files_with(role=FileRole.DECODER_WEIGHTS)),
        "ple_table": sum(f.bytes for f in manifest.files_with(role=FileRole.PLE_TABLE)),
        "graph": graph_bytes([bundle / manifest.graphs.embedder.file, bundle / manifest.graphs.decoder.file]),
    }


def peer_bytes(model_dir: Path) -> Json:
    files = [p for p in model_dir.iterdir() if p.is_file()]
    return {
        "total": sum(p.stat().st_size for p in files),
        "graph": graph_bytes(sorted(model_dir.glob("*.onnx"))),
    }
