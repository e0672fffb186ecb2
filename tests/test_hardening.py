"""Issue #8: every bad input a clear one-line error, nothing destroyed.

Classes: --overwrite only replaces an earlier output of ours and nothing an input needs; user text
is shown literally; OS errors are one line; a bundle's files cannot escape its folder (symlink,
hard link, `..`, absolute, external data pointing elsewhere); SIGTERM and an early Ctrl-C end like
a later Ctrl-C; a staging folder left by SIGKILL is removed by the next run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from exporter.synth import is_earlier_checkpoint
from ple_export.bundle import manifest as manifest_mod
from ple_export.bundle.members import sha256_file
from ple_export.errors import UserError, os_error
from ple_export.outdir import OWNER_FILE, check_output, staged_output
from tests.test_cli import (
    ENV,
    Job,
    _cmd,
    assert_nothing_left,
    assert_user_error,
    cli,
    earlier_manifest,
    leftovers,
    make_existing,
    snapshot,
)

EXIT_TERMINATED = 143


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.synth import synth_checkpoint
    from tests.test_cli import TINY

    return synth_checkpoint(TINY, tmp_path_factory.mktemp("hard") / "ckpt", max_shard_bytes=400_000, seed=2)


@pytest.fixture(scope="module")
def bundle(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.export import export_bundle

    return export_bundle(ckpt, tmp_path_factory.mktemp("hard") / "bundle").out_dir


def copy_bundle(bundle: Path, dest: Path) -> Path:
    return Path(shutil.copytree(bundle, dest))


# ---- 1. --overwrite replaces only an earlier output of ours ------------------------------------------


def _web_app(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "index.html").write_text("<html>my site</html>\n")
    (out / "manifest.json").write_text('{"name": "my app", "start_url": "/"}\n')


def _bundle_plus_a_stranger(out: Path) -> None:
    make_existing(out)
    (out / "index.html").write_text("<html>not listed in the manifest</html>\n")


def _bundle_with_a_folder(out: Path) -> None:
    make_existing(out)
    (out / "photos").mkdir()
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")


def _bundle_with_a_symlink(out: Path) -> None:
    files = {"notes.txt": b"notes\n"}
    out.mkdir(parents=True)
    (out.parent / "elsewhere.txt").write_bytes(b"notes\n")
    (out / "notes.txt").symlink_to(out.parent / "elsewhere.txt")
    (out / "manifest.json").write_text(json.dumps(earlier_manifest(files)))


def _wrong_format(out: Path) -> None:
    make_existing(out)
    doc = json.loads((out / "manifest.json").read_text()) | {"format": "something-else"}
    (out / "manifest.json").write_text(json.dumps(doc))


NOT_OURS = {
    "web_app": _web_app,
    "bundle_plus_a_stranger": _bundle_plus_a_stranger,
    "bundle_with_a_folder": _bundle_with_a_folder,
    "bundle_with_a_symlink": _bundle_with_a_symlink,
    "wrong_format": _wrong_format,
}


@pytest.mark.parametrize("case", list(NOT_OURS))
def test_overwrite_refuses_a_folder_that_is_not_an_earlier_bundle(case: str, tmp_path: Path) -> None:
    out = tmp_path / "site"
    NOT_OURS[case](out)
    before = snapshot(out)
    assert not manifest_mod.is_earlier_bundle(out)
    with pytest.raises(UserError, match="not a ple-export bundle"):
        check_output(out, True, manifest_mod.is_earlier_bundle, "a ple-export bundle")
    assert snapshot(out) == before


def test_an_earlier_bundle_and_a_subset_of_it_may_be_replaced(bundle: Path, tmp_path: Path) -> None:
    out = copy_bundle(bundle, tmp_path / "b")
    assert manifest_mod.is_earlier_bundle(out)
    (out / "tokenizer.json").unlink(missing_ok=True)
    (out / "generation_config.json").unlink()  # a subset of the listed files is still ours
    assert manifest_mod.is_earlier_bundle(out)


def test_export_overwrite_of_a_web_app_keeps_it(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    _web_app(out)
    before = snapshot(out)
    proc = cli("export", ckpt, "-o", out, "--overwrite", "--quiet", cwd=tmp_path)
    assert_user_error(proc, out, "not a ple-export bundle")
    assert_nothing_left(out, before)


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_overwrite_never_deletes_what_the_checkpoint_needs(link: str, ckpt: Path, tmp_path: Path) -> None:
    """The checkpoint's shard lives in the output folder (an earlier bundle that lists it) and the
    checkpoint reaches it through a link: replacing the folder would lose the weights."""
    out = tmp_path / "bundle"
    shard = "model-00001-of-00002.safetensors"
    work = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    out.mkdir()
    shutil.move(work / shard, out / shard)
    (work / shard).symlink_to(out / shard) if link == "symlink" else os.link(out / shard, work / shard)
    (out / "manifest.json").write_text(json.dumps(earlier_manifest({shard: (out / shard).read_bytes()})))
    assert manifest_mod.is_earlier_bundle(out)  # it looks like ours: only the link protects it
    before = snapshot(out)
    with pytest.raises(UserError, match="which the input needs"):
        check_output(out, True, manifest_mod.is_earlier_bundle, "a ple-export bundle", [work])
    proc = cli("export", work, "-o", out, "--overwrite", "--quiet", cwd=tmp_path)
    assert_user_error(proc, shard, "which the input needs")
    assert snapshot(out) == before


def test_synth_overwrite_only_replaces_a_synthetic_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    assert is_earlier_checkpoint(ckpt)
    mixed = Path(shutil.copytree(ckpt, tmp_path / "mixed"))
    (mixed / "README.md").write_text("my model card\n")
    assert not is_earlier_checkpoint(mixed)
    before = snapshot(mixed)
    assert_user_error(cli("synth", "-o", mixed, "--overwrite", "--quiet", cwd=tmp_path), mixed, "synthetic")
    assert snapshot(mixed) == before


def test_demo_overwrite_keeps_foreign_subfolders(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    (demo / "checkpoint").mkdir(parents=True)
    (demo / "checkpoint" / "thesis.tex").write_text("years of work\n")
    before = snapshot(demo)
    proc = cli("demo", demo, "--overwrite", "--quiet", cwd=tmp_path)
    assert_user_error(proc, "checkpoint", "not a demo checkpoint")
    assert snapshot(demo) == before


def test_missing_parents_of_the_output_are_created(tmp_path: Path) -> None:
    from ple_export.outdir import staged_output

    out = tmp_path / "a" / "b" / "c"
    with staged_output(out, False) as tmp:
        (tmp / "x").write_text("x")
    assert (out / "x").read_text() == "x"
    # a failed run removes the parents it made
    out2 = tmp_path / "d" / "e" / "f"
    with pytest.raises(RuntimeError), staged_output(out2, False):
        raise RuntimeError("boom")
    assert not (tmp_path / "d").exists()


# ---- 2. user text is shown literally, on one line --------------------------------------------------


@pytest.mark.parametrize("name", ["ck[/]pt", "model[v2]", "a[bold]b[/bold]", "new\nline", "tab\there"])
def test_paths_with_markup_or_control_characters(name: str, tmp_path: Path) -> None:
    missing = tmp_path / name
    line = assert_user_error(cli("export", missing, "-o", tmp_path / "out", cwd=tmp_path))
    shown = name.replace("\n", "\\n").replace("\t", "\\t")
    assert shown in line, line


def test_inspect_shows_manifest_strings_literally(bundle: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle, tmp_path / "b")
    doc = json.loads((b / "manifest.json").read_text())
    tensor = next(iter(doc["quantization"]["tensors"].values()))
    tensor["precision"] = "[red]evil[/red]"
    doc["ple"]["dtype"] = "[/]"
    (b / "manifest.json").write_text(json.dumps(doc))
    proc = cli("inspect", b, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[red]evil[/red]" in proc.stdout and "([/])" in proc.stdout
    doc["files"][0]["role"] = "[red]evil[/red]"  # a role is one of the format's: anything else is refused
    (b / "manifest.json").write_text(json.dumps(doc))
    assert "[red]evil[/red]" in assert_user_error(cli("inspect", b, cwd=tmp_path), "files[0].role")


# ---- 5. operating-system errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [errno.EACCES, errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EROFS, errno.ENOSPC, errno.EIO],
)
def test_os_errors_become_one_line_advice(code: int) -> None:
    e = os_error(OSError(code, os.strerror(code), "/some/path"))
    assert str(e).startswith("/some/path: ") and "\n" not in str(e)
    assert os.strerror(code) in str(e)


def test_os_errors_from_the_cli(ckpt: Path, tmp_path: Path) -> None:
    long_name = tmp_path / ("x" * 300)
    assert_user_error(cli("export", ckpt, "-o", long_name, cwd=tmp_path), "File name too long")
    # config.json a folder (EISDIR)
    odd = Path(shutil.copytree(ckpt, tmp_path / "odd"))
    (odd / "config.json").unlink()
    (odd / "config.json").mkdir()
    assert_user_error(cli("export", odd, "-o", tmp_path / "o2", cwd=tmp_path), "config.json")
    # a read-only file system (root: a read-only tmpfs)
    ro = tmp_path / "ro"
    ro.mkdir()
    if (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]).returncode == 0
    ):
        try:
            assert_user_error(cli("export", ckpt, "-o", ro / "b", cwd=tmp_path), "ro")
        finally:
            subprocess.run(["umount", str(ro)])
    assert not list(tmp_path.glob(".*partial*"))


# ---- 7. a bundle's files cannot escape its folder ------------------------------------------------------


def _symlink_out(b: Path, tmp: Path) -> str:
    outside = tmp / "outside.data"
    shutil.copyfile(b / "decoder.data", outside)
    (b / "decoder.data").unlink()
    (b / "decoder.data").symlink_to(outside)
    return "symlink"


def _symlink_to_etc(b: Path, tmp: Path) -> str:
    (b / "generation_config.json").unlink()
    (b / "generation_config.json").symlink_to("/etc/hostname")
    return "symlink"


def _hardlink_out(b: Path, tmp: Path) -> str:
    os.link(b / "decoder.data", tmp / "another-name.data")
    return "hard links"


def _dotdot_path(b: Path, tmp: Path) -> str:
    doc = json.loads((b / "manifest.json").read_text())
    doc["files"][0]["path"] = "../outside.data"
    (b / "manifest.json").write_text(json.dumps(doc))
    return "outside the bundle"


def _absolute_path(b: Path, tmp: Path) -> str:
    doc = json.loads((b / "manifest.json").read_text())
    doc["files"][0]["path"] = "/etc/hostname"
    (b / "manifest.json").write_text(json.dumps(doc))
    return "not a plain relative name"


def _external_data_elsewhere(b: Path, tmp: Path) -> str:
    model = onnx.load(str(b / "embedder.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.data"
    onnx.save(model, str(b / "embedder.onnx"))
    doc = json.loads((b / "manifest.json").read_text())
    entry = next(f for f in doc["files"] if f["path"] == "embedder.onnx")
    entry["bytes"] = (b / "embedder.onnx").stat().st_size
    entry["sha256"] = sha256_file(b / "embedder.onnx")
    (b / "manifest.json").write_text(json.dumps(doc))
    return "which the manifest does not list"


def _manifest_symlink(b: Path, tmp: Path) -> str:
    shutil.move(b / "manifest.json", tmp / "manifest.json")
    (b / "manifest.json").symlink_to(tmp / "manifest.json")
    return "symlink"


ESCAPES = {
    "symlink_out": _symlink_out,
    "symlink_to_etc": _symlink_to_etc,
    "hardlink_out": _hardlink_out,
    "dotdot_path": _dotdot_path,
    "absolute_path": _absolute_path,
    "external_data_elsewhere": _external_data_elsewhere,
    "manifest_symlink": _manifest_symlink,
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_escaping_bundles_are_refused_by_inspect_and_the_runtime(
    case: str, bundle: Path, tmp_path: Path
) -> None:
    from runtime_harness.session import BundleSession

    b = copy_bundle(bundle, tmp_path / "b")
    needle = ESCAPES[case](b, tmp_path)
    for args in (["inspect", b], ["inspect", b, "--verify"]):
        assert_user_error(cli(*args, cwd=tmp_path), needle)
    with pytest.raises(UserError, match=needle):
        BundleSession(b)
    with pytest.raises(UserError, match=needle):
        BundleSession(b, check=False)  # skipping the hashes never skips the escape checks


def test_the_runtime_refuses_a_modified_file_before_loading(bundle: Path, tmp_path: Path) -> None:
    from runtime_harness.session import BundleSession

    b = copy_bundle(bundle, tmp_path / "b")
    data = bytearray((b / "decoder.data").read_bytes())
    data[100] ^= 0xFF
    (b / "decoder.data").write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        BundleSession(b)
    BundleSession(b, check=False)  # documented: check=False skips the hash


# ---- 8. signals ---------------------------------------------------------------------------------


def _wait_for_partial(job: Job, parent: Path, name: str) -> None:
    deadline = time.monotonic() + 120
    while not list(parent.glob(f".{name}.partial-*")):
        assert job.proc.poll() is None, f"export ended before writing: {job.result().stderr}"
        assert time.monotonic() < deadline, "no .partial folder appeared"
        time.sleep(0.02)
    time.sleep(0.3)


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite"])
def test_sigterm_mid_export_leaves_nothing(existing: bool, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    before = make_existing(out) if existing else None
    job = Job("export", ckpt, "-o", out, "--quiet", *(["--overwrite"] if existing else []), cwd=tmp_path)
    try:
        _wait_for_partial(job, tmp_path, out.name)
        job.proc.send_signal(signal.SIGTERM)
        proc = job.result(timeout=60)
    finally:
        job.stop()
    assert_user_error(proc, "terminated", code=EXIT_TERMINATED)
    assert_nothing_left(out, before)


def _wait_until_mapped(pid: int, library: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if library in Path(f"/proc/{pid}/maps").read_text():
                return True
        except OSError:
            return False
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, EXIT_TERMINATED)])
@pytest.mark.parametrize("library", ["_multiarray_umath", "libtorch_cpu"])
def test_a_signal_while_modules_import_is_one_line(
    sig: int, code: int, library: str, ckpt: Path, tmp_path: Path
) -> None:
    """The signal lands while numpy's or torch's shared library is being loaded (the moment it
    appears in /proc/PID/maps): imports are under way. numpy turns a KeyboardInterrupt raised inside
    its import into a printed traceback, so the CLI holds it until the import returns."""
    out = tmp_path / "x"
    proc = subprocess.Popen(
        _cmd(("export", ckpt, "-o", out, "--quiet")),
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_until_mapped(proc.pid, library), f"{library} never loaded"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert_user_error(done, "no partial output", code=code)
    assert not out.exists() and leftovers(out) == []


def test_a_signal_inside_an_import_is_held_until_it_returns(tmp_path: Path) -> None:
    """Deterministic: a module that signals itself while importing and, like numpy's C import,
    turns a KeyboardInterrupt raised inside it into an ImportError. Held, the signal surfaces as a
    KeyboardInterrupt at the outermost import statement instead."""
    (tmp_path / "fragile.py").write_text(
        "import os, signal\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    import json  # a nested import: still held\n"
        "    for _ in range(1000): pass\n"
        "except KeyboardInterrupt:\n"
        "    raise ImportError('fragile failed to import')\n"
    )
    script = (
        "import builtins, signal, sys\n"
        "from ple_export import launch\n"
        "builtins.__import__ = launch._import\n"
        "signal.signal(signal.SIGINT, launch._on_signal)\n"
        "try:\n"
        "    import fragile\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
        "except ImportError:\n"
        "    sys.exit(1)\n"
        "sys.exit(0)\n"
    )
    env = ENV | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{Path(__file__).resolve().parents[1]}"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr


def test_a_stale_staging_folder_from_sigkill_is_removed(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    job = Job("export", ckpt, "-o", out, "--quiet", cwd=tmp_path)
    try:
        _wait_for_partial(job, tmp_path, out.name)
        job.proc.send_signal(signal.SIGKILL)
        job.proc.wait(timeout=30)
    finally:
        job.stop()
    stale = leftovers(out)
    assert stale and (tmp_path / stale[0] / OWNER_FILE).is_file()
    proc = cli("export", ckpt, "-o", out, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "stale staging folder" in proc.stderr and stale[0] in proc.stderr
    assert leftovers(out) == [] and manifest_mod.is_earlier_bundle(out)


def test_a_live_owners_staging_folder_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    live = tmp_path / ".out.partial-live"
    live.mkdir()
    (live / OWNER_FILE).write_text(f"{os.getpid()} {_own_start_time()}\n")
    dead = tmp_path / ".out.partial-dead"
    dead.mkdir()
    (dead / OWNER_FILE).write_text("999999999 1\n")
    with staged_output(out, False) as tmp:
        (tmp / "x").write_text("x")
    assert live.is_dir() and not dead.exists()


def test_an_interrupted_swap_is_put_back(tmp_path: Path) -> None:
    """Killed between moving the old folder aside and moving the new one in: the next run restores."""
    out = tmp_path / "out"
    old = tmp_path / ".out.old-x"
    (old / "previous").mkdir(parents=True)
    (old / "previous" / "keep.txt").write_text("keep\n")
    (old / OWNER_FILE).write_text("999999999 1\n")
    from ple_export.outdir import remove_stale

    remove_stale(out)
    assert (out / "keep.txt").read_text() == "keep\n" and not old.exists()


def _own_start_time() -> str:
    from ple_export.outdir import _start_time

    return _start_time(os.getpid())


def _handlers_installed(pid: int, timeout: float = 30.0) -> bool:
    """The CLI's handlers are in place: SIGTERM is caught (Python catches only SIGINT on its own,
    and the launcher sets both at once), read from /proc/PID/status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        caught = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return True
        time.sleep(0.001)
    return False


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, EXIT_TERMINATED)])
def test_a_signal_at_any_moment_after_the_handlers_is_one_line(
    sig: int, code: int, trained: dict[str, Path], tmp_path: Path
) -> None:
    """From the moment the launcher's handlers are in place, a signal at any delay (while modules
    import, while an option's value is read, while the work runs) ends with exactly one line.
    Before that moment Python itself is starting and answers a signal its own way (docs/bad-input.md)."""
    for delay_ms in (0, 1, 2, 5, 10, 20, 40, 80, 120, 160, 240, 320, 480):
        proc = subprocess.Popen(
            _cmd(("profile", trained["int4"], "--runs", "1", "--warmup", "0", "--device", "pixel-8a")),
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert _handlers_installed(proc.pid), "the handlers were never installed"
            time.sleep(delay_ms / 1000)
            proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
        done = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
        assert_user_error(done, code=code), delay_ms
