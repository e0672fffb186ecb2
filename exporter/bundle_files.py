"""Which files belong to a bundle, checked before anything reads them.

A bundle is untrusted input. Every command that opens one (`inspect`, the runtime harness) and the
`--overwrite` check that decides whether a folder may be replaced go through this module:

- a manifest path is a plain relative name inside the bundle folder: no `..`, not absolute, no
  backslash or control characters;
- the file is a regular file reached without following a symlink, with one hard link (onnxruntime
  follows hard links, so a link to a file outside the folder would be read as if it were ours);
- an ONNX graph's external-data entries name only files the manifest lists.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.errors import UserError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def member_path(bundle: Path, rel: Any, where: str) -> Path:
    """The path of manifest entry `rel` inside `bundle`, refusing anything that could escape it."""
    if not isinstance(rel, str) or not _SAFE_NAME.match(rel):
        raise UserError(f"{where}: file path {rel!r} is not a plain relative name inside the bundle")
    parts = rel.split("/")
    if any(p in (".", "..") for p in parts):
        raise UserError(f"{where}: file path {rel!r} points outside the bundle")
    path = bundle
    for part in parts:
        path = path / part
        try:
            st = path.lstat()
        except FileNotFoundError:
            return bundle / rel  # missing: the caller reports it
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
        if stat.S_ISLNK(st.st_mode):
            raise UserError(f"{path}: is a symlink; a bundle's files must be inside its folder")
    return bundle / rel


def check_member(path: Path) -> os.stat_result:
    """A bundle file must be a regular file with a single hard link."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise UserError(f"{path}: missing (the manifest lists it)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file")
    if st.st_nlink != 1:
        raise UserError(
            f"{path}: has {st.st_nlink} hard links; a bundle's files must not be hard-linked "
            "(copy the bundle instead)"
        )
    return st


@dataclass(frozen=True)
class FileCheck:
    path: str
    problem: str | None  # None: fine


def check_files(bundle: Path, manifest: dict[str, Any], verify_hashes: bool) -> list[FileCheck]:
    """Every listed file: inside the bundle (refused with UserError if not), present, of the listed
    size and, if `verify_hashes`, of the listed sha256 (reported per file)."""
    where = str(bundle / "manifest.json")
    results = []
    for entry in manifest["files"]:
        path = member_path(bundle, entry["path"], where)
        if not path.exists():
            results.append(FileCheck(entry["path"], "is missing"))
            continue
        st = check_member(path)
        if st.st_size != entry["bytes"]:
            results.append(
                FileCheck(entry["path"], f"has {st.st_size} bytes, manifest says {entry['bytes']}")
            )
        elif verify_hashes and sha256_file(path) != entry["sha256"]:
            results.append(FileCheck(entry["path"], "sha256 differs from the manifest"))
        else:
            results.append(FileCheck(entry["path"], None))
    return results


def external_data_files(onnx_path: Path) -> set[str]:
    """Locations of the external-data tensors of an ONNX file, read without loading any weights."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError; onnx its own errors
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{onnx_path}: not a readable ONNX model ({first})") from None
    locations: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        tensors = list(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
                tensors.extend(attr.tensors)
                if attr.HasField("g"):
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                loc = next((e.value for e in t.external_data if e.key == "location"), None)
                locations.add(loc if loc is not None else "")

    visit(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.HasField("t") and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                    locations.add(next((e.value for e in attr.t.external_data if e.key == "location"), ""))
    return locations


def check_graph_references(bundle: Path, manifest: dict[str, Any], graph_file: str) -> None:
    """An ONNX graph of the bundle may read external data only from files the manifest lists."""
    listed = {f["path"] for f in manifest["files"]}
    graph = member_path(bundle, graph_file, str(bundle / "manifest.json"))
    if graph_file not in listed:
        raise UserError(f"{bundle}: graph {graph_file!r} is not among the manifest's files")
    for location in sorted(external_data_files(graph)):
        if location not in listed:
            raise UserError(
                f"{graph}: external data points at {location!r}, which the manifest does not list"
            )


def trusted_bundle(bundle: Path, manifest: dict[str, Any], verify_hashes: bool = True) -> None:
    """All checks at once, before any onnxruntime session is created: raises UserError on the first
    problem."""
    for check in check_files(bundle, manifest, verify_hashes):
        if check.problem:
            raise UserError(f"{bundle / check.path}: {check.problem}")
    for graph in ("embedder", "decoder"):
        check_graph_references(bundle, manifest, manifest["graphs"][graph]["file"])
