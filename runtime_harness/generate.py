"""Text in, text out through onnxruntime alone: the bundle's tokenizer (if it has one), the KV-cache
loop, a sampler. Everything it needs comes from the bundle folder and its manifest."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import UserError
from runtime_harness.sampling import Sampler
from runtime_harness.session import BundleSession

TOKENIZER_FILE = "tokenizer.json"
GREEDY = Sampler()


class BundleTokenizer:
    """The bundle's `tokenizer.json` through the `tokenizers` library."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - a dependency of ple-export
            raise UserError("the `tokenizers` package is needed to read tokenizer.json") from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type
            raise UserError(f"{path}: not a readable tokenizer ({str(e).splitlines()[0]})") from None

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; `special`: with the tokenizer's own additions (e.g. a leading <bos>),
        as the model saw its training text."""
        return list(self._tok.encode(text, add_special_tokens=special).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))


def bundle_tokenizer(session: BundleSession) -> BundleTokenizer | None:
    listed = {f["path"] for f in session.manifest["files"]}
    return BundleTokenizer(session.bundle / TOKENIZER_FILE) if TOKENIZER_FILE in listed else None


FAMILY_CONTEXT = {"gemma4": 131072}  # max_position_embeddings of the family's released configs


def context_length(manifest: dict[str, Any]) -> int | None:
    """Tokens the bundle may hold: the manifest's, else the family's (RoPE was trained that far)."""
    for value in (
        manifest["generation"].get("context_length"),
        manifest["model"]["spec"].get("max_position_embeddings"),
        FAMILY_CONTEXT.get(manifest["model"]["family"]),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass
class Result:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    stopped_by: str = "max_new_tokens"  # or "eos"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


def generate(
    session: BundleSession,
    prompt: list[int],
    max_new_tokens: int,
    sampler: Sampler = GREEDY,
    on_token: Callable[[int], None] | None = None,
    stop_at_eos: bool = True,
) -> Result:
    """One prefill call, then one call per new token; `on_token` sees each token as it comes."""
    sampler.validate()
    if not prompt:
        raise UserError("the prompt is empty")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    vocab = int(session.manifest["generation"].get("vocab_size") or 0)
    if vocab and any(not 0 <= t < vocab for t in prompt):
        raise UserError(f"prompt token ids must be in [0, {vocab})")
    limit = context_length(session.manifest)
    if limit is not None and len(prompt) + max_new_tokens > limit:
        raise UserError(
            f"prompt ({len(prompt)} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the bundle's "
            f"context of {limit} tokens"
        )
    rng = sampler.rng()
    result = Result(prompt=list(prompt))
    cache = session.new_cache(1)
    t0 = time.perf_counter()
    logits = session.forward(np.array([prompt], dtype=np.int64), cache, last_only=True)[:, -1]
    result.prefill_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        token = int(sampler(logits, rng)[0])
        result.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if stop_at_eos and token in session.eos_ids:
            result.stopped_by = "eos"
            break
        if step + 1 < max_new_tokens:
            logits = session.forward(np.array([[token]], dtype=np.int64), cache)[:, -1]
    result.decode_seconds = time.perf_counter() - t1
    return result
