"""The README's and docs' command blocks, run as written (issue #15): every ```bash block that calls
`ple-export` runs line by line, in order, in an empty folder, and every line must exit 0. Lines that
install (`pip install ...`) or run the tests are the environment this suite already is: of a
quickstart line `pip install X && CMD`, CMD runs. Benchmark lines (`python benchmarks/X.py ...`)
take minutes and peers' files: each of their flags must be one the script's --help lists."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def blocks(doc: Path) -> list[list[str]]:
    """The bash blocks of `doc` as command lines (continuations joined, comments and blanks out)."""
    out = []
    for body in FENCE.findall(doc.read_text()):
        lines = []
        for raw in body.replace("\\\n", " ").splitlines():
            line = raw.strip()
            if line and not line.startswith("#"):
                lines.append(line)
        out.append(lines)
    return out


def _runnable(line: str) -> str | None:
    """What of a line the suite runs: None for the environment's own steps (install, tests, lint)."""
    if line.startswith("pip install"):
        rest = line.split("&&", 1)
        return rest[1].strip() if len(rest) == 2 and "pytest" not in rest[1] else None
    if line.split()[0] in ("pytest", "ruff", "mypy"):
        return None
    return line


CLI_BLOCKS = [
    (doc.name, i, b) for doc in DOCS for i, b in enumerate(blocks(doc)) if any("ple-export" in ln for ln in b)
]


def test_the_docs_have_command_blocks() -> None:
    assert any(name == "README.md" and len(b) >= 10 for name, _, b in CLI_BLOCKS)


@pytest.mark.parametrize("doc, index, lines", CLI_BLOCKS, ids=[f"{n}-{i}" for n, i, _ in CLI_BLOCKS])
def test_command_blocks_run_as_written(doc: str, index: int, lines: list[str], tmp_path: Path) -> None:
    shim = tmp_path / "bin"
    shim.mkdir()
    exe = shim / "ple-export"  # the code under test, whatever is installed
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ple_export "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    env |= {"PATH": f"{shim}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    ran = 0
    for line in lines:
        command = _runnable(line)
        if command is None:
            continue
        proc = subprocess.run(
            ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"{doc}: `{line}` exited {proc.returncode}:\n{proc.stderr[-2000:]}"
        ran += 1
    assert ran >= 1


def _benchmark_lines() -> list[str]:
    return [ln for doc in DOCS for b in blocks(doc) for ln in b if ln.startswith("python benchmarks/")]


@pytest.mark.parametrize("line", _benchmark_lines())
def test_benchmark_lines_use_flags_the_scripts_take(line: str) -> None:
    words = line.split("#", 1)[0].split()
    script = ROOT / words[1]
    assert script.is_file(), line
    helptext = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    ).stdout
    for flag in (w.split("=", 1)[0] for w in words[2:] if w.startswith("--")):
        assert flag in helptext, f"{line}: {script.name} has no {flag}"
