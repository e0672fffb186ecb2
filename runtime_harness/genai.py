"""A bundle run by onnxruntime-genai (the runtime phone apps embed), as a model the one loop drives.

`export` writes `model.onnx` (the embedder spliced in front of the decoder, graph only) and
`genai_config.json` into the bundle (docs/deploy.md). `GenaiModel` opens them with onnxruntime-genai
and offers what `runtime_harness.loop` asks of a model: `new_cache` is an `og.Generator` (it owns the
KV cache), `forward` appends tokens and reads the logits of the last one. So `generate` and `verify
--runtime genai` run the same loop, picks and teacher forcing as with our own session; only the
forward is onnxruntime-genai's.

Two rules of onnxruntime-genai this follows: its tokenizer does not add `<bos>` (our loop's prompts
carry it), and a step's logits must be read before the next `append_tokens` (the loop always does).
Prompts go in chunks of the config's `search.chunk_size` (set at export: `--genai-chunk`), every
call, not only the first as onnxruntime-genai itself does. It returns the last position's logits
only (the model is pruned), so teacher-forced scoring of every position (`loop.score`, `quality`)
is not offered here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ple_export.bundle.files import trusted_bundle
from ple_export.bundle.format import GENAI_CONFIG_FILE, FileRole
from ple_export.bundle.manifest import Manifest
from ple_export.errors import UserError
from ple_export.jsonfile import read_json_object
from runtime_harness import session  # through its module: tests replace session.BundleSession
from runtime_harness.defaults import DEFAULT_PREFILL_CHUNK, RUNTIMES

__all__ = ["RUNTIMES", "GenaiModel", "check_genai_files", "import_genai", "open_runtime"]

INSTALL = "pip install 'ple-export[genai]' (onnxruntime-genai, pinned with onnxruntime)"


def import_genai() -> Any:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UserError(f"--runtime genai needs onnxruntime-genai: {INSTALL}") from None
    return og


def check_genai_files(bundle: Path, manifest: Manifest) -> None:
    """One line saying how to make the files when a bundle has none."""
    if not all(manifest.files_with(role=role) for role in (FileRole.GENAI_MODEL, FileRole.GENAI_CONFIG)):
        raise UserError(
            f"{bundle}: has no onnxruntime-genai files (model.onnx, {GENAI_CONFIG_FILE}); re-export the "
            "checkpoint with `ple-export export` without --no-genai (`quantize` keeps its source's choice)"
        )


@dataclass
class GenaiCache:
    """onnxruntime-genai's generator (it holds the KV cache) and its batch."""

    generator: Any
    batch: int


class GenaiModel:
    def __init__(self, bundle: Path, threads: int = 0, check: bool = True):
        """Open a bundle's onnxruntime-genai files after the same checks as our session (every file
        inside the folder, of its size and sha256 unless `check=False`, external data only to listed
        files). `threads`: intra-op threads (0: onnxruntime's default)."""
        self.bundle = Path(bundle)
        self.manifest = Manifest.read(self.bundle)
        check_genai_files(self.bundle, self.manifest)
        trusted_bundle(self.bundle, self.manifest, verify_hashes=check, genai=True)
        og = import_genai()
        self._og = og
        config = og.Config(str(self.bundle))
        if threads:
            options = {"intra_op_num_threads": threads, "log_id": "onnxruntime-genai"}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        try:
            self.model = og.Model(config)
        except Exception as e:  # onnxruntime-genai raises RuntimeError with onnxruntime's message
            raise UserError(
                f"{self.bundle}: onnxruntime-genai cannot load the bundle ({str(e).splitlines()[0]})"
            ) from None
        self.eos_ids = frozenset(self.manifest.generation.eos_token_ids)
        search = read_json_object(self.bundle / GENAI_CONFIG_FILE).get("search", {})
        chunk = search.get("chunk_size", 0) if isinstance(search, dict) else 0
        self.prefill_chunk = chunk if isinstance(chunk, int) and chunk > 0 else 0  # 0: none

    def chunk_for(self, prefill_chunk: int) -> int:
        """The prefill chunk a run asking for `prefill_chunk` gets: the config's. Asking for another
        than the default is refused, not ignored."""
        if prefill_chunk not in (DEFAULT_PREFILL_CHUNK, self.prefill_chunk):
            raise UserError(
                f"--prefill-chunk {prefill_chunk}: under --runtime genai prompts go in the chunks of "
                f"{GENAI_CONFIG_FILE} ({self.prefill_chunk or 'none'}); re-export with --genai-chunk"
            )
        return self.prefill_chunk

    def new_cache(self, batch: int, positions: int | None = None) -> GenaiCache:
        """A generator for at most `positions` tokens (default: the context). onnxruntime-genai sizes
        a buffer by it when the generator is made: with the default 131072 of a Gemma 4 context that
        was a 484 MiB transient on the 595M model (peak 760 MiB against 291 at 256 positions)."""
        if batch != 1:
            # measured with onnxruntime-genai 0.18.0: a batch of 2 allocates the full-attention presents
            # with length 0 on this graph (no attention_mask input) and the first run fails
            raise UserError(f"--runtime genai runs one sequence at a time (batch 1), got a batch of {batch}")
        params = self._og.GeneratorParams(self.model)
        if positions is not None:
            params.set_search_options(max_length=positions)
        return GenaiCache(self._og.Generator(self.model, params), batch)

    def forward(self, input_ids: np.ndarray, cache: GenaiCache, last_only: bool = False) -> np.ndarray:
        """Append S new tokens [B, S]; the last one's logits [B, 1, V]."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int32)
        b, s = ids.shape
        if s > 1 and not last_only:
            raise ValueError("onnxruntime-genai returns the last position's logits only")
        if b != cache.batch:
            raise ValueError(f"a cache for batch {cache.batch} got {b} rows")
        step = self.prefill_chunk or s
        for i in range(0, s, step):  # onnxruntime-genai chunks a first prompt only; we chunk every one
            cache.generator.append_tokens(ids[:, i : i + step])
            logits = cache.generator.get_logits()  # read before the next append (its rule)
        return np.asarray(logits, dtype=np.float32).reshape(b, 1, -1)


def open_runtime(
    bundle: Path, runtime: str, threads: int, check: bool, prefill_chunk: int = DEFAULT_PREFILL_CHUNK
) -> tuple[session.BundleSession | GenaiModel, int]:
    """The bundle under `runtime` (ours | genai), and the prefill chunk its runs take. Under genai the
    chunk is the config's (`export --genai-chunk`): another `prefill_chunk` than the default is
    refused, not ignored."""
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "ours":
        return session.BundleSession(
            bundle, threads=threads, check=check, allow_spinning=False
        ), prefill_chunk
    model = GenaiModel(bundle, threads, check)
    return model, model.chunk_for(prefill_chunk)
