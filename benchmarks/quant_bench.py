"""Quantized bundle vs fp32 bundle vs transformers vs the peer (ORT-GenAI int4), one run, one checkpoint.

    python benchmarks/quant_bench.py --checkpoint /work/peers/ckpt/mid \\
        --peer-genai /work/peers/onnx/mid_int4_epcpu --peer-python /work/peers/venv/bin/python \\
        --repeats 5 --profile

(`bash /work/shared/peers/run_all.sh` with `SHAPES=mid PEERS_ROOT=/work/peers` makes the checkpoint,
the peer's model folder and its venv; `--checkpoint /work/peers/ckpt/tiny` with
`--peer-genai /work/peers/onnx/tiny_int4_epcpu --repeats 1` is the quick end-to-end check.)

Engines, each run in its OWN fresh subprocess per repeat (load once, a cold run, then a warm run):

    int4          our bundle, default recipe (`QuantRecipe()`: int4 MatMulNBits block 256 with zero
                  points and clip search, accuracy 4, int8 PLE table via GatherBlockQuantized),
                  `BundleSession`
    int4-b32      our bundle with the peer's recipe (block 32 symmetric): the like-for-like ratio
    int4-b64      our bundle with `--block-size 64` (asymmetric): the higher-quality option
    int4-b128     our bundle with `--block-size 128` (asymmetric, clip search): GPTQ's and AWQ's group
    fp32          our bundle, `QuantRecipe.none()`
    transformers  `Gemma4ForCausalLM`, fp32, eager attention, DynamicCache, `logits_to_keep=1`
                  (what `generate()` does: the prefill computes the last position's logits only,
                  and skips the prompt positions in the KV-shared layers)
    peer          onnxruntime-genai on the peer's model folder (`--peer-genai`), driven by THIS file
                  under the peer's python (`--peer-python`), same protocol as the peer's
                  `bench_ortgenai.py` (`append_tokens` = prefill, `generate_next_token` = a step)

Protocol (the peer's): prompt = `numpy.random.RandomState(1234).randint(3, vocab, 128)`, 64 greedy
new tokens with EOS masked, `--threads` intra-op threads (OMP_NUM_THREADS too). Our bundles and
transformers run the same loop by hand: forward the prompt, pick token 1 (TTFT), then 63 decode
steps of (forward one token + pick). Like transformers' `logits_to_keep=1`, our prefill asks the
decoder for the last position's logits only (its `logits_positions` input).

Figures per engine (medians over `--repeats`, with [min-max]):
    decode tok/s     1 / median of the 63 decode step times of the warm run
    prefill tok/s    128 / prefill time (the prompt's forward, without the pick), warm run
    TTFT             prefill + first pick, warm run
    peak RSS         ru_maxrss from wait4, and the max RssAnon / RssFile sampled from
                     /proc/<pid>/status every `--sample-ms` while the child runs (import + load + 2 runs)
    bytes/token      weight bytes streamed per decode token: initializers read by anything other than
                     a Gather (the PLE and token-embedding rows are gathered, not streamed); for our
                     bundles also the manifest's DRAM `decoder_weights` bytes; for transformers the
                     parameter bytes minus the PLE table
    achieved GB/s    bytes/token x decode tok/s, against this machine's read bandwidth measured in
                     the same run (numpy sum over a 1 GiB array in its own subprocess, 1 thread and
                     `--threads` threads, median of several passes, once per repeat)
Ratios are medians of paired per-repeat ratios (engines run round-robin, rotating who goes first, with
an idle gap between children). Greedy-token agreement with transformers fp32 over the 64 tokens of the
cold run is reported, not asserted (random weights make int4 diverge quickly).

`--profile` adds one untimed onnxruntime-profiled run per ONNX engine and prints the op types that
dominate a decode step (kernel time per step, prefill excluded).

Bundles are exported once into `--workdir`, keyed by the checkpoint (path, config, shard sizes and
mtimes), the recipe and the bundle format version; `--rebuild` re-exports.
The timings are only meaningful on a quiet machine: a warning is printed when the load average says
other processes competed for the cores.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Only the standard library at module level: the peer's python (without our package, torch or rich)
# runs this same file as its worker.

PROMPT_LEN = 128
NEW_TOKENS = 64
PROMPT_SEED = 1234
SETTLE_S = 0.5  # idle gap before each child: lets page cache writeback / other children's threads settle
BW_BYTES = 1 << 30
BW_PASSES = 7
ROOT = Path(__file__).resolve().parents[1]
# our bundles: engine -> QuantRecipe arguments (None: QuantRecipe.none()); plain data, as this file
# must import without our package (the measuring middleman runs it with `python -S -E`)
BUNDLE_RECIPES: dict[str, dict[str, object] | None] = {
    "int4": {},  # the default recipe
    "int4-b32": {"block_size": 32, "symmetric": True, "clip_search": False},  # the peer's recipe (RTN)
    "int4-b64": {"block_size": 64},  # the higher-quality option (docs/quantization.md)
    "int4-b128": {"block_size": 128},  # GPTQ's and AWQ's group size
    "fp32": None,
}
BUNDLE_ENGINES = tuple(BUNDLE_RECIPES)
OURS_INT4 = tuple(e for e in BUNDLE_ENGINES if e.startswith("int4"))
ONNX_ENGINES = (*BUNDLE_ENGINES, "peer")
ENGINES = (*BUNDLE_ENGINES, "transformers", "peer")
# (op, input index) that read only a few rows of an initializer per token; None: any input
ROW_READERS: dict[str, set[int] | None] = {
    "Gather": None,
    "GatherBlockQuantized": None,
    "GatherElements": None,
    "GatherND": None,
    "GroupQueryAttention": {7, 8},  # cos_cache, sin_cache
    "RotaryEmbedding": {2, 3},  # cos_cache, sin_cache
}

Json = dict[str, Any]


# ----------------------------------------------------------------------------------------------------
# child side (runs in a fresh process; the peer's venv runs `peer` and nothing else)
# ----------------------------------------------------------------------------------------------------


def proc_status() -> dict[str, float]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, MiB."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = round(int(value.split()[0]) / 1024.0, 1)
    return out


def make_prompt(vocab: int) -> Any:
    import numpy as np

    return np.random.RandomState(PROMPT_SEED).randint(3, vocab, size=PROMPT_LEN).astype(np.int64)


class Loop:
    """An engine as the greedy loop sees it: `prefill(prompt)` then `step(token)`, each returning
    the next greedy token with EOS masked. `prefill` also records the prompt forward's own time."""

    prefill_s: float = 0.0

    def prefill(self, prompt: Any) -> int:
        raise NotImplementedError

    def step(self, token: int) -> int:
        raise NotImplementedError


def greedy_run(loop: Loop, prompt: Any) -> Json:
    t0 = time.perf_counter()
    tokens = [loop.prefill(prompt)]
    ttft = time.perf_counter() - t0
    steps = []
    while len(tokens) < NEW_TOKENS:
        t = time.perf_counter()
        tokens.append(loop.step(tokens[-1]))
        steps.append(time.perf_counter() - t)
    return {"prefill_s": loop.prefill_s, "ttft_s": ttft, "steps_s": steps, "tokens": tokens}


def _masked_argmax(logits: Any, eos: list[int]) -> int:
    row = logits.reshape(-1)
    if eos:
        row = row.copy()
        row[eos] = -float("inf")
    return int(row.argmax())


class BundleLoop(Loop):
    def __init__(self, bundle: Path, threads: int, profile_dir: str | None = None):
        from runtime_harness.session import BundleSession

        self.session = BundleSession(bundle, threads=threads, check=False, profile_dir=profile_dir)
        self.eos = sorted(self.session.eos_ids)

    def prefill(self, prompt: Any) -> int:
        self.cache = self.session.new_cache(1)
        t = time.perf_counter()
        logits = self.session.forward(prompt[None], self.cache, last_only=True)
        self.prefill_s = time.perf_counter() - t
        return _masked_argmax(logits[0, -1], self.eos)

    def step(self, token: int) -> int:
        import numpy as np

        return _masked_argmax(
            self.session.forward(np.array([[token]], np.int64), self.cache)[0, -1], self.eos
        )

    def end_profiling(self) -> list[str]:
        return [self.session.embedder.end_profiling(), self.session.decoder.end_profiling()]


class TransformersLoop(Loop):
    def __init__(self, ckpt: Path, threads: int):
        import torch
        from transformers import Gemma4ForCausalLM
        from transformers.cache_utils import DynamicCache
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()
        self.torch = torch
        self.model = Gemma4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
        self.model.eval()
        self.new_cache = lambda: DynamicCache(config=self.model.config)
        eos = self.model.generation_config.eos_token_id
        self.eos = sorted({eos} if isinstance(eos, int) else set(eos or []))
        seen: set[int] = set()
        streamed = 0
        for name, p in self.model.named_parameters():  # tied weights are listed once
            if id(p) not in seen and "embed_tokens_per_layer" not in name:
                seen.add(id(p))
                streamed += p.numel() * p.element_size()
        self.streamed_bytes = streamed

    def _run(self, ids: Any) -> int:
        with self.torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return _masked_argmax(out.logits[0, -1].numpy(), self.eos)

    def prefill(self, prompt: Any) -> int:
        self.cache = self.new_cache()
        ids = self.torch.from_numpy(prompt)[None]
        with self.torch.inference_mode():
            t = time.perf_counter()
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            self.prefill_s = time.perf_counter() - t
        return _masked_argmax(out.logits[0, -1].numpy(), self.eos)

    def step(self, token: int) -> int:
        return self._run(self.torch.tensor([[token]]))


class GenAIGreedy:
    """onnxruntime-genai, as the peer's bench_ortgenai.py drives it (EOS masked by min_length)."""

    def __init__(self, model_dir: str, threads: int, profile_prefix: str | None = None):
        import onnxruntime_genai as og

        self.og = og
        cfg = og.Config(model_dir)
        cfg.clear_providers()  # CPU EP
        session_options: Json = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        if profile_prefix:
            session_options["enable_profiling"] = profile_prefix
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
        self.model = og.Model(cfg)

    def run(self, prompt: Any) -> Json:
        import numpy as np

        total = PROMPT_LEN + NEW_TOKENS
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        gen = self.og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt.astype(np.int32))
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


def measure_bandwidth(threads: int) -> Json:
    """Read bandwidth: numpy sum over a 1 GiB float64 array, 1 thread and `threads` threads (slices),
    median of BW_PASSES passes after one untimed pass. numpy releases the GIL inside the reduction."""
    import numpy as np

    a = np.ones(BW_BYTES // 8)
    out: Json = {"bytes": a.nbytes}
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


def worker(task: Json) -> Json:
    """One child: load an engine, run it cold then warm (or profile it), return a JSON record."""
    engine, threads = task["engine"], task["threads"]
    if engine == "bandwidth":
        return measure_bandwidth(threads)
    rec: Json = {"status_start": proc_status()}
    prompt = make_prompt(task["vocab"])
    profile_dir = task.get("profile_dir")
    t0 = time.perf_counter()
    if engine == "peer":
        genai = GenAIGreedy(
            task["model"], threads, os.path.join(profile_dir, "peer") if profile_dir else None
        )
        runner: Callable[[], Json] = lambda: genai.run(prompt)  # noqa: E731
    else:
        loop: Loop
        if engine == "transformers":
            loop = TransformersLoop(Path(task["model"]), threads)
            rec["streamed_bytes"] = loop.streamed_bytes  # type: ignore[attr-defined]
        else:
            loop = BundleLoop(Path(task["model"]), threads, profile_dir)
        runner = lambda: greedy_run(loop, prompt)  # noqa: E731
    rec["load_s"] = time.perf_counter() - t0
    rec["status_after_load"] = proc_status()
    cold = runner()
    if profile_dir:
        runner()  # profiled too: the parser takes the second (warm) generation
        if engine == "peer":
            del genai, runner  # the profile is written when the session ends
            import gc

            gc.collect()
        elif isinstance(loop, BundleLoop):
            rec["profiles"] = loop.end_profiling()
        rec["cold"] = cold
        return rec
    warm = runner()
    rec["status_end"] = proc_status()
    rec["cold"], rec["warm"] = cold, warm
    rec["tokens_identical_cold_warm"] = cold["tokens"] == warm["tokens"]
    return rec


def worker_main(argv: list[str]) -> int:
    task = json.loads(argv[0])
    rec = worker(task)
    with open(task["out"], "w") as f:
        json.dump(rec, f)
    return 0


# ----------------------------------------------------------------------------------------------------
# parent side
# ----------------------------------------------------------------------------------------------------


def read_status(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) / 1024.0
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def measure_child(job: Json) -> Json:
    """In the slim `_measure` process: run `python THIS_FILE _worker TASK`, sample its /proc status every
    `sample_s`, reap it with wait4. Returns the child's record with a `measure` section.

    A slim middleman, because a child's ru_maxrss starts from the RSS of the process that forked it
    (Linux carries the forking mm's high-water mark across exec): forked from the main process, which
    has torch and the exporter loaded, every engine would report at least the main process's RSS."""
    task, log = job["task"], Path(job["log"])
    fd, out = tempfile.mkstemp(suffix=".json", prefix="quant_bench_")
    os.close(fd)
    task = dict(task, out=out)
    peaks = {"RssAnon": 0.0, "RssFile": 0.0, "VmRSS": 0.0}
    with open(log, "w") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [job["python"], __file__, "_worker", json.dumps(task)],
            env=job["env"],
            cwd=ROOT,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        stop = threading.Event()

        def sampler() -> None:
            while not stop.is_set():
                for key, value in read_status(proc.pid).items():
                    peaks[key] = max(peaks[key], value)
                stop.wait(job["sample_s"])

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        timer = threading.Timer(job["timeout"], proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    try:
        with open(out) as f:
            rec: Json = json.load(f) if rc == 0 else {}
    except (OSError, json.JSONDecodeError):
        rec = {}
    finally:
        os.unlink(out)
    rec["rc"] = rc
    rec["measure"] = {
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024.0,
        "peak_rss_anon_mb": peaks["RssAnon"],
        "peak_rss_file_mb": peaks["RssFile"],
        "peak_vmrss_mb_sampled": peaks["VmRSS"],
        "measurer_rss_mb": read_status(os.getpid()).get("VmRSS"),
    }
    return rec


def drop_page_cache(model: Path) -> None:
    """Every engine starts from the same state: its model files out of the page cache (read from
    disk on first touch, with the kernel's read-around). Files just written (our export) otherwise sit
    there in 2 MiB folios that a single row lookup maps whole, which inflates file-backed RSS."""
    for path in [model] if model.is_file() else sorted(model.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(python: str, task: Json, log: Path, sample_s: float, timeout: float) -> Json:
    """One engine (or the bandwidth probe) in a fresh process, measured from outside by a slim
    stdlib-only middleman (`python -S -E THIS_FILE _measure`)."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(task["threads"]),
        MKL_NUM_THREADS=str(task["threads"]),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    if task["engine"] == "peer":
        env.pop("PYTHONPATH")  # the peer's venv must not see our package
    job = {
        "python": python,
        "task": task,
        "log": str(log),
        "env": env,
        "sample_s": sample_s,
        "timeout": timeout,
    }
    if task.get("model"):
        drop_page_cache(Path(task["model"]))
    time.sleep(SETTLE_S)
    proc = subprocess.run(
        [sys.executable, "-S", "-E", __file__, "_measure"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    try:
        rec: Json = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"measuring {task['engine']} failed: {proc.stderr.strip()[-2000:]}") from None
    if rec["rc"] != 0 or ("load_s" not in rec and task["engine"] != "bandwidth"):
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(
            f"{task['engine']} child failed (rc={rec['rc']}, log {log}):\n  " + "\n  ".join(tail)
        )
    return rec


def _checkpoint_key(ckpt: Path) -> str:
    parts: list[Any] = [str(ckpt.resolve())]
    for p in sorted(ckpt.iterdir()):
        if p.is_file():
            st = p.stat()
            parts.append([p.name, st.st_size, st.st_mtime_ns])
            if p.name == "config.json":
                parts.append(p.read_text())
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def prepare_bundle(
    ckpt: Path, recipe_name: str, workdir: Path, rebuild: bool, say: Callable[[str], None]
) -> Path:
    """Export (once) the checkpoint with the named recipe into workdir; keyed by checkpoint+recipe+format."""
    from exporter.export import ExportOptions, export_bundle
    from exporter.manifest import FORMAT_VERSION
    from graphs.recipe import QuantRecipe

    args = BUNDLE_RECIPES[recipe_name]
    recipe = QuantRecipe.none() if args is None else QuantRecipe(**args)  # type: ignore[arg-type]
    key = hashlib.sha256(json.dumps([recipe.to_dict(), FORMAT_VERSION]).encode()).hexdigest()[:8]
    bundle = workdir.expanduser() / f"{ckpt.resolve().name}-{_checkpoint_key(ckpt)}" / f"{recipe_name}-{key}"
    if rebuild or not (bundle / "manifest.json").is_file():
        t = time.perf_counter()
        say(f"exporting {recipe_name} bundle to {bundle} ...")
        export_bundle(ckpt, bundle, ExportOptions(recipe=recipe, overwrite=True))
        say(f"exported {recipe_name} bundle in {time.perf_counter() - t:.1f}s")
    return bundle


def _initializer_bytes(init: Any) -> tuple[int, tuple[Any, ...]]:
    """(bytes, identity): external data is identified by (file, offset, length), so two initializers
    viewing the same bytes (our tied embedding: one copy for MatMulNBits and GatherBlockQuantized)
    count once."""
    import onnx

    ext = {entry.key: entry.value for entry in init.external_data}
    if "length" in ext:
        return int(ext["length"]), ("ext", ext.get("location"), int(ext.get("offset", 0)), int(ext["length"]))
    if init.raw_data:
        return len(init.raw_data), ("own", id(init))
    n = 1
    for d in init.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize, ("own", id(init))


def _row_reader(op: str, index: int) -> bool:
    if op not in ROW_READERS:
        return False
    indices = ROW_READERS[op]
    return indices is None or index in indices


def graph_bytes(paths: list[Path]) -> Json:
    """Initializer bytes of ONNX graphs (external data not loaded), split into `streamed` (read whole by
    a MatMul-like op: every byte read per decode token) and `gathered` (read only by Gather-like inputs,
    e.g. the PLE / embedding tables or GQA's cos/sin caches: a few rows per token), plus the bytes by
    consuming op type. Bytes shared by several initializers count once."""
    import onnx

    uses: dict[tuple[Any, ...], set[tuple[str, int]]] = defaultdict(set)
    sizes: dict[tuple[Any, ...], int] = {}
    for path in paths:
        model = onnx.load(str(path), load_external_data=False)
        consumers: dict[str, set[tuple[str, int]]] = defaultdict(set)
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                consumers[name].add((node.op_type, i))
        for init in model.graph.initializer:
            n, ident = _initializer_bytes(init)
            if ident[0] == "ext":
                ident = (str(path.parent), *ident)
            sizes[ident] = n
            uses[ident] |= consumers.get(init.name, set())
    out: Json = {"streamed": 0, "gathered": 0, "by_consumer": defaultdict(int)}
    for ident, n in sizes.items():
        ops = uses[ident]
        gathered = bool(ops) and all(_row_reader(op, i) for op, i in ops)
        out["gathered" if gathered else "streamed"] += n
        out["by_consumer"]["+".join(sorted({op for op, _ in ops})) or "unused"] += n
    out["by_consumer"] = dict(sorted(out["by_consumer"].items(), key=lambda kv: -kv[1]))
    return out


def bundle_bytes(bundle: Path) -> Json:
    manifest = json.loads((bundle / "manifest.json").read_text())
    by_place: dict[str, int] = defaultdict(int)
    by_role: dict[str, int] = defaultdict(int)
    for f in manifest["files"]:
        by_place[f["placement"]] += f["bytes"]
        by_role[f["role"]] += f["bytes"]
    graphs = [bundle / manifest["graphs"][g]["file"] for g in ("embedder", "decoder")]
    return {
        "dram": by_place["dram"],
        "flash": by_place["flash"],
        "total": sum(by_place.values()),
        "decoder_weights": by_role["decoder_weights"],
        "ple_table": by_role["ple_table"],
        "graph": graph_bytes(graphs),
    }


def peer_bytes(model_dir: Path) -> Json:
    files = [p for p in model_dir.iterdir() if p.is_file()]
    return {
        "total": sum(p.stat().st_size for p in files),
        "graph": graph_bytes(sorted(model_dir.glob("*.onnx"))),
    }


def spread(values: list[float]) -> Json:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def agreement(tokens: list[int], ref: list[int]) -> Json:
    first = next((i for i, (a, b) in enumerate(zip(tokens, ref, strict=True)) if a != b), None)
    return {
        "match": sum(a == b for a, b in zip(tokens, ref, strict=True)),
        "of": len(ref),
        "first_divergence": first,
    }


def parse_profile(paths: list[str]) -> Json:
    """Kernel time by op type for the warm run's decode steps (per step) and its prefill, from
    onnxruntime profile files of two generations (cold, warm): a session's last NEW_TOKENS - 1
    `model_run`s are the warm decode steps, the one before them the warm prefill. Several files
    (our embedder and decoder sessions) add up."""
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
        if len(runs) < 2:
            continue
        n = NEW_TOKENS if len(runs) >= NEW_TOKENS else len(runs)
        phase_of = {runs[-n]: "prefill"} | dict.fromkeys(runs[-n + 1 :], "decode")
        steps = max(steps, n - 1)
        ms = {ph: [(b - a) / 1e3 for (a, b), p in phase_of.items() if p == ph] for ph in run_ms}
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


def rotate(items: list[str], r: int) -> list[str]:
    k = r % len(items)
    return items[k:] + items[:k]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        return worker_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        print(json.dumps(measure_child(json.load(sys.stdin))))
        return 0
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="HF Gemma 4 checkpoint folder")
    p.add_argument("--peer-genai", type=Path, default=None, help="the peer's ORT-GenAI model folder")
    p.add_argument(
        "--peer-python",
        default="/work/peers/venv/bin/python",
        help="python of a venv with onnxruntime-genai (runs the peer engine)",
    )
    p.add_argument(
        "--engines",
        default="int4,int4-b32,int4-b128,fp32,transformers,peer",
        help=f"comma list out of {','.join(ENGINES)} (peer needs --peer-genai)",
    )
    p.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per engine, round-robin")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("~/.cache/ple-export-bench/quant"))
    p.add_argument("--rebuild", action="store_true", help="re-export the cached bundles")
    p.add_argument("--profile", action="store_true", help="add one profiled run per ONNX engine")
    p.add_argument("--sample-ms", type=float, default=10.0, help="RSS sampling period")
    p.add_argument("--timeout", type=float, default=1800.0, help="per child, seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = p.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if bad := [e for e in engines if e not in ENGINES]:
        p.error(f"unknown engine(s) {bad}; choose from {ENGINES}")
    if "peer" in engines and args.peer_genai is None:
        engines.remove("peer")
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    if not (args.checkpoint / "config.json").is_file():
        p.error(f"{args.checkpoint}: no config.json (not a checkpoint folder)")
    if "peer" in engines and not (args.peer_genai / "genai_config.json").is_file():  # type: ignore[operator]
        p.error(f"{args.peer_genai}: no genai_config.json (not an ORT-GenAI model folder)")
    if "peer" in engines and not os.access(args.peer_python, os.X_OK):
        p.error(f"--peer-python {args.peer_python}: not an executable (a python with onnxruntime-genai)")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    wall0 = time.perf_counter()
    cpus = os.cpu_count() or 1
    notes: list[str] = []
    load0 = os.getloadavg()[0]
    if load0 > 0.5 * cpus:
        notes.append(
            f"WARNING: 1-min load average was {load0:.1f} on {cpus} CPUs before the benchmark started"
        )

    from exporter.spec import Gemma4Spec

    spec = Gemma4Spec.from_checkpoint_dir(args.checkpoint)
    args.workdir.expanduser().mkdir(parents=True, exist_ok=True)
    logs = args.workdir.expanduser() / "logs"
    logs.mkdir(exist_ok=True)
    models: dict[str, str] = {}
    sizes: dict[str, Json] = {}
    for name in BUNDLE_ENGINES:
        if name in engines:
            bundle = prepare_bundle(args.checkpoint, name, args.workdir, args.rebuild, say)
            models[name], sizes[name] = str(bundle), bundle_bytes(bundle)
    if "transformers" in engines:
        models["transformers"] = str(args.checkpoint)
    if "peer" in engines:
        models["peer"] = str(args.peer_genai)
        sizes["peer"] = peer_bytes(args.peer_genai)  # type: ignore[arg-type]

    try:
        return _run(args, engines, spec, models, sizes, notes, logs, say, wall0)
    except RuntimeError as e:
        say(f"error: {e}")
        return 1


def _run(
    args: argparse.Namespace,
    engines: list[str],
    spec: Any,
    models: dict[str, str],
    sizes: dict[str, Json],
    notes: list[str],
    logs: Path,
    say: Callable[[str], None],
    wall0: float,
) -> int:
    vocab = spec.vocab_size

    def python_for(engine: str) -> str:
        return str(args.peer_python) if engine == "peer" else sys.executable

    records: dict[str, list[Json]] = {e: [] for e in engines}
    bandwidth: list[Json] = []
    loads = [os.getloadavg()[0]]
    order = ["bandwidth", *engines]
    for r in range(args.repeats):
        for engine in rotate(order, r):
            task = {"engine": engine, "threads": args.threads, "vocab": vocab, "model": models.get(engine)}
            say(f"repeat {r + 1}/{args.repeats}: {engine} ...")
            rec = run_child(
                python_for(engine), task, logs / f"{engine}.{r}.log", args.sample_ms / 1e3, args.timeout
            )
            (bandwidth if engine == "bandwidth" else records[engine]).append(rec)
            loads.append(os.getloadavg()[0])
        say(f"repeat {r + 1}/{args.repeats} done (1-min load average {loads[-1]:.1f})")

    profiles: Json = {}
    if args.profile:
        for engine in [e for e in engines if e in ONNX_ENGINES]:
            pdir = args.workdir.expanduser() / "profiles" / engine  # kept for inspection; replaced per run
            shutil.rmtree(pdir, ignore_errors=True)
            pdir.mkdir(parents=True)
            task = {
                "engine": engine,
                "threads": args.threads,
                "vocab": vocab,
                "model": models[engine],
                "profile_dir": str(pdir),
            }
            say(f"profiling {engine} ...")
            try:
                rec = run_child(
                    python_for(engine),
                    task,
                    logs / f"{engine}.profile.log",
                    args.sample_ms / 1e3,
                    args.timeout,
                )
                files = rec.get("profiles") or [str(f) for f in sorted(pdir.glob("*.json"))]
                profiles[engine] = parse_profile(files) | {"files": files}
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                notes.append(f"profile of {engine} failed: {e}")

    report = summarize(args, spec, engines, records, bandwidth, sizes, profiles, loads, notes)
    report["wall_s"] = time.perf_counter() - wall0
    if args.json:
        for note in report["notes"]:
            say(note)
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
    return 0


def summarize(
    args: argparse.Namespace,
    spec: Any,
    engines: list[str],
    records: dict[str, list[Json]],
    bandwidth: list[Json],
    sizes: dict[str, Json],
    profiles: Json,
    loads: list[float],
    notes: list[str],
) -> Json:
    cpus = os.cpu_count() or 1
    bw_key = f"gb_s_{args.threads}t"
    bw = {k: spread([b[k] for b in bandwidth]) for k in ("gb_s_1t", bw_key)}
    rep: Json = {
        "checkpoint": str(args.checkpoint),
        "num_parameters": spec.num_parameters(),
        "vocab_size": spec.vocab_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "hidden_size": spec.hidden_size,
        "prompt_len": PROMPT_LEN,
        "new_tokens": NEW_TOKENS,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpus": cpus,
        "peer_genai": str(args.peer_genai) if args.peer_genai else None,
        "read_bandwidth_gb_s": bw,
        "load_avg_1m": spread(loads),
        "engines": {},
        "ratios": {},
        "agreement_vs_transformers": {},
        "profiles": profiles,
        "notes": notes,
    }
    for engine in engines:
        recs = records[engine]
        decode = [1.0 / statistics.median(r["warm"]["steps_s"]) for r in recs]
        e: Json = {
            "load_s": spread([r["load_s"] for r in recs]),
            "decode_tok_s": spread(decode),
            "decode_tok_s_cold": spread([1.0 / statistics.median(r["cold"]["steps_s"]) for r in recs]),
            "decode_step_p90_ms": spread([_p90(r["warm"]["steps_s"]) * 1e3 for r in recs]),
            "prefill_tok_s": spread([PROMPT_LEN / r["warm"]["prefill_s"] for r in recs]),
            "ttft_ms": spread([r["warm"]["ttft_s"] * 1e3 for r in recs]),
            "ttft_cold_ms": spread([r["cold"]["ttft_s"] * 1e3 for r in recs]),
            "peak_rss_mb": spread([r["measure"]["peak_rss_mb"] for r in recs]),
            "peak_rss_anon_mb": spread([r["measure"]["peak_rss_anon_mb"] for r in recs]),
            "peak_rss_file_mb": spread([r["measure"]["peak_rss_file_mb"] for r in recs]),
            "vmhwm_end_mb": spread([r["status_end"]["VmHWM"] for r in recs]),  # the child's own high water
            "rss_after_load_mb": recs[-1]["status_after_load"],
            "decode_steps": len(recs[0]["warm"]["steps_s"]),
            "tokens": recs[0]["cold"]["tokens"],
            "tokens_identical_cold_warm": all(r["tokens_identical_cold_warm"] for r in recs),
        }
        if engine in sizes:
            e["bytes"] = sizes[engine]
        streamed = sizes[engine]["graph"]["streamed"] if engine in sizes else recs[0].get("streamed_bytes")
        e["streamed_bytes_per_token"] = streamed
        if streamed:
            achieved = streamed * e["decode_tok_s"]["median"] / 1e9
            e["achieved_gb_s"] = achieved
            e["achieved_vs_read_bw"] = achieved / bw[bw_key]["median"]
        if engine in BUNDLE_ENGINES:
            dram = sizes[engine]["decoder_weights"]
            e["achieved_gb_s_manifest_dram"] = dram * e["decode_tok_s"]["median"] / 1e9
        rep["engines"][engine] = e

    def paired(a: str, b: str, metric: Callable[[Json], float]) -> Json | None:
        if a not in records or b not in records:
            return None
        return spread([metric(x) / metric(y) for x, y in zip(records[a], records[b], strict=True)])

    def dec(r: Json) -> float:
        return 1.0 / statistics.median(r["warm"]["steps_s"])

    def pre(r: Json) -> float:
        return PROMPT_LEN / float(r["warm"]["prefill_s"])

    for ours, other in [(o, x) for o in OURS_INT4 for x in ("peer", "transformers", "fp32")]:
        for label, fn in (("decode", dec), ("prefill", pre)):
            if (v := paired(ours, other, fn)) is not None:
                rep["ratios"][f"{ours}/{other} {label} tok/s"] = v
    for key in ("peak_rss_mb", "peak_rss_anon_mb", "peak_rss_file_mb"):

        def rss(r: Json, key: str = key) -> float:
            return float(r["measure"][key]) or float("nan")

        for ours in OURS_INT4:
            if (v := paired(ours, "peer", rss)) is not None:
                rep["ratios"][f"{ours}/peer {key}"] = v
    if "transformers" in records:
        ref = rep["engines"]["transformers"]["tokens"]
        for engine in engines:
            if engine != "transformers":
                rep["agreement_vs_transformers"][engine] = agreement(rep["engines"][engine]["tokens"], ref)
    if max(loads) > cpus + 0.5:
        notes.append(
            f"WARNING: 1-min load average reached {max(loads):.1f} on {cpus} CPUs (this benchmark keeps "
            f"about {args.threads} busy itself): other processes competed for the cores; figures and "
            "even ratios are unreliable. Rerun on a quiet machine."
        )
    for engine in engines:
        if not rep["engines"][engine]["tokens_identical_cold_warm"]:
            notes.append(f"note: {engine} produced different tokens in its cold and warm runs")
    return rep


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def _fmt(s: Json | None, digits: int = 1) -> str:
    """median, and ±half the min-max range as % of the median when there are several values."""
    if not s:
        return "-"
    text = f"{s['median']:,.{digits}f}"
    if s["n"] > 1 and s["median"]:
        text += f" ±{50 * (s['max'] - s['min']) / abs(s['median']):.0f}%"
    return text


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}"


def print_report(rep: Json) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    out = Console(width=max(Console().width, 180))
    bw = rep["read_bandwidth_gb_s"]
    bw_t = bw[f"gb_s_{rep['threads']}t"]
    table = Table(
        title=escape(
            f"{rep['checkpoint']}: {rep['num_parameters'] / 1e6:.4g}M params, "
            f"{rep['num_hidden_layers']} layers, hidden {rep['hidden_size']}, vocab {rep['vocab_size']}; "
            f"prompt {rep['prompt_len']}, "
            f"{rep['new_tokens']} greedy tokens, batch 1, {rep['threads']} threads"
        ),
        caption=escape(
            f"median ±half the min-max range (% of median) of {rep['repeats']} fresh processes per engine; "
            f"read bandwidth "
            f"{_fmt(bw['gb_s_1t'], 2)} GB/s (1 thread), {_fmt(bw_t, 2)} GB/s ({rep['threads']} threads)"
        ),
    )
    cols = (
        "engine",
        "decode tok/s",
        "prefill tok/s",
        "TTFT ms",
        "load s",
        "peak RSS MiB",
        "RssAnon MiB",
        "RssFile MiB",
        "streamed MB/tok",
        "achieved GB/s (% of read bw)",
        "greedy = HF /64",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "engine" else "right", no_wrap=True)
    for name, e in rep["engines"].items():
        agree = rep["agreement_vs_transformers"].get(name)
        ach = (
            f"{e['achieved_gb_s']:.2f} ({100 * e['achieved_vs_read_bw']:.0f}%)"
            if "achieved_gb_s" in e
            else "-"
        )
        table.add_row(
            name,
            _fmt(e["decode_tok_s"]),
            _fmt(e["prefill_tok_s"]),
            _fmt(e["ttft_ms"]),
            _fmt(e["load_s"], 2),
            _fmt(e["peak_rss_mb"], 0),
            _fmt(e["peak_rss_anon_mb"], 0),
            _fmt(e["peak_rss_file_mb"], 0),
            _mb(e.get("streamed_bytes_per_token")),
            ach,
            "ref" if name == "transformers" else (f"{agree['match']}" if agree else "-"),
        )
    out.print(table)

    sizes = Table(title="bytes on disk (MB)")
    for col in (
        "engine",
        "DRAM",
        "flash",
        "total",
        "decoder weights (DRAM)",
        "streamed / token",
        "gathered (rows only)",
    ):
        sizes.add_column(col, justify="left" if col == "engine" else "right")
    for name, e in rep["engines"].items():
        b = e.get("bytes")
        if b:
            sizes.add_row(
                name,
                _mb(b.get("dram")),
                _mb(b.get("flash")),
                _mb(b["total"]),
                _mb(b.get("decoder_weights")),
                _mb(b["graph"]["streamed"]),
                _mb(b["graph"]["gathered"]),
            )
    if sizes.row_count:
        out.print(sizes)
        out.print("(the peer's folder has no DRAM/flash split: one model.onnx.data)", style="dim")

    for pair, r in rep["ratios"].items():
        out.print(f"{pair}: x{_fmt(r, 2)}")
    for name, a in rep["agreement_vs_transformers"].items():
        out.print(
            f"greedy tokens {name} vs transformers fp32: {a['match']}/{a['of']} agree, "
            f"first divergence at step {a['first_divergence']}"
        )
    for name, prof in rep["profiles"].items():
        dec, pre = prof["decode"], prof["prefill"]
        ptab = Table(
            title=escape(
                f"{name}: onnxruntime profile of the warm run (profiling adds overhead). Decode: "
                f"{dec['kernel_ms']:.2f} ms of kernels per step ({prof['decode_steps']} steps), model_run "
                f"median {dec['run_ms_median'] or 0:.2f} ms. Prefill: {pre['kernel_ms']:.1f} ms of kernels, "
                f"model_run {pre['run_ms_median'] or 0:.1f} ms"
            )
        )
        for col in ("#", "decode op", "ms/step", "share", "calls/step", "prefill op", "ms", "share "):
            ptab.add_column(col, justify="left" if "op" in col else "right")
        for i in range(min(12, max(len(dec["ops"]), len(pre["ops"])))):
            d = dec["ops"][i] if i < len(dec["ops"]) else None
            q = pre["ops"][i] if i < len(pre["ops"]) else None
            ptab.add_row(
                str(i + 1),
                *(
                    (d["op"], f"{d['ms']:.3f}", f"{100 * d['share']:.1f}%", f"{d['calls']:.0f}")
                    if d
                    else ("",) * 4
                ),
                *((q["op"], f"{q['ms']:.1f}", f"{100 * q['share']:.1f}%") if q else ("",) * 3),
            )
        out.print(ptab)
    load = rep["load_avg_1m"]
    out.print(
        f"wall {rep['wall_s']:.0f}s; 1-min load average {load['min']:.1f}-{load['max']:.1f} "
        f"on {rep['cpus']} CPUs"
    )
    for note in rep["notes"]:
        out.print(note, style="yellow", markup=False)


if __name__ == "__main__":
    sys.exit(main())
