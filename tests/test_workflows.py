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


def _job_commands(job: dict) -> list[list[str]]:
    return [
        shlex.split(line)
        for step in job["steps"]
        if "run" in step
        for line in step["run"].replace("\\\n", " ").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def _option(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words else None


def test_the_arm_gate_compares_two_bundles_it_built() -> None:
    """The ARM job profiles the head's bundle against the base's, both exported by the x86 job from
    one checkpoint and handed over as an artifact, and fails on the paired ratio: it compares on its
    first run (no committed baseline from another machine, no path where it compares nothing)."""
    doc = yaml.safe_load((ROOT / ".github" / "workflows" / "arm-profile.yml").read_text())
    export, profile = doc["jobs"]["export"], doc["jobs"]["profile"]
    assert profile["runs-on"] == "ubuntu-24.04-arm" and profile["needs"] == "export"
    gates = [w for w in _job_commands(profile) if w[:2] == ["ple-export", "profile"]]
    assert len(gates) == 1, gates
    gate = gates[0]
    head, base = gate[2], _option(gate, "--baseline-bundle")
    assert base is not None and _option(gate, "--max-regression") and int(_option(gate, "--rounds") or 0) >= 3
    assert "--baseline" not in gate  # a saved report from another machine compares noise
    exports = {_option(w, "-o"): w for w in _job_commands(export) if "export" in w and "ple-export" in w[0]}
    assert {head, base} <= set(exports), (head, base, set(exports))
    # one checkpoint, two codes: the base's bundle comes from the base commit's own install
    assert exports[head][2] == exports[base][2], (exports[head], exports[base])
    assert exports[head][0] == "ple-export" and exports[base][0] != "ple-export"
    venv = exports[base][0].removesuffix("/bin/ple-export")
    worktrees = [w[3] for w in _job_commands(export) if w[:3] == ["git", "worktree", "add"]]
    assert any([f"{venv}/bin/pip", "install", f"./{tree}"] in _job_commands(export) for tree in worktrees)
    # nothing lets the gate's failure pass: no continue-on-error, no step condition, no `|| true`
    assert not profile.get("continue-on-error") and not profile.get("if")
    step = next(s for s in profile["steps"] if "ple-export profile" in s.get("run", ""))
    assert not step.get("continue-on-error") and "if" not in step
    assert not {"||", "|| true", ";"} & set(gate) and not any(w.endswith(";") for w in gate)
    uploaded = next(
        s for s in export["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")
    )
    downloaded = next(
        s for s in profile["steps"] if str(s.get("uses", "")).startswith("actions/download-artifact")
    )
    assert uploaded["with"]["name"] == downloaded["with"]["name"]
    for bundle in (head, base):
        assert bundle.startswith(uploaded["with"]["path"] + "/") and bundle.startswith(
            downloaded["with"]["path"]
        )
    assert not any(
        "if [" in step.get("run", "") and "profile" in step.get("run", "") for step in profile["steps"]
    )
    evidence = [s for s in profile["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert (
        evidence
        and "profile.json" in evidence[0]["with"]["path"]
        and "profile.png" in evidence[0]["with"]["path"]
    )


def test_the_arm_job_installs_the_runtime_without_torch() -> None:
    """The profiling job needs no torch: the package without its dependencies, then the runtime's own,
    at pyproject's pins."""
    doc = yaml.safe_load((ROOT / ".github" / "workflows" / "arm-profile.yml").read_text())
    installs = [w for w in _job_commands(doc["jobs"]["profile"]) if w[:2] == ["pip", "install"]]
    assert ["pip", "install", "--no-deps", "."] in installs
    documented = (ROOT / "docs" / "deploy.md").read_text()
    for step in doc["jobs"]["profile"]["steps"]:  # docs/deploy.md shows the same two lines
        if "pip install" in step.get("run", ""):
            for line in step["run"].strip().splitlines():
                assert line.strip() in documented.splitlines(), line
    wanted = [p for w in installs for p in w[2:] if not p.startswith("-") and p != "."]
    assert not [p for p in wanted if p.startswith(("torch", "transformers"))]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {
        d.split("=")[0].split(">")[0]: d
        for d in [*project["dependencies"], *project["optional-dependencies"]["genai"]]
    }
    for spec in wanted:
        name = spec.split("=")[0].split(">")[0]
        if name in pins and "==" in pins[name]:
            assert spec == pins[name], (spec, pins[name])


def test_the_arm_job_checks_x86_tokens_under_both_runtimes() -> None:
    """The x86 job records the embedded default's greedy run; the ARM job generates the same prompt
    with `--expect` on it, with our loop and with onnxruntime-genai (installed at the extra's pin)."""
    doc = yaml.safe_load((ROOT / ".github" / "workflows" / "arm-profile.yml").read_text())
    export, profile = doc["jobs"]["export"], doc["jobs"]["profile"]
    recorded = [w for w in _job_commands(export) if w[:2] == ["ple-export", "generate"]]
    assert len(recorded) == 1 and "--json" in recorded[0] and "--expect" not in recorded[0]
    expected_file = recorded[0][recorded[0].index(">") + 1]
    checks = [w for w in _job_commands(profile) if w[:2] == ["ple-export", "generate"]]
    runtimes = sorted(_option(w, "--runtime") or "ours" for w in checks)
    assert runtimes == ["genai", "ours"]
    for check in checks:
        assert _option(check, "--expect") == expected_file
        # the same bundle, prompt and length as the recorded run
        assert check[2] == recorded[0][2] and _option(check, "--prompt") == _option(recorded[0], "--prompt")
        assert _option(check, "--max-new-tokens") == _option(recorded[0], "--max-new-tokens")
    installs = [p for w in _job_commands(profile) if w[:2] == ["pip", "install"] for p in w[2:]]
    assert any(p.startswith("onnxruntime-genai") for p in installs)
