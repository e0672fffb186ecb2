"""The CLI as a user meets it: `python -m ple_export ...` in a subprocess.

The project's rule: bad input gets a clear one-line error and a non-zero exit (2; 130 for Ctrl-C),
never a traceback, and never destroys data: an existing output folder is not clobbered unless asked,
and a failed export leaves no half-written bundle (nor a hidden `.NAME.partial-*` temp folder).

Runtime: every CLI start imports torch (~2 s), an export of the tiny model takes ~15-20 s. The two
long runs (export --overwrite for the happy path, `demo`) start in the background when this module
starts, and the cheap failing runs (bad checkpoints and flags, caught before tracing: one CLI start
each) are all started at once on two workers; the tests then only check their results.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from exporter.presets import get_preset

TINY = get_preset("tiny")
SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# No COLUMNS override: `_fail` prints with soft_wrap, so a long message must stay on one line at the
# default 80 columns of a non-terminal stderr.
ENV = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
ENV |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(args: tuple[Any, ...]) -> list[str]:
    return [sys.executable, "-m", "ple_export", *(str(a) for a in args)]


def cli(*args: Any, cwd: Path, timeout: float = 180, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = kw.pop("env", ENV)
    return subprocess.run(_cmd(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def assert_user_error(
    proc: subprocess.CompletedProcess[str], *needles: Any, code: int = EXIT_USER_ERROR
) -> str:
    """Exit `code`, no traceback, exactly one non-empty stderr line starting "error:" naming `needles`."""
    shown = f"exit {proc.returncode}\n--- stderr ---\n{proc.stderr}--- stdout ---\n{proc.stdout}"
    assert "Traceback" not in proc.stderr, shown
    assert proc.returncode == code, shown
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stderr is not one line:\n{shown}"
    line = lines[0]
    assert line.startswith("error:"), shown
    for needle in needles:
        assert str(needle) in line, f"{needle!r} not named in the error:\n{shown}"
    return line


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry below `folder`: file bytes, or None for a directory."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def leftovers(out: Path) -> list[str]:
    """Hidden temp siblings of `out` (`.NAME.partial-*`, `.NAME.old-*`)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_nothing_left(out: Path, before: dict[str, bytes | None] | None = None) -> None:
    """`out` is absent (or, if it existed, byte-for-byte as before) and no temp sibling is left."""
    if before is None:
        assert not out.exists(), f"{out} exists after a failed run: {sorted(os.listdir(out))}"
    else:
        assert out.is_dir(), f"{out} was removed"
        assert snapshot(out) == before, f"{out} was modified"
    assert leftovers(out) == [], f"temp folders left beside {out}: {leftovers(out)}"


def earlier_manifest(files: dict[str, bytes]) -> dict[str, Any]:
    """The smallest manifest `load` accepts, listing `files` with their true sizes and hashes."""
    return {
        "format": "ple-export-bundle",
        "format_version": 1,
        "files": [
            {
                "path": n,
                "bytes": len(b),
                "sha256": hashlib.sha256(b).hexdigest(),
                "placement": "none",
                "role": "metadata",
            }
            for n, b in files.items()
        ],
        "model": {
            "family": "gemma4",
            "num_parameters": 1,
            "spec": {"num_hidden_layers": 1, "hidden_size": 1},
        },
        "graphs": {g: {"file": f"{g}.onnx", "inputs": [], "outputs": []} for g in ("embedder", "decoder")},
        "ple": {
            "rows": 1,
            "row_bytes": 2,
            "dtype": "bfloat16",
            "page_size": 4096,
            "pages_per_token": {"min": 1, "mean": 1, "max": 1},
        },
        "kv_cache": {"layers": []},
        "generation": {"vocab_size": 1, "eos_token_ids": [1]},
    }


def make_existing(out: Path) -> dict[str, bytes | None]:
    """A non-empty folder an earlier export left at `out`: a manifest listing every other file in it,
    so --overwrite may replace it (anything else is refused even with --overwrite)."""
    files = {"notes.txt": b"my precious notes\n", "old.data": bytes(range(256))}
    out.mkdir(parents=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / "manifest.json").write_text(json.dumps(earlier_manifest(files)))
    return snapshot(out)


# ---- checkpoint surgery ----------------------------------------------------------------------------


def _edit_config(ckpt: Path, **changes: Any) -> None:
    path = ckpt / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del cfg[key]
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg, indent=2))


_DELETE = object()


def _edit_header(shard: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a safetensors header in place; the data bytes (and relative offsets) are kept."""
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    shard.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])


def _edit_tensors(shard: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a safetensors shard after `edit` changes its {name: {"dtype", "shape", "data"}} map; the
    tensors are laid out again back to back, as the format requires (no gaps, no shared bytes)."""
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    start = 8 + n
    tensors = {
        name: {
            "dtype": e["dtype"],
            "shape": e["shape"],
            "data": raw[start + e["data_offsets"][0] : start + e["data_offsets"][1]],
        }
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    }
    edit(tensors)
    out: dict[str, Any] = {} if meta is None else {"__metadata__": meta}
    pos = 0
    for name, t in tensors.items():
        out[name] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [pos, pos + len(t["data"])]}
        pos += len(t["data"])
    blob = json.dumps(out, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    shard.write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(t["data"] for t in tensors.values()))


def _edit_index(ckpt: Path, edit: Callable[[dict[str, str]], None]) -> None:
    path = ckpt / INDEX
    doc = json.loads(path.read_text())
    edit(doc["weight_map"])
    path.write_text(json.dumps(doc, indent=2))


def _shard_of(ckpt: Path, tensor: str) -> Path:
    return ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][tensor]


def _no_config(ckpt: Path) -> list[Any]:
    (ckpt / "config.json").unlink()
    return [ckpt / "config.json", "missing"]


def _config_not_json(ckpt: Path) -> list[Any]:
    (ckpt / "config.json").write_text('{"model_type": "gemma4_text", "hidden_size": 64,')
    return [ckpt / "config.json", "not valid JSON"]


def _config_a_list(ckpt: Path) -> list[Any]:
    (ckpt / "config.json").write_text("[1, 2, 3]\n")
    return [ckpt / "config.json", "JSON object"]


def _config_no_hidden_size(ckpt: Path) -> list[Any]:
    _edit_config(ckpt, hidden_size=_DELETE)
    return ["config.json", "hidden_size"]


def _config_hidden_size_not_a_number(ckpt: Path) -> list[Any]:
    _edit_config(ckpt, hidden_size="sixty-four")
    return ["config.json", "hidden_size"]


def _model_type_llama(ckpt: Path) -> list[Any]:
    _edit_config(ckpt, model_type="llama")
    return ["config.json", "model_type", "llama"]


def _no_ple_zero(ckpt: Path) -> list[Any]:
    _edit_config(ckpt, hidden_size_per_layer_input=0)
    return ["hidden_size_per_layer_input", "Per-Layer Embeddings"]


def _no_ple_null(ckpt: Path) -> list[Any]:
    _edit_config(ckpt, hidden_size_per_layer_input=None)
    return ["hidden_size_per_layer_input", "Per-Layer Embeddings"]


def _moe(ckpt: Path) -> list[Any]:
    _edit_config(ckpt, enable_moe_block=True, num_experts=8)
    return ["config.json", "Mixture-of-Experts"]


def _missing_shard(ckpt: Path) -> list[Any]:
    (ckpt / SHARD_2).unlink()
    return [SHARD_2, "missing"]


def _truncated_shard(ckpt: Path) -> list[Any]:
    shard = ckpt / SHARD_2
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 5)
    return [shard, "truncated"]


def _header_garbage(ckpt: Path) -> list[Any]:
    shard = ckpt / SHARD_1
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe{{{not json" * 2)
    return [shard, "header"]


def _header_size_garbage(ckpt: Path) -> list[Any]:
    shard = ckpt / SHARD_1
    with open(shard, "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))
    return [shard, "header size"]


def _intermediate_size_disagrees(ckpt: Path) -> list[Any]:
    _edit_config(ckpt, intermediate_size=TINY.intermediate_size + 32)
    return ["model.layers.0.mlp.gate_proj.weight", "config.json"]


def _tensor_shape_disagrees(ckpt: Path) -> list[Any]:
    name = "model.layers.1.self_attn.o_proj.weight"  # (64, 64) in the tiny preset

    def edit(header: dict[str, Any]) -> None:
        assert header[name]["shape"] == [64, 64]
        header[name]["shape"] = [32, 128]  # same bytes, so the header itself stays consistent

    _edit_header(_shard_of(ckpt, name), edit)
    return [name, "[32, 128]"]


def _missing_tensor(ckpt: Path) -> list[Any]:
    name = "model.layers.4.mlp.up_proj.weight"
    _edit_tensors(_shard_of(ckpt, name), lambda t: t.pop(name))
    _edit_index(ckpt, lambda m: m.pop(name))
    return [name, "missing"]


def _unexpected_tensor(ckpt: Path) -> list[Any]:
    extra, twin = "model.layers.0.mlp.extra_proj.weight", "model.layers.0.mlp.up_proj.weight"
    shard = _shard_of(ckpt, twin)
    _edit_tensors(shard, lambda t: t.__setitem__(extra, dict(t[twin])))  # a copy of twin's bytes
    _edit_index(ckpt, lambda m: m.__setitem__(extra, shard.name))
    return [extra, "unexpected"]


BAD_CHECKPOINTS: dict[str, Callable[[Path], list[Any]]] = {
    "no_config": _no_config,
    "config_not_json": _config_not_json,
    "config_a_list": _config_a_list,
    "config_no_hidden_size": _config_no_hidden_size,
    "config_hidden_size_not_a_number": _config_hidden_size_not_a_number,
    "model_type_llama": _model_type_llama,
    "no_ple_zero": _no_ple_zero,
    "no_ple_null": _no_ple_null,
    "moe": _moe,
    "missing_shard": _missing_shard,
    "truncated_shard": _truncated_shard,
    "header_garbage": _header_garbage,
    "header_size_garbage": _header_size_garbage,
    "intermediate_size_disagrees": _intermediate_size_disagrees,
    "tensor_shape_disagrees": _tensor_shape_disagrees,
    "missing_tensor": _missing_tensor,
    "unexpected_tensor": _unexpected_tensor,
}

# (args with {ckpt}/{out} placeholders, what the error must name)
BAD_FLAGS: dict[str, tuple[list[str], list[str]]] = {
    "page-size-1000": (["export", "{ckpt}", "-o", "{out}", "--page-size", "1000"], ["--page-size", "1000"]),
    "ple-dtype-int3": (["export", "{ckpt}", "-o", "{out}", "--ple-dtype", "int3"], ["--ple-dtype", "int3"]),
    "preset-nope": (["synth", "-o", "{out}", "--preset", "nope"], ["preset", "nope"]),
    "shard-size-abc": (["synth", "-o", "{out}", "--shard-size", "abc"], ["abc"]),
    "shard-size-0": (["synth", "-o", "{out}", "--shard-size", "0"], ["size", "'0'"]),
    "dtype-int8": (["synth", "-o", "{out}", "--dtype", "int8"], ["dtype", "int8"]),
    # Left to typer/click: a value that is not an integer, a missing required option.
    "page-size-not-int": (["export", "{ckpt}", "-o", "{out}", "--page-size", "abc"], ["--page-size", "abc"]),
    "no-output": (["export", "{ckpt}"], ["--output"]),
}


# ---- fixtures ---------------------------------------------------------------------------------------


class Job:
    """A CLI run in the background."""

    def __init__(self, *args: Any, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            _cmd(args), cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._done: subprocess.CompletedProcess[str] | None = None

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        if self._done is None:
            out, err = self.proc.communicate(timeout=timeout)
            self._done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return self._done

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@dataclass
class Background:
    root: Path
    synth: subprocess.CompletedProcess[str]
    ckpt: Path
    bundle: Path
    bundle_before: dict[str, bytes | None]
    demo_dir: Path
    jobs: dict[str, Job] = field(default_factory=dict)


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    """`synth`, then (in the background) `export --overwrite` onto a non-empty folder, and `demo`."""
    root = tmp_path_factory.mktemp("cli_bg")
    ckpt, bundle = root / "ckpt", root / "bundle"
    synth = cli(
        "synth",
        "-o",
        ckpt,
        "--preset",
        "tiny",
        "--shard-size",
        "400KB",
        "--seed",
        "3",
        "--json",
        "--quiet",
        cwd=root,
    )
    bg = Background(root, synth, ckpt, bundle, make_existing(bundle), root / "demo")
    if synth.returncode == 0:
        bg.jobs["export"] = Job("export", ckpt, "-o", bundle, "--overwrite", "--json", "--quiet", cwd=root)
    bg.jobs["demo"] = Job("demo", bg.demo_dir, "--json", "--quiet", cwd=root)
    yield bg
    for job in bg.jobs.values():
        job.stop()


@pytest.fixture(scope="module")
def clean_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded tiny checkpoint (two shards + index), written in-process. Copy before corrupting."""
    from exporter.synth import synth_checkpoint

    ckpt = synth_checkpoint(TINY, tmp_path_factory.mktemp("clean") / "ckpt", max_shard_bytes=400_000, seed=1)
    assert sorted(p.name for p in ckpt.glob("model*")) == [SHARD_1, SHARD_2, INDEX]
    return ckpt


@dataclass
class Run:
    proc: Future[subprocess.CompletedProcess[str]]
    needles: list[Any]
    out: Path
    before: dict[str, bytes | None] | None = None


@pytest.fixture(scope="module")
def prefetched(clean_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Every cheap failing run (bad checkpoint, bad flag), started at once on two workers.

    Each costs a CLI start (torch import) and nothing else, so running them beside the background
    jobs, instead of one after another, is what keeps this module's wall time down.
    """
    root = tmp_path_factory.mktemp("prefetch")
    pool = ThreadPoolExecutor(2)
    runs: dict[str, Run] = {}
    for case, corrupt in BAD_CHECKPOINTS.items():
        ckpt = Path(shutil.copytree(clean_ckpt, root / case / "ckpt"))
        needles, out = corrupt(ckpt), root / case / "bundle"
        proc = pool.submit(cli, "export", ckpt, "-o", out, "--quiet", cwd=root / case)
        runs[case] = Run(proc, needles, out)
    # the same corruption with --overwrite onto an existing folder: the folder must survive
    ckpt = Path(shutil.copytree(clean_ckpt, root / "overwrite" / "ckpt"))
    needles, out = _missing_tensor(ckpt), root / "overwrite" / "bundle"
    before = make_existing(out)
    runs["failed_overwrite"] = Run(
        pool.submit(cli, "export", ckpt, "-o", out, "--overwrite", "--quiet", cwd=root), needles, out, before
    )
    for flag, (args, needles) in BAD_FLAGS.items():
        (root / flag).mkdir()
        out = root / flag / "out"
        argv = [a.format(ckpt=clean_ckpt, out=out) for a in args]
        runs[flag] = Run(pool.submit(cli, *argv, cwd=root / flag), needles, out)
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


# ---- bad input, caught before tracing ------------------------------------------------------------------


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused(case: str, prefetched: dict[str, Run]) -> None:
    run = prefetched[case]
    assert_user_error(run.proc.result(), *run.needles)
    assert_nothing_left(run.out)


def test_failed_overwrite_keeps_the_old_folder(prefetched: dict[str, Run]) -> None:
    run = prefetched["failed_overwrite"]
    assert_user_error(run.proc.result(), *run.needles)
    assert_nothing_left(run.out, run.before)


@pytest.mark.parametrize("flag", list(BAD_FLAGS))
def test_bad_flag_values(flag: str, prefetched: dict[str, Run]) -> None:
    run = prefetched[flag]
    assert_user_error(run.proc.result(), *run.needles)
    assert_nothing_left(run.out)


# ---- existing output folders -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["non_empty_folder", "a_file"])
def test_existing_output_is_not_clobbered(kind: str, clean_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    if kind == "a_file":
        out.write_text("not a folder\n")
        before_bytes = out.read_bytes()
        proc = cli("export", clean_ckpt, "-o", out, "--quiet", cwd=tmp_path)
        assert_user_error(proc, out, "is a file")
        assert out.read_bytes() == before_bytes
        assert leftovers(out) == []
        return
    before = make_existing(out)
    for args in (["export", clean_ckpt, "-o", out, "--quiet"], ["synth", "-o", out, "--quiet"]):
        proc = cli(*args, cwd=tmp_path)
        assert_user_error(proc, out, "--overwrite")
        assert_nothing_left(out, before)


def test_inspect_refuses_a_folder_without_manifest(clean_ckpt: Path, tmp_path: Path) -> None:
    before = snapshot(clean_ckpt)
    assert_user_error(cli("inspect", clean_ckpt, cwd=tmp_path), clean_ckpt, "manifest.json")
    assert snapshot(clean_ckpt) == before


# ---- Ctrl-C and a full disk --------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite"])
def test_ctrl_c_mid_export_leaves_nothing(existing: bool, clean_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    before = make_existing(out) if existing else None
    flags = ["--overwrite"] if existing else []
    job = Job("export", clean_ckpt, "-o", out, "--quiet", *flags, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(f".{out.name}.partial-*")):
            assert job.proc.poll() is None, f"export ended before writing: {job.result().stderr}"
            assert time.monotonic() < deadline, "no .partial folder appeared"
            time.sleep(0.02)
        time.sleep(0.3)  # inside the export proper (tracing / writing), not at its first line
        job.proc.send_signal(signal.SIGINT)
        proc = job.result(timeout=60)
    finally:
        job.stop()
    # `python -m` (not the `ple-export` script) may end killed by SIGINT after printing the error: a
    # CPython 3.11 quirk when the KeyboardInterrupt surfaced inside exec()/eval() of a string (e.g.
    # a dataclass or namedtuple being built) - Py_RunMain then re-raises SIGINT at exit even though
    # the CLI handled it. A shell shows both as status 130.
    code = -signal.SIGINT if proc.returncode == -signal.SIGINT else EXIT_INTERRUPTED
    assert_user_error(proc, "interrupted", code=code)
    assert_nothing_left(out, before)


def _mount_tiny_tmpfs(mnt: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    return res.returncode == 0


def _limit_file_size() -> None:  # preexec_fn: writes past 64 KiB fail with EFBIG instead of SIGXFSZ
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_full_disk_leaves_the_old_folder(clean_ckpt: Path, tmp_path: Path) -> None:
    """64 KiB tmpfs (root), else RLIMIT_FSIZE: ple_table.data (96 KiB) does not fit."""
    mnt = tmp_path / "small"
    mounted = _mount_tiny_tmpfs(mnt)
    try:
        if not mounted:
            mnt.mkdir(exist_ok=True)
        out = mnt / "bundle"
        before = make_existing(out)  # an earlier bundle: --overwrite may replace it
        proc = cli(
            "export",
            clean_ckpt,
            "-o",
            out,
            "--overwrite",
            "--quiet",
            cwd=tmp_path,
            preexec_fn=None if mounted else _limit_file_size,
        )
        assert_user_error(proc, mnt, "no space left" if mounted else "too large")
        assert_nothing_left(out, before)
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)


# ---- happy paths (the background jobs) ---------------------------------------------------------------


def _json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def test_synth_export_inspect(background: Background) -> None:
    synth = _json(background.synth)
    ckpt = background.ckpt
    assert synth["path"] == str(ckpt.absolute()) and synth["seed"] == 3
    assert synth["num_parameters"] == TINY.num_parameters()
    assert (ckpt / "config.json").is_file() and (ckpt / INDEX).is_file()
    assert leftovers(ckpt) == []

    # --overwrite replaced the non-empty folder with a complete bundle
    exported = _json(background.jobs["export"].result())
    bundle = background.bundle
    assert (bundle / "manifest.json").is_file()
    after = snapshot(bundle)
    old_only = set(background.bundle_before) - {"manifest.json"}
    assert not old_only & set(after), "old contents survived --overwrite"
    assert after["manifest.json"] != background.bundle_before["manifest.json"]
    assert leftovers(bundle) == []

    summary = _json(cli("inspect", bundle, "--verify", "--json", cwd=background.root))
    on_disk = {p.name: p.stat().st_size for p in bundle.iterdir() if p.name != "manifest.json"}
    assert {f["path"]: f["bytes"] for f in summary["files"]} == on_disk
    totals: dict[str, int] = {}
    for f in summary["files"]:
        totals[f["placement"]] = totals.get(f["placement"], 0) + on_disk[f["path"]]
    assert summary["bytes"] == {
        "flash": totals.get("flash", 0),
        "dram": totals.get("dram", 0),
        "other": totals.get("none", 0),
    }
    assert sum(summary["bytes"].values()) == sum(on_disk.values())
    placement = {f["path"]: f["placement"] for f in summary["files"]}
    assert placement["ple_table.data"] == placement["embedder.onnx"] == "flash"
    assert placement["decoder.data"] == placement["decoder.onnx"] == "dram"
    ple = summary["ple"]
    assert ple["rows"] == TINY.vocab_size_per_layer_input
    assert ple["dtype"] == "int8" and ple["row_bytes"] == TINY.ple_dim  # the default: an int8 table
    assert on_disk["ple_table.data"] >= ple["rows"] * ple["row_bytes"]
    assert summary["bytes"] == exported["bytes"] and summary["files"] == exported["files"]
    assert summary["files_checked"] == {"checked": len(on_disk), "sha256": True, "problems": []}
    assert all(len(f["sha256"]) == 64 for f in summary["files"])


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate"])
def test_inspect_verify_names_a_modified_file(damage: str, background: Background, tmp_path: Path) -> None:
    assert background.jobs["export"].result().returncode == 0
    bundle = Path(shutil.copytree(background.bundle, tmp_path / "bundle"))
    if damage == "flip_a_byte":
        victim = bundle / "ple_table.data"
        with open(victim, "r+b") as f:
            f.seek(1000)
            b = f.read(1)
            f.seek(1000)
            f.write(bytes([b[0] ^ 0x01]))
        needles = ["ple_table.data", "sha256"]
    else:
        victim = bundle / "decoder.data"
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size - 4096)
        needles = ["decoder.data", "bytes"]
    before = snapshot(bundle)
    assert_user_error(cli("inspect", bundle, "--verify", cwd=tmp_path), bundle, *needles)
    assert snapshot(bundle) == before
    if damage == "truncate":  # sizes are checked without --verify too
        assert_user_error(cli("inspect", bundle, cwd=tmp_path), bundle, *needles)
    else:  # a flipped byte keeps the size: only --verify's sha256 sees it
        assert cli("inspect", bundle, cwd=tmp_path).returncode == 0


def test_demo_then_demo_again_is_refused(background: Background) -> None:
    summary = _json(background.jobs["demo"].result())
    demo = background.demo_dir
    assert (demo / "bundle" / "manifest.json").is_file() and (demo / "checkpoint" / "config.json").is_file()
    gen = summary["generation"]
    assert 1 <= len(gen["tokens"]) <= 32 and gen["text"] and summary["parity"]["passed"]
    assert summary["parity"]["precision"] == "int4"
    assert summary["bytes"]["flash"] > 0 and summary["bytes"]["dram"] > 0
    assert leftovers(demo / "bundle") == [] and leftovers(demo / "checkpoint") == []

    before = snapshot(demo)
    proc = cli("demo", demo, "--quiet", cwd=background.root)
    assert_user_error(proc, demo / "checkpoint", "--overwrite")
    assert snapshot(demo) == before


# ---- --overwrite never reaches what is not ours -----------------------------------------------------


def test_overwrite_refuses_what_is_not_an_earlier_output(clean_ckpt: Path, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(clean_ckpt, tmp_path / "work" / "ckpt"))
    ckpt_before = snapshot(ckpt)
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "todo.txt").write_text("keep me\n")
    notes_before = snapshot(notes)
    # a folder of someone else's, the checkpoint itself, the folder that holds the checkpoint
    cases = [
        (["export", ckpt, "-o", notes], notes, "not a ple-export bundle"),
        (["synth", "-o", notes], notes, "not a synthetic checkpoint"),
        (["export", ckpt, "-o", ckpt], ckpt, "would replace the checkpoint"),
        (["export", ckpt, "-o", ckpt.parent], ckpt.parent, "would replace the checkpoint"),
    ]
    for args, target, needle in cases:
        assert_user_error(cli(*args, "--overwrite", "--quiet", cwd=tmp_path), target, needle)
    assert snapshot(notes) == notes_before and snapshot(ckpt) == ckpt_before
    assert leftovers(notes) == [] and leftovers(ckpt) == []


def test_demo_into_a_file_is_a_one_line_error(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    assert_user_error(cli("demo", afile, "--quiet", cwd=tmp_path), afile, "is a file")
    assert_user_error(cli("demo", afile / "sub", "--quiet", cwd=tmp_path), "afile")
    assert afile.read_text() == "x\n"


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-16KiB", "3000"])
def test_unreadable_page_sizes(value: str, clean_ckpt: Path, tmp_path: Path) -> None:
    assert_user_error(
        cli("export", clean_ckpt, "-o", tmp_path / "b", "--page-size", value, cwd=tmp_path), "--page-size"
    )
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "damage",
    [
        {"files": [1]},
        {
            "ple": {
                "rows": 1,
                "row_bytes": 2,
                "dtype": "x",
                "page_size": "big",
                "pages_per_token": {"min": 1, "mean": 1, "max": 1},
            }
        },
        {"kv_cache": {"layers": [{}]}},
    ],
)
def test_inspect_malformed_manifest(damage: dict[str, Any], background: Background, tmp_path: Path) -> None:
    background.jobs["export"].result()
    bundle = Path(shutil.copytree(background.bundle, tmp_path / "bundle"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(manifest | damage))
    assert_user_error(cli("inspect", bundle, cwd=tmp_path), "manifest")
