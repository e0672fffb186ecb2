"""`export ORG/NAME[@REVISION]`: a Hub id resolved through huggingface_hub's cache, offline, against a
cache laid out as huggingface_hub lays it out (snapshots/COMMIT/FILE -> ../../blobs/SHA256, refs/main),
built here from a synthetic sharded checkpoint. Every failure is one line and writes nothing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import ENV, assert_user_error, cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "acme/tiny-gemma"


def _hub_cache(checkpoint: Path, cache: Path) -> Path:
    """`checkpoint` as the cached snapshot of REPO at COMMIT (refs/main points at it)."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in sorted(checkpoint.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snapshot / f.name)
    return snapshot


@pytest.fixture()
def hub(checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    cache = tmp_path / "hub"
    snapshot = _hub_cache(checkpoints["tiny"], cache)
    env = ENV | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"cache": cache, "snapshot": snapshot, "env": env}


def test_resolve_finds_the_cached_snapshot_by_branch_and_commit(
    hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)  # it reads HF_HUB_CACHE / HF_HUB_OFFLINE at import
    from exporter.hub import resolve

    try:
        assert resolve(REPO, quiet=True) == hub["snapshot"]
        assert resolve(f"{REPO}@main", quiet=True) == hub["snapshot"]
        assert resolve(f"{REPO}@{COMMIT}", quiet=True) == hub["snapshot"]
    finally:  # the environment back, and huggingface_hub's view of it
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def test_export_from_a_hub_id_equals_export_from_the_folder(
    hub: dict[str, Any], checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    flags = ("--quant", "none", "--ple-quant", "none", "--quiet")
    proc = cli("export", REPO, "-o", tmp_path / "from-hub", *flags, cwd=tmp_path, env=hub["env"])
    assert proc.returncode == 0, proc.stderr
    proc = cli("export", checkpoints["tiny"], "-o", tmp_path / "local", *flags, cwd=tmp_path, env=hub["env"])
    assert proc.returncode == 0, proc.stderr
    for name in ("decoder.onnx", "decoder.data", "embedder.onnx", "ple_table.data"):
        assert (tmp_path / "from-hub" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


@pytest.mark.parametrize(
    ("source", "needles"),
    [
        (f"{REPO}@v9", ["revision 'v9' is not in the Hugging Face cache", "HF_HUB_OFFLINE"]),
        ("acme/no-such-model", ["no such folder", "not in the Hugging Face cache"]),
        ("not/a/hub/id", ["not a Hub id"]),
    ],
)
def test_a_hub_id_that_cannot_resolve_is_one_line_and_writes_nothing(
    hub: dict[str, Any], tmp_path: Path, source: str, needles: list[str]
) -> None:
    out = tmp_path / "bundle"
    proc = cli("export", source, "-o", out, cwd=tmp_path, env=hub["env"])
    assert_user_error(proc, *needles)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_a_half_downloaded_snapshot_is_one_line_and_writes_nothing(
    hub: dict[str, Any], tmp_path: Path
) -> None:
    """A shard whose blob never arrived (a dangling symlink in the snapshot)."""
    shard = next(p for p in hub["snapshot"].iterdir() if p.name.startswith("model-0000"))
    (shard.parent / os.readlink(shard)).unlink()
    out = tmp_path / "bundle"
    proc = cli("export", REPO, "-o", out, cwd=tmp_path, env=hub["env"])
    assert_user_error(proc, shard.name)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_without_the_offline_switch_and_without_network_it_says_so(
    hub: dict[str, Any], tmp_path: Path
) -> None:
    """No network here: a model that is not cached cannot be fetched (a reachable Hub answers that it
    does not exist), and nothing is written; a cached one still exports from the cache."""
    env = {k: v for k, v in hub["env"].items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = cli("export", "acme/no-such-model", "-o", tmp_path / "b", cwd=tmp_path, env=env)
    line = assert_user_error(proc, "acme/no-such-model")
    assert "cannot be reached" in line or "no such model on the Hub" in line
    assert not (tmp_path / "b").exists() and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".bundle")
    ]
    flags = ("--quant", "none", "--ple-quant", "none", "--quiet")
    proc = cli("export", REPO, "-o", tmp_path / "cached", *flags, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cached" / "manifest.json").is_file()


def test_a_snapshot_missing_a_shard_is_one_line_and_writes_nothing(
    hub: dict[str, Any], tmp_path: Path
) -> None:
    """A download cut off before a shard's link was made: the index names a shard the snapshot lacks."""
    shard = next(p for p in hub["snapshot"].iterdir() if p.name.startswith("model-0000"))
    shard.unlink()
    out = tmp_path / "bundle"
    proc = cli("export", REPO, "-o", out, cwd=tmp_path, env=hub["env"])
    assert_user_error(proc, shard.name)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


@pytest.mark.parametrize(
    ("error", "status", "needles"),
    [
        ("GatedRepoError", 403, ["acme/x@v9: a gated model", "hf auth login", "HF_TOKEN"]),
        ("RevisionNotFoundError", 404, ["acme/x@v9: the model has no revision 'v9'"]),
        ("RepositoryNotFoundError", 401, ["no such model on the Hub", "HF_TOKEN"]),
        ("HfHubHTTPError", 500, ["acme/x@v9: the download failed (500 Server Error: from the Hub)"]),
    ],
)
def test_what_the_hub_answers_is_one_line_each(
    monkeypatch: pytest.MonkeyPatch, error: str, status: int, needles: list[str]
) -> None:
    """The Hub's answers over a network (none here: a stand-in snapshot_download raises them as
    huggingface_hub does, with an HTTP response): each one line saying what to do."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    from exporter.hub import resolve
    from ple_export.errors import UserError

    request = httpx2.Request("GET", "https://huggingface.co/api/models/acme/x/revision/v9")
    response = httpx2.Response(status, request=request)

    def answer(*args: Any, **kwargs: Any) -> str:
        raise getattr(errors, error)(f"{status} Server Error: from the Hub\ndetails", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", answer)
    with pytest.raises(UserError) as caught:
        resolve("acme/x@v9", quiet=True)
    message = str(caught.value)
    assert "\n" not in message and all(n in message for n in needles), message
