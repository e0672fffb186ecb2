"""Text in, text out through onnxruntime alone: the bundle's tokenizer (if it has one), the one decode
loop (`runtime_harness.loop`), a sampler. Everything it needs comes from the bundle folder and its
manifest."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ple_export.bundle.format import TOKENIZER_FILE
from ple_export.bundle.manifest import Manifest
from ple_export.errors import UserError
from runtime_harness import loop
from runtime_harness.genai import GenaiModel
from runtime_harness.sampling import Sampler
from runtime_harness.session import BundleSession

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

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))


def bundle_tokenizer(bundle: Path, manifest: Manifest) -> BundleTokenizer | None:
    """The bundle's tokenizer, when it ships one."""
    return BundleTokenizer(bundle / TOKENIZER_FILE) if TOKENIZER_FILE in manifest.listed else None


def check_prompt(manifest: Manifest, prompt: Sequence[int], max_new_tokens: int) -> None:
    """A prompt the bundle can take: not empty, ids in its vocabulary, within its context."""
    if not prompt:
        raise UserError("the prompt is empty")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    vocab = manifest.generation.vocab_size
    if any(not 0 <= t < vocab for t in prompt):
        raise UserError(f"prompt token ids must be in [0, {vocab})")
    what = f"prompt ({len(prompt)} tokens) + --max-new-tokens {max_new_tokens}"
    manifest.model.check_context(len(prompt) + max_new_tokens, what)


def generate(
    session: BundleSession | GenaiModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampler: Sampler = GREEDY,
    on_token: Callable[[np.ndarray], None] | None = None,
    stop_at_eos: bool = True,
    prefill_chunk: int = loop.DEFAULT_PREFILL_CHUNK,
) -> loop.Generation:
    """`prompt` checked against the bundle, then the one loop with `sampler`'s picks (the prompt in
    chunks of `prefill_chunk` tokens; 0: one call). Records each pick's top-2 logit margin."""
    sample = sampler.picker()
    margins: list[float] = []

    def pick(logits: np.ndarray) -> np.ndarray:  # and how decided row 0's greedy choice was
        top2 = np.partition(logits[0], -2)[-2:]
        margins.append(float(top2[1] - top2[0]))
        return sample(logits)

    check_prompt(session.manifest, prompt, max_new_tokens)
    out = loop.generate(
        session, list(prompt), max_new_tokens, pick, on_token, stop_at_eos, prefill_chunk=prefill_chunk
    )
    out.margins = margins[: len(out.tokens)]
    return out
