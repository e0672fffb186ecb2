"""`ple-export`: a thin typer layer. Each command maps its flags onto an options dataclass, makes one
library call and hands the result to one printer; the work lives in exporter/, graphs/ and
runtime_harness/. Errors a user can fix print one line and exit 2 (ple_export/console.py)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

# typer 0.29 vendors click; its usage errors are not exported at the top level
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # noqa: E402

from ple_export.console import (
    NoteHandler,
    emit,
    err,
    fail,
    human,
    literal,
    out,
    parse_fraction,
    parse_ids,
    parse_size,
    progress_bars,
    user_errors,
)
from ple_export.errors import (
    EXIT_INTERRUPTED,
    EXIT_PARITY_FAILED,
    EXIT_USER_ERROR,
    UserError,
)
from ple_export.recipe_flags import recipe_from_flags, with_recipe_flags

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Export Per-Layer-Embedding language models (Gemma 4) to split ONNX bundles: "
    "the PLE table in a flash file, the decoder in DRAM.",
)


JsonFlag = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


@app.command()
def synth(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the checkpoint.")],
    preset: Annotated[str, typer.Option(help="tiny | small | e2b | e4b")] = "tiny",
    dtype: Annotated[str, typer.Option(help="bf16 | fp16 | fp32")] = "bf16",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 0,
    shard_size: Annotated[str, typer.Option(help="Maximum shard size, e.g. 2GB, 500MB.")] = "2GB",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Write a synthetic Gemma 4 checkpoint in real HF format (random, well-conditioned weights)."""
    with user_errors():
        from exporter.presets import get_preset
        from exporter.synth import synth_to_folder

        spec = get_preset(preset)
        with progress_bars(not quiet and not as_json) as progress:
            result = synth_to_folder(
                spec,
                output,
                dtype,
                seed,
                parse_size(shard_size, "--shard-size"),
                overwrite,
                lambda n, total: progress("synth", n, total),
            )
        emit(
            result,
            as_json,
            lambda: out.print(
                f"wrote {result['num_parameters'] / 1e6:,.1f}M-parameter {preset} checkpoint "
                f"({human(result['bytes'])}) to {literal(result['path'])}"
            ),
        )


@app.command()
@with_recipe_flags
def export(
    checkpoint: Annotated[Path, typer.Argument(help="HF checkpoint folder (config.json + safetensors).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle folder to create.")],
    page_size: Annotated[
        str, typer.Option(help="Alignment of the PLE table and large tensors: 16KiB, 4096, ...")
    ] = "16KiB",
    ple_dtype: Annotated[
        str, typer.Option(help="A float PLE table's dtype: checkpoint | bf16 | fp16 | fp32")
    ] = ("checkpoint"),
    recipe_flags: dict[str, Any] | None = None,  # the recipe's flags: `with_recipe_flags`
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Export a checkpoint to a bundle: embedder + PLE table (flash), decoder + weights (DRAM)."""
    with user_errors():
        from exporter.export import ExportOptions, export_bundle
        from ple_export.printers import BundleSummary, print_summary

        assert recipe_flags is not None
        opts = ExportOptions(
            page_size=parse_size(page_size, "--page-size"),
            ple_dtype=ple_dtype,
            recipe=recipe_from_flags(recipe_flags),
            overwrite=overwrite,
        )
        with progress_bars(not quiet and not as_json) as progress:
            result = export_bundle(checkpoint, output, opts, progress)
        summary = BundleSummary(result.out_dir, result.manifest, {"seconds": round(result.seconds, 2)})
        emit(
            summary.to_json(), as_json, lambda: print_summary(summary, f"exported in {result.seconds:.1f} s")
        )


@app.command()
@with_recipe_flags
def quantize(
    bundle: Annotated[Path, typer.Argument(help="An fp32 bundle (export --quant none --ple-quant none).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle folder to create.")],
    recipe_flags: dict[str, Any] | None = None,  # the recipe's flags: `with_recipe_flags`
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Re-quantize an fp32 bundle into a new one, streamed (weights never whole in memory)."""
    with user_errors():
        from exporter.quantize import quantize_bundle
        from ple_export.printers import BundleSummary, print_summary

        assert recipe_flags is not None
        recipe = recipe_from_flags(recipe_flags)
        with progress_bars(not quiet and not as_json) as progress:
            result = quantize_bundle(bundle, output, recipe, overwrite, progress)
        summary = BundleSummary(result.out_dir, result.manifest, {"seconds": round(result.seconds, 2)})
        emit(
            summary.to_json(), as_json, lambda: print_summary(summary, f"quantized in {result.seconds:.1f} s")
        )


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    reference: Annotated[Path, typer.Option(help="The checkpoint the bundle was exported from.")],
    prompts: Annotated[int, typer.Option(help="How many prompts.")] = 3,
    prompt_len: Annotated[int | None, typer.Option(help="Prompt tokens (default: window + 8).")] = None,
    steps: Annotated[int, typer.Option(help="Prefill + greedy decode steps compared per prompt.")] = 8,
    oracle: Annotated[str, typer.Option(help="ours (PyTorch re-authoring) | transformers")] = "ours",
    seed: Annotated[int, typer.Option(help="Seed of the token-id prompts (no tokenizer).")] = 0,
    max_rel_error: Annotated[
        float | None, typer.Option(help="Override: max |logit error| / max |logit|.")
    ] = None,
    min_cosine: Annotated[float | None, typer.Option(help="Override: minimum logit cosine.")] = None,
    min_top1: Annotated[float | None, typer.Option(help="Override: minimum top-1 agreement.")] = None,
    max_mean_kl: Annotated[float | None, typer.Option(help="Override: maximum mean KL (nats).")] = None,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the sha256 check of the files.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Parity of a bundle (onnxruntime) against the PyTorch reference: exit 0 pass, 3 parity failure."""
    with user_errors():
        from exporter.reference import reference_for
        from runtime_harness.verify import VerifyOptions, run_verify

        opts = VerifyOptions(
            reference=reference,
            prompts=prompts,
            prompt_len=prompt_len,
            steps=steps,
            seed=seed,
            oracle=oracle,
            check=not no_check,
            overrides={
                "max_rel_error": max_rel_error,
                "min_cosine": min_cosine,
                "min_top1": min_top1,
                "max_mean_kl": max_mean_kl,
            },
        )
        opts.validate()
        report = run_verify(bundle, opts, reference_for(reference, oracle))
        if as_json:
            sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
        _print_verify(report)
        if not report.passed:
            raise typer.Exit(EXIT_PARITY_FAILED)


def _print_verify(report: Any) -> None:
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
    err.print(
        f"verify {literal(report.bundle)} ({report.precision}) against {report.oracle} "
        f"reference, {report.prompts} prompts:",
        highlight=False,
    )
    err.print(table)
    if report.passed:
        err.print("[green]parity holds[/]")
    else:
        err.print(f"[bold red]parity failed:[/] {literal('; '.join(report.failures))}", soft_wrap=True)


@app.command()
def generate(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    prompt: Annotated[str | None, typer.Option(help="Text (through the bundle's tokenizer).")] = None,
    prompt_ids: Annotated[str | None, typer.Option(help="Token ids, comma-separated (no tokenizer).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many new tokens.")] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest (0: all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample within this probability mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    threads: Annotated[int, typer.Option(help="Decoder threads (0: onnxruntime's default).")] = 0,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the sha256 check of the files.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Generate from a prompt with onnxruntime only; text streams to stdout, tok/s to stderr."""
    with user_errors():
        from ple_export.printers import TokenStream
        from runtime_harness.generate import bundle_tokenizer
        from runtime_harness.generate import generate as run_generate
        from runtime_harness.sampling import Sampler
        from runtime_harness.session import BundleSession

        if (prompt is None) == (prompt_ids is None):
            raise UserError("give exactly one of --prompt (text) or --prompt-ids (token ids)")
        sampler = Sampler(temperature, top_k, top_p, seed)
        sampler.validate()
        session = BundleSession(bundle, threads=threads, check=not no_check, allow_spinning=False)
        tok = bundle_tokenizer(session)
        if prompt is not None:
            if tok is None:
                raise UserError(f"{bundle}: has no tokenizer.json; give --prompt-ids instead")
            ids = tok.encode(prompt)
        else:
            ids = parse_ids(str(prompt_ids), "--prompt-ids")
        stream = TokenStream(tok, prompt, shown=not as_json)
        result = run_generate(session, ids, max_new_tokens, sampler, stream)
        stream.finish(result, ids, as_json)


@app.command()
def quality(
    bundle: Annotated[Path, typer.Argument(help="A quantized bundle.")],
    reference: Annotated[Path, typer.Option(help="The fp32 bundle of the same model.")],
    text: Annotated[Path, typer.Option(help="Held-out text (UTF-8) to measure on.")],
    windows: Annotated[int, typer.Option(help="Windows of the text.")] = 8,
    window_tokens: Annotated[int, typer.Option(help="Tokens per window.")] = 128,
    as_json: JsonFlag = False,
) -> None:
    """What quantization costs on text: perplexity (fp32 vs quantized), top-1, KL, cosine, greedy
    agreement; exit 3 when the recipe's thresholds are not met."""
    with user_errors():
        from runtime_harness.quality import QualityOptions, compare

        report = compare(bundle, reference, QualityOptions(text, windows, window_tokens))
        if as_json:
            sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
        else:
            t = report.thresholds
            out.print(
                f"{report.tokens:,} tokens of {literal(report.text)}: perplexity "
                f"{report.perplexity_reference:.3f} (fp32) -> {report.perplexity_quantized:.3f} "
                f"(x{report.perplexity_ratio:.4f}, limit x{t.max_perplexity_ratio}); "
                f"top-1 {report.top1_agreement:.3f}, mean KL {report.mean_kl:.4f}, "
                f"cosine {report.mean_cosine:.4f}, greedy agreement {report.greedy_agreement:.2f}",
                highlight=False,
            )
        if not report.passed:
            fail(
                f"{bundle}: quality below the {report.thresholds_for} thresholds: "
                + "; ".join(report.failures),
                EXIT_PARITY_FAILED,
            )


@app.command()
def profile(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    device: Annotated[str, typer.Option(help="Device profile (see `ple-export devices`).")] = "pixel-8a",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length (seeded token ids).")] = 64,
    gen_tokens: Annotated[int, typer.Option(help="Timed decode steps.")] = 32,
    runs: Annotated[int, typer.Option(help="Timed runs (in one fresh process per mode).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs.")] = 1,
    threads: Annotated[int, typer.Option(help="Decoder threads (0: every CPU available).")] = 0,
    cold: Annotated[bool, typer.Option(help="Evict the PLE table before each step; count faults.")] = False,
    enforce: Annotated[bool, typer.Option(help="Run inside a memory cgroup limited to the budget.")] = False,
    budget_mb: Annotated[
        float | None, typer.Option(help="App memory budget in MiB (default: device's).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Prompt seed.")] = 0,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the sha256 check of the files.")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Write a .png/.svg/.pdf: memory, per-step latency.")
    ] = None,
    baseline: Annotated[Path | None, typer.Option(help="An earlier profile --json to compare with.")] = None,
    baseline_bundle: Annotated[
        Path | None, typer.Option(help="A base bundle, profiled in turn with it.")
    ] = None,
    rounds: Annotated[int, typer.Option(help="Paired rounds against --baseline-bundle.")] = 3,
    max_regression: Annotated[str, typer.Option(help="Allowed regression vs a baseline, e.g. 10%.")] = "10%",
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Latency and memory of a bundle as a phone would run it, against a device's memory budget.
    Exit 4 when --baseline shows a regression beyond --max-regression."""
    with user_errors():
        from ple_export.printers import print_profile
        from runtime_harness import profile as prof

        tolerance = parse_fraction(max_regression, "--max-regression")
        opts = prof.ProfileOptions(
            device=device,
            prompt_tokens=prompt_tokens,
            gen_tokens=gen_tokens,
            runs=runs,
            warmup=warmup,
            threads=threads,
            cold=cold,
            enforce=enforce,
            budget_mb=budget_mb,
            seed=seed,
            verify=not no_check,
        )
        gate = prof.Gate(baseline, baseline_bundle, rounds, tolerance)
        if plot is not None:
            prof.check_plot_path(plot)
        with progress_bars(not quiet and not as_json) as progress:
            report = prof.profile_gated(bundle, opts, gate, progress)
        if plot is not None:
            prof.plot(report, plot)
        print_profile(report, as_json)
        if report.exit_code:
            raise typer.Exit(report.exit_code)


@app.command()
def devices(as_json: JsonFlag = False) -> None:
    """The device profiles `profile` knows, every figure with its source."""
    with user_errors():
        from runtime_harness.measure.devices import list_devices, render_devices

        rows = list_devices()
        if as_json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        else:
            out.print(render_devices(rows))


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    verify: Annotated[bool, typer.Option(help="Also check every file's size and sha256.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """What went where, in bytes: flash vs DRAM, the PLE table's bytes and pages per token, what each
    graph pass did."""
    with user_errors():
        from ple_export.bundle.files import check_files, check_graph_references
        from ple_export.bundle.manifest import Manifest
        from ple_export.printers import BundleSummary, file_problems, print_summary

        manifest = Manifest.read(bundle)
        checks = check_files(bundle, manifest, verify_hashes=verify)  # refuses files that escape it
        for graph in (manifest.graphs.embedder, manifest.graphs.decoder):
            check_graph_references(bundle, manifest, graph.file)
        summary = BundleSummary(bundle, manifest)
        problems = file_problems(checks)
        if verify:
            summary.extra["verify"] = problems
        emit(summary.to_json(), as_json, lambda: print_summary(summary, None))
        if verify and problems["problems"]:
            fail(f"{bundle}: {problems['problems'][0]}")


@app.command()
def demo(
    output: Annotated[Path, typer.Argument(help="Working folder: checkpoint/ and bundle/ go inside.")] = Path(
        "ple-demo"
    ),
    prompt: Annotated[str, typer.Option(help="Text to continue (the trained model).")] = "If the file",
    synthetic: Annotated[
        bool, typer.Option(help="Use a random tiny checkpoint (synth) instead of the trained one.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing demo folder's contents.")] = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """The embedded default end to end: the shipped trained tiny Gemma 4 (or a synthetic one) ->
    int4 bundle -> verify against its PyTorch reference -> text generated by onnxruntime."""
    with user_errors():
        from ple_export.demo import DemoOptions, run_demo
        from ple_export.printers import demo_summary, print_demo

        with progress_bars(not quiet and not as_json) as progress:
            result = run_demo(DemoOptions(output, prompt, synthetic, overwrite), progress)
        summary = demo_summary(result)
        emit(summary.to_json(), as_json, lambda: print_demo(summary, result))
        report = result.parity
        if not report.passed:
            fail(f"{result.bundle}: parity failed ({'; '.join(report.failures)})", EXIT_PARITY_FAILED)


def main() -> None:
    """Console entry: usage errors become one line too (typer would draw a multi-line box)."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    logger = logging.getLogger("ple_export")
    if not any(isinstance(h, NoteHandler) for h in logger.handlers):
        logger.addHandler(NoteHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        rv = app(standalone_mode=False)
    except NoArgsIsHelpError as e:
        out.print(e.ctx.get_help() if e.ctx else "ple-export --help", highlight=False, markup=False)
        sys.exit(0)
    except UsageError as e:
        command = e.ctx.command_path if e.ctx else "ple-export"
        err.print(
            f"[bold red]error:[/] {literal(e.format_message())} (see `{literal(command)} --help`)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(EXIT_USER_ERROR)
    except typer.Abort:
        err.print("[bold red]error:[/] interrupted", highlight=False)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(rv if isinstance(rv, int) else 0)
