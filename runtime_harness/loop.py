"""The one decode loop: prefill, then one step per new token, for any model with a KV cache.

    prefill(model, ids, cache, chunk) prompt [B, S] -> logits of its last position [B, V]
    score(model, ids, cache, chunk)   prompt [B, S] -> logits of every position [B, S, V]
    decode_one(model, tokens, cache)  tokens [B]    -> logits [B, V]
    generate(model, prompt, n, ...)   prefill + pick, then n - 1 x (decode_one + pick)

`generate` is what `generate`, `verify`, `quality`, `profile`'s worker, the demo and the benchmarks
run (as gpt-fast's `generate.py`: prefill / decode_one_token / decode_n_tokens / generate). A model
is anything with `new_cache`, `forward` and `eos_ids`: a bundle (`BundleSession`), or a PyTorch
engine of the benchmarks. A `StepHook` sees each forward call: before it (e.g. to evict the PLE
table) and after it, with its time and logits. Timings: `prefill_seconds` is the prompt's forward,
`first_token_seconds` adds the first pick (time to first token), `step_seconds` hold each later
token's forward + pick; decode tok/s is their count over their sum.

A prompt goes in chunks of `chunk` tokens (0: in one call), each over the cache the previous ones
filled, as phone runtimes prefill (onnxruntime-genai's `chunk_size`, LiteRT-LM's prefill signatures).
One call over S tokens holds every layer's attention scores [heads, S, P + S] at once: a 4096-token
prompt took 3.9 GB on a 595M model whose int4 weights are 170 MB. In chunks of C the scores are
[heads, C, P + C], and a sliding layer's past is capped at its window, so working memory is
O(C x context) for full layers and O(C x window) for sliding ones; the logits are the same within
float noise (tests/test_chunked_prefill.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from runtime_harness.defaults import DEFAULT_PREFILL_CHUNK

Pick = Callable[[np.ndarray], np.ndarray]  # logits [B, V] -> token ids [B]


class LanguageModel(Protocol):
    eos_ids: frozenset[int]

    def new_cache(self, batch: int, positions: int | None = None) -> Any: ...  # positions: at most

    def forward(self, input_ids: np.ndarray, cache: Any, last_only: bool = False) -> np.ndarray: ...


class StepHook(Protocol):
    def before(self, step: int) -> None: ...  # step 0: the prefill

    def after(self, step: int, seconds: float, logits: np.ndarray) -> None: ...


def greedy(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(-1)


def decode_rate(step_seconds: Sequence[float]) -> float:
    """Decode tokens per second of a run: its steps over their summed time (as llama-bench's tg)."""
    total = sum(step_seconds)
    return len(step_seconds) / total if total > 0 else 0.0


@dataclass
class Generation:
    prompt: np.ndarray  # [B, S]
    rows: list[list[int]]  # [B][new tokens]
    stopped_by: str = "max_new_tokens"  # or "eos"
    prefill_seconds: float = 0.0
    first_token_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    step_logits: list[np.ndarray] = field(default_factory=list)  # [B, V] per token, when kept
    margins: list[float] = field(default_factory=list)  # row 0's top-1 - top-2 logit per pick, when asked

    @property
    def tokens(self) -> list[int]:
        """The new tokens of the first (for batch 1: the only) row."""
        return self.rows[0]

    @property
    def decode_seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def decode_tokens_per_second(self) -> float:
        return decode_rate(self.step_seconds)


def _chunks(prompt: np.ndarray, chunk: int) -> list[np.ndarray]:
    ids = np.ascontiguousarray(prompt, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"a prompt is [batch, tokens] with at least one token, got shape {ids.shape}")
    if chunk < 0:
        raise ValueError(f"chunk must be 0 (one call) or positive, got {chunk}")
    step = chunk or ids.shape[1]
    return [ids[:, i : i + step] for i in range(0, ids.shape[1], step)]


def prefill(
    model: LanguageModel, prompt: np.ndarray, cache: Any, chunk: int = DEFAULT_PREFILL_CHUNK
) -> np.ndarray:
    """The prompt [B, S] into `cache`, `chunk` tokens per call (0: one call); the logits of its last
    position [B, V] (each call asks for its last position's only: the LM head runs once per chunk)."""
    for part in _chunks(prompt, chunk):
        logits = model.forward(part, cache, last_only=True)
    return logits[:, -1]


def score(
    model: LanguageModel, prompt: np.ndarray, cache: Any, chunk: int = DEFAULT_PREFILL_CHUNK
) -> np.ndarray:
    """Every position's logits [B, S, V] of the prompt [B, S] (teacher forcing), `chunk` tokens per
    call: what perplexity and parity read."""
    return np.concatenate([model.forward(part, cache) for part in _chunks(prompt, chunk)], axis=1)


def decode_one(model: LanguageModel, tokens: np.ndarray, cache: Any) -> np.ndarray:
    """One new token per row [B]; its logits [B, V]."""
    return model.forward(np.asarray(tokens, dtype=np.int64).reshape(-1, 1), cache)[:, -1]


class _NoHook:
    def before(self, step: int) -> None:
        pass

    def after(self, step: int, seconds: float, logits: np.ndarray) -> None:
        pass


def generate(
    model: LanguageModel,
    prompt: Sequence[int] | np.ndarray,
    max_new_tokens: int,
    pick: Pick = greedy,
    on_token: Callable[[np.ndarray], None] | None = None,
    stop_at_eos: bool = True,
    hook: StepHook | None = None,
    keep_logits: bool = False,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Generation:
    """Prefill `prompt` ([S] or [B, S]) in chunks of `prefill_chunk` tokens (0: one call), then
    decode until `max_new_tokens` or, with `stop_at_eos`, until every row has produced an EOS token.
    `on_token` sees each step's tokens [B] as they come (outside the timed region)."""
    ids = np.asarray(prompt, dtype=np.int64)
    ids = ids[None] if ids.ndim == 1 else ids
    hook = hook or _NoHook()
    out = Generation(prompt=ids, rows=[[] for _ in range(ids.shape[0])])
    cache = model.new_cache(ids.shape[0], positions=ids.shape[1] + max_new_tokens)
    hook.before(0)
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache, prefill_chunk)
    out.prefill_seconds = time.perf_counter() - t0
    tokens = pick(logits)
    out.first_token_seconds = time.perf_counter() - t0
    hook.after(0, out.first_token_seconds, logits)
    for step in range(1, max_new_tokens + 1):
        if keep_logits:
            out.step_logits.append(logits)
        for row, token in zip(out.rows, tokens.tolist(), strict=True):
            row.append(int(token))
        if on_token is not None:
            on_token(tokens)
        if stop_at_eos and all(row[-1] in model.eos_ids for row in out.rows):
            out.stopped_by = "eos"
            break
        if step == max_new_tokens:
            break
        hook.before(step)
        t = time.perf_counter()
        logits = decode_one(model, tokens, cache)
        tokens = pick(logits)
        seconds = time.perf_counter() - t
        out.step_seconds.append(seconds)
        hook.after(step, seconds, logits)
    return out
