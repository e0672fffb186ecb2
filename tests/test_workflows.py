"""The GitHub workflows parse, and every `ple-export` command they run exists with the flags they
pass; files and extras they name exist. (Whether they pass on GitHub's runners is theirs to say.)"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import typer
import yaml

from ple_export.cli import app

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def _runs(doc: dict) -> list[str]:
    return [step["run"] for job in doc["jobs"].values() for step in job["steps"] if "run" in step]


def _command_options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    out = {}
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        flags = set()
        for param in cmd.params:
            flags.update(getattr(param, "opts", []))
            flags.update(getattr(param, "secondary_opts", []))
        out[name] = flags
    return out


def test_there_are_workflows() -> None:
    assert {p.name for p in WORKFLOWS} >= {"parity.yml", "arm-profile.yml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_commands_exist(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert doc["jobs"], path
    commands = _command_options()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for run in _runs(doc):
        for line in run.replace(">\n", " ").splitlines():
            words = shlex.split(line.replace("\\\n", " "))
            for i, word in enumerate(words):
                if word == "ple-export":
                    cmd = words[i + 1]
                    assert cmd in commands, f"{path.name}: `ple-export {cmd}` is not a command"
                    for flag in words[i + 2 :]:
                        if flag.startswith("--"):
                            assert flag in commands[cmd], f"{path.name}: `ple-export {cmd}` has no {flag}"
                if word == "bash" and i + 1 < len(words):
                    assert (ROOT / words[i + 1]).is_file(), f"{path.name}: {words[i + 1]} missing"
                for extra in re.findall(r"\.\[(\w+)\]", word):
                    assert extra in extras, f"{path.name}: no [{extra}] extra in pyproject.toml"


def test_arm_workflow_runs_on_arm_and_keeps_its_evidence() -> None:
    doc = yaml.safe_load((ROOT / ".github" / "workflows" / "arm-profile.yml").read_text())
    job = doc["jobs"]["profile"]
    assert job["runs-on"] == "ubuntu-24.04-arm"
    text = " ".join(_runs(doc))
    assert "--baseline" in text and "--max-regression" in text
    uploads = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert (
        uploads
        and "profile.json" in uploads[0]["with"]["path"]
        and "profile.png" in uploads[0]["with"]["path"]
    )
