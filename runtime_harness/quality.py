"""What quantization costs, end to end: a quantized bundle against the fp32 bundle of the same model
on held-out text, both run by onnxruntime.

Teacher-forced over windows of the text (each window in chunks of `prefill_chunk` tokens, as a
prompt is run): perplexity of each bundle, top-1 agreement, mean KL(fp32 || quantized), mean logit
cosine; then greedy generation of `greedy_steps` tokens from the start of each window by both (the
one decode loop), and the fraction of positions where the two agree before their first divergence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ple_export.bundle.manifest import Manifest
from ple_export.errors import UserError
from runtime_harness import loop
from runtime_harness.compare.judge import judge
from runtime_harness.compare.metrics import log_softmax, position_cosine, position_kl
from runtime_harness.compare.thresholds import QUALITY, Quality, recipe_class
from runtime_harness.generate import bundle_tokenizer
from runtime_harness.session import BundleSession

SCHEMA = "ple-export-quality/1"


@dataclass(frozen=True)
class QualityOptions:
    text: Path
    windows: int = 8
    window_tokens: int = 128
    greedy_steps: int = 32
    prompt_tokens: int = 8
    prefill_chunk: int = loop.DEFAULT_PREFILL_CHUNK


@dataclass(frozen=True)
class QualityReport:
    quantized: Path
    reference: Path
    text: Path
    tokens: int
    perplexity_reference: float
    perplexity_quantized: float
    perplexity_ratio: float
    top1_agreement: float
    mean_kl: float
    mean_cosine: float
    greedy_agreement: float
    recipe: dict[str, Any]
    thresholds_for: str  # the recipe class whose thresholds apply
    thresholds: Quality
    labels: tuple[str, str]  # (reference, quantized), from their manifests

    @property
    def failures(self) -> list[str]:
        return judge(self.thresholds, self, digits=5)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "quantized": str(self.quantized),
            "reference": str(self.reference),
            "text": str(self.text),
            "tokens": self.tokens,
            "perplexity_reference": self.perplexity_reference,
            "perplexity_quantized": self.perplexity_quantized,
            "perplexity_ratio": self.perplexity_ratio,
            "top1_agreement": self.top1_agreement,
            "mean_kl": self.mean_kl,
            "mean_cosine": self.mean_cosine,
            "greedy_agreement": self.greedy_agreement,
            "recipe": self.recipe,
            "thresholds_for": self.thresholds_for,
            "thresholds": dataclasses.asdict(self.thresholds),
            "reference_label": self.labels[0],
            "quantized_label": self.labels[1],
            "passed": self.passed,
            "failures": self.failures,
        }


@dataclass
class _Tally:
    """Running sums over the windows of the text."""

    nll_q: float = 0.0
    nll_r: float = 0.0
    count: int = 0
    agree: int = 0
    kls: list[float] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)
    greedy_agree: int = 0
    greedy_total: int = 0

    def window(self, q: BundleSession, r: BundleSession, window: list[int], opts: QualityOptions) -> None:
        """One window teacher-forced through both (every position's logits, in chunks), then
        `greedy_steps` greedy tokens of each from its first `prompt_tokens`."""
        x = np.array([window], dtype=np.int64)
        lq = loop.score(q, x, q.new_cache(1), opts.prefill_chunk)[0, :-1]
        lr = loop.score(r, x, r.new_cache(1), opts.prefill_chunk)[0, :-1]
        target = np.array(window[1:])
        pq, pr = log_softmax(lq), log_softmax(lr)
        pos = np.arange(len(target))
        self.nll_q -= float(pq[pos, target].sum())
        self.nll_r -= float(pr[pos, target].sum())
        self.count += len(target)
        self.agree += int((lq.argmax(-1) == lr.argmax(-1)).sum())
        self.kls.extend(position_kl(pr, pq).tolist())
        self.cosines.extend(position_cosine(lq, lr).tolist())
        prompt = window[: opts.prompt_tokens]
        chunk = opts.prefill_chunk
        gq = loop.generate(q, prompt, opts.greedy_steps, stop_at_eos=False, prefill_chunk=chunk).tokens
        gr = loop.generate(r, prompt, opts.greedy_steps, stop_at_eos=False, prefill_chunk=chunk).tokens
        self.greedy_agree += next((i for i, (a, b) in enumerate(zip(gq, gr, strict=True)) if a != b), len(gr))
        self.greedy_total += len(gr)


def _windows(tok: Any, opts: QualityOptions) -> list[list[int]]:
    """`opts.windows` windows of the text, spread over it, each led by the tokenizer's own <bos>."""
    try:
        text = opts.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{opts.text}: cannot read the text ({e})") from None
    ids = tok.encode(text, special=False)
    bos = tok.encode("", special=True)
    body = opts.window_tokens - len(bos)
    if len(ids) < body * opts.windows:
        raise UserError(
            f"{opts.text}: {len(ids)} tokens, but --windows {opts.windows} x --window-tokens "
            f"{opts.window_tokens} need {body * opts.windows} (ask for fewer or shorter windows)"
        )
    stride = len(ids) // opts.windows
    return [bos + ids[w * stride : w * stride + body] for w in range(opts.windows)]


def label(manifest: Manifest) -> str:
    """What a bundle's numbers are, from its manifest.

    E.g. `int4 decoder, int8 PLE` or `fp32 decoder, bfloat16 PLE` (`, float16 KV` for a half cache).
    """
    weights = manifest.recipe.weights
    kv = "" if manifest.kv_cache.dtype == "float32" else f", {manifest.kv_cache.dtype} KV"
    return f"{'fp32' if weights == 'none' else weights} decoder, {manifest.ple.dtype} PLE{kv}"


def _check_reference(ref: Manifest, quantized: Manifest, path: Path) -> None:
    """The reference must be a float bundle of the same model: nothing else compares."""
    if ref.recipe.weights != "none" or ref.recipe.ple != "none" or ref.kv_cache.dtype != "float32":
        raise UserError(
            f"{path}: a quantized bundle ({label(ref)}); --reference must be the float bundle of the same "
            "model (export --quant none --ple-quant none, KV cache fp32)"
        )
    mine, theirs = quantized.model, ref.model
    differing = sorted(k for k in set(mine.spec) | set(theirs.spec) if mine.spec.get(k) != theirs.spec.get(k))
    if mine.family != theirs.family or differing:
        what = ", ".join(differing[:4]) or "family"
        raise UserError(f"{path}: not a bundle of the same model (its spec differs in {what})")


@dataclass(frozen=True)
class QualityPlan:
    """What `measure` will compare, every input checked (no weights read yet)."""

    quantized: Path
    reference: Path
    opts: QualityOptions
    kind: str  # the quantized bundle's recipe class: its thresholds
    windows: list[list[int]]
    labels: tuple[str, str]


def plan(quantized: Path, reference: Path, opts: QualityOptions) -> QualityPlan:
    """Check the two bundles and the text from their manifests and tokenizer alone."""
    qm, rm = Manifest.read(quantized), Manifest.read(reference)
    kind = recipe_class(qm.recipe, qm.kv_cache.dtype)
    if kind == "fp32":
        raise UserError(f"{quantized}: the bundle is not quantized: nothing to measure against fp32")
    _check_reference(rm, qm, reference)
    longest = max(opts.window_tokens, opts.prompt_tokens + opts.greedy_steps)
    qm.model.check_context(longest, "--window-tokens" if longest == opts.window_tokens else "the greedy runs")
    tok = bundle_tokenizer(reference, rm)
    if tok is None:
        raise UserError(f"{reference}: has no tokenizer.json; quality is measured on text")
    return QualityPlan(quantized, reference, opts, kind, _windows(tok, opts), (label(rm), label(qm)))


def compare(
    quantized: Path,
    reference: Path,
    opts: QualityOptions,
    progress: Callable[[str, int, int], None] | None = None,
) -> QualityReport:
    """Measure, and carry the thresholds of the quantized bundle's recipe class."""
    return measure(plan(quantized, reference, opts), progress)


def measure(p: QualityPlan, progress: Callable[[str, int, int], None] | None = None) -> QualityReport:
    """Both bundles through onnxruntime over the plan's windows."""
    q, r = BundleSession(p.quantized), BundleSession(p.reference)
    quantized, reference, opts, kind = p.quantized, p.reference, p.opts, p.kind
    t = _Tally()
    for window in p.windows:
        t.window(q, r, window, opts)
        if progress is not None:
            progress("quality", 1, opts.windows)
    return QualityReport(
        quantized=quantized,
        reference=reference,
        text=opts.text,
        tokens=t.count,
        perplexity_reference=float(np.exp(t.nll_r / t.count)),
        perplexity_quantized=float(np.exp(t.nll_q / t.count)),
        perplexity_ratio=float(np.exp((t.nll_q - t.nll_r) / t.count)),
        top1_agreement=t.agree / t.count,
        mean_kl=float(np.mean(t.kls)),
        mean_cosine=float(np.mean(t.cosines)),
        greedy_agreement=t.greedy_agree / t.greedy_total,
        recipe=q.manifest.recipe.to_dict(),
        thresholds_for=kind,
        thresholds=QUALITY[kind],
        labels=p.labels,
    )
