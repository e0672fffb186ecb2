"""Our int4 bundle vs the peer vs PyTorch eager, side by side in one run, one checkpoint.

    python benchmarks/quant_bench.py --checkpoint /work/peers/ckpt/mid \\
        --peer-genai /work/peers/onnx/mid_int4_epcpu --peer-python /work/peers/venv/bin/python --repeats 3
    python benchmarks/quant_bench.py --preset small --engines fp32,torch,transformers   # fp32 side by side

(`PEERS_ROOT=/work/peers bash ../shared/peers/run_all.sh` makes the peer's checkpoint, its model folder
and its venv; `--preset NAME` synthesizes a checkpoint instead, once, under --workdir.)

Engines, each in its OWN fresh process per repeat (load once, a cold run, then a warm run), measured
by the measuring core's child runner (`runtime_harness/measure/child.py`):

    int4          our bundle, the default recipe (int4 MatMulNBits block 256 with zero points and clip
                  search, int8 PLE table), through `BundleSession` and the one decode loop
    int4-b32      our bundle with the peer's recipe (block 32 symmetric, RTN): the like-for-like ratio
    int4-b64      block 64 (asymmetric): the higher-quality option
    int4-b128     block 128 (asymmetric, clip search): GPTQ's and AWQ's group
    fp32          our bundle, no quantization
    torch         our PyTorch modules, eager fp32 (`exporter.reference.TorchModel`)
    transformers  `Gemma4ForCausalLM`, fp32, eager attention, DynamicCache
    int4-genai    the int4 bundle run by onnxruntime-genai (its model.onnx + genai_config.json)
    peer          onnxruntime-genai on the peer's model folder (`peer_engine.py`, under --peer-python)

Protocol (the peer's): prompt = `numpy.random.RandomState(1234).randint(3, vocab, 128)`, 64 greedy new
tokens with EOS masked, `--threads` intra-op threads. Figures per engine (medians over `--repeats`):
decode tok/s = the warm run's 63 steps over their summed time (`runtime_harness.loop.decode_rate`, the
one definition `profile` uses too); prefill tok/s = 128 / the prompt's forward; TTFT = prefill + the
first pick; peak RSS from wait4, RssAnon / RssFile sampled every `--sample-ms`; streamed bytes per
token (`graph_bytes.py`) and the bandwidth they achieve against this machine's read bandwidth
measured in the same run. Ratios are medians of paired per-repeat ratios (engines round-robin,
rotating who goes first, files dropped from the page cache before each child).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_report import print_report, summarize  # noqa: E402
from benchmarks.graph_bytes import bundle_bytes, peer_bytes  # noqa: E402
from benchmarks.ort_profile import parse_profile  # noqa: E402
from runtime_harness.defaults import DEFAULT_PREFILL_CHUNK  # noqa: E402
from runtime_harness.measure.child import run_measured  # noqa: E402
from runtime_harness.measure.memory import drop_page_cache  # noqa: E402

PROMPT_LEN = 128
NEW_TOKENS = 64
PROMPT_SEED = 1234
SETTLE_S = 0.5  # idle gap before each child: lets writeback and other children's threads settle
HERE = Path(__file__).resolve().parent
# our bundles: engine -> QuantRecipe arguments (None: QuantRecipe.none())
BUNDLE_RECIPES: dict[str, dict[str, object] | None] = {
    "int4": {},  # the default recipe
    "int4-b32": {"block_size": 32, "symmetric": True, "clip_search": False},  # the peer's recipe (RTN)
    "int4-b64": {"block_size": 64},  # the higher-quality option (docs/quantization.md)
    "int4-b128": {"block_size": 128},  # GPTQ's and AWQ's group size
    "fp32": None,
}
BUNDLE_ENGINES = tuple(BUNDLE_RECIPES)
OURS_INT4 = tuple(e for e in BUNDLE_ENGINES if e.startswith("int4"))
GENAI_ENGINES = {"int4-genai": "int4"}  # our bundle (of that engine's recipe) under onnxruntime-genai
ONNX_ENGINES = (*BUNDLE_ENGINES, *GENAI_ENGINES, "peer")
ENGINES = (*BUNDLE_ENGINES, *GENAI_ENGINES, "torch", "transformers", "peer")
Json = dict[str, Any]


def make_prompt(vocab: int, length: int = PROMPT_LEN) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.RandomState(PROMPT_SEED).randint(3, vocab, size=length)]


def _checkpoint_key(ckpt: Path) -> str:
    parts: list[Any] = [str(ckpt.resolve())]
    for p in sorted(ckpt.iterdir()):
        if p.is_file():
            st = p.stat()
            parts.append([p.name, st.st_size, st.st_mtime_ns])
            if p.name == "config.json":
                parts.append(p.read_text())
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def prepare_bundle(ckpt: Path, engine: str, workdir: Path, rebuild: bool, say: Callable[[str], None]) -> Path:
    """Export (once) the checkpoint with the engine's recipe; keyed by checkpoint, recipe and format."""
    from exporter.export import ExportOptions, export_bundle
    from ple_export.bundle.format import FORMAT_VERSION
    from ple_export.bundle.recipe import QuantRecipe

    args = BUNDLE_RECIPES[engine]
    recipe = QuantRecipe.none() if args is None else QuantRecipe(**args)  # type: ignore[arg-type]
    key = hashlib.sha256(json.dumps([recipe.to_dict(), FORMAT_VERSION]).encode()).hexdigest()[:8]
    bundle = workdir / f"{ckpt.resolve().name}-{_checkpoint_key(ckpt)}" / f"{engine}-{key}"
    if rebuild or not (bundle / "manifest.json").is_file():
        t = time.perf_counter()
        say(f"exporting {engine} bundle to {bundle} ...")
        export_bundle(ckpt, bundle, ExportOptions(recipe=recipe, overwrite=True))
        say(f"exported {engine} bundle in {time.perf_counter() - t:.1f}s")
    return bundle


def prepare_preset(preset: str, workdir: Path, say: Callable[[str], None]) -> Path:
    """A synthetic checkpoint of `preset`, made once under `workdir` (keyed by the spec)."""
    from exporter.presets import get_preset
    from exporter.synth import synth_to_folder

    spec = get_preset(preset)
    key = hashlib.sha256(json.dumps(spec.to_hf_config(), sort_keys=True).encode()).hexdigest()[:12]
    ckpt = workdir / f"{preset}-{key}-checkpoint"
    if not (ckpt / "config.json").is_file():
        say(f"synthesizing the {preset} checkpoint into {ckpt} ...")
        synth_to_folder(spec, ckpt, overwrite=True)
    return ckpt


def run_engine(python: str, task: Json, log: Path, sample_s: float, timeout_s: float) -> Json:
    """One engine (or the bandwidth probe) in a fresh measured process; its record plus `measure`."""
    script = HERE / ("peer_engine.py" if task["kind"] == "peer" else "engines.py")
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(task["threads"]),
        MKL_NUM_THREADS=str(task["threads"]),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    if task["kind"] == "peer":
        env.pop("PYTHONPATH")  # the peer's venv must not see our package
    if task.get("model"):
        model = Path(task["model"])
        drop_page_cache([model] if model.is_file() else sorted(model.rglob("*")))
    time.sleep(SETTLE_S)
    with tempfile.TemporaryDirectory(prefix="quant_bench_") as tmp:
        task_path, out = Path(tmp) / "task.json", Path(tmp) / "record.json"
        task_path.write_text(json.dumps(task | {"out": str(out)}))
        record = run_measured(
            [python, script, task_path], log, env=env, cwd=ROOT, sample_s=sample_s, timeout_s=timeout_s
        )
        if record.status != 0 or not out.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(
                f"{task['engine']} child failed (exit {record.status}, log {log}):\n  " + "\n  ".join(tail)
            )
        rec: Json = json.loads(out.read_text())
    mib = 1 << 20
    rec["measure"] = {
        "wall_s": record.wall_s,
        "peak_rss_mb": record.peak_rss_bytes / mib,
        "peak_rss_anon_mb": record.sampled_peak_bytes.get("RssAnon", 0) / mib,
        "peak_rss_file_mb": record.sampled_peak_bytes.get("RssFile", 0) / mib,
        "peak_vmrss_mb_sampled": record.sampled_peak_bytes.get("VmRSS", 0) / mib,
    }
    return rec


def rotate(items: list[str], r: int) -> list[str]:
    k = r % len(items)
    return items[k:] + items[:k]


def _kind(engine: str) -> str:
    if engine in BUNDLE_ENGINES:
        return "bundle"
    if engine in GENAI_ENGINES:
        return "genai"
    return engine  # torch | transformers | peer | bandwidth


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="HF Gemma 4 or Gemma 3n checkpoint folder")
    source.add_argument("--preset", help="synthesize this preset's checkpoint instead (tiny, small, ...)")
    p.add_argument("--peer-genai", type=Path, default=None, help="the peer's ORT-GenAI model folder")
    p.add_argument(
        "--peer-python", default="/work/peers/venv/bin/python", help="python with onnxruntime-genai"
    )
    p.add_argument(
        "--engines",
        default="int4,int4-genai,int4-b32,int4-b128,fp32,transformers,peer",
        help=f"comma list out of {','.join(ENGINES)} (peer needs --peer-genai)",
    )
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per engine, round-robin")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_LEN, help="prompt length (the peer's: 128)")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="greedy tokens after the prompt")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="our engines' prompt tokens per call (default: runtime_harness's; 0: one call)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("~/.cache/ple-export-bench/quant"))
    p.add_argument("--rebuild", action="store_true", help="re-export the cached bundles")
    p.add_argument("--profile", action="store_true", help="add one profiled run per ONNX engine")
    p.add_argument("--sample-ms", type=float, default=10.0, help="RSS sampling period")
    p.add_argument("--timeout", type=float, default=1800.0, help="per child, seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = p.parse_args()
    args.workdir = args.workdir.expanduser()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if bad := [e for e in engines if e not in ENGINES]:
        p.error(f"unknown engine(s) {bad}; choose from {ENGINES}")
    if "peer" in engines and args.peer_genai is None:
        engines.remove("peer")
    args.engines = engines
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        p.error(f"{args.checkpoint}: no config.json (not a checkpoint folder)")
    if "peer" in engines and not (args.peer_genai / "genai_config.json").is_file():
        p.error(f"{args.peer_genai}: no genai_config.json (not an ORT-GenAI model folder)")
    if "peer" in engines and not os.access(args.peer_python, os.X_OK):
        p.error(f"--peer-python {args.peer_python}: not an executable (a python with onnxruntime-genai)")
    return args


def main() -> int:
    args = _parse()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    wall0 = time.perf_counter()
    cpus = os.cpu_count() or 1
    notes: list[str] = []
    if (load0 := os.getloadavg()[0]) > 0.5 * cpus:
        notes.append(
            f"WARNING: 1-min load average was {load0:.1f} on {cpus} CPUs before the benchmark started"
        )

    from exporter.family import read_spec

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is None:
        args.checkpoint = prepare_preset(args.preset, args.workdir, say)
    spec = read_spec(args.checkpoint)
    logs = args.workdir / "logs"
    logs.mkdir(exist_ok=True)
    models: dict[str, str] = {}
    sizes: dict[str, Json] = {}
    for name in [e for e in args.engines if e in BUNDLE_ENGINES or e in GENAI_ENGINES]:
        bundle = prepare_bundle(
            args.checkpoint, GENAI_ENGINES.get(name, name), args.workdir, args.rebuild, say
        )
        models[name], sizes[name] = str(bundle), bundle_bytes(bundle)
    for name in ("torch", "transformers"):
        models[name] = str(args.checkpoint)
    if "peer" in args.engines:
        models["peer"] = str(args.peer_genai)
        sizes["peer"] = peer_bytes(args.peer_genai)
    try:
        report = _run(args, spec, models, sizes, notes, logs, say)
    except RuntimeError as e:
        say(f"error: {e}")
        return 1
    report["wall_s"] = time.perf_counter() - wall0
    if args.json:
        for note in report["notes"]:
            say(note)
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
    return 0


def _run(
    args: argparse.Namespace,
    spec: Any,
    models: dict[str, str],
    sizes: dict[str, Json],
    notes: list[str],
    logs: Path,
    say: Callable[[str], None],
) -> Json:
    prompt = make_prompt(spec.vocab_size, args.prompt_tokens)
    chunk = {} if args.prefill_chunk is None else {"prefill_chunk": args.prefill_chunk}

    def task(engine: str, **extra: Any) -> Json:
        return (
            {
                "engine": engine,
                "kind": _kind(engine),
                "threads": args.threads,
                "model": models.get(engine),
                "prompt": prompt,
                "new_tokens": args.new_tokens,
            }
            | chunk
            | extra
        )

    def python_for(engine: str) -> str:
        return str(args.peer_python) if engine == "peer" else sys.executable

    records: dict[str, list[Json]] = {e: [] for e in args.engines}
    bandwidth: list[Json] = []
    loads = [os.getloadavg()[0]]
    for r in range(args.repeats):
        for engine in rotate(["bandwidth", *args.engines], r):
            say(f"repeat {r + 1}/{args.repeats}: {engine} ...")
            rec = run_engine(
                python_for(engine),
                task(engine),
                logs / f"{engine}.{r}.log",
                args.sample_ms / 1e3,
                args.timeout,
            )
            (bandwidth if engine == "bandwidth" else records[engine]).append(rec)
            loads.append(os.getloadavg()[0])
        say(f"repeat {r + 1}/{args.repeats} done (1-min load average {loads[-1]:.1f})")
    profiles: Json = {}
    if args.profile:
        for engine in [e for e in args.engines if e in ONNX_ENGINES and e not in GENAI_ENGINES]:
            pdir = args.workdir / "profiles" / engine  # kept for inspection; replaced per run
            pdir.mkdir(parents=True, exist_ok=True)
            for old in pdir.glob("*.json"):
                old.unlink()
            extra = {"profile_prefix": str(pdir / "peer")} if engine == "peer" else {"profile_dir": str(pdir)}
            say(f"profiling {engine} ...")
            try:
                rec = run_engine(
                    python_for(engine),
                    task(engine, **extra),
                    logs / f"{engine}.profile.log",
                    0.01,
                    args.timeout,
                )
                files = rec.get("profiles") or [str(f) for f in sorted(pdir.glob("*.json"))]
                # our engines run the prompt in chunks, one decoder call each; the peer in one call
                step = args.prefill_chunk if args.prefill_chunk is not None else DEFAULT_PREFILL_CHUNK
                chunks = 1 if engine == "peer" or step == 0 else -(-args.prompt_tokens // step)
                profiles[engine] = parse_profile(files, args.new_tokens, chunks) | {"files": files}
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                notes.append(f"profile of {engine} failed: {e}")
    context = {
        "prompt_len": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "prefill_chunk": args.prefill_chunk,
        "ours_int4": OURS_INT4,
        "bundles": BUNDLE_ENGINES,
    }
    return summarize(args, spec, context, records, bandwidth, sizes, profiles, loads, notes)


if __name__ == "__main__":
    sys.exit(main())
