"""manifest.json as typed values: parsed strictly once (`Manifest.read`), read by attribute after.

Everything a runtime needs to run a bundle, and nothing it must guess. The exporter builds a
`Manifest` and writes it last (a folder without manifest.json is not a bundle); every reader (the
runtime, the CLI, the benchmarks) gets the same frozen value. `Manifest.from_json(m.to_json()) == m`,
and for a manifest we wrote, `to_json` gives back its bytes. Schema: docs/bundle-format.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from ple_export.bundle.format import (
    APPENDING_KV_SINCE,
    FORMAT,
    MANIFEST_FILE,
    PLE_TABLE_FILE,
    READABLE_VERSIONS,
    FileRole,
    Placement,
    Role,
)
from ple_export.bundle.members import check_name, member_path
from ple_export.bundle.recipe import QuantRecipe
from ple_export.bundle.typed_json import Doc, is_int
from ple_export.errors import UserError
from ple_export.jsonfile import read_json_object

POSITIONS_RULE = (
    "position_ids are the absolute 0-based positions of the new tokens (past length + i); "
    "logits_positions index the new tokens (0..sequence-1) whose logits the decoder computes"
)
KV_UPDATE_RULE = (
    "append each present_* output (the call's new positions) to the matching past_* input for the next "
    "call; a layer with a max_length keeps its last max_length positions"
)
OUT_OF_RANGE_IDS = "read row 0"
FAMILY_CONTEXT = {"gemma4": 131072}  # max_position_embeddings of the family's released configs
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

T = TypeVar("T")


# ---- the values ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the bundle folder
    bytes: int
    sha256: str
    placement: Placement
    role: FileRole


@dataclass(frozen=True)
class TensorIO:
    """One graph input or output: its name, element type, dims (ints or symbolic names) and role."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    role: Role
    layer: int | None = None  # KV tensors: the layer that owns the cache


@dataclass(frozen=True)
class GraphIO:
    file: str
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]

    def input(self, role: Role) -> TensorIO | None:
        """The (layerless) input of `role`, if the graph has one."""
        return next((t for t in self.inputs if t.role == role and t.layer is None), None)

    def output(self, role: Role) -> TensorIO | None:
        return next((t for t in self.outputs if t.role == role and t.layer is None), None)

    def kv_inputs(self) -> tuple[TensorIO, ...]:
        return tuple(t for t in self.inputs if t.role in (Role.PAST_KEY, Role.PAST_VALUE))

    def kv_pairs(self) -> dict[str, str]:
        """present output name -> the past input name it feeds on the next call (by role and layer)."""
        past = {(t.role.removeprefix("past_"), t.layer): t.name for t in self.kv_inputs()}
        return {
            t.name: past[(t.role.removeprefix("present_"), t.layer)]
            for t in self.outputs
            if t.role in (Role.PRESENT_KEY, Role.PRESENT_VALUE)
        }


@dataclass(frozen=True)
class Graphs:
    embedder: GraphIO
    decoder: GraphIO


@dataclass(frozen=True)
class PageCounts:
    """Pages one token's PLE row touches, over the table's rows."""

    min: int
    mean: float
    max: int


@dataclass(frozen=True)
class PleLayout:
    """The flash table: where it is, its row format, and what one token reads of it."""

    file: str
    offset: int
    dtype: str  # int8 / int4 when quantized, else the float dtype
    rows: int
    row_bytes: int  # code (or float) bytes of one row
    scales_row_bytes: int  # one row of scales (0 for a float table)
    bytes_per_token: int
    page_size: int
    pages_per_token: PageCounts
    scale: float  # sqrt(PLE width) in the embedder's float dtype, applied in the graph
    out_of_range_ids: str = OUT_OF_RANGE_IDS


@dataclass(frozen=True)
class KVLayer:
    layer: int
    type: str  # sliding_attention | full_attention
    kv_heads: int
    head_dim: int
    max_length: int | None  # sliding layers keep window - 1 positions; None: grows with the sequence
    shared_by: tuple[int, ...] = ()

    def length_after(self, positions: int) -> int:
        return positions if self.max_length is None else min(positions, self.max_length)


@dataclass(frozen=True)
class KVCache:
    dtype: str
    layers: tuple[KVLayer, ...]
    initial_past_length: int = 0
    update: str = KV_UPDATE_RULE

    def bytes_after(self, positions: int, batch: int = 1) -> int:
        """The whole cache after `positions` tokens (keys and values of the cache's dtype)."""
        itemsize = 2 if self.dtype == "float16" else 4
        return sum(
            2 * batch * kv.kv_heads * kv.head_dim * kv.length_after(positions) * itemsize
            for kv in self.layers
        )

    @property
    def sliding_window(self) -> int | None:
        """The longest window a sliding layer attends over (its max_length + 1), if any layer slides."""
        lengths = [kv.max_length for kv in self.layers if kv.max_length is not None]
        return max(lengths) + 1 if lengths else None


@dataclass(frozen=True)
class Generation:
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    final_logit_softcapping: float | None  # informational: applied in the graph


@dataclass(frozen=True)
class TensorRecord:
    """What became of one source tensor: its precision in the bundle and its weight error."""

    precision: str  # int4 | int8 | a float dtype
    op: str  # MatMulNBits, GatherBlockQuantized, both joined by "+", or "float"
    block_size: int | None = None
    rel_weight_error: float | None = None  # ||w - dequant(q(w))|| / ||w||
    kept_float_because: str | None = None


@dataclass(frozen=True)
class PleQuant:
    precision: str
    bits: int
    block_size: int
    row_bytes: int
    scales_dtype: str
    scales_row_bytes: int
    op: str = "com.microsoft.GatherBlockQuantized"


@dataclass(frozen=True)
class Quantization:
    recipe: QuantRecipe
    tensors: Mapping[str, TensorRecord] = field(default_factory=dict)
    ple: PleQuant | None = None

    @property
    def precision(self) -> str:
        """The coarsest precision in the bundle (decoder weights or PLE table): int4 > int8 > fp32."""
        parts = {self.recipe.weights, self.recipe.ple}
        return next((p for p in ("int4", "int8") if p in parts), "fp32")


@dataclass(frozen=True)
class ModelInfo:
    family: str
    spec: Mapping[str, Any]  # the family's parsed spec (exporter/spec.py for gemma4), as written
    num_parameters: int
    source: Mapping[str, Any] | None = None  # checkpoint dtypes and tensor count

    @property
    def num_layers(self) -> int:
        return int(self.spec["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.spec["hidden_size"])

    @property
    def context_length(self) -> int | None:
        """Tokens a bundle may hold: the spec's, else the family's (how far RoPE was trained)."""
        for value in (self.spec.get("max_position_embeddings"), FAMILY_CONTEXT.get(self.family)):
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def check_context(self, positions: int, what: str) -> None:
        """`positions` tokens fit the context; otherwise one line naming `what` and by how much."""
        limit = self.context_length
        if limit is not None and positions > limit:
            raise UserError(
                f"{what} ({positions}) exceeds the bundle's context of {limit} tokens by {positions - limit}"
            )


@dataclass(frozen=True)
class Onnx:
    ir_version: int
    opset: int


@dataclass(frozen=True)
class Manifest:
    format_version: int
    model: ModelInfo
    files: tuple[FileEntry, ...]
    graphs: Graphs
    ple: PleLayout
    kv_cache: KVCache
    generation: Generation
    onnx: Onnx | None = None
    quantization: Quantization | None = None  # absent from format 1 bundles made before quantization
    positions: str = POSITIONS_RULE
    export_options: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    passes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # graph -> pass -> matches

    # ---- questions every reader asks ---------------------------------------------------------------
    @property
    def appends_kv(self) -> bool:
        """The decoder's presents are the new positions only (the runtime appends them to its cache);
        before format 4 they are the whole cache, fed back as they are."""
        return self.format_version >= APPENDING_KV_SINCE

    @property
    def precision(self) -> str:
        """int4 / int8 / fp32: the coarsest precision of the decoder weights and the PLE table."""
        return self.quantization.precision if self.quantization else "fp32"

    @property
    def recipe(self) -> QuantRecipe:
        return self.quantization.recipe if self.quantization else QuantRecipe.none()

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    def files_with(self, placement: Placement | None = None, role: FileRole | None = None) -> list[FileEntry]:
        return [
            f
            for f in self.files
            if (placement is None or f.placement == placement) and (role is None or f.role == role)
        ]

    def bytes_in(self, placement: Placement) -> int:
        return sum(f.bytes for f in self.files_with(placement))

    @property
    def dram_bytes(self) -> int:
        return self.bytes_in(Placement.DRAM)

    @property
    def listed(self) -> set[str]:
        return {f.path for f in self.files}

    def replace(self, **changes: Any) -> Manifest:
        return replace(self, **changes)

    # ---- JSON -------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return _dump_manifest(self)

    def text(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def write(self, bundle: Path) -> None:
        (bundle / MANIFEST_FILE).write_text(self.text())

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str = MANIFEST_FILE) -> Manifest:
        """Parse and type-check a manifest document; one-line UserError naming the field otherwise."""
        return _parse_manifest(Doc(doc, where))

    @classmethod
    def read(cls, bundle: Path) -> Manifest:
        """`bundle`'s manifest.json, parsed strictly; every file path stays inside the bundle."""
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
        manifest = cls.from_json(read_json_object(path), str(path))
        for entry in manifest.files:
            member_path(bundle, entry.path, str(path))  # no symlink on the way to a listed file
        return manifest


def is_earlier_bundle(folder: Path) -> bool:
    """May `--overwrite` replace `folder`? Only if it is a ple-export bundle holding nothing but
    manifest.json and (a subset of) the regular files its manifest lists."""
    try:
        listed = Manifest.read(folder).listed | {MANIFEST_FILE}
        return all(e.name in listed and e.is_file(follow_symlinks=False) for e in os.scandir(folder))
    except (UserError, OSError):
        return False


# ---- writing ---------------------------------------------------------------------------------------


def _without_none(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    """`d` less those of `keys` whose value is None (optional fields are absent, not null)."""
    return {k: v for k, v in d.items() if not (k in keys and v is None)}


def dump_record(r: TensorRecord) -> dict[str, Any]:
    return _without_none(asdict(r), "block_size", "rel_weight_error", "kept_float_because")


def _dump_graph(g: GraphIO) -> dict[str, Any]:
    def io(t: TensorIO) -> dict[str, Any]:
        return _without_none(asdict(t) | {"shape": list(t.shape), "role": str(t.role)}, "layer")

    return {"file": g.file, "inputs": [io(t) for t in g.inputs], "outputs": [io(t) for t in g.outputs]}


def _dump_manifest(m: Manifest) -> dict[str, Any]:
    """The manifest document, keys in the order docs/bundle-format.md lists them."""
    q = m.quantization
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": m.format_version,
        "model": _without_none(asdict(m.model) | {"spec": dict(m.model.spec)}, "source"),
        "files": [asdict(f) | {"placement": str(f.placement), "role": str(f.role)} for f in m.files],
        "graphs": {"embedder": _dump_graph(m.graphs.embedder), "decoder": _dump_graph(m.graphs.decoder)},
        "onnx": asdict(m.onnx) if m.onnx else None,
        "ple": asdict(m.ple),
        "quantization": None
        if q is None
        else _without_none(
            {
                "recipe": q.recipe.to_dict(),
                "tensors": {name: dump_record(r) for name, r in q.tensors.items()},
                "ple": asdict(q.ple) if q.ple else None,
            },
            "ple",
        ),
        "kv_cache": asdict(m.kv_cache),
        "positions": m.positions,
        "generation": asdict(m.generation),
        "export_options": dict(m.export_options),
        "versions": dict(m.versions),
        "passes": {graph: dict(counts) for graph, counts in m.passes.items()} or None,
    }
    return json.loads(json.dumps(_without_none(doc, "onnx", "quantization", "passes")))  # tuples as lists


# ---- reading ---------------------------------------------------------------------------------------


def _file_entry(d: Doc) -> FileEntry:
    path = check_name(d.get("path", "str"), d.where)
    sha = d.get("sha256", "str")
    if not _SHA256.match(sha):
        raise d.fail("sha256", "is not a sha256 hex digest")
    return FileEntry(
        path, d.get("bytes", "count"), sha, d.enum("placement", Placement), d.enum("role", FileRole)
    )


def _tensor_io(d: Doc) -> TensorIO:
    shape = d.get("shape", "list")
    if not all(is_int(x) or isinstance(x, str) for x in shape):
        raise d.fail("shape", "must list integers and dimension names")
    layer = d.get("layer", "count", None)
    return TensorIO(d.get("name", "str"), d.get("dtype", "str"), tuple(shape), d.enum("role", Role), layer)


def _graph(d: Doc) -> GraphIO:
    return GraphIO(
        d.get("file", "str"),
        tuple(_tensor_io(t) for t in d.items("inputs")),
        tuple(_tensor_io(t) for t in d.items("outputs")),
    )


def _ple(d: Doc) -> PleLayout:
    pages = d.obj("pages_per_token")
    row_bytes = d.get("row_bytes", "positive")
    scales = d.get("scales_row_bytes", "count", 0)
    return PleLayout(
        file=d.get("file", "str", PLE_TABLE_FILE),
        offset=d.get("offset", "count", 0),
        dtype=d.get("dtype", "str"),
        rows=d.get("rows", "count"),
        row_bytes=row_bytes,
        scales_row_bytes=scales,
        bytes_per_token=d.get("bytes_per_token", "count", row_bytes + scales),
        page_size=d.get("page_size", "positive"),
        pages_per_token=PageCounts(
            pages.get("min", "number"), pages.get("mean", "number"), pages.get("max", "number")
        ),
        scale=float(d.get("scale", "number", 1.0)),
        out_of_range_ids=d.get("out_of_range_ids", "str", OUT_OF_RANGE_IDS),
    )


def _kv_layer(d: Doc) -> KVLayer:
    shared = d.get("shared_by", "list", [])
    if not all(is_int(x) for x in shared):
        raise d.fail("shared_by", "must list layer indices")
    return KVLayer(
        d.get("layer", "count"),
        d.get("type", "str"),
        d.get("kv_heads", "positive"),
        d.get("head_dim", "positive"),
        d.get("max_length", "positive", None, nullable=True),
        tuple(shared),
    )


def _recipe(d: Doc) -> QuantRecipe:
    keep = d.get("keep", "list", [])
    if not all(isinstance(k, str) for k in keep):
        raise d.fail("keep", "must list strings")
    recipe = QuantRecipe(
        weights=d.get("weights", "str"),
        block_size=d.get("block_size", "positive", QuantRecipe.block_size),
        symmetric=d.get("symmetric", "bool", QuantRecipe.symmetric),
        accuracy_level=d.get("accuracy_level", "count", QuantRecipe.accuracy_level),
        clip_search=d.get("clip_search", "bool", False),  # absent: made before clip search existed
        ple=d.get("ple", "str"),
        ple_block_size=d.get("ple_block_size", "positive", None, nullable=True),
        ple_symmetric=d.get("ple_symmetric", "bool", QuantRecipe.ple_symmetric),
        scales_dtype=d.get("scales_dtype", "str", QuantRecipe.scales_dtype),
        keep=tuple(keep),
    )
    try:
        recipe.validate()
    except UserError as e:
        raise UserError(f"{d.where}: malformed manifest, {d.prefix.rstrip('.')}: {e}") from None
    return recipe


def _record(d: Doc) -> TensorRecord:
    error = d.get("rel_weight_error", "number", None, nullable=True)
    return TensorRecord(
        precision=d.get("precision", "str"),
        op=d.get("op", "str"),
        block_size=d.get("block_size", "positive", None, nullable=True),
        rel_weight_error=None if error is None else float(error),
        kept_float_because=d.get("kept_float_because", "str", None, nullable=True),
    )


def _quantization(d: Doc) -> Quantization:
    tensors = d.obj("tensors")
    records = {name: _record(tensors.obj(name)) for name in tensors.node}
    ple = None
    if "ple" in d.node:
        p = d.obj("ple")
        ple = PleQuant(
            p.get("precision", "str"),
            p.get("bits", "positive"),
            p.get("block_size", "positive"),
            p.get("row_bytes", "positive"),
            p.get("scales_dtype", "str"),
            p.get("scales_row_bytes", "count"),
            p.get("op", "str", PleQuant.op),
        )
    return Quantization(_recipe(d.obj("recipe")), records, ple)


def _generation(d: Doc) -> Generation:
    eos = d.get("eos_token_ids", "list")
    if not all(is_int(t) for t in eos):
        raise UserError(f"{d.where}: generation.eos_token_ids must be a list of integers")
    cap = d.get("final_logit_softcapping", "number", None, nullable=True)
    return Generation(
        vocab_size=d.get("vocab_size", "positive"),
        bos_token_id=d.get("bos_token_id", "count", None, nullable=True),
        eos_token_ids=tuple(eos),
        pad_token_id=d.get("pad_token_id", "count", None, nullable=True),
        final_logit_softcapping=None if cap is None else float(cap),
    )


def _passes(d: Doc | None) -> dict[str, dict[str, int]]:
    if d is None:
        return {}
    out: dict[str, dict[str, int]] = {}
    for graph in d.node:
        counts = d.obj(graph)
        out[graph] = {name: counts.get(name, "int") for name in counts.node}
    return out


def _strings(d: Doc | None) -> dict[str, str]:
    if d is None:
        return {}
    return {k: v for k, v in d.node.items() if isinstance(v, str)}


def _parse_manifest(d: Doc) -> Manifest:
    if d.node.get("format") != FORMAT:
        raise UserError(f"{d.where}: not a ple-export manifest")
    version = d.node.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise UserError(
            f"{d.where}: format_version {version!r:.40} is not supported "
            f"(this ple-export reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    model = d.obj("model")
    spec = model.obj("spec")
    spec.get("num_hidden_layers", "positive")
    spec.get("hidden_size", "positive")
    source = model.get("source", "dict", None)
    files = tuple(_file_entry(f) for f in d.items("files"))
    if len({f.path for f in files}) != len(files):
        raise UserError(f"{d.where}: a file is listed twice")
    graphs = d.obj("graphs")
    onnx = d.optional("onnx")
    quant = d.optional("quantization")
    kv = d.obj("kv_cache")
    return Manifest(
        format_version=version,
        model=ModelInfo(
            family=model.get("family", "str"),
            spec=dict(spec.node),
            num_parameters=model.get("num_parameters", "count"),
            source=source,
        ),
        files=files,
        graphs=Graphs(_graph(graphs.obj("embedder")), _graph(graphs.obj("decoder"))),
        ple=_ple(d.obj("ple")),
        kv_cache=KVCache(
            dtype=kv.get("dtype", "str", "float32"),
            layers=tuple(_kv_layer(layer) for layer in kv.items("layers")),
            initial_past_length=kv.get("initial_past_length", "count", 0),
            update=kv.get("update", "str", KV_UPDATE_RULE),
        ),
        generation=_generation(d.obj("generation")),
        onnx=None
        if onnx is None
        else Onnx(onnx.get("ir_version", "positive"), onnx.get("opset", "positive")),
        quantization=None if not quant or not quant.node else _quantization(quant),
        positions=d.get("positions", "str", POSITIONS_RULE),
        export_options=d.get("export_options", "dict", {}),
        versions=_strings(d.optional("versions")),
        passes=_passes(d.optional("passes")),
    )
