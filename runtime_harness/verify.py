"""`verify`: run a bundle with onnxruntime against a reference built from its checkpoint.

For a few prompts longer than the sliding window (text through the bundle's tokenizer when it has
one, seeded token ids otherwise) the reference generates greedily; the bundle is fed the same tokens
(teacher forcing: the one decode loop with the reference's token as its pick), so every step
compares the two on the same context. Per step: max abs and relative logit error, cosine, top-1
agreement, top-k overlap, KL(reference || bundle), and whether a top-1 disagreement is a near-tie
(the reference's top-2 margin below `near_tie`: ambiguous, not failed). Thresholds depend on the
bundle's recipe class (`compare/thresholds.py`); any can be overridden.

The reference is handed in (`Reference`): this module imports no torch. The CLI builds ours
(`exporter.reference`) or transformers' (`--oracle transformers`). With `--runtime genai` and no
checkpoint, our own onnxruntime loop is the reference (`our_loop`): onnxruntime-genai against it.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ple_export.bundle.manifest import Manifest
from ple_export.errors import UserError
from runtime_harness import loop
from runtime_harness.compare.judge import judge, overridden
from runtime_harness.compare.metrics import StepMetrics, step_metrics
from runtime_harness.compare.thresholds import PARITY, Parity, recipe_class
from runtime_harness.genai import RUNTIMES, GenaiModel
from runtime_harness.generate import bundle_tokenizer
from runtime_harness.session import BundleSession

SCHEMA = "ple-export-verify/1"
FLAT_ENTROPY = 0.8  # measured: random synthetic weights 0.92, the trained tiny model 0.55-0.58
ORACLES = ("ours", "transformers")
# onnxruntime-genai runs the same graph and kernels: measured 0.0 on every bundle kind when both take
# the same chunks; 1e-5 of the logit scale is float noise (a reordered reduction), not a second model
GENAI_MAX_REL = 1e-5

PROMPT_TEXTS = (
    "The river bank was quiet in the early morning, and the water moved slowly past the reeds.",
    "Once upon a time there was a small town at the edge of a great forest, where people",
    "In the beginning the committee met every week to discuss the plans for the new library and",
)

Progress = Callable[[str, int, int], None]
Forward = Callable[[list[int]], np.ndarray]  # new token ids -> the last one's logits [V] (keeps its cache)
Reference = Callable[[], Forward]  # a fresh sequence of the reference model
# builds the reference once the bundle is open (it checks the reference is the bundle's model)
ReferenceFor = Callable[[Manifest], Reference]


@dataclass
class VerifyOptions:
    reference: Path | None  # None: our own loop is the reference (--runtime genai only)
    prompts: int = 3
    prompt_len: int | None = None  # default: sliding window + 8, at least 16
    steps: int = 8  # prefill + steps - 1 decode steps
    seed: int = 0
    oracle: str = "ours"  # ours | transformers
    top_k: int = 5
    threads: int = 0
    check: bool = True
    prefill_chunk: int = loop.DEFAULT_PREFILL_CHUNK  # the bundle's prompt in chunks (0: one call)
    runtime: str = "ours"  # ours | genai: onnxruntime-genai on the bundle's model.onnx
    overrides: dict[str, float | None] = field(default_factory=dict)

    def validate(self) -> None:
        if self.prompts < 1 or self.steps < 1:
            raise UserError("--prompts and --steps must be at least 1")
        if self.oracle not in ORACLES:
            raise UserError(f"--oracle must be ours or transformers, got {self.oracle!r}")
        if self.runtime not in RUNTIMES:
            raise UserError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.reference is None and (self.runtime != "genai" or self.oracle != "ours"):
            raise UserError(
                "verify needs --reference CHECKPOINT (the checkpoint the bundle was exported from); "
                "only --runtime genai runs without one, against our own onnxruntime loop"
            )


@dataclass(frozen=True)
class Summary:
    steps: int
    ambiguous_steps: int
    max_rel_error: float
    max_abs_error: float
    min_cosine: float
    top1_agreement: float
    top1_agreement_unambiguous: float
    mean_kl: float
    max_kl: float
    mean_topk_overlap: float
    reference_entropy: float  # median over steps; near 1: the reference's logits are flat

    @classmethod
    def of(cls, steps: list[StepMetrics]) -> Summary:
        decided = [s for s in steps if not s.ambiguous]
        return cls(
            steps=len(steps),
            ambiguous_steps=len(steps) - len(decided),
            max_rel_error=max(s.max_rel_error for s in steps),
            max_abs_error=max(s.max_abs_error for s in steps),
            min_cosine=min(s.cosine for s in steps),
            top1_agreement=sum(s.top1_agree for s in steps) / len(steps),
            top1_agreement_unambiguous=(sum(s.top1_agree for s in decided) / len(decided))
            if decided
            else 1.0,
            mean_kl=sum(s.kl for s in steps) / len(steps),
            max_kl=max(s.kl for s in steps),
            mean_topk_overlap=sum(s.topk_overlap for s in steps) / len(steps),
            reference_entropy=statistics.median(s.reference_entropy for s in steps),
        )


@dataclass(frozen=True)
class PromptRun:
    prompt_tokens: int
    reference_tokens: list[int]
    steps: list[StepMetrics]


@dataclass(frozen=True)
class Agreement:
    """onnxruntime-genai against our own loop on the same bundle, fed the same tokens."""

    runtime: str
    steps: int
    same_top1: bool  # every step's argmax the same
    max_abs_logit_diff: float
    max_rel_logit_diff: float  # over the step's max |logit|
    max_rel_allowed: float = GENAI_MAX_REL

    @property
    def holds(self) -> bool:
        return self.same_top1 and self.max_rel_logit_diff <= self.max_rel_allowed


@dataclass(frozen=True)
class VerifyReport:
    bundle: Path
    reference: Path | None  # None: our own loop (`our_loop`)
    oracle: str
    precision: str  # the bundle's coarsest precision
    prompts: str  # "text" or "ids"
    thresholds_for: str  # the class whose thresholds apply (`recipe_class`: e.g. int4, kv-fp16)
    thresholds: Parity
    summary: Summary
    failures: list[str]
    runs: list[PromptRun]
    runtime: str = "ours"
    agreement: Agreement | None = None  # --runtime genai: against our loop

    @property
    def passed(self) -> bool:
        return not self.failures

    def hint(self) -> str:
        """What a failure against a flat reference means (random weights make flat logits, whose
        top-1 flips on any noise: a quantized bundle cannot follow them)."""
        if self.passed or self.precision == "fp32" or self.summary.reference_entropy < FLAT_ENTROPY:
            return ""
        return (
            f" (the reference's logits are nearly flat, median entropy {self.summary.reference_entropy:.2f}"
            " of uniform's: random weights? A quantized bundle cannot follow noise; verify an fp32 export,"
            " --quant none --ple-quant none, or a trained checkpoint)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "bundle": str(self.bundle),
            "reference": None if self.reference is None else str(self.reference),
            "oracle": self.oracle,
            "precision": self.precision,
            "prompts": self.prompts,
            "thresholds_for": self.thresholds_for,
            "thresholds": dataclasses.asdict(self.thresholds),
            "summary": dataclasses.asdict(self.summary),
            "passed": self.passed,
            "failures": self.failures,
            "runtime": self.runtime,
            "agreement_with_our_loop": None if self.agreement is None else dataclasses.asdict(self.agreement),
            "runs": [dataclasses.asdict(run) for run in self.runs],
        }


def _prompts(session: BundleSession, opts: VerifyOptions) -> tuple[str, list[list[int]]]:
    vocab = session.manifest.generation.vocab_size
    length = opts.prompt_len or max(16, (session.manifest.kv_cache.sliding_window or 8) + 8)
    tok = bundle_tokenizer(session.bundle, session.manifest)
    if tok is not None:
        prompts = []
        for i in range(opts.prompts):
            text = PROMPT_TEXTS[i % len(PROMPT_TEXTS)]
            ids = tok.encode(text)
            while 0 < len(ids) < length:
                ids += tok.encode(" " + text, special=False)
            if ids:
                prompts.append(ids[:length])
        if prompts:
            return "text", prompts
    rng = np.random.RandomState(opts.seed)
    low = 3 if vocab > 3 else 0
    return "ids", [rng.randint(low, vocab, length).tolist() for _ in range(opts.prompts)]


class _Teacher:
    """The loop's pick: compares the bundle's logits with the reference's for the same context, then
    answers the reference's greedy token, which both are fed next."""

    def __init__(self, reference: Forward, prompt: list[int], steps: int, k: int, near_tie: float):
        self.reference, self.steps, self.k, self.near_tie = reference, steps, k, near_tie
        self.expected = reference(prompt)
        self.metrics: list[StepMetrics] = []
        self.tokens: list[int] = []
        self.seen: list[np.ndarray] = []  # the reference's logits [V], step by step

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        self.metrics.append(step_metrics(logits[0], self.expected, self.k, self.near_tie))
        self.seen.append(self.expected)
        token = int(self.expected.argmax())
        self.tokens.append(token)
        if len(self.tokens) < self.steps:
            self.expected = self.reference([token])
        return np.array([token])


def our_loop(session: BundleSession, chunk: int) -> Reference:
    """Our own onnxruntime loop as the reference: fresh sequences of the bundle, each prompt in
    `chunk`-token calls (what `verify --runtime genai` compares with when given no checkpoint)."""

    def fresh() -> Forward:
        cache = session.new_cache(1)
        return lambda ids: loop.prefill(session, np.array([ids], dtype=np.int64), cache, chunk)[0]

    return fresh


def run_verify(
    bundle: Path, opts: VerifyOptions, reference_for: ReferenceFor | None, progress: Progress | None = None
) -> VerifyReport:
    """`reference_for` None: our own loop is the reference (`--runtime genai` without a checkpoint)."""
    opts.validate()
    if opts.prompt_len is not None:  # before the session: nothing is read for a prompt that cannot fit
        Manifest.read(bundle).model.check_context(opts.prompt_len + opts.steps, "--prompt-len + --steps")
    session = BundleSession(bundle, threads=opts.threads, check=opts.check)
    genai = GenaiModel(bundle, opts.threads, opts.check) if opts.runtime == "genai" else None
    chunk = opts.prefill_chunk if genai is None else genai.chunk_for(opts.prefill_chunk)
    kind = recipe_class(session.manifest.recipe, session.manifest.kv_cache.dtype)
    thresholds = overridden(PARITY[kind], **opts.overrides)
    prompts_kind, prompts = _prompts(session, opts)
    reference = our_loop(session, chunk) if reference_for is None else reference_for(session.manifest)
    runs: list[PromptRun] = []
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for prompt in prompts:
        teacher = _Teacher(reference(), prompt, opts.steps, opts.top_k, thresholds.near_tie)
        run = loop.generate(
            genai or session,
            prompt,
            opts.steps,
            teacher,
            stop_at_eos=False,
            prefill_chunk=chunk,
            keep_logits=genai is not None,
        )
        runs.append(PromptRun(len(prompt), teacher.tokens, teacher.metrics))
        if genai is not None and reference_for is None:  # our loop was the reference
            pairs += [(e[None], g) for e, g in zip(teacher.seen, run.step_logits, strict=True)]
        elif genai is not None:  # our loop fed the same tokens in the same chunks
            ours = loop.generate(
                session,
                prompt,
                opts.steps,
                _Replay(teacher.tokens),
                stop_at_eos=False,
                prefill_chunk=chunk,
                keep_logits=True,
            )
            pairs += zip(ours.step_logits, run.step_logits, strict=True)
        if progress is not None:
            progress("verify", 1, len(prompts))
    summary = Summary.of([s for run in runs for s in run.steps])
    agreement = _agreement(opts.runtime, pairs) if genai is not None else None
    return VerifyReport(
        bundle=bundle,
        reference=opts.reference,
        oracle=opts.oracle if reference_for is not None else "our-loop",
        precision=session.manifest.precision,
        prompts=prompts_kind,
        thresholds_for=kind,
        thresholds=thresholds,
        summary=summary,
        failures=judge(thresholds, summary) + _disagreement(agreement),
        runs=runs,
        runtime=opts.runtime,
        agreement=agreement,
    )


def _disagreement(agreement: Agreement | None) -> list[str]:
    if agreement is None or agreement.holds:
        return []
    return [
        f"onnxruntime-genai differs from our loop: same top-1 {agreement.same_top1}, max relative "
        f"logit difference {agreement.max_rel_logit_diff:.3g} > {agreement.max_rel_allowed:g}"
    ]


class _Replay:
    """A pick that answers the given tokens in turn (our loop fed what another runtime was fed)."""

    def __init__(self, tokens: list[int]):
        self.tokens = iter(tokens)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return np.array([next(self.tokens)])


def _agreement(runtime: str, pairs: list[tuple[np.ndarray, np.ndarray]]) -> Agreement:
    """Our loop's logits (first) against the other runtime's (second), step by step."""
    abs_diff = [float(np.abs(a - b).max()) for a, b in pairs]
    rel = [d / max(float(np.abs(a).max()), 1e-30) for d, (a, _) in zip(abs_diff, pairs, strict=True)]
    same = all(np.array_equal(a.argmax(-1), b.argmax(-1)) for a, b in pairs)
    return Agreement(runtime, len(pairs), same, max(abs_diff), max(rel))
