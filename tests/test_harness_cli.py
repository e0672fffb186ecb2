"""`verify`, `generate`, `quality`, `profile`, `devices` as a user meets them: the trained tiny model's
bundles, exit codes (0 pass, 3 parity/quality failure, 4 regression, 2 bad input), one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from exporter import assets
from tests.test_cli import assert_user_error, cli

TRAINED = Path(assets.__file__).parent / "tiny_trained"


def test_verify_passes_fp32_and_int4_and_says_so_in_json(trained: dict[str, Path]) -> None:
    for name in ("fp32", "int4"):
        proc = cli(
            "verify", trained[name], "--reference", TRAINED, "--json", "--steps", "4", cwd=trained["root"]
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["schema"] == "ple-export-verify/1" and report["passed"]
        assert report["precision"] == name and report["prompts"] == "text"
        assert report["summary"]["steps"] == 3 * 4


def test_verify_fails_with_its_own_exit_code(trained: dict[str, Path]) -> None:
    """int4 held to fp32's thresholds (overridden on the command line) fails: exit 3, not 2."""
    proc = cli(
        "verify",
        trained["int4"],
        "--reference",
        TRAINED,
        "--max-rel-error",
        "1e-6",
        "--steps",
        "2",
        cwd=trained["root"],
    )
    assert proc.returncode == 3, proc.stderr
    assert "parity failed" in proc.stderr and "max_rel_error" in proc.stderr


def test_verify_bad_input(trained: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(TRAINED, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["sliding_window"] = 16
    (other / "config.json").write_text(json.dumps(cfg))
    assert_user_error(
        cli("verify", trained["int4"], "--reference", other, cwd=tmp_path), "not the checkpoint"
    )
    assert_user_error(cli("verify", trained["int4"], "--reference", tmp_path, cwd=tmp_path), "config.json")
    assert_user_error(
        cli("verify", trained["int4"], "--reference", TRAINED, "--oracle", "nope", cwd=tmp_path), "--oracle"
    )


def test_generate_text_and_ids(trained: dict[str, Path]) -> None:
    proc = cli(
        "generate", trained["int4"], "--prompt", "If the file", "--max-new-tokens", "12", cwd=trained["root"]
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("If the file") and len(proc.stdout) > len("If the file") + 5
    assert "tok/s" in proc.stderr
    out = cli(
        "generate",
        trained["int4"],
        "--prompt-ids",
        "2,100,200",
        "--max-new-tokens",
        "5",
        "--json",
        cwd=trained["root"],
    )
    payload = json.loads(out.stdout)
    assert payload["prompt_ids"] == [2, 100, 200] and len(payload["tokens"]) <= 5
    # seeded sampling is reproducible
    runs = [
        json.loads(
            cli(
                "generate",
                trained["int4"],
                "--prompt",
                "Return a",
                "--temperature",
                "0.8",
                "--top-k",
                "20",
                "--top-p",
                "0.9",
                "--seed",
                "7",
                "--max-new-tokens",
                "8",
                "--json",
                cwd=trained["root"],
            ).stdout
        )["tokens"]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_generate_bad_input(trained: dict[str, Path], tmp_path: Path) -> None:
    b = trained["int4"]
    cases = [
        (["--prompt", "x", "--prompt-ids", "1"], ["exactly one"]),
        (["--prompt-ids", "1,x"], ["--prompt-ids"]),
        (["--prompt-ids", "1,99999"], ["token ids"]),
        (["--prompt", "x", "--max-new-tokens", "0"], ["--max-new-tokens"]),
        (["--prompt", "x", "--max-new-tokens", "200000"], ["context"]),
        (["--prompt", "x", "--top-p", "0"], ["--top-p"]),
    ]
    for args, needles in cases:
        assert_user_error(cli("generate", b, *args, cwd=tmp_path), *needles)


def test_quality_cli(trained: dict[str, Path]) -> None:
    proc = cli(
        "quality",
        trained["int4"],
        "--reference",
        trained["fp32"],
        "--text",
        TRAINED / "heldout.txt",
        "--windows",
        "3",
        "--json",
        cwd=trained["root"],
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["thresholds_for"] == "int4"
    assert_user_error(
        cli(
            "quality",
            trained["fp32"],
            "--reference",
            trained["fp32"],
            "--text",
            TRAINED / "heldout.txt",
            cwd=trained["root"],
        ),
        "not quantized",
    )


def test_profile_and_devices_cli(trained: dict[str, Path], tmp_path: Path) -> None:
    devices = json.loads(cli("devices", "--json", cwd=tmp_path).stdout)
    assert {"pixel-8a", "iphone-15"} <= {d["name"] for d in devices}
    base = tmp_path / "p.json"
    args = [
        "profile",
        trained["int4"],
        "--runs",
        "1",
        "--warmup",
        "0",
        "--gen-tokens",
        "4",
        "--prompt-tokens",
        "8",
    ]
    proc = cli(*args, "--json", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    base.write_text(proc.stdout)
    report = json.loads(proc.stdout)
    assert report["samples"] and report["regressions"] == []
    # a baseline that held half the DRAM-resident bytes: a regression whatever the timings, exit 4
    leaner = json.loads(base.read_text())
    leaner["verdict"]["dram_resident_bytes"] /= 2
    (tmp_path / "fast.json").write_text(json.dumps(leaner))
    proc = cli(*args, "--baseline", tmp_path / "fast.json", "--quiet", cwd=tmp_path)
    assert proc.returncode == 4 and "DRAM-resident" in proc.stderr, proc.stderr
    assert_user_error(cli("profile", trained["int4"], "--device", "nokia-3310", cwd=tmp_path), "pixel-8a")
    assert_user_error(cli(*args, "--max-regression", "lots", cwd=tmp_path), "--max-regression")
