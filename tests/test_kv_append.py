"""The KV cache appended in place (format 4): `KVRows` against concatenate-and-cut, and a format 3
bundle (whole-cache presents, rebuilt here from a format 4 one with the pass the onnxruntime-genai
model uses) still runs, with the same logits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from exporter.genai_files import whole_cache_outputs
from graphs.genai_model import whole_presents
from ple_export.bundle.files import file_entries
from ple_export.bundle.manifest import Manifest
from runtime_harness import loop
from runtime_harness.kv_rows import SLACK, KVRows
from runtime_harness.session import BundleSession


@pytest.mark.parametrize("keep", [None, 7, 40])
@pytest.mark.parametrize("heads", [1, 2])
def test_rows_equal_concatenate_and_cut(keep: int | None, heads: int) -> None:
    """Chunks of every size, past the slack and the window: the view is always the last `keep`
    positions of everything appended (all of them without `keep`)."""
    rng = np.random.default_rng(0)
    rows = KVRows(1, heads, 4, np.dtype(np.float32), keep, capacity=5)
    everything = np.zeros((1, heads, 0, 4), np.float32)
    for s in [3, 1, 1, 9, 50, 1, 2, 1, *([1] * (2 * SLACK)), 13, 41, 1]:
        new = rng.standard_normal((1, heads, s, 4)).astype(np.float32)
        rows.append(new)
        everything = np.concatenate([everything, new], axis=2)
        expected = everything if keep is None else everything[:, :, -keep:]
        view = rows.view()
        assert view.flags.c_contiguous and np.array_equal(view, expected)


def test_one_head_is_fed_without_a_copy() -> None:
    """batch x kv_heads = 1: the view shares the buffer (onnxruntime reads the cache where it is);
    decode steps only move the live rows when the slack is used up."""
    rows = KVRows(1, 1, 8, np.dtype(np.float32), keep=16, capacity=0)
    rows.append(np.ones((1, 1, 16, 8), np.float32))
    buffer = rows.buffer
    for step in range(SLACK):
        rows.append(np.full((1, 1, 1, 8), step, np.float32))
        assert np.shares_memory(rows.view(), buffer) and rows.buffer is buffer
    assert rows.start == SLACK  # nothing moved yet; the next step moves window - 1 rows once
    rows.append(np.zeros((1, 1, 1, 8), np.float32))
    assert rows.start == 0 and len(rows) == 16 and rows.buffer is buffer


def _as_format_3(bundle: Path, out: Path) -> Path:
    """The bundle as format 3 wrote it: presents = Concat(past, new), a sliding layer's cut."""
    shutil.copytree(bundle, out)
    manifest = Manifest.read(out)
    decoder = manifest.graphs.decoder
    model = whole_presents(ir.load(out / decoder.file), whole_cache_outputs(manifest))
    ir.save(model, out / decoder.file)
    known = {f.path: f.sha256 for f in manifest.files if f.path != decoder.file}
    manifest.replace(format_version=3, files=file_entries(out, known)).write(out)
    return out


def test_a_format_3_bundle_runs_with_the_same_logits(bundles: dict[str, Path], tmp_path: Path) -> None:
    """Whole-cache presents are fed back as they are; the tokens and logits are format 4's, past the
    sliding window, in chunks that split it."""
    old = _as_format_3(bundles["tiny"], tmp_path / "format3")
    old_session, new_session = BundleSession(old), BundleSession(bundles["tiny"])
    assert not old_session.manifest.appends_kv and new_session.manifest.appends_kv
    vocab = new_session.manifest.generation.vocab_size
    prompt = np.random.default_rng(1).integers(3, vocab, 29).tolist()
    runs = [
        loop.generate(s, prompt, 12, stop_at_eos=False, keep_logits=True, prefill_chunk=5)
        for s in (old_session, new_session)
    ]
    assert runs[0].tokens == runs[1].tokens
    for a, b in zip(runs[0].step_logits, runs[1].step_logits, strict=True):
        assert float(np.abs(a - b).max()) <= 1e-5 * float(np.abs(a).max())
    cache = old_session.new_cache(1)
    old_session.forward(np.array([prompt]), cache)
    lengths = [cache.tensors[t.name].shape[2] for t in old_session.manifest.graphs.decoder.kv_inputs()]
    assert max(lengths) == len(prompt) and min(lengths) < len(prompt)  # whole caches, sliding ones capped
