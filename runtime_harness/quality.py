"""What quantization costs, end to end: a quantized bundle against the fp32 bundle of the same model
on held-out text, both run by onnxruntime.

Teacher-forced over windows of the text (each window a prefill, so every position's logits come
from one call): perplexity of each bundle, top-1 agreement, mean KL(fp32 || quantized), mean logit
cosine; then greedy generation of `greedy_steps` tokens from the start of each window by both, and
the fraction of positions where the two agree before their first divergence counts too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import UserError
from runtime_harness.generate import bundle_tokenizer, generate
from runtime_harness.session import BundleSession

SCHEMA = "ple-export-quality/1"


@dataclass(frozen=True)
class QualityOptions:
    text: Path
    windows: int = 8
    window_tokens: int = 128
    greedy_steps: int = 32
    prompt_tokens: int = 8


# What each recipe must meet on the trained tiny model's held-out text (measured there: int4 block 256
# asymmetric with clip search, the default: perplexity x1.021, KL 0.035, top-1 0.84, cosine 0.9958;
# block 128 asymmetric, plain RTN: x1.032, KL 0.036, top-1 0.83, cosine 0.9957; block 64
# asymmetric: x1.025, KL 0.030, top-1 0.85, cosine 0.9963; block 32
# symmetric: x1.038, KL 0.029, top-1 0.83, cosine 0.9966; int8: x1.0008, KL 0.0002,
# top-1 0.986; int8 PLE table alone: x1.0000; int4 PLE table alone: x1.0014, KL 0.0013).
@dataclass(frozen=True)
class QualityThresholds:
    max_perplexity_ratio: float
    max_mean_kl: float
    min_top1: float
    min_cosine: float


QUALITY_THRESHOLDS = {
    "int4": QualityThresholds(1.06, 0.05, 0.78, 0.99),
    "int8": QualityThresholds(1.005, 0.002, 0.97, 0.9995),
    "ple-int8": QualityThresholds(1.002, 0.0005, 0.99, 0.9999),
    "ple-int4": QualityThresholds(1.01, 0.005, 0.95, 0.999),
}


def recipe_class(recipe: dict[str, Any] | None) -> str:
    """Which thresholds apply: the decoder's weights decide; a float decoder, the PLE table."""
    recipe = recipe or {}
    if recipe.get("weights") in ("int4", "int8"):
        return str(recipe["weights"])
    if recipe.get("ple") in ("int4", "int8"):
        return f"ple-{recipe['ple']}"
    raise UserError("the bundle is not quantized: nothing to measure against fp32")


def judge(report: dict[str, Any], t: QualityThresholds) -> list[str]:
    checks = [
        (
            "perplexity_ratio",
            report["perplexity_ratio"] <= t.max_perplexity_ratio,
            "<=",
            t.max_perplexity_ratio,
        ),
        ("mean_kl", report["mean_kl"] <= t.max_mean_kl, "<=", t.max_mean_kl),
        ("top1_agreement", report["top1_agreement"] >= t.min_top1, ">=", t.min_top1),
        ("mean_cosine", report["mean_cosine"] >= t.min_cosine, ">=", t.min_cosine),
    ]
    return [f"{n} {report[n]:.5g} (must be {op} {v:g})" for n, ok, op, v in checks if not ok]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def compare(quantized: Path, reference: Path, opts: QualityOptions) -> dict[str, Any]:
    """Measure, then judge against the thresholds of the quantized bundle's recipe."""
    return finish(measure(quantized, reference, opts))


def measure(quantized: Path, reference: Path, opts: QualityOptions) -> dict[str, Any]:
    q, r = BundleSession(quantized), BundleSession(reference)
    recipe_class((q.manifest.get("quantization") or {}).get("recipe"))  # refuse an fp32 bundle early
    tok = bundle_tokenizer(r)
    if tok is None:
        raise UserError(f"{reference}: has no tokenizer.json; quality is measured on text")
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
    nll_q = nll_r = 0.0
    count = agree = 0
    kls, cosines = [], []
    greedy_agree = greedy_total = 0
    stride = len(ids) // opts.windows
    for w in range(opts.windows):
        window = bos + ids[w * stride : w * stride + body]
        x = np.array([window], dtype=np.int64)
        lq = q.forward(x, q.new_cache(1))[0, :-1]
        lr = r.forward(x, r.new_cache(1))[0, :-1]
        target = np.array(window[1:])
        pq, pr = _log_softmax(lq), _log_softmax(lr)
        pos = np.arange(len(target))
        nll_q -= float(pq[pos, target].sum())
        nll_r -= float(pr[pos, target].sum())
        count += len(target)
        agree += int((lq.argmax(-1) == lr.argmax(-1)).sum())
        kls.extend(np.sum(np.exp(pr) * (pr - pq), axis=-1).tolist())
        num = (lq.astype(np.float64) * lr).sum(-1)
        cosines.extend((num / (np.linalg.norm(lq, axis=-1) * np.linalg.norm(lr, axis=-1))).tolist())
        prompt = window[: opts.prompt_tokens]
        gq = generate(q, prompt, opts.greedy_steps, stop_at_eos=False).tokens
        gr = generate(r, prompt, opts.greedy_steps, stop_at_eos=False).tokens
        same = next((i for i, (a, b) in enumerate(zip(gq, gr, strict=True)) if a != b), len(gr))
        greedy_agree += same
        greedy_total += len(gr)
    return {
        "schema": SCHEMA,
        "quantized": str(quantized),
        "reference": str(reference),
        "text": str(opts.text),
        "tokens": count,
        "perplexity_reference": float(np.exp(nll_r / count)),
        "perplexity_quantized": float(np.exp(nll_q / count)),
        "perplexity_ratio": float(np.exp((nll_q - nll_r) / count)),
        "top1_agreement": agree / count,
        "mean_kl": float(np.mean(kls)),
        "mean_cosine": float(np.mean(cosines)),
        "greedy_agreement": greedy_agree / greedy_total,
        "recipe": (q.manifest.get("quantization") or {}).get("recipe"),
    } | _verdict((q.manifest.get("quantization") or {}).get("recipe"))


def _verdict(recipe: dict[str, Any] | None) -> dict[str, Any]:
    kind = recipe_class(recipe)
    return {"thresholds_for": kind, "thresholds": dataclasses.asdict(QUALITY_THRESHOLDS[kind])}


def finish(report: dict[str, Any]) -> dict[str, Any]:
    """The report with its verdict against the recipe's thresholds."""
    failures = judge(report, QualityThresholds(**report["thresholds"]))
    return report | {"passed": not failures, "failures": failures}
