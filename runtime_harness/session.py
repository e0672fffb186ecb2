"""Run a bundle with onnxruntime, reading nothing but manifest.json to wire it up.

ids -> embedder.onnx -> per_layer_inputs -+
ids, positions, past KV ------------------+-> decoder.onnx -> logits, present KV (fed back)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from exporter import manifest as manifest_mod
from exporter.bundle_files import trusted_bundle
from exporter.errors import UserError
from runtime_harness import memory

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


@dataclass
class KVCache:
    """Past keys/values by decoder input name, plus how many positions the sequence has consumed."""

    tensors: dict[str, np.ndarray]
    position: int = 0


@dataclass
class Generation:
    tokens: list[list[int]]  # [B][new tokens]
    step_logits: list[np.ndarray] = field(
        default_factory=list
    )  # prefill's last position, then each decode step


class BundleSession:
    def __init__(
        self,
        bundle: Path,
        threads: int = 0,
        graph_optimization: str = "all",
        check: bool = True,
        allow_spinning: bool = True,
        embedder_threads: int | None = None,
        ple_random_access: bool = True,
        profile_dir: str | None = None,
    ):
        """Open a bundle from its manifest. Before any onnxruntime session exists, every file is
        checked to be inside the bundle (no symlink, hard link or external-data reference out of it)
        and, unless `check=False`, of the manifest's size and sha256.

        `threads`: the decoder's intra-op threads (0: onnxruntime's default). `allow_spinning=False`
        stops idle pool threads spinning after each call (they burn a core otherwise: what a phone
        wants). `embedder_threads`: the lookup's threads (default 1: a few rows need no pool, and
        waking one cost 0.15-0.4 ms a decode step on the 595M model, measured).
        `ple_random_access`: advise the kernel (Linux `MADV_RANDOM`) that onnxruntime's mapping of
        the PLE table is read at random, so a lookup faults in its row's pages rather than a
        read-around window (measured: 8 KiB of table per uncached token instead of 128 KiB).
        `profile_dir`: onnxruntime profiling on, files `embedder*.json` / `decoder*.json` there."""
        self.bundle = Path(bundle)
        self.manifest = manifest_mod.load(self.bundle)
        trusted_bundle(self.bundle, self.manifest, verify_hashes=check)
        graphs = self.manifest["graphs"]
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }

        def options(n_threads: int, part: str) -> ort.SessionOptions:
            opts = ort.SessionOptions()
            if profile_dir:
                opts.enable_profiling = True
                opts.profile_file_prefix = str(Path(profile_dir) / part)
            opts.graph_optimization_level = levels[graph_optimization]
            opts.intra_op_num_threads = n_threads
            opts.log_severity_level = 3
            # no BFC arena: tensors come from malloc and go back after each run. With the arena, anon
            # RSS grew by ~100 MiB over a 128-token prefill + 64 steps on the 595M model (the prefill's
            # logits and the KV shapes that change every step), and decode was ~6% slower (measured
            # interleaved, 12.6 vs 11.8 ms/step)
            opts.enable_cpu_mem_arena = False
            if not allow_spinning:
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return opts

        emb_threads = 1 if embedder_threads is None else embedder_threads
        self.options: dict[str, object] = {
            "threads": threads,
            "embedder_threads": emb_threads,
            "allow_spinning": allow_spinning,
            "graph_optimization": graph_optimization,
        }
        emb_opts, dec_opts = options(emb_threads, "embedder"), options(threads, "decoder")
        try:
            self.embedder = ort.InferenceSession(
                str(self.bundle / graphs["embedder"]["file"]), emb_opts, providers=["CPUExecutionProvider"]
            )
            self.decoder = ort.InferenceSession(
                str(self.bundle / graphs["decoder"]["file"]), dec_opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise UserError(
                f"{self.bundle}: onnxruntime cannot load the bundle ({str(e).splitlines()[0]})"
            ) from None
        self.ple_advised = 0
        if ple_random_access and sys.platform.startswith("linux"):
            ple_file = self.bundle / str(self.manifest.get("ple", {}).get("file", "ple_table.data"))
            with contextlib.suppress(OSError):  # advice only
                self.ple_advised = memory.advise_random(ple_file)
        self.options["ple_random_access"] = bool(self.ple_advised)
        try:
            self._wire(graphs)
        except (KeyError, StopIteration, TypeError, ValueError) as e:
            raise UserError(
                f"{self.bundle / 'manifest.json'}: graph inputs/outputs do not wire up "
                f"({type(e).__name__}: {e}); not a bundle this runtime can run"
            ) from None

    def _wire(self, graphs: dict[str, Any]) -> None:
        """Map the manifest's I/O roles onto the graphs, and check they are the graphs' own names."""
        self._dec_inputs = graphs["decoder"]["inputs"]
        self._dec_outputs = graphs["decoder"]["outputs"]
        for sess, side, listed in (
            (self.decoder, "inputs", self._dec_inputs),
            (self.decoder, "outputs", self._dec_outputs),
            (self.embedder, "inputs", graphs["embedder"]["inputs"]),
        ):
            actual = {v.name for v in (sess.get_inputs() if side == "inputs" else sess.get_outputs())}
            if {d["name"] for d in listed} != actual:
                raise ValueError(f"the manifest's {side} are not the graph's")
        # present_* output name -> past_* input name, matched by role and layer
        past = {
            (d["role"].removeprefix("past_"), d["layer"]): d["name"]
            for d in self._dec_inputs
            if d["role"] in ("past_key", "past_value")
        }
        self._present_to_past = {
            d["name"]: past[(d["role"].removeprefix("present_"), d["layer"])]
            for d in self._dec_outputs
            if d["role"] in ("present_key", "present_value")
        }
        # names by role, looked up once here rather than on every step
        roles = {d["role"]: d["name"] for d in self._dec_inputs if "layer" not in d}
        self._ids, self._pli, self._positions = (
            roles[r] for r in ("input_ids", "per_layer_inputs", "position_ids")
        )
        # format 1 bundles have no logits_positions input: their decoder returns every position's logits
        self._logits_positions: str | None = roles.get("logits_positions")
        self._output_names = [d["name"] for d in self._dec_outputs]
        self._logits = next(d["name"] for d in self._dec_outputs if d["role"] == "logits")
        for d in self._dec_inputs:
            if d["role"] in ("past_key", "past_value"):
                _, heads, _, head_dim = d["shape"]
                if d["dtype"] not in _NP_DTYPES or not all(isinstance(x, int) for x in (heads, head_dim)):
                    raise ValueError(f"{d['name']}: dtype or shape unusable")
        self.eos_ids = set(self.manifest["generation"]["eos_token_ids"])
        self._embedder_ids = next(d["name"] for d in graphs["embedder"]["inputs"] if d["role"] == "input_ids")

    def new_cache(self, batch: int) -> KVCache:
        tensors = {}
        for d in self._dec_inputs:
            if d["role"] in ("past_key", "past_value"):
                _, heads, _, head_dim = d["shape"]
                tensors[d["name"]] = np.zeros((batch, heads, 0, head_dim), dtype=_NP_DTYPES[d["dtype"]])
        return KVCache(tensors)

    def per_layer_inputs(self, input_ids: np.ndarray) -> np.ndarray:
        return self.embedder.run(None, {self._embedder_ids: input_ids})[0]

    def forward(self, input_ids: np.ndarray, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Run S new tokens [B, S] through the model; returns logits [B, S, V] (`last_only`: the
        last token's, [B, 1, V]) and advances `cache`. A prefill that only samples the next token
        wants `last_only`: the LM head then runs for one position, not S (format 2 bundles)."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        b, s = input_ids.shape
        positions = np.broadcast_to(np.arange(cache.position, cache.position + s, dtype=np.int64), (b, s))
        feeds: dict[str, Any] = {
            self._ids: input_ids,
            self._pli: self.per_layer_inputs(input_ids),
            self._positions: np.ascontiguousarray(positions),
            **cache.tensors,
        }
        if self._logits_positions is not None:
            feeds[self._logits_positions] = np.array([s - 1] if last_only else range(s), dtype=np.int64)
        names = self._output_names
        if b > 1 and s > 1 and cache.position > 0:
            # bundles exported with onnxruntime's GroupQueryAttention (before the explicit attention
            # of exporter/gemma4.py) take S > 1 new tokens over a non-empty cache (a chunked
            # prefill) one batch row at a time: run the rows one by one (right for any bundle)
            def row(r: int) -> dict[str, Any]:  # logits_positions has no batch axis
                return {k: v if k == self._logits_positions else v[r : r + 1] for k, v in feeds.items()}

            rows = [self.decoder.run(names, row(r)) for r in range(b)]
            results = [np.concatenate(parts, axis=0) for parts in zip(*rows, strict=True)]
        else:
            results = self.decoder.run(names, feeds)
        outputs = dict(zip(names, results, strict=True))
        cache.tensors = {
            self._present_to_past[n]: v for n, v in outputs.items() if n in self._present_to_past
        }
        cache.position += s
        logits = outputs[self._logits]
        return logits[:, -1:] if last_only and self._logits_positions is None else logits

    def generate(self, prompt: np.ndarray, max_new_tokens: int, stop_at_eos: bool = True) -> Generation:
        """Greedy decoding: one prefill call, then one call per new token."""
        cache = self.new_cache(prompt.shape[0])
        gen = Generation(tokens=[[] for _ in range(prompt.shape[0])])
        for logits in self.stream_logits(prompt, max_new_tokens, cache):
            gen.step_logits.append(logits)
            nxt = logits.argmax(-1)
            for row, tok in zip(gen.tokens, nxt, strict=True):
                row.append(int(tok))
            if stop_at_eos and all(row[-1] in self.eos_ids for row in gen.tokens):
                break
        return gen

    def stream_logits(self, prompt: np.ndarray, max_new_tokens: int, cache: KVCache) -> Iterator[np.ndarray]:
        logits = self.forward(prompt, cache, last_only=True)[:, -1]
        for step in range(max_new_tokens):
            yield logits
            if step + 1 < max_new_tokens:
                logits = self.forward(logits.argmax(-1)[:, None], cache)[:, -1]
