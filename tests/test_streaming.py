"""Export streams weights: its peak memory does not grow with the checkpoint.

Two exports in child processes, a small checkpoint and one ~230 MB larger (a big PLE table and
token embedding, the tensors that dominate real PLE models); the peak RSS must grow by far less
than the checkpoint did. Loading whole tensors (or mmapping the shards) would add >= their size.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from exporter.synth import synth_checkpoint
from tests.conftest import ROOT, VARIANTS

_CHILD = """
import resource, sys
from pathlib import Path
import exporter.export
exporter.export.CHUNK_BYTES = 8 << 20  # small chunks, so a modest checkpoint shows the difference
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


def test_export_peak_rss_does_not_follow_checkpoint_size(tmp_path: Path) -> None:
    small = VARIANTS["tiny"]
    # PLE table 32768 x 6*512 bf16 = 192 MiB; embedding 32768 x 512 (fp32 in the decoder: 64 MiB)
    big = small.replace(
        vocab_size=32768, vocab_size_per_layer_input=32768, hidden_size_per_layer_input=512, hidden_size=512
    )
    small_ckpt = synth_checkpoint(small, tmp_path / "small")
    big_ckpt = synth_checkpoint(big, tmp_path / "big", max_shard_bytes=128 << 20)
    growth = _bytes(big_ckpt) - _bytes(small_ckpt)
    assert growth > 200 << 20
    rss_small = _peak_rss(small_ckpt, tmp_path / "small-bundle")
    rss_big = _peak_rss(big_ckpt, tmp_path / "big-bundle")
    assert rss_big - rss_small < growth / 3, (
        f"peak RSS grew {(rss_big - rss_small) / 2**20:.0f} MiB for {growth / 2**20:.0f} MiB more checkpoint"
    )
