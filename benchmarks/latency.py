"""Prefill / decode latency of a bundle under onnxruntime, side by side with PyTorch (batch 1, fp32).

Engines: onnxruntime on the exported bundle (`BundleSession`), our PyTorch eager reference
(`exporter.reference`), and transformers' `Gemma4ForCausalLM` (eager attention, DynamicCache).
A synthetic checkpoint and its bundle are built once and cached under --workdir, keyed by the spec.
Each engine gets one untimed warm-up run, then --repeats timed runs (prefill, then one decode step
per token), interleaved round-robin across engines (rotating who goes first) so the noise of this
shared machine spreads over all of them; ratios are medians of per-repeat (paired) ratios.
Runs are whole, not interleaved token by token: onnxruntime's intra-op pool spins ~25 ms of a core
after every Run (its default), which slowed a PyTorch step that followed it by ~40% on 2 cores.
A short idle gap before each run keeps that out of the next engine's timings.
All engines compute logits for the last prompt position only (transformers: `logits_to_keep=1`).

    python benchmarks/latency.py [--preset small|tiny] [--prompt-len 128] [--new-tokens 32]
                                 [--repeats 5] [--threads 2] [--workdir DIR] [--json] [--rebuild]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from exporter.export import ExportOptions, export_bundle
from exporter.gemma4 import empty_past
from exporter.manifest import FORMAT_VERSION
from exporter.reference import load_reference
from exporter.spec import Gemma4Spec, get_preset
from exporter.synth import synth_to_folder
from graphs.recipe import QuantRecipe
from runtime_harness.session import BundleSession

SYNTH_DTYPE, SYNTH_SEED = "bf16", 0
SETTLE_S = 0.1  # idle gap before each timed run (> onnxruntime's ~25 ms post-Run spin)
CHECK_TOKENS = 8  # greedy tokens that must agree across engines (prefill's + the first decode steps)
log = Console(stderr=True)


def small_spec() -> Gemma4Spec:
    """~330M parameters (228M in the decoder, 101M in the PLE table); 5:1 sliding:full, last full."""
    return get_preset("small")


def prepare(preset: str, workdir: Path, rebuild: bool) -> tuple[Gemma4Spec, Path, Path]:
    """(spec, checkpoint, bundle), built unless cached for exactly this spec (and bundle format).
    A cached bundle predates later exporter changes: `rebuild` re-exports it."""
    spec = small_spec() if preset == "small" else get_preset(preset)
    spec.validate()
    key_src = json.dumps([spec.to_hf_config(), SYNTH_DTYPE, SYNTH_SEED, FORMAT_VERSION], sort_keys=True)
    root = workdir.expanduser() / f"{preset}-{hashlib.sha256(key_src.encode()).hexdigest()[:12]}"
    ckpt, bundle = root / "checkpoint", root / "bundle"
    root.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "config.json").is_file():  # synth_to_folder and export_bundle commit atomically
        t = time.perf_counter()
        synth_to_folder(spec, ckpt, SYNTH_DTYPE, SYNTH_SEED, overwrite=True)
        log.print(f"synthesized {spec.num_parameters() / 1e6:.3g}M params in {time.perf_counter() - t:.1f}s")
    if rebuild or not (bundle / "manifest.json").is_file():
        t = time.perf_counter()
        export_bundle(ckpt, bundle, ExportOptions(overwrite=True, recipe=QuantRecipe.none()))  # fp32 vs fp32
        log.print(f"exported bundle in {time.perf_counter() - t:.1f}s")
    log.print(f"checkpoint {ckpt}\nbundle     {bundle}")
    return spec, ckpt, bundle


class Engine(Protocol):
    def prefill(self, prompt: np.ndarray) -> int: ...  # fresh cache; returns the first greedy token

    def step(self, token: int) -> int: ...  # one decode step; returns the next greedy token


class OrtEngine:
    def __init__(self, bundle: Path, threads: int):
        self.session = BundleSession(bundle, threads=threads, check=False)

    def prefill(self, prompt: np.ndarray) -> int:
        self.cache = self.session.new_cache(1)
        return int(self.session.forward(prompt, self.cache, last_only=True)[0, -1].argmax())

    def step(self, token: int) -> int:
        return int(self.session.forward(np.array([[token]], dtype=np.int64), self.cache)[0, -1].argmax())


class TorchEngine:
    """A PyTorch model: `reset` starts an empty cache, `run` feeds ids and returns the next greedy token."""

    def reset(self) -> None:
        raise NotImplementedError

    def run(self, ids: torch.Tensor) -> int:
        raise NotImplementedError

    def prefill(self, prompt: np.ndarray) -> int:
        self.reset()
        return self.run(torch.from_numpy(prompt))

    def step(self, token: int) -> int:
        return self.run(torch.tensor([[token]]))


class ReferenceEngine(TorchEngine):
    def __init__(self, ckpt: Path):
        self.spec, self.embedder, self.decoder = load_reference(ckpt, torch.float32)
        self.past: list[torch.Tensor] = []
        self.position = 0

    def reset(self) -> None:
        self.past, self.position = empty_past(self.spec, 1, torch.float32), 0

    def run(self, ids: torch.Tensor) -> int:
        positions = torch.arange(self.position, self.position + ids.shape[1])[None]
        last = torch.tensor([ids.shape[1] - 1])
        logits, *self.past = self.decoder(ids, self.embedder(ids), positions, last, *self.past)
        self.position += ids.shape[1]
        return int(logits[0, -1].argmax())


class TransformersEngine(TorchEngine):
    def __init__(self, ckpt: Path):
        from transformers import Gemma4ForCausalLM
        from transformers.cache_utils import DynamicCache
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model = Gemma4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
        self.model.eval()
        self.new_cache = lambda: DynamicCache(config=self.model.config)

    def reset(self) -> None:
        self.cache = self.new_cache()

    def run(self, ids: torch.Tensor) -> int:
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax())


@dataclass
class Run:
    tokens: list[int]  # greedy: the prefill's, then one per decode step
    ttft_s: float
    step_s: list[float]  # per decode step


@dataclass
class Result:
    load_s: float
    prefill_tok_s: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)  # 1 / median per-token latency, per run
    tokens: list[int] = field(default_factory=list)  # greedy tokens of the warm-up run


@torch.inference_mode()
def run_once(engine: Engine, prompt: np.ndarray, new_tokens: int) -> Run:
    time.sleep(SETTLE_S)  # let the previous engine's thread pool stop spinning
    t0 = time.perf_counter()
    run = Run([engine.prefill(prompt)], time.perf_counter() - t0, [])
    for _ in range(new_tokens):
        t = time.perf_counter()
        run.tokens.append(engine.step(run.tokens[-1]))
        run.step_s.append(time.perf_counter() - t)
    return run


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=["small", "tiny"])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("~/.cache/ple-export-bench"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--rebuild", action="store_true", help="re-export the cached bundle")
    args = p.parse_args()
    if min(args.prompt_len, args.new_tokens, args.repeats, args.threads) < 1:
        p.error("--prompt-len, --new-tokens, --repeats and --threads must be >= 1")
    wall0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    spec, ckpt, bundle = prepare(args.preset, args.workdir, args.rebuild)

    notes: list[str] = []
    factories: list[tuple[str, Callable[[], Engine]]] = [
        ("onnxruntime", lambda: OrtEngine(bundle, args.threads)),
        ("pytorch-eager", lambda: ReferenceEngine(ckpt)),
        ("transformers", lambda: TransformersEngine(ckpt)),
    ]
    engines: dict[str, Engine] = {}
    results: dict[str, Result] = {}
    for name, make in factories:
        t = time.perf_counter()
        try:
            engines[name] = make()
        except ImportError as e:
            notes.append(f"{name} skipped: {e}")
            continue
        results[name] = Result(load_s=time.perf_counter() - t)
        log.print(f"loaded {name} in {results[name].load_s:.2f}s")

    prompt = np.random.default_rng(0).integers(0, spec.vocab_size, (1, args.prompt_len), dtype=np.int64)
    loads = [os.getloadavg()[0]]  # sampled before and after every repeat
    order = list(engines.items())
    for name, engine in order:  # warm-up, untimed; its tokens feed the sanity check
        results[name].tokens = run_once(engine, prompt, args.new_tokens).tokens
    for r in range(args.repeats):
        for name, engine in order[r % len(order) :] + order[: r % len(order)]:  # round-robin, rotated
            run = run_once(engine, prompt, args.new_tokens)
            res = results[name]
            res.ttft_ms.append(run.ttft_s * 1e3)
            res.prefill_tok_s.append(args.prompt_len / run.ttft_s)
            res.decode_tok_s.append(1.0 / statistics.median(run.step_s))
        loads.append(os.getloadavg()[0])
        log.print(f"repeat {r + 1}/{args.repeats} done (1-min load average {loads[-1]:.1f})")

    check = min(CHECK_TOKENS, args.new_tokens + 1)
    first = {name: res.tokens[:check] for name, res in results.items()}
    tokens_match = len({tuple(t) for t in first.values()}) == 1
    if not tokens_match:
        notes.append(f"WARNING: greedy tokens differ in the first {check}: {first}")
    cpus = os.cpu_count() or 1
    if max(loads) > cpus + 1:  # this run keeps about `threads` runnable itself
        notes.append(
            f"WARNING: 1-min load average reached {max(loads):.1f} on {cpus} CPUs: other processes competed "
            "for the cores. The engines degrade unequally under oversubscription (PyTorch's OpenMP far "
            "more than onnxruntime), so even side-by-side ratios are unreliable; rerun on a quiet machine."
        )

    manifest = json.loads((bundle / "manifest.json").read_text())
    weight_bytes = sum(f["bytes"] for f in manifest["files"] if f["role"] == "decoder_weights")
    report: dict[str, Any] = {
        "preset": args.preset,
        "num_parameters": spec.num_parameters(),
        "decoder_weight_bytes": weight_bytes,
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "cpus": cpus,
        "load_avg_1m": spread(loads),
        "tokens_match": tokens_match,
        "notes": notes,
        "engines": {},
        "ratios": {},
    }
    for name, res in results.items():
        decode = statistics.median(res.decode_tok_s)
        report["engines"][name] = {
            "load_s": res.load_s,
            "ttft_ms": spread(res.ttft_ms),
            "prefill_tok_s": spread(res.prefill_tok_s),
            "decode_tok_s": spread(res.decode_tok_s),
            "decode_weight_gb_s": weight_bytes * decode / 1e9,
            "first_tokens": first[name],
        }
    for other in ("pytorch-eager", "transformers"):
        if other in results and "onnxruntime" in results:
            ort, ref = results["onnxruntime"], results[other]
            report["ratios"][f"onnxruntime/{other}"] = {
                m: statistics.median(a / b for a, b in zip(getattr(ort, m), getattr(ref, m), strict=True))
                for m in ("prefill_tok_s", "decode_tok_s")
            }
    report["wall_s"] = time.perf_counter() - wall0
    if args.json:
        for note in notes:
            log.print(note, style="yellow", markup=False)
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


def print_report(rep: dict[str, Any]) -> None:
    def fmt(s: dict[str, float]) -> str:
        return f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"

    out = Console(width=max(Console().width, 132))
    table = Table(
        title=f"preset {rep['preset']}: {rep['num_parameters'] / 1e6:.3g}M params (decoder weights "
        f"{rep['decoder_weight_bytes'] / 1e6:.4g} MB), prompt {rep['prompt_len']}, {rep['new_tokens']} new "
        f"tokens, batch 1, {rep['threads']} threads",
        caption=escape(f"median [min-max] of {rep['repeats']} timed runs per engine"),
    )
    for col in ("engine", "load s", "TTFT ms", "prefill tok/s", "decode tok/s", "decode weight GB/s"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for name, e in rep["engines"].items():
        table.add_row(
            name,
            f"{e['load_s']:.2f}",
            fmt(e["ttft_ms"]),
            fmt(e["prefill_tok_s"]),
            fmt(e["decode_tok_s"]),
            f"{e['decode_weight_gb_s']:.2f}",
        )
    out.print(table)
    for pair, r in rep["ratios"].items():
        out.print(f"{pair}: prefill x{r['prefill_tok_s']:.2f}, decode x{r['decode_tok_s']:.2f}")
    load = rep["load_avg_1m"]
    out.print(
        f"greedy tokens agree across engines: {rep['tokens_match']}; wall {rep['wall_s']:.1f}s; "
        f"1-min load average in timed runs {load['min']:.1f}-{load['max']:.1f} on {rep['cpus']} CPUs"
    )
    for note in rep["notes"]:
        out.print(note, style="yellow", markup=False)


if __name__ == "__main__":
    main()
