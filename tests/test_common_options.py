"""What every command shares (issue #15): `--quiet`, `--json`, `-h`, `--version`; results on stdout,
progress and diagnostics on stderr; tables readable at 80 columns in a pipe; `inspect` checks every
listed file; `quality` takes only a float reference of the same model; `verify` explains a failure
against flat logits."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import typer.main

from exporter.export import ExportOptions, export_bundle
from ple_export import cli as cli_module
from ple_export.bundle.manifest import Manifest
from ple_export.bundle.recipe import QuantRecipe
from tests.test_cli import ENV, assert_user_error, cli

COMMANDS = typer.main.get_command(cli_module.app).commands  # type: ignore[attr-defined]


def test_every_command_takes_the_common_options() -> None:
    for name, command in COMMANDS.items():
        opts = {o for p in command.params for o in p.opts}
        assert {"--json", "--quiet", "-q"} <= opts, name
    for name in COMMANDS:
        proc = cli(name, "-h", cwd=Path.cwd())
        assert proc.returncode == 0 and "Usage" in proc.stdout and proc.stderr == "", name


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str, tmp_path: Path) -> None:
    proc = cli(flag, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("ple-export ") and proc.stderr == ""


def _runs(trained: dict[str, Path], out: Path) -> dict[str, list[Any]]:
    """A cheap successful run of each command (the long ones, export/quantize/synth/demo, are run
    with --json --quiet by test_cli)."""
    ckpt, int4, fp32 = trained["checkpoint"], trained["int4"], trained["fp32"]
    return {
        "inspect": ["inspect", int4],
        "devices": ["devices"],
        "verify": ["verify", int4, "--reference", ckpt, "--prompts", "1", "--steps", "2"],
        "verify-transformers": [
            "verify",
            fp32,
            "--reference",
            ckpt,
            "--oracle",
            "transformers",
            "--steps",
            "2",
        ],
        "generate": ["generate", int4, "--prompt", "If the file", "--max-new-tokens", "4"],
        "quality": ["quality", int4, "--reference", fp32, "--text", ckpt / "heldout.txt", "--windows", "1"],
        "profile": [
            "profile",
            int4,
            "--runs",
            "1",
            "--warmup",
            "0",
            "--gen-tokens",
            "2",
            "--prompt-tokens",
            "4",
        ],
        "quantize": ["quantize", fp32, "-o", out / "q"],
    }


@pytest.mark.parametrize(
    "command",
    ["inspect", "devices", "verify", "verify-transformers", "generate", "quality", "profile", "quantize"],
)
def test_quiet_leaves_stderr_empty_and_json_is_one_document(
    command: str, trained: dict[str, Path], tmp_path: Path
) -> None:
    argv = _runs(trained, tmp_path)[command]
    quiet = cli(*argv, "--quiet", cwd=tmp_path, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and quiet.stdout.strip(), command  # the result on stdout, nothing else
    shutil.rmtree(tmp_path / "q", ignore_errors=True)
    as_json = cli(*argv, "--json", cwd=tmp_path, timeout=300)
    assert as_json.returncode == 0, as_json.stderr
    assert isinstance(json.loads(as_json.stdout), (dict, list))


def test_devices_at_80_columns_in_a_pipe_names_every_device_in_full(tmp_path: Path) -> None:
    names = [d["name"] for d in json.loads(cli("devices", "--json", cwd=tmp_path).stdout)]
    env = ENV | {"COLUMNS": "80"}
    proc = cli("devices", cwd=tmp_path, env=env)
    assert proc.returncode == 0
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    words = proc.stdout.split()
    assert all(name in words for name in names), proc.stdout


def test_inspect_checks_every_listed_file(trained: dict[str, Path], tmp_path: Path) -> None:
    """Each file the manifest lists, deleted or resized: exit 2 naming it; the table lists each
    file's sha256 and each tensor's precision."""
    source = trained["int4"]
    manifest = Manifest.read(source)
    listed = sorted(manifest.listed)
    assert {"ple_table.data", "decoder.data", "embedder.onnx", "decoder.onnx"} <= set(listed)
    for name in listed:
        for damage in ("delete", "grow"):
            bundle = Path(shutil.copytree(source, tmp_path / f"{name}-{damage}"))
            if damage == "delete":
                (bundle / name).unlink()
            else:
                with open(bundle / name, "ab") as f:
                    f.write(b"\0")
            line = assert_user_error(cli("inspect", bundle, cwd=tmp_path), bundle, name)
            assert ("missing" in line) if damage == "delete" else ("bytes" in line), line
    shown = cli("inspect", source, cwd=tmp_path, env=ENV | {"COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(cli("inspect", source, "--json", cwd=tmp_path).stdout)
    for f in summary["files"]:
        assert f["sha256"][:12] in shown.stdout, f["path"]
    tensors = summary["quantization"]["tensors"]
    assert {t["precision"] for t in tensors.values()} >= {"int4", "fp32"}
    cells = [line.replace("│", " ").split() for line in shown.stdout.splitlines()]
    rows = {c[0]: c[1] for c in cells if len(c) >= 2}
    assert all(rows.get(name) == t["precision"] for name, t in tensors.items()), shown.stdout


def test_quality_takes_only_a_float_reference_of_the_same_model(
    trained: dict[str, Path], bundles: dict[str, Path], tmp_path: Path
) -> None:
    ckpt, int4, fp32 = trained["checkpoint"], trained["int4"], trained["fp32"]
    text = ckpt / "heldout.txt"
    line = assert_user_error(cli("quality", int4, "--reference", int4, "--text", text, cwd=tmp_path), int4)
    assert "quantized" in line and "float" in line
    other = bundles["tiny"]  # a synthetic model: another spec
    line = assert_user_error(cli("quality", int4, "--reference", other, "--text", text, cwd=tmp_path), other)
    assert "same model" in line
    report = json.loads(
        cli(
            "quality", int4, "--reference", fp32, "--text", text, "--windows", "1", "--json", cwd=tmp_path
        ).stdout
    )
    ple = Manifest.read(fp32).ple.dtype
    assert report["reference_label"] == f"fp32 decoder, {ple} PLE"
    assert report["quantized_label"] == f"int4 decoder, {Manifest.read(int4).ple.dtype} PLE"


def test_verify_against_flat_logits_says_so(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """int4 of a random checkpoint fails parity (its logits are flat, int4 cannot follow noise):
    exit 3, and the one line says why and what to verify instead."""
    ckpt = checkpoints["tiny"]
    bundle = export_bundle(ckpt, tmp_path / "int4", ExportOptions(recipe=QuantRecipe())).out_dir
    proc = cli("verify", bundle, "--reference", ckpt, "--prompts", "1", cwd=tmp_path)
    line = assert_user_error(proc, bundle, "parity failed", "flat", "--quant none", code=3)
    assert "random" in line
    assert "max relative logit error" in proc.stdout  # the table is a result: stdout


def test_verify_prints_its_table_on_stdout(trained: dict[str, Path], tmp_path: Path) -> None:
    proc = cli("verify", trained["int4"], "--reference", trained["checkpoint"], "--steps", "2", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "max relative logit error" in proc.stdout and "parity holds" in proc.stdout
    assert os.linesep in proc.stdout


def test_generate_streams_exactly_the_decoded_text(capsys: pytest.CaptureFixture[str]) -> None:
    """The stream decodes incrementally (never the whole text per token) yet prints what decoding
    all tokens at once gives, multi-byte characters and spaces included."""
    from exporter import assets
    from ple_export.printers import TokenStream
    from runtime_harness.generate import BundleTokenizer

    tok = BundleTokenizer(Path(assets.__file__).parent / "tiny_trained" / "tokenizer.json")
    text = "If the file is naïve, café — 東京 and  two  spaces;\n\tdone. " * 20
    ids = tok.encode(text, special=False)
    seen: list[int] = []

    class Counting:
        def decode(self, part: list[int]) -> str:
            seen.append(len(part))
            return tok.decode(part)

    stream = TokenStream(Counting(), "P:", shown=True)
    for t in ids:
        stream([t])
    assert capsys.readouterr().out == "P:" + tok.decode(ids)
    assert len(ids) > 300 and max(seen) <= 16  # a few tokens per call, not the whole text
