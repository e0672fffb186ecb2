"""Every option of every command, walked at and past the edges of its domain (issue #15).

The walk reads the commands from the CLI itself, so an option added later is walked too: every
option that is not a flag must be a `ple_export.params.Param` (its domain declared once, checked
while the command line is read). For each value at the edges:

- past the domain: exit 2, exactly one `error:` line naming the option, and no work started;
- inside it: the command's first unit of work is reached (the values were all accepted);

"work" is each command's first expensive call, replaced here by one that raises `WorkStarted`.
Then a real run per command with its numbers at their low edges, and the cheap high edges, must end
with a verdict (0, 2 one line, 3, 4), never 70 ("a bug of ours") or a traceback.
"""

from __future__ import annotations

import importlib
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from ple_export import cli, params

COMMANDS = typer.main.get_command(cli.app).commands  # type: ignore[attr-defined]


class WorkStarted(BaseException):
    """Raised where a command's work would start (a BaseException: no handler of ours catches it)."""


# each command's first expensive call (module, attribute), looked up when the command runs
WORK = {
    "synth": ("exporter.synth", "synth_to_folder"),
    "export": ("exporter.export", "export_bundle"),
    "quantize": ("exporter.quantize", "quantize_bundle"),
    "verify": ("runtime_harness.verify", "run_verify"),
    "generate": ("runtime_harness.session", "BundleSession"),
    "quality": ("runtime_harness.quality", "measure"),
    "profile": ("runtime_harness.profile", "profile_gated"),
    "demo": ("ple_export.demo", "run_demo"),
    "inspect": ("ple_export.bundle.files", "check_files"),
    "devices": ("runtime_harness.measure.devices", "list_devices"),
}


def _flag(p: Any) -> bool:
    return bool(getattr(p, "is_flag", False) or getattr(p, "is_bool_flag", False))


def _name(p: Any) -> str:
    return str(p.opts[0]) if getattr(p, "param_type_name", "") == "option" else str(p.name)


def test_every_command_is_walked_and_every_option_declares_its_domain() -> None:
    assert set(COMMANDS) == set(WORK)
    undeclared = [
        f"{command} {_name(p)}"
        for command, c in COMMANDS.items()
        for p in c.params
        if not _flag(p)
        and not isinstance(getattr(p.type_descriptor.parameter_info, "parser", None), params.Param)
    ]
    assert undeclared == [], "options without a declared domain (ple_export.params)"


class Places:
    """The paths an edge value names: {fresh} (a new empty folder), {missing}, {a_file}, {a_dir}."""

    def __init__(self, root: Path):
        self.root = root
        self.count = itertools.count()
        (root / "a_file").write_text("not a folder\n")
        (root / "a_dir").mkdir()
        (root / "report.json").write_text("{}\n")
        # a greedy `generate --json` run of the base command's prompt, for `generate --expect`
        (root / "expected.json").write_text('{"prompt_ids": [2, 17], "tokens": [5], "margins": [1.0]}\n')

    def fill(self, text: str) -> str:
        fresh = self.root / f"fresh-{next(self.count)}"
        fresh.mkdir()
        return text.format(
            fresh=fresh, missing=self.root / "missing", a_file=self.root / "a_file", a_dir=self.root / "a_dir"
        )


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> Places:
    return Places(tmp_path_factory.mktemp("places"))


def _base(command: str, trained: dict[str, Path], places: Places) -> dict[str, Any]:
    """A valid command line: positional arguments under their names, options under their flags."""
    ckpt, int4, fp32 = trained["checkpoint"], trained["int4"], trained["fp32"]
    text = ckpt / "heldout.txt"
    return {
        "synth": {"--output": places.fill("{fresh}/ck")},
        "export": {"checkpoint": ckpt, "--output": places.fill("{fresh}/b")},
        "quantize": {"bundle": fp32, "--output": places.fill("{fresh}/q")},
        "verify": {"bundle": int4, "--reference": ckpt},
        "generate": {"bundle": int4, "--prompt-ids": "2,17"},
        "quality": {"bundle": int4, "--reference": fp32, "--text": text},
        "profile": {"bundle": int4},
        "demo": {"output": places.fill("{fresh}/demo")},
        "inspect": {"bundle": int4},
        "devices": {},
    }[command]


def _valid(param: params.Param, trained: dict[str, Path], places: Places) -> list[str]:
    """Inside values of a path option that is not in the base command line."""
    if isinstance(param, params.ExistingDir):
        return [str(trained["checkpoint"] if param.what == "checkpoint" else trained["int4"])]
    if isinstance(param, params.ExistingFile):
        if param.what == "generate --json output":
            return [str(places.root / "expected.json")]
        return [str(places.root / "report.json" if param.suffixes else trained["checkpoint"] / "heldout.txt")]
    return []


def _with(command: str, base: dict[str, Any], name: str, value: str) -> list[str]:
    line = dict(base)
    if command == "generate" and name == "--prompt":
        line.pop("--prompt-ids")  # one of the two
    line[name] = value
    return _argv(command, line)


def _argv(command: str, line: dict[str, Any]) -> list[str]:
    line = dict(line)
    c = COMMANDS[command]
    positional = [
        str(line.pop(str(p.name))) for p in c.params if p.param_type_name == "argument" and p.name in line
    ]
    return [command, *positional, *itertools.chain.from_iterable((k, str(v)) for k, v in line.items())]


def _cases(trained: dict[str, Path], places: Places) -> Iterator[tuple[str, str, str, bool]]:
    for command, c in sorted(COMMANDS.items()):
        for p in c.params:
            if _flag(p):
                continue
            param = p.type_descriptor.parameter_info.parser
            accepted, refused = param.edges()
            for value in [*accepted, *_valid(param, trained, places)]:
                yield command, _name(p), places.fill(value), True
            for value in refused:
                yield command, _name(p), places.fill(value), False


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str, str]:
    """`ple-export ARGV` in this process: its exit code (or "work") and its stderr."""
    sys_argv = sys.argv
    sys.argv = ["ple-export", *argv]
    try:
        cli.main()
        code: int | str = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except WorkStarted:
        code = "work"
    finally:
        sys.argv = sys_argv
    return code, capsys.readouterr().err


def test_every_option_at_and_past_its_edges(
    trained: dict[str, Path],
    places: Places,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def work(*args: Any, **kwargs: Any) -> None:
        raise WorkStarted

    # every module first, then the patches: a module imported under a patch would keep it
    modules = {name: importlib.import_module(name) for name, _ in WORK.values()}
    for name, attribute in WORK.values():
        monkeypatch.setattr(modules[name], attribute, work)
    wrong = []
    walked = 0
    for command, name, value, inside in _cases(trained, places):
        argv = _with(command, _base(command, trained, places), name, value)
        code, stderr = _run(argv, capsys)
        walked += 1
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        one_line = code == 2 and len(lines) == 1 and lines[0].startswith("error:")
        named = one_line and name.lstrip("-") in lines[0].lower()
        # inside the domain: the work starts, or a limit of this bundle (its context) refuses the
        # value by name before it does
        if inside and code != "work" and not named:
            wrong.append(f"{argv}: refused a value inside the domain (exit {code}): {stderr.strip()}")
        elif not inside and not named:
            wrong.append(
                f"{argv}: past the domain, expected one error line and exit 2, got {code}: {stderr!r}"
            )
    assert walked > 150
    assert wrong == [], "\n".join(wrong)


# Real runs: every number of a command at its low edge at once, then (where that is cheap) at its
# high edge, the values read from the declared domains; a domain that admits a value the work cannot
# take ends here as exit 70 instead of a verdict.
NUMBERS = (params.Int, params.Float, params.PowerOfTwo, params.Fraction)
EXPENSIVE_AT_THE_TOP = {"generate": {"--max-new-tokens"}, "verify": {"--prompts", "--steps", "--prompt-len"}}
# 3: a zero error bound (or a cosine of 1) fails parity, and one token's perplexity may miss int4's
# limit; 4: a budget of a millionth of a MiB is exceeded
EXPECTED = {
    "generate-low": {0},
    "generate-high": {0},
    "verify-low": {3},
    "verify-high": {3},
    "quality-low": {0, 3},
    "profile-low": {4},
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_real_runs_at_the_edges_end_with_a_verdict(
    case: str, trained: dict[str, Path], places: Places, capsys: pytest.CaptureFixture[str]
) -> None:
    command, end = case.split("-")
    line = _base(command, trained, places)
    if command == "profile":
        line["--baseline-bundle"] = trained["fp32"]
    for p in COMMANDS[command].params:
        param = getattr(p.type_descriptor.parameter_info, "parser", None)
        if isinstance(param, NUMBERS) and not (end == "high" and _name(p) in EXPENSIVE_AT_THE_TOP[command]):
            accepted, _ = param.edges()
            line[_name(p)] = accepted[0] if end == "low" else accepted[-1]
    argv = [*_argv(command, line), "--quiet"]
    code, stderr = _run(argv, capsys)
    assert "Traceback" not in stderr
    assert code in EXPECTED[case], f"{argv}: exit {code}: {stderr}"
