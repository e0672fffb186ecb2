"""Kernel time by op type from onnxruntime profile files (`quant_bench.py --profile`): the warm run's
decode steps (per step) and its prefill. onnxruntime's profiler adds ~6 us to every node, which
swamps the small ops: read the shares of the large ones."""

from __future__ import annotations

import bisect
import json
import statistics
from collections import defaultdict
from typing import Any

Json = dict[str, Any]


def parse_profile(paths: list[str], new_tokens: int, prefill_calls: int = 1) -> Json:
    """Kernel time by op type for the warm run's decode steps (per step) and its prefill, from
    onnxruntime profile files of two generations (cold, warm): a session's last new_tokens - 1
    `model_run`s are the warm decode steps, the `prefill_calls` before them the warm prefill (one per
    prompt chunk). Several files (our embedder and decoder sessions) add up."""
    per_op: dict[str, dict[str, float]] = {"decode": defaultdict(float), "prefill": defaultdict(float)}
    calls: dict[str, dict[str, float]] = {"decode": defaultdict(float), "prefill": defaultdict(float)}
    run_ms: dict[str, list[float]] = {"decode": [], "prefill": []}
    steps = 0
    for path in paths:
        with open(path) as f:
            events = json.load(f)
        runs = sorted(
            (e["ts"], e["ts"] + e["dur"])
            for e in events
            if e.get("cat") == "Session" and e.get("name") == "model_run"
        )
        if len(runs) < 1 + prefill_calls:
            continue
        n = min(new_tokens, len(runs) - prefill_calls + 1)  # decode steps + 1
        decode = runs[len(runs) - (n - 1) :]
        prefill = runs[len(runs) - (n - 1) - prefill_calls : len(runs) - (n - 1)]
        phase_of = dict.fromkeys(prefill, "prefill") | dict.fromkeys(decode, "decode")
        steps = max(steps, n - 1)
        ms = {
            "decode": [(b - a) / 1e3 for a, b in decode],
            "prefill": [sum((b - a) / 1e3 for a, b in prefill)],  # the whole prompt, every chunk
        }
        for ph in run_ms:  # per-run totals over sessions (one embedder run per decoder run)
            run_ms[ph] = [x + y for x, y in zip(run_ms[ph], ms[ph], strict=True)] if run_ms[ph] else ms[ph]
        chosen = sorted(phase_of)
        starts = [a for a, _ in chosen]
        for e in events:
            if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
                continue
            i = bisect.bisect_right(starts, e["ts"]) - 1
            if i < 0 or e["ts"] > chosen[i][1]:
                continue
            ph = phase_of[chosen[i]]
            per = 1 / (n - 1) if ph == "decode" else 1.0
            op = e.get("args", {}).get("op_name", "?")
            per_op[ph][op] += e["dur"] / 1e3 * per
            calls[ph][op] += per
    out: Json = {"decode_steps": steps}
    for ph in ("decode", "prefill"):
        total = sum(per_op[ph].values())
        out[ph] = {
            "run_ms_median": statistics.median(run_ms[ph]) if run_ms[ph] else None,
            "kernel_ms": total,
            "ops": [
                {"op": op, "ms": ms, "share": ms / total if total else 0.0, "calls": calls[ph][op]}
                for op, ms in sorted(per_op[ph].items(), key=lambda kv: -kv[1])
            ],
        }
    return out
