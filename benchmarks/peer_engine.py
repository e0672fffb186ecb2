"""The peer engine: onnxruntime-genai on the peer's model folder, driven as the peer's own
`bench_ortgenai.py` drives it (`append_tokens` = the prefill, `generate_next_token` = a step, EOS
masked by min_length = max_length). Runs under the peer's python, which has neither this package nor
torch: the standard library, numpy and onnxruntime_genai only. The one decode loop of ple-export
(`runtime_harness/loop.py`) cannot drive ORT-GenAI's generator, which owns its own loop.

    PEER_PYTHON benchmarks/peer_engine.py TASK.json     (quant_bench.py runs it)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def status() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PeerEngine:
    def __init__(self, model_dir: str, threads: int, profile_prefix: str | None = None):
        import onnxruntime_genai as og

        self.og = og
        cfg = og.Config(model_dir)
        cfg.clear_providers()  # CPU EP
        options: dict[str, Any] = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        if profile_prefix:
            options["enable_profiling"] = profile_prefix
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(cfg)

    def run(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        import numpy as np

        total = len(prompt) + new_tokens
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        gen = self.og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        prefill = time.perf_counter() - t0
        gen.generate_next_token()
        tokens = [int(gen.get_next_tokens()[0])]
        ttft = time.perf_counter() - t0
        steps = []
        while not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            steps.append(time.perf_counter() - t)
        del gen
        return {"prefill_s": prefill, "ttft_s": ttft, "steps_s": steps, "tokens": tokens}


def main(task_path: str) -> int:
    task = json.loads(Path(task_path).read_text())
    record: dict[str, Any] = {"status_start": status()}
    t0 = time.perf_counter()
    engine = PeerEngine(task["model"], task["threads"], task.get("profile_prefix"))
    record["load_s"] = time.perf_counter() - t0
    record["status_after_load"] = status()
    record["cold"] = engine.run(task["prompt"], task["new_tokens"])
    record["warm"] = engine.run(task["prompt"], task["new_tokens"])
    record["status_end"] = status()
    del engine  # a profile is written when the session ends
    Path(task["out"]).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
