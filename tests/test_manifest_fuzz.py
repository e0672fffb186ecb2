"""Fuzzing manifest.json (hypothesis): every command that opens a bundle either works or gives a
one-line error with exit 2 - never a traceback, an internal error, a hang or a crash.

The mutations start from a real bundle's manifest: a value anywhere in the document replaced by
another JSON type, an extreme number, NaN, a string carrying markup, control characters or a path
out of the bundle, deep nesting; a key deleted or added. Each mutated manifest is opened by
`inspect`, `inspect --verify`, the runtime (`BundleSession`) and the `--overwrite` check.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ple_export.bundle import manifest as manifest_mod
from ple_export.errors import UserError

EXAMPLE_SECONDS = 20.0

LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["[/]", "[red]x[/red]", "a\nb", "../decoder.data", "/etc/hostname", "decoder.data", "", "\x00", "é/ü"]
    ),
)
VALUES = st.one_of(
    LEAVES,
    st.lists(LEAVES, max_size=4),
    st.dictionaries(st.text(max_size=8), LEAVES, max_size=4),
    st.integers(min_value=65, max_value=400).map(lambda d: json.loads("[" * d + "]" * d)),
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from exporter.export import export_bundle
    from exporter.synth import synth_checkpoint
    from tests.test_cli import TINY

    root = tmp_path_factory.mktemp("mfuzz")
    ckpt = synth_checkpoint(TINY, root / "ckpt", seed=5)
    bundle = export_bundle(ckpt, root / "bundle").out_dir
    return bundle, json.loads((bundle / "manifest.json").read_text())


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:6]):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for part in path[:-1]:
            parent = parent[part]
        key = path[-1]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[key] = draw(VALUES)
        elif action == "delete":
            if isinstance(parent, dict):
                del parent[key]
            else:
                parent.pop(key)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(VALUES)
        else:
            parent.append(draw(VALUES))
    return doc


def _run_cli(*args: str) -> tuple[int, str]:
    from ple_export.cli import main

    err = io.StringIO()
    argv = sys.argv
    sys.argv = ["ple-export", *args]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return code, err.getvalue()


def _assert_clean(code: int, stderr: str, what: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code in (0, 2), f"{what}: exit {code}\n{stderr}"
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error:"), f"{what}: not one line\n{stderr}"


def test_fuzz_manifest(
    pristine: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    bundle, doc = pristine
    work = Path(shutil.copytree(bundle, tmp_path_factory.mktemp("mf") / "b"))

    @settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated(doc))
    def check(m: dict[str, Any]) -> None:
        from runtime_harness.session import BundleSession

        (work / "manifest.json").write_text(json.dumps(m, allow_nan=True))
        t0 = time.monotonic()
        for args in (
            ["inspect", str(work)],
            ["inspect", str(work), "--verify"],
            ["inspect", str(work), "--json"],
        ):
            _assert_clean(*_run_cli(*args), " ".join(args))
        try:
            BundleSession(work, check=True)
        except UserError as e:
            assert "\n" not in str(e)
        assert isinstance(manifest_mod.is_earlier_bundle(work), bool)
        assert time.monotonic() - t0 < EXAMPLE_SECONDS, "one example took too long"

    check()
    # the bundle's data files were never touched
    for name in ("decoder.data", "ple_table.data", "embedder.onnx", "decoder.onnx"):
        assert (work / name).read_bytes() == (bundle / name).read_bytes()
