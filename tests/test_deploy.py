"""docs/deploy.md, held to the code: its Python snippets run as written on the embedded default's
bundle and generate what `ple-export generate` does, and its operator table is the bundle's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tests.conftest import ROOT
from tests.test_cli import ENV, cli

DEPLOY = ROOT / "docs" / "deploy.md"
PYTHON = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PROMPT, NEW_TOKENS = "The while statement", 24


def _snippets() -> list[str]:
    return PYTHON.findall(DEPLOY.read_text())


def test_the_doc_has_both_snippets() -> None:
    snippets = _snippets()
    assert len(snippets) == 2
    assert "onnxruntime_genai" in snippets[0] and "InferenceSession" in snippets[1]
    for snippet in snippets:
        assert 'bundle = "bundle"' in snippet and f'"{PROMPT}"' in snippet and str(NEW_TOKENS) in snippet


@pytest.mark.parametrize("which", [0, 1], ids=["onnxruntime-genai", "plain-onnxruntime"])
def test_snippet_generates_what_ple_export_generates(
    trained: dict[str, Path], tmp_path: Path, which: int
) -> None:
    shutil.copytree(trained["int4"], tmp_path / "bundle")
    script = tmp_path / "snippet.py"
    script.write_text(_snippets()[which])
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    tokens = json.loads(proc.stdout.splitlines()[0])
    ours = cli(
        "generate", "bundle", "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--json", cwd=tmp_path
    )
    assert ours.returncode == 0, ours.stderr
    expected = json.loads(ours.stdout)
    assert tokens == expected["tokens"] and len(tokens) > 3
    assert "\n".join(proc.stdout.splitlines()[1:]).strip() == expected["text"].strip()


def _doc_ops() -> set[str]:
    """`domain::op` of every row of the doc's operator table."""
    section = DEPLOY.read_text().split("## Which onnxruntime builds run it", 1)[1]
    ops = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0] != "`domain`":
            domain = cells[0].split("`")[1]
            ops |= {f"{domain}::{op.strip()}" for op in cells[1].split(",")}
    return ops


def test_the_operator_table_is_the_bundles(trained: dict[str, Path]) -> None:
    found = set()
    for kind in ("int4", "fp32"):
        for graph in ("embedder.onnx", "decoder.onnx", "model.onnx"):
            model = onnx.load(str(trained[kind] / graph), load_external_data=False)
            found |= {f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node}
    assert found == _doc_ops()
