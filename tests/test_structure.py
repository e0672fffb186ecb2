"""The layering docs/architecture.md describes, held against the code: no import cycle, each layer
importing only those below it, the runtime and the bundle contract free of torch, manifests read by
attribute outside their parser, the bundle's names spelled once, and modest files and functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("ple_export", "exporter", "graphs", "runtime_harness", "benchmarks")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Our modules that `name` imports, at any depth of its code (function-level imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import (the code imports absolutely)"
            base = node.module or ""
            # `from package import submodule` imports the submodule; `from module import name`, the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES}
    return found - {name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_no_module_imports_one_that_imports_it_back() -> None:
    """No cycle, directly or through others (a strongly connected component of one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == []


BASE = ("ple_export.errors", "ple_export.jsonfile", "ple_export.outdir")


def _layer(name: str) -> str:
    if name.startswith("ple_export.bundle") or name in (
        "ple_export.errors",
        "ple_export.jsonfile",
        "ple_export.outdir",
    ):
        return "base"
    return name.split(".")[0]


# which layers each layer may import (besides itself)
ALLOWED = {
    "base": {"base"},
    "graphs": {"base"},
    "exporter": {"base", "graphs"},
    "runtime_harness": {"base"},
    "ple_export": {"base", "graphs", "exporter", "runtime_harness"},  # the CLI, printers, demo: the top
    "benchmarks": {"base", "graphs", "exporter", "runtime_harness"},
}


def test_each_layer_imports_only_those_below_it() -> None:
    climbing = sorted(
        f"{a} -> {b}"
        for a, targets in GRAPH.items()
        for b in targets
        if _layer(b) != _layer(a) and _layer(b) not in ALLOWED[_layer(a)]
    )
    assert climbing == []
    # the CLI is a leaf: only its console entry point (which installs the signal handlers) imports it
    assert [a for a, targets in GRAPH.items() if "ple_export.cli" in targets] == ["ple_export.launch"]


def test_the_runtime_and_the_bundle_contract_import_no_torch() -> None:
    torch_free = [
        name for name in MODULES if name.startswith(("runtime_harness", "ple_export.bundle")) or name in BASE
    ]
    assert "runtime_harness.profile.worker" in torch_free and "ple_export.bundle.manifest" in torch_free
    code = (
        "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *torch_free], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "False"
    # the check can fail: a module that does import torch is seen
    out = subprocess.run(
        [sys.executable, "-c", code, "exporter.reference"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert out.stdout.strip() == "True"


def _library_files() -> list[Path]:
    return [p for n, p in MODULES.items() if not n.startswith("benchmarks")]


def test_manifests_are_read_by_attribute_outside_their_parser() -> None:
    """Nothing outside ple_export/bundle/manifest.py indexes a manifest document by key."""
    parser = ROOT / "ple_export" / "bundle" / "manifest.py"
    offenders = []
    for path in _library_files() + sorted((ROOT / "benchmarks").glob("*.py")):
        if path == parser:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Subscript)
                and isinstance(node.value, (ast.Name, ast.Attribute))
                and (node.value.id if isinstance(node.value, ast.Name) else node.value.attr) == "manifest"
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize(
    "literal",
    [
        "ple_table.data",
        "decoder.data",
        "embedder.onnx",
        "decoder.onnx",
        "manifest.json",
        "past_key",
        "present_value",
    ],
)
def test_the_bundle_names_are_spelled_once(literal: str) -> None:
    """File names and I/O roles live in ple_export/bundle/format.py; the library imports them."""
    home = ROOT / "ple_export" / "bundle" / "format.py"
    spelled = []
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == literal:
                spelled.append(str(path.relative_to(ROOT)))
    assert spelled == [str(home.relative_to(ROOT))]


def test_files_and_functions_stay_readable() -> None:
    """No library file over 600 lines; no function over 60 lines in runtime_harness/ and the CLI."""
    long_files = [
        f"{p.relative_to(ROOT)} ({n})"
        for p in _library_files()
        if (n := len(p.read_text().splitlines())) > 600
    ]
    assert long_files == []
    long_functions = []
    for name, path in MODULES.items():
        if not (name.startswith("runtime_harness") or name.startswith("ple_export.cli")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.name} ({length})")
    assert long_functions == []
