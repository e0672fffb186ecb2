"""Export streams weights: its peak memory does not grow with the checkpoint.

Two exports in child processes, a small checkpoint and one ~470 MB larger (a big PLE table and
token embedding, the tensors that dominate real PLE models); the peak RSS must grow by far less
than the checkpoint did. Loading whole tensors (or mmapping the shards) would add >= their size.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporter.presets import get_preset
from exporter.synth import synth_checkpoint
from tests.conftest import ROOT, VARIANTS

_CHILD = """
import resource, sys
from pathlib import Path
import exporter.checkpoint, exporter.export
exporter.checkpoint.CHUNK_BYTES = 8 << 20  # small chunks, so a modest checkpoint shows the difference
exporter.export.export_bundle(Path(sys.argv[1]), Path(sys.argv[2]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_rss(ckpt: Path, out: Path) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ckpt), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout.strip().splitlines()[-1])


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(".safetensors"))


@pytest.mark.parametrize("family", ["gemma4", "gemma3n"])
def test_export_peak_rss_does_not_follow_checkpoint_size(family: str, tmp_path: Path) -> None:
    small = VARIANTS["tiny"] if family == "gemma4" else get_preset("gemma3n-tiny")
    # PLE table 65536 x 6*512 bf16 = 384 MiB; embedding 65536 x 512 (fp32 in the decoder: 128 MiB).
    # Quantizing a row chunk (8 MiB here) has a transient working set of 70-95 MiB (measured, as
    # malloc reuses it or not), so the checkpoint must grow well past 3x that for the bound to mean
    # "streams" rather than "was lucky".
    big = small.replace(
        vocab_size=65536, vocab_size_per_layer_input=65536, hidden_size_per_layer_input=512, hidden_size=512
    )
    small_ckpt = synth_checkpoint(small, tmp_path / "small")
    big_ckpt = synth_checkpoint(big, tmp_path / "big", max_shard_bytes=128 << 20)
    growth = _bytes(big_ckpt) - _bytes(small_ckpt)
    assert growth > 400 << 20
    rss_small = _peak_rss(small_ckpt, tmp_path / "small-bundle")
    rss_big = _peak_rss(big_ckpt, tmp_path / "big-bundle")
    assert rss_big - rss_small < growth / 3, (
        f"peak RSS grew {(rss_big - rss_small) / 2**20:.0f} MiB for {growth / 2**20:.0f} MiB more checkpoint"
    )
