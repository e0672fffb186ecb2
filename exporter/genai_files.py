"""The export stage that writes onnxruntime-genai's files into a finished bundle folder:

    embedder.onnx + decoder.onnx (graphs only) -> graphs/genai_model.splice -> model.onnx
    the manifest                                -> ple_export/bundle/genai.genai_config -> genai_config.json

Both are small: model.onnx references the weights in decoder.data and ple_table.data where they are.
`export` and `quantize` call it after the manifest is described and before it is written, so the
manifest lists the two files (roles genai_model / genai_config) like every other.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir

from graphs.genai_model import splice, whole_presents
from ple_export.bundle.contract import whole_cache_length
from ple_export.bundle.files import file_entries
from ple_export.bundle.format import GENAI_CONFIG_FILE, GENAI_MODEL_FILE, Role
from ple_export.bundle.genai import genai_chunk, genai_config
from ple_export.bundle.manifest import Manifest


def with_genai_files(folder: Path, manifest: Manifest, chunk: int) -> Manifest:
    """Write model.onnx and genai_config.json (prefill chunks of `chunk` tokens, at most half a
    sliding window) into `folder`; the manifest with them listed."""
    graphs = manifest.graphs
    config = genai_config(manifest, genai_chunk(manifest, chunk))  # refuses what it cannot describe
    decoder = graphs.decoder

    def name(role: Role) -> str:
        io = decoder.input(role) or decoder.output(role)
        assert io is not None, role
        return io.name

    model = splice(
        ir.load(folder / graphs.embedder.file),
        ir.load(folder / decoder.file),
        ids=name(Role.INPUT_IDS),
        per_layer_inputs=name(Role.PER_LAYER_INPUTS),
        logits_positions=name(Role.LOGITS_POSITIONS),
        logits=name(Role.LOGITS),
    )
    model = whole_presents(model, whole_cache_outputs(manifest))
    ir.save(model, folder / GENAI_MODEL_FILE)
    (folder / GENAI_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    known = {f.path: f.sha256 for f in manifest.files}
    return manifest.replace(files=file_entries(folder, known))


def whole_cache_outputs(manifest: Manifest) -> list[tuple[str, str, int | None, tuple[object, ...]]]:
    """`whole_presents`' arguments for a bundle: each present's past, name, max_length and the whole
    cache's dims (what onnxruntime-genai, and a format 3 decoder, return)."""
    decoder = manifest.graphs.decoder
    pairs = decoder.kv_pairs()  # present -> past
    layers = {kv.layer: kv for kv in manifest.kv_cache.layers}
    out: list[tuple[str, str, int | None, tuple[object, ...]]] = []
    for t in decoder.outputs:
        if t.name in pairs:
            kv = layers[int(t.layer)]  # type: ignore[arg-type]
            dims = (t.shape[0], t.shape[1], whole_cache_length(kv), t.shape[3])
            out.append((pairs[t.name], t.name, kv.max_length, dims))
    return out
