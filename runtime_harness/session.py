"""Run a bundle with onnxruntime, reading nothing but manifest.json to wire it up.

ids -> embedder.onnx -> per_layer_inputs -+
ids, positions, past KV ------------------+-> decoder.onnx -> logits, present KV (fed back)
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ple_export.bundle.files import trusted_bundle
from ple_export.bundle.format import MANIFEST_FILE, MS_DOMAIN, Role
from ple_export.bundle.manifest import Manifest
from ple_export.errors import UserError
from runtime_harness.kv_rows import KVRows
from runtime_harness.measure import memory

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
_FIRST_ROOM = 256  # a growing layer's first buffer when the caller plans no length
# bundles exported with onnxruntime's GroupQueryAttention (before the written-out attention of
# exporter/gemma4.py) refuse S > 1 new tokens over a non-empty cache for batch > 1
_GQA = f"{MS_DOMAIN}::GroupQueryAttention"


_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _options(
    threads: int, level: ort.GraphOptimizationLevel, allow_spinning: bool, profile_dir: str | None, part: str
) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if profile_dir:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / part)
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # no BFC arena: tensors come from malloc and go back after each run. With the arena, anon RSS grew
    # by ~100 MiB over a 128-token prefill + 64 steps on the 595M model (the prefill's logits and the
    # KV shapes that change every step), and decode was ~6% slower (measured interleaved, 12.6 vs
    # 11.8 ms/step)
    opts.enable_cpu_mem_arena = False
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


@dataclass
class KVCache:
    """Past keys/values by decoder input name (what the next call is fed), plus how many positions
    the sequence has consumed. A format 4 bundle's are views of `rows`, which the presents (the new
    positions) are appended to; an earlier bundle's presents are the whole caches, fed back."""

    tensors: dict[str, np.ndarray]
    position: int = 0
    rows: dict[str, KVRows] = field(default_factory=dict)


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
        self.manifest = Manifest.read(self.bundle)
        facts = trusted_bundle(self.bundle, self.manifest, verify_hashes=check)
        graphs = self.manifest.graphs
        self._rows_one_by_one = _GQA in facts["decoder"].op_types
        emb_threads = 1 if embedder_threads is None else embedder_threads
        self.options: dict[str, object] = {
            "threads": threads,
            "embedder_threads": emb_threads,
            "allow_spinning": allow_spinning,
            "graph_optimization": graph_optimization,
        }
        level = _LEVELS[graph_optimization]
        self.embedder = self._load(
            graphs.embedder.file, _options(emb_threads, level, allow_spinning, profile_dir, "embedder")
        )
        self.decoder = self._load(
            graphs.decoder.file, _options(threads, level, allow_spinning, profile_dir, "decoder")
        )
        self.ple_advised = 0
        self.lookup_seconds = 0.0
        if ple_random_access and sys.platform.startswith("linux"):
            ple_file = self.bundle / self.manifest.ple.file
            with contextlib.suppress(OSError):  # advice only
                self.ple_advised = memory.advise_random(ple_file)
        self.options["ple_random_access"] = bool(self.ple_advised)
        try:
            self._wire()
        except (KeyError, StopIteration, TypeError, ValueError) as e:
            raise UserError(
                f"{self.bundle / MANIFEST_FILE}: graph inputs/outputs do not wire up "
                f"({type(e).__name__}: {e}); not a bundle this runtime can run"
            ) from None

    def _load(self, graph: str, options: ort.SessionOptions) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(self.bundle / graph), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise UserError(
                f"{self.bundle}: onnxruntime cannot load the bundle ({str(e).splitlines()[0]})"
            ) from None

    def _wire(self) -> None:
        """Map the manifest's I/O roles onto the graphs, and check they are the graphs' own names."""
        graphs = self.manifest.graphs
        for sess, side, listed in (
            (self.decoder, "inputs", graphs.decoder.inputs),
            (self.decoder, "outputs", graphs.decoder.outputs),
            (self.embedder, "inputs", graphs.embedder.inputs),
        ):
            actual = {v.name for v in (sess.get_inputs() if side == "inputs" else sess.get_outputs())}
            if {t.name for t in listed} != actual:
                raise ValueError(f"the manifest's {side} are not the graph's")
        decoder = graphs.decoder
        self._present_to_past = decoder.kv_pairs()  # present_* output -> past_* input, by role and layer

        def name(io: Any) -> str:
            if io is None:
                raise KeyError("a decoder input or output role is missing")
            return str(io.name)

        self._ids = name(decoder.input(Role.INPUT_IDS))
        self._pli = name(decoder.input(Role.PER_LAYER_INPUTS))
        self._positions = name(decoder.input(Role.POSITION_IDS))
        # format 1 bundles have no logits_positions input: their decoder returns every position's logits
        lp = decoder.input(Role.LOGITS_POSITIONS)
        self._logits_positions: str | None = lp.name if lp is not None else None
        self._output_names = [t.name for t in decoder.outputs]
        self._logits = name(decoder.output(Role.LOGITS))
        self._kv_inputs = decoder.kv_inputs()
        max_length = {kv.layer: kv.max_length for kv in self.manifest.kv_cache.layers}
        self._keep = {t.name: max_length[int(t.layer)] for t in self._kv_inputs}  # type: ignore[arg-type]
        for t in self._kv_inputs:
            _, heads, _, head_dim = t.shape
            if t.dtype not in _NP_DTYPES or not all(isinstance(x, int) for x in (heads, head_dim)):
                raise ValueError(f"{t.name}: dtype or shape unusable")
        self.eos_ids = frozenset(self.manifest.generation.eos_token_ids)
        self._embedder_ids = name(graphs.embedder.input(Role.INPUT_IDS))

    def new_cache(self, batch: int, positions: int | None = None) -> KVCache:
        """Empty pasts. `positions`: how many the sequence will take at most (a growing layer's
        buffer is that long; it doubles when a sequence goes past it)."""
        cache = KVCache({})
        for t in self._kv_inputs:
            _, heads, _, head_dim = t.shape
            dtype = np.dtype(_NP_DTYPES[t.dtype])
            if self.manifest.appends_kv:
                keep = self._keep[t.name]
                rows = KVRows(batch, int(heads), int(head_dim), dtype, keep, positions or _FIRST_ROOM)
                cache.rows[t.name] = rows
                cache.tensors[t.name] = rows.view()
            else:
                cache.tensors[t.name] = np.zeros((batch, int(heads), 0, int(head_dim)), dtype=dtype)
        return cache

    def per_layer_inputs(self, input_ids: np.ndarray) -> np.ndarray:
        """The PLE lookup (the embedder); its time adds up in `lookup_seconds` (where flash faults land)."""
        t = time.perf_counter()
        out = self.embedder.run(None, {self._embedder_ids: input_ids})[0]
        self.lookup_seconds += time.perf_counter() - t
        return out

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
        if self._rows_one_by_one and b > 1 and s > 1 and cache.position > 0:
            # a GroupQueryAttention bundle takes a chunk over a non-empty cache one batch row at a time
            def row(r: int) -> dict[str, Any]:  # logits_positions has no batch axis
                return {k: v if k == self._logits_positions else v[r : r + 1] for k, v in feeds.items()}

            rows = [self.decoder.run(names, row(r)) for r in range(b)]
            results = [np.concatenate(parts, axis=0) for parts in zip(*rows, strict=True)]
        else:
            results = self.decoder.run(names, feeds)
        outputs = dict(zip(names, results, strict=True))
        for present, past in self._present_to_past.items():
            if cache.rows:  # the new positions, appended in place
                cache.rows[past].append(outputs[present])
                cache.tensors[past] = cache.rows[past].view()
            else:  # format 3 and before: the whole cache
                cache.tensors[past] = outputs[present]
        cache.position += s
        logits = outputs[self._logits]
        return logits[:, -1:] if last_only and self._logits_positions is None else logits
