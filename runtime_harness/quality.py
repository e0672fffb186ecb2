"""What quantization costs, end to end: a quantized bundle against the fp32 bundle of the same model
on held-out text, both run by onnxruntime.

Teacher-forced over windows of the text (each window one call, so every position's logits come from
one forward): perplexity of each bundle, top-1 agreement, mean KL(fp32 || quantized), mean logit
cosine; then greedy generation of `greedy_steps` tokens from the start of each window by both (the
one decode loop), and the fraction of positions where the two agree before their first divergence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
        """One window teacher-forced through both (every position's logits, one call each), then
        `greedy_steps` greedy tokens of each from its first `prompt_tokens`."""
        x = np.array([window], dtype=np.int64)
        lq = q.forward(x, q.new_cache(1))[0, :-1]
        lr = r.forward(x, r.new_cache(1))[0, :-1]
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
        gq = loop.generate(q, prompt, opts.greedy_steps, stop_at_eos=False).tokens
        gr = loop.generate(r, prompt, opts.greedy_steps, stop_at_eos=False).tokens
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
            f"{opts.text}: {len(ids)} tokens, need {body * opts.windows} for {opts.windows} windows"
        )
    stride = len(ids) // opts.windows
    return [bos + ids[w * stride : w * stride + body] for w in range(opts.windows)]


def compare(quantized: Path, reference: Path, opts: QualityOptions) -> QualityReport:
    """Measure, and carry the thresholds of the quantized bundle's recipe class."""
    q, r = BundleSession(quantized), BundleSession(reference)
    kind = recipe_class(q.manifest.recipe)
    if kind == "fp32":
        raise UserError("the bundle is not quantized: nothing to measure against fp32")
    tok = bundle_tokenizer(r)
    if tok is None:
        raise UserError(f"{reference}: has no tokenizer.json; quality is measured on text")
    t = _Tally()
    for window in _windows(tok, opts):
        t.window(q, r, window, opts)
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
    )
