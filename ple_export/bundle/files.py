"""Which files belong to a bundle, checked before anything reads them.

A bundle is untrusted input. Every command that opens one (`inspect`, the runtime) and the
`--overwrite` check that decides whether a folder may be replaced go through here: every listed file
is a plain name inside the folder, a regular file with one link (`members`), of the listed size
(and sha256 when asked); an ONNX graph's external-data entries name only files the manifest lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ple_export.bundle.format import MANIFEST_FILE, FileRole, file_role
from ple_export.bundle.manifest import FileEntry, Manifest
from ple_export.bundle.members import check_member, member_path, sha256_file
from ple_export.errors import UserError
from ple_export.outdir import OWNER_FILE


@dataclass(frozen=True)
class FileCheck:
    path: str
    problem: str | None  # None: fine


@dataclass(frozen=True)
class GraphFacts:
    """What an ONNX file of the bundle says without loading a weight."""

    external_files: frozenset[str]  # external-data locations
    op_types: frozenset[str]  # `domain::op` outside the default domain


def file_entries(folder: Path, hashes: Mapping[str, str] | None = None) -> tuple[FileEntry, ...]:
    """Every file of a finished bundle folder but the manifest, by name: bytes, sha256 (from `hashes`
    where the writer computed it, else read), placement and role."""
    hashes = hashes or {}
    entries = []
    for path in sorted(
        p for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST_FILE, OWNER_FILE)
    ):
        placement, role = file_role(path.name)
        sha = hashes.get(path.name) or sha256_file(path)
        entries.append(FileEntry(path.name, path.stat().st_size, sha, placement, role))
    return tuple(entries)


def check_files(bundle: Path, manifest: Manifest, verify_hashes: bool) -> list[FileCheck]:
    """Every listed file: inside the bundle (refused with UserError if not), present, of the listed
    size and, if `verify_hashes`, of the listed sha256 (reported per file)."""
    where = str(bundle / MANIFEST_FILE)
    results = []
    for entry in manifest.files:
        path = member_path(bundle, entry.path, where)
        if not path.exists():
            results.append(FileCheck(entry.path, "is missing"))
            continue
        st = check_member(path)
        if st.st_size != entry.bytes:
            results.append(FileCheck(entry.path, f"has {st.st_size} bytes, manifest says {entry.bytes}"))
        elif verify_hashes and sha256_file(path) != entry.sha256:
            results.append(FileCheck(entry.path, "sha256 differs from the manifest"))
        else:
            results.append(FileCheck(entry.path, None))
    return results


def graph_facts(onnx_path: Path) -> GraphFacts:
    """External-data locations and custom-domain op types of an ONNX file, read without its weights."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError; onnx its own errors
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{onnx_path}: not a readable ONNX model ({first})") from None
    locations: set[str] = set()
    ops: set[str] = set()

    def location(t: onnx.TensorProto) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locations.add(next((e.value for e in t.external_data if e.key == "location"), ""))

    def visit(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> None:
        for t in initializers:
            location(t)
        for node in nodes:
            if node.domain not in ("", "ai.onnx"):
                ops.add(f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.HasField("t"):
                    location(attr.t)
                for t in attr.tensors:
                    location(t)
                if attr.HasField("g"):
                    visit(list(attr.g.node), list(attr.g.initializer))
                for g in attr.graphs:
                    visit(list(g.node), list(g.initializer))

    visit(list(model.graph.node), list(model.graph.initializer))
    for fn in model.functions:
        visit(list(fn.node), [])
    return GraphFacts(frozenset(locations), frozenset(ops))


def check_graph_references(bundle: Path, manifest: Manifest, graph_file: str) -> GraphFacts:
    """An ONNX graph of the bundle may read external data only from files the manifest lists."""
    graph = member_path(bundle, graph_file, str(bundle / MANIFEST_FILE))
    if graph_file not in manifest.listed:
        raise UserError(f"{bundle}: graph {graph_file!r} is not among the manifest's files")
    facts = graph_facts(graph)
    for location in sorted(facts.external_files):
        if location not in manifest.listed:
            raise UserError(
                f"{graph}: external data points at {location!r}, which the manifest does not list"
            )
    return facts


def graph_files(manifest: Manifest, genai: bool = True) -> dict[str, str]:
    """The bundle's ONNX files by graph: embedder, decoder and (listed, when `genai`) onnxruntime-genai's."""
    files = {"embedder": manifest.graphs.embedder.file, "decoder": manifest.graphs.decoder.file}
    listed = manifest.files_with(role=FileRole.GENAI_MODEL)
    if genai and listed:
        files["genai"] = listed[0].path
    return files


def trusted_bundle(
    bundle: Path, manifest: Manifest, verify_hashes: bool = True, genai: bool = False
) -> dict[str, GraphFacts]:
    """All checks at once, before any onnxruntime session is created: raises UserError on the first
    problem. Returns what each graph file says (by graph: embedder, decoder and, with `genai`,
    onnxruntime-genai's model when the bundle lists one)."""
    for check in check_files(bundle, manifest, verify_hashes):
        if check.problem:
            raise UserError(f"{bundle / check.path}: {check.problem}")
    return {
        graph: check_graph_references(bundle, manifest, file)
        for graph, file in graph_files(manifest, genai).items()
    }
