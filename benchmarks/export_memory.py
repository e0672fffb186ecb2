"""Peak memory of `ple-export export` next to the checkpoint size (the streaming claim, measured).

    python benchmarks/export_memory.py                  # e2b: ~9.3 GB bf16 checkpoint, default int4 export
    python benchmarks/export_memory.py --export-args "--quant none --ple-quant none"   # fp32 bundle
    python benchmarks/export_memory.py --mode quantize  # fp32 bundle (made once) -> int4, streamed
    python benchmarks/export_memory.py --preset tiny --json

The checkpoint is synthesised once and cached under --workdir. The export runs as a measured child
process (`python -m ple_export export`, under the measuring core's child runner,
`runtime_harness/measure/child.py`) whose peak RSS is its ru_maxrss from wait4: the number
`/usr/bin/time -v` prints as "Maximum resident set size".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.presets import get_preset  # noqa: E402
from exporter.synth import synth_to_folder  # noqa: E402
from runtime_harness.measure.child import run_measured  # noqa: E402

GiB = 1 << 30


def _fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="e2b")
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "ple-export-bench")
    ap.add_argument("--budget-gib", type=float, default=4.0, help="peak RSS the export must stay under")
    ap.add_argument("--keep-bundle", action="store_true", help="leave the exported bundle in --workdir")
    ap.add_argument("--export-args", default="", help="extra flags for `ple-export export` / `quantize`")
    ap.add_argument("--mode", choices=["export", "quantize"], default="export")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    spec = get_preset(args.preset)
    key = hashlib.sha256(json.dumps(spec.to_hf_config(), sort_keys=True).encode()).hexdigest()[:12]
    ckpt = args.workdir / f"{args.preset}-{key}-checkpoint"
    bundle = args.workdir / f"{args.preset}-{key}-bundle"
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "config.json").is_file():
        print(f"synthesising {args.preset} checkpoint into {ckpt} (once)...", file=sys.stderr)
        shutil.rmtree(ckpt, ignore_errors=True)
        synth_to_folder(spec, ckpt)

    extra = args.export_args.split()
    source = ckpt
    if args.mode == "quantize":  # the fp32 bundle is made once (its memory is not what is measured)
        source = args.workdir / f"{args.preset}-{key}-fp32-bundle"
        if not (source / "manifest.json").is_file():
            print(f"exporting the fp32 bundle {source} (once)...", file=sys.stderr)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ple_export",
                    "export",
                    str(ckpt),
                    "-o",
                    str(source),
                    "--overwrite",
                    "--quiet",
                    "--quant",
                    "none",
                    "--ple-quant",
                    "none",
                ],
                cwd=ROOT,
                check=True,
            )
    argv = [sys.executable, "-m", "ple_export", args.mode, str(source), "-o", str(bundle)]
    stderr = args.workdir / "export.stderr"
    stderr.write_bytes(b"")
    lines: list[str] = []
    record = run_measured(
        [*argv, "--overwrite", "--quiet", "--json", *extra],
        stderr,
        cwd=ROOT,
        on_line=lines.append,
        timeout_s=6 * 3600,
    )
    seconds, peak = record.wall_s, record.peak_rss_bytes
    if record.status != 0:
        print(stderr.read_text().strip(), file=sys.stderr)
        return 1
    summary = json.loads("".join(lines))
    result = {
        "preset": args.preset,
        "mode": args.mode,
        "args": extra,
        "num_parameters": spec.num_parameters(),
        "checkpoint_bytes": _dir_bytes(ckpt),
        "bundle_bytes": _dir_bytes(bundle),
        "flash_bytes": summary["bytes"]["flash"],
        "dram_bytes": summary["bytes"]["dram"],
        "export_seconds": round(seconds, 1),
        "peak_rss_bytes": peak,
        "peak_rss_over_checkpoint": round(peak / _dir_bytes(ckpt), 4),
        "budget_bytes": int(args.budget_gib * GiB),
        "within_budget": peak < args.budget_gib * GiB,
    }
    if not args.keep_bundle:
        shutil.rmtree(bundle, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"preset {args.preset}: {result['num_parameters'] / 1e6:,.1f}M parameters")
        print(f"  checkpoint        {_fmt(result['checkpoint_bytes']):>12}")
        flash, dram = _fmt(result["flash_bytes"]), _fmt(result["dram_bytes"])
        print(f"  bundle            {_fmt(result['bundle_bytes']):>12}  (flash {flash}, DRAM {dram})")
        print(f"  export wall time  {seconds:10.1f} s")
        verdict = "OK" if result["within_budget"] else "EXCEEDED"
        ratio = result["peak_rss_over_checkpoint"]
        print(
            f"  peak RSS          {_fmt(peak):>12}  = {ratio:.3f} x checkpoint;"
            f" budget {args.budget_gib:.1f} GiB: {verdict}"
        )
    return 0 if result["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
