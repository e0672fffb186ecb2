"""The engines the benchmarks compare, each a model the one decode loop drives
(`runtime_harness.loop.generate`), and the worker that runs one in a fresh process:

    bundle        an exported bundle through `BundleSession` (onnxruntime)
    torch         our PyTorch modules, eager (`exporter.reference.TorchModel`)
    transformers  `Gemma4ForCausalLM`, eager attention, DynamicCache (`exporter.reference.TransformersModel`)

(the peer, onnxruntime-genai, runs under its own python: `peer_engine.py`). Protocol: greedy with EOS
masked, the prompt in chunks of `prefill_chunk` tokens (the loop's default) each asking for its last
position's logits only, then one step per token; a
run is `Generation`'s timings: prefill (the forward), TTFT (+ the first pick), each step (forward +
pick).

    python benchmarks/engines.py TASK.json     (quant_bench.py runs it)
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime_harness import loop  # noqa: E402


def masked_greedy(eos: frozenset[int]) -> loop.Pick:
    """argmax with the EOS tokens masked, so every run makes the same number of tokens."""
    banned = sorted(eos)

    def pick(logits: np.ndarray) -> np.ndarray:
        if banned:
            logits = logits.copy()
            logits[:, banned] = -np.inf
        return logits.argmax(-1)

    return pick


def load(kind: str, model: str, threads: int, profile_dir: str | None = None) -> Any:
    """An engine of `kind` on `model` (a bundle folder, or a checkpoint for the PyTorch engines)."""
    if kind == "bundle":
        from runtime_harness.session import BundleSession

        return BundleSession(Path(model), threads=threads, check=False, profile_dir=profile_dir)
    if kind == "genai":  # the same bundle, run by onnxruntime-genai (its model.onnx)
        from runtime_harness.genai import GenaiModel

        return GenaiModel(Path(model), threads=threads, check=False)
    import torch

    torch.set_num_threads(threads)
    from exporter.reference import TorchModel, TransformersModel

    return (TorchModel if kind == "torch" else TransformersModel)(Path(model))


def run(
    engine: Any, prompt: list[int], new_tokens: int, chunk: int = loop.DEFAULT_PREFILL_CHUNK
) -> dict[str, Any]:
    pick = masked_greedy(engine.eos_ids)
    gen = loop.generate(engine, prompt, new_tokens, pick, stop_at_eos=False, prefill_chunk=chunk)
    return {
        "prefill_s": gen.prefill_seconds,
        "ttft_s": gen.first_token_seconds,
        "steps_s": gen.step_seconds,
        "tokens": gen.tokens,
    }


def status() -> dict[str, int]:
    from runtime_harness.measure.child import read_status

    return read_status()


def streamed_bytes(engine: Any) -> int | None:
    """Parameter bytes a PyTorch engine reads per decode token: all but the PLE table (gathered)."""
    model = getattr(engine, "model", None) or getattr(engine, "decoder", None)
    if model is None:
        return None
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():  # tied weights are listed once
        if id(p) not in seen and "embed_tokens_per_layer" not in name and "ple_table" not in name:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


BW_BYTES = 1 << 30
BW_PASSES = 7


def measure_bandwidth(threads: int) -> dict[str, Any]:
    """Read bandwidth: numpy sum over a 1 GiB float64 array, 1 thread and `threads` threads (slices),
    median of BW_PASSES passes after one untimed pass. numpy releases the GIL inside the reduction."""
    import numpy as np

    a = np.ones(BW_BYTES // 8)
    out: dict[str, Any] = {"bytes": a.nbytes}
    for n in sorted({1, threads}):
        parts = np.array_split(a, n)
        times = []
        for i in range(BW_PASSES + 1):
            sums = [0.0] * n

            def work(k: int, sums: list[float] = sums, parts: list[Any] = parts) -> None:
                sums[k] = float(parts[k].sum())

            t = time.perf_counter()
            if n == 1:
                work(0)
            else:
                pool = [threading.Thread(target=work, args=(k,)) for k in range(n)]
                for th in pool:
                    th.start()
                for th in pool:
                    th.join()
            if i:
                times.append(time.perf_counter() - t)
        out[f"gb_s_{n}t"] = a.nbytes / statistics.median(times) / 1e9
        out[f"gb_s_{n}t_max"] = a.nbytes / min(times) / 1e9
    return out


def main(task_path: str) -> int:
    task = json.loads(Path(task_path).read_text())
    if task["kind"] == "bandwidth":
        Path(task["out"]).write_text(json.dumps(measure_bandwidth(task["threads"])))
        return 0
    record: dict[str, Any] = {"status_start": status()}
    t0 = time.perf_counter()
    engine = load(task["kind"], task["model"], task["threads"], task.get("profile_dir"))
    record["load_s"] = time.perf_counter() - t0
    record["status_after_load"] = status()
    record["streamed_bytes"] = None if task["kind"] in ("bundle", "genai") else streamed_bytes(engine)
    chunk = task.get("prefill_chunk", loop.DEFAULT_PREFILL_CHUNK)
    record["cold"] = run(engine, task["prompt"], task["new_tokens"], chunk)
    record["warm"] = run(engine, task["prompt"], task["new_tokens"], chunk)
    record["status_end"] = status()
    if task.get("profile_dir") and task["kind"] == "bundle":
        record["profiles"] = [engine.embedder.end_profiling(), engine.decoder.end_profiling()]
    Path(task["out"]).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
