"""How the CLI shows a bundle: what went where in bytes, the PLE table's row and page figures, the
recipe with the weight error per precision, what each graph pass did; as JSON or as a table."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from ple_export.bundle.files import FileCheck
from ple_export.bundle.format import Placement
from ple_export.bundle.manifest import Manifest, dump_record
from ple_export.console import err, human, literal, one_line, out


@dataclass(frozen=True)
class PrecisionGroup:
    tensors: int
    mean_rel_weight_error: float | None
    kept: list[str]


@dataclass
class BundleSummary:
    bundle: Path
    manifest: Manifest
    extra: dict[str, Any] = field(default_factory=dict)  # the command's own fields (seconds, checks...)
    tensors: bool = False  # show every tensor's precision (inspect)

    def by_precision(self) -> dict[str, PrecisionGroup]:
        """Tensors by precision with their mean weight error, and those the recipe kept float."""
        q = self.manifest.quantization
        groups: dict[str, tuple[int, list[float], list[str]]] = {}
        for name, t in (q.tensors if q else {}).items():
            count, errors, kept = groups.setdefault(t.precision, (0, [], []))
            if t.rel_weight_error is not None:
                errors.append(t.rel_weight_error)
            if t.kept_float_because is not None:
                kept.append(name)
            groups[t.precision] = (count + 1, errors, kept)
        return {
            p: PrecisionGroup(n, round(sum(e) / len(e), 6) if e else None, kept)
            for p, (n, e, kept) in groups.items()
        }

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        ple = m.ple
        q = m.quantization
        quantization: dict[str, Any] = {"recipe": None, "by_precision": {}}
        if q is not None:
            quantization = {
                "recipe": q.recipe.to_dict(),
                "by_precision": {
                    p: {
                        "tensors": g.tensors,
                        "kept": g.kept,
                        "mean_rel_weight_error": g.mean_rel_weight_error,
                    }
                    for p, g in self.by_precision().items()
                },
                "tensors": {name: dump_record(t) for name, t in q.tensors.items()},
            }
        return {
            "bundle": str(self.bundle),
            "model": {
                "family": m.model.family,
                "num_parameters": m.model.num_parameters,
                "layers": m.model.num_layers,
                "hidden_size": m.model.hidden_size,
                "kv_layers": [kv.layer for kv in m.kv_cache.layers],
            },
            "bytes": {
                "flash": m.bytes_in(Placement.FLASH),
                "dram": m.bytes_in(Placement.DRAM),
                "other": m.bytes_in(Placement.NONE),
            },
            "ple": {
                "dtype": ple.dtype,
                "rows": ple.rows,
                "row_bytes": ple.row_bytes,
                "page_size": ple.page_size,
                "pages_per_token": {
                    "min": ple.pages_per_token.min,
                    "mean": ple.pages_per_token.mean,
                    "max": ple.pages_per_token.max,
                },
            },
            "files": [
                {
                    "path": f.path,
                    "bytes": f.bytes,
                    "placement": str(f.placement),
                    "role": str(f.role),
                    "sha256": f.sha256,
                }
                for f in m.files
            ],
            "quantization": quantization,
            "passes": {graph: dict(counts) for graph, counts in m.passes.items()},
        } | self.extra


def print_summary(summary: BundleSummary, headline: str | None) -> None:
    m = summary.manifest
    if headline:
        out.print(f"[green]{headline}[/]: {literal(summary.bundle)}")
    table = Table(title=None, show_edge=False)
    for col in ("file", "placement", "role", "bytes", "sha256"):
        table.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
    for f in m.files:
        table.add_row(
            Text(one_line(f.path)), str(f.placement), str(f.role), human(f.bytes), f"{f.sha256[:12]}..."
        )
    out.print(table)
    out.print(
        f"flash {human(m.bytes_in(Placement.FLASH))} | DRAM {human(m.bytes_in(Placement.DRAM))} | "
        f"{m.model.num_parameters / 1e6:,.1f}M parameters, {m.model.num_layers} layers, "
        f"KV cache in {len(m.kv_cache.layers)} layers"
    )
    ple, pages = m.ple, m.ple.pages_per_token
    out.print(
        f"PLE table: {ple.rows:,} rows x {ple.row_bytes:,} B ({literal(ple.dtype)}); a token reads "
        f"{pages.min}-{pages.max} (mean {pages.mean}) page(s) of {ple.page_size // 1024} KiB"
    )
    _print_quantization(summary)
    print_passes(m.passes)
    checks = summary.extra.get("files_checked")
    if checks is not None:
        what = "sizes and sha256" if checks["sha256"] else "sizes (sha256: --verify)"
        out.print(
            f"[green]checked[/]: {checks['checked']} files present, {what} as listed"
            if not checks["problems"]
            else f"[red]{len(checks['problems'])} problem(s)[/]: " + literal("; ".join(checks["problems"]))
        )


def _print_quantization(summary: BundleSummary) -> None:
    q = summary.manifest.quantization
    if q is None:
        return
    r = q.recipe
    weights = f"weights {literal(r.weights)}"
    if r.weights != "none":  # block and zero points mean nothing for a float decoder
        weights += (
            f" (block {r.block_size}, {'symmetric' if r.symmetric else 'asymmetric'}, "
            f"{'clip search' if r.clip_search else 'round to nearest'}, "
            f"accuracy level {r.accuracy_level})"
        )
    out.print(f"recipe: {weights}, PLE table {literal(r.ple)}")
    for precision, g in sorted(summary.by_precision().items()):
        error = g.mean_rel_weight_error
        kept = f"; kept: {literal(', '.join(g.kept))}" if g.kept else ""
        out.print(
            f"  {literal(precision):>5}: {g.tensors} tensors"
            + (f", mean relative weight error {error:.4f}" if error is not None else "")
            + kept
        )
    if summary.tensors:
        table = Table(title=None, show_edge=False)
        for col in ("tensor", "precision", "op", "block", "rel. error"):
            table.add_column(
                col, justify="right" if col in ("block", "rel. error") else "left", overflow="fold"
            )
        for name, t in q.tensors.items():
            shown = "" if t.rel_weight_error is None else f"{t.rel_weight_error:.4f}"
            op = t.op if t.kept_float_because is None else f"{t.op} (kept: {t.kept_float_because})"
            table.add_row(
                Text(one_line(name)), literal(t.precision), literal(op), str(t.block_size or ""), shown
            )
        out.print(table)


def print_passes(passes: Mapping[str, Mapping[str, int]]) -> None:
    for graph, counts in passes.items():
        shown = ", ".join(f"{name} {n}" for name, n in counts.items())
        out.print(f"passes ({literal(graph)}): {literal(shown)}", highlight=False)


class TokenStream:
    """The loop's `on_token` for `generate`: text as it comes (whole characters only) or token ids, on
    stdout; then the result, as JSON or as a closing line on stderr."""

    def __init__(self, tok: Any, prompt: str | None, shown: bool):
        self.tok, self.shown = tok, shown
        self.new: list[int] = []
        # incremental detokenizing: only the tokens since the last flush are decoded, with the few
        # before them as context (a token's text depends on its neighbours: spaces, merges)
        self.prefix, self.read = 0, 0
        if shown and tok is not None:
            sys.stdout.write(prompt or "")

    def __call__(self, tokens: Any) -> None:
        token = int(tokens[0])
        self.new.append(token)
        if not self.shown:
            return
        if self.tok is None:
            sys.stdout.write(f"{token} ")
        else:
            before = self.tok.decode(self.new[self.prefix : self.read])
            text = self.tok.decode(self.new[self.prefix :])
            if len(text) > len(before) and not text.endswith("\ufffd"):  # a whole character more
                sys.stdout.write(text[len(before) :])
                self.prefix, self.read = self.read, len(self.new)
        sys.stdout.flush()

    def finish(
        self, result: Any, prompt_ids: list[int], as_json: bool, quiet: bool = False, extra: Any = None
    ) -> None:
        if as_json:
            payload = {
                "prompt_ids": prompt_ids,
                "tokens": result.tokens,
                "margins": [round(m, 5) for m in result.margins],
                "text": self.tok.decode(result.tokens) if self.tok is not None else None,
                "stopped_by": result.stopped_by,
                "prefill_seconds": round(result.prefill_seconds, 5),
                "decode_tokens_per_second": round(result.decode_tokens_per_second, 2),
            } | (extra or {})
            sys.stdout.write(json.dumps(payload, indent=2) + "\n")
            return
        sys.stdout.write("\n")
        if quiet:
            return
        err.print(
            f"{len(result.tokens)} tokens ({result.stopped_by}); prefill {len(prompt_ids)} tokens in "
            f"{result.prefill_seconds * 1e3:.1f} ms, decode {result.decode_tokens_per_second:.1f} tok/s",
            highlight=False,
        )


def demo_summary(result: Any) -> BundleSummary:
    """The demo's result (`ple_export.demo.DemoResult`) as the bundle summary plus parity and text."""
    report, gen = result.parity, result.generation
    parity = report.to_json()
    return BundleSummary(
        result.bundle,
        result.export.manifest,
        {
            "checkpoint": str(result.checkpoint),
            "seconds": round(result.export.seconds, 2),
            "parity": {k: parity[k] for k in ("precision", "passed", "failures", "summary", "thresholds")},
            "generation": {
                "prompt": result.prompt,
                "prompt_ids": result.prompt_ids,
                "tokens": gen.tokens,
                "text": result.text,
                "decode_tokens_per_second": round(gen.decode_tokens_per_second, 1),
            },
        },
    )


def print_demo(summary: BundleSummary, result: Any) -> None:
    report, gen = result.parity, result.generation
    print_summary(summary, f"exported in {result.export.seconds:.1f} s")
    s = report.summary
    verdict = "[green]parity holds[/]" if report.passed else "[bold red]parity failed[/]"
    out.print(
        f"verify ({report.precision} vs PyTorch fp32): {verdict}; cosine >= {s.min_cosine:.4f}, "
        f"top-1 {s.top1_agreement:.2f}, mean KL {s.mean_kl:.3g}"
    )
    out.print("onnxruntime:")
    if result.text is not None:  # the model's text as it is, newlines included (Text: no markup)
        out.print(Text(result.prompt) + Text(result.text, style="bold"), soft_wrap=True)
    else:
        out.print(str(gen.tokens))
    out.print(f"  {len(gen.tokens)} tokens at {gen.decode_tokens_per_second:,.0f} tok/s on this toy model")
    prompt = (
        "--prompt '...'"
        if result.text is not None
        else f"--prompt-ids {','.join(map(str, result.prompt_ids))}"
    )
    out.print(
        f"next: ple-export generate {literal(result.bundle)} {prompt}; "
        f"ple-export profile {literal(result.bundle)} --device pixel-8a"
    )


def print_profile(report: Any, as_json: bool) -> None:
    """A `ProfileReport`: its JSON on stdout, or its table; regressions and an over-budget verdict on
    stderr either way."""
    from runtime_harness.profile import render_table

    if as_json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        out.print(render_table(report))
    if report.versus is not None:
        from runtime_harness.profile.versus import describe

        err.print(literal(describe(report.versus)), highlight=False, soft_wrap=True)
    for line in report.regressions:
        err.print(f"[bold red]regression:[/] {literal(line)}", soft_wrap=True)
    if not report.verdict.fits:
        err.print(f"[bold red]over budget:[/] {literal(report.verdict.summary)}", soft_wrap=True)


def file_problems(checks: list[FileCheck], sha256: bool) -> dict[str, Any]:
    problems = [f"{c.path} {c.problem}" for c in checks if c.problem]
    return {"checked": len(checks), "sha256": sha256, "problems": problems}


def print_verify(report: Any) -> None:
    s, t = report.summary, report.thresholds
    table = Table(title=None, show_edge=False)
    for col in ("metric", "measured", "threshold"):
        table.add_column(col)
    rows = [
        ("max relative logit error", f"{s.max_rel_error:.3g}", f"<= {t.max_rel_error:g}"),
        ("min cosine", f"{s.min_cosine:.6f}", f">= {t.min_cosine:g}"),
        ("top-1 agreement (unambiguous)", f"{s.top1_agreement_unambiguous:.3f}", f">= {t.min_top1:g}"),
        ("top-1 agreement (all)", f"{s.top1_agreement:.3f}", ""),
        ("mean KL (nats)", f"{s.mean_kl:.3g}", f"<= {t.max_mean_kl:g}"),
        ("mean top-k overlap", f"{s.mean_topk_overlap:.3f}", f">= {t.min_topk_overlap:g}"),
        ("near-tie steps", f"{s.ambiguous_steps}/{s.steps}", f"margin < {t.near_tie:g}"),
    ]
    for row in rows:
        table.add_row(*row)
    out.print(
        f"verify {literal(report.bundle)} ({report.precision}; {report.thresholds_for} thresholds; "
        f"{'onnxruntime-genai' if report.runtime == 'genai' else 'our loop'}) against "
        f"{'our loop' if report.reference is None else report.oracle + ' reference'}, "
        f"{report.prompts} prompts:",
        highlight=False,
    )
    out.print(table)
    a = report.agreement
    if a is not None:
        out.print(
            f"onnxruntime-genai against our loop over {a.steps} steps: "
            f"{'same' if a.same_top1 else '[bold red]different[/]'} top-1 at every step, max logit "
            f"difference {a.max_abs_logit_diff:.3g} ({a.max_rel_logit_diff:.3g} of the scale)",
            highlight=False,
        )
    out.print("[green]parity holds[/]" if report.passed else "[bold red]parity failed[/]")
