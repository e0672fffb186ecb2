"""Peak memory of `ple-export export` next to the checkpoint size (the streaming claim, measured).

    python benchmarks/export_memory.py                  # e2b: ~9.3 GB bf16 checkpoint, default int4 export
    python benchmarks/export_memory.py --export-args "--quant none --ple-quant none"   # fp32 bundle
    python benchmarks/export_memory.py --mode quantize  # fp32 bundle (made once) -> int4, streamed
    python benchmarks/export_memory.py --preset tiny --json

The checkpoint is synthesised once and cached under --workdir. The export runs in a child process
(`python -m ple_export export`) whose peak RSS is read from `getrusage(RUSAGE_CHILDREN)`: the same
number `/usr/bin/time -v` prints as "Maximum resident set size".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.spec import get_preset  # noqa: E402
from exporter.synth import synth_to_folder  # noqa: E402

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
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ple_export",
            args.mode,
            str(source),
            "-o",
            str(bundle),
            "--overwrite",
            "--quiet",
            "--json",
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr.strip(), file=sys.stderr)
        return proc.returncode
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    if before * 1024 >= peak:
        print("warning: an earlier child had a higher peak; figure is an upper bound", file=sys.stderr)
    summary = json.loads(proc.stdout)
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
