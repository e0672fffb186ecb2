"""`ple-export`: a thin typer layer. Each command maps its flags onto an options dataclass, makes one
library call and hands the result to one printer; the work lives in exporter/, graphs/ and
runtime_harness/. Errors a user can fix print one line and exit 2 (ple_export/console.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

# typer 0.29 vendors click; its usage errors are not exported at the top level
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # noqa: E402

from ple_export import params as P
from ple_export.bundle.contract import KV_DTYPES
from ple_export.console import (
    NoteHandler,
    emit,
    err,
    fail,
    human,
    literal,
    out,
    progress_bars,
    said,
    user_errors,
)
from ple_export.errors import (
    EXIT_INTERRUPTED,
    EXIT_PARITY_FAILED,
    EXIT_USER_ERROR,
    UserError,
)
from ple_export.params import arg, opt
from ple_export.recipe_flags import recipe_from_flags, with_recipe_flags
from runtime_harness.defaults import DEFAULT_PREFILL_CHUNK, RUNTIMES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            version = metadata.version("ple-export")
        except metadata.PackageNotFoundError:  # run from a checkout
            version = "unknown (not installed)"
        out.print(f"ple-export {version}", highlight=False)
        raise typer.Exit()


@app.callback()
def _common(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Export Per-Layer-Embedding language models (Gemma 4) to split ONNX bundles: the PLE table in a
    flash file, the decoder in DRAM. Exit codes: 0 success; 2 bad input; 3 parity or quality below the
    thresholds; 4 over the memory budget or a regression; 70 a bug of ours; 130 Ctrl-C; 143 SIGTERM."""


JsonFlag = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]
QuietFlag = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars or closing notes on stderr.")
]


def _presets() -> list[str]:
    from exporter.presets import PRESETS

    return list(PRESETS)


def _devices() -> list[str]:
    from runtime_harness.measure.devices import load_devices

    return list(load_devices())


BUNDLE = P.ExistingDir("bundle")
REPORT = P.ExistingFile("profile report", (".json",))
DEVICE = P.Choice(_devices)
ORACLE = P.Choice(("ours", "transformers"))
GB = 10**9
SEED = P.Int(0, 2**32 - 1)
THREADS = P.Int(0, 256)
TOKENS = P.Int(1, 1 << 20)
SHARD = P.Size(1 << 10, 1 << 40)
PAGE = P.Size(4096, 1 << 20, power_of_two=True)
CHUNK = P.Int(0, 1 << 20)
CHUNK_HELP = "Prompt tokens per prefill call (0: the whole prompt in one call)."
RUNTIME = P.Choice(RUNTIMES)
EXPECT = P.ExistingFile("generate --json output", (".json",))
RUNTIME_HELP = "ours: our onnxruntime loop; genai: onnxruntime-genai on the bundle's model.onnx."
PLOT = P.OutputFile((".png", ".svg", ".pdf"), ("matplotlib", "pip install 'ple-export[plot]'"))


@app.command()
def synth(
    output: Annotated[Path, opt(P.OutputDir(), "Folder for the checkpoint.", "--output", "-o")],
    preset: Annotated[
        str,
        opt(
            P.Choice(_presets),
            "Model shapes: tiny | small | e2b | e4b | gemma3n-{tiny,small,e2b,e4b}.",
        ),
    ] = "tiny",
    dtype: Annotated[str, opt(P.Choice(("bf16", "fp16", "fp32")), "Weights' dtype.")] = "bf16",
    seed: Annotated[int, opt(SEED, "Random seed; same seed, same bytes.")] = 0,
    shard_size: Annotated[int, opt(SHARD, "Maximum shard size (GB = 10^9 bytes, as on the Hub).")] = 2 * GB,
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
                shard_size,
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
    checkpoint: Annotated[
        Any,  # a Path, or a Hub id (str) resolved below
        arg(
            P.CheckpointSource(),
            "HF checkpoint folder (config.json + safetensors), or a Hub id ORG/NAME[@REV].",
        ),
    ],
    output: Annotated[Path, opt(P.OutputDir(), "Bundle folder to create.", "--output", "-o")],
    page_size: Annotated[int, opt(PAGE, "Alignment of the PLE table and large tensors.")] = 16384,
    ple_dtype: Annotated[
        str, opt(P.Choice(("checkpoint", "bf16", "fp16", "fp32")), "A float PLE table's dtype.")
    ] = "checkpoint",
    kv_dtype: Annotated[
        str, opt(P.Choice(tuple(KV_DTYPES)), "KV cache dtype (fp16: half the cache's DRAM).")
    ] = "fp32",
    genai: Annotated[
        bool, typer.Option(help="Also write onnxruntime-genai's model.onnx + genai_config.json.")
    ] = True,
    genai_chunk: Annotated[
        int, opt(P.Int(1, 1 << 16), "Prefill chunk genai_config.json asks for (<= half the window).")
    ] = DEFAULT_PREFILL_CHUNK,
    recipe_flags: dict[str, Any] | None = None,  # the recipe's flags: `with_recipe_flags`
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Export a checkpoint to a bundle: embedder + PLE table (flash), decoder + weights (DRAM), and
    onnxruntime-genai's files (docs/deploy.md)."""
    with user_errors():
        from exporter.export import ExportOptions, export_bundle
        from ple_export.printers import BundleSummary, print_summary

        assert recipe_flags is not None
        checkpoint = _checkpoint(checkpoint, quiet or as_json)
        opts = ExportOptions(
            page_size=page_size,
            ple_dtype=ple_dtype,
            recipe=recipe_from_flags(recipe_flags),
            overwrite=overwrite,
            kv_dtype=KV_DTYPES[kv_dtype],
            genai=genai,
            genai_chunk=genai_chunk,
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
    bundle: Annotated[Path, arg(BUNDLE, "An fp32 bundle (export --quant none --ple-quant none).")],
    output: Annotated[Path, opt(P.OutputDir(), "Bundle folder to create.", "--output", "-o")],
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
    bundle: Annotated[Path, arg(BUNDLE, "Bundle folder.")],
    reference: Annotated[
        Any,  # a Path, a Hub id (str) resolved below, or None
        opt(
            P.CheckpointSource(),
            "The checkpoint the bundle was exported from (folder or ORG/NAME[@REV]); "
            "optional with --runtime genai (then compared with our loop only).",
        ),
    ] = None,
    prompts: Annotated[int, opt(P.Int(1, 1000), "How many prompts.")] = 3,
    prompt_len: Annotated[int | None, opt(TOKENS, "Prompt tokens (default: window + 8).")] = None,
    steps: Annotated[int, opt(P.Int(1, 4096), "Prefill + greedy decode steps compared per prompt.")] = 8,
    oracle: Annotated[str, opt(ORACLE, "ours: our PyTorch modules; transformers: *ForCausalLM.")] = "ours",
    prefill_chunk: Annotated[int, opt(CHUNK, CHUNK_HELP)] = DEFAULT_PREFILL_CHUNK,
    runtime: Annotated[str, opt(RUNTIME, RUNTIME_HELP + " Also compared with our loop.")] = "ours",
    seed: Annotated[int, opt(SEED, "Seed of the token-id prompts (no tokenizer).")] = 0,
    max_rel_error: Annotated[
        float | None, opt(P.Float(0, 1e6), "Override: max |logit error| / max |logit|.")
    ] = None,
    min_cosine: Annotated[float | None, opt(P.Float(-1, 1), "Override: minimum logit cosine.")] = None,
    min_top1: Annotated[float | None, opt(P.Float(0, 1), "Override: minimum top-1 agreement.")] = None,
    max_mean_kl: Annotated[float | None, opt(P.Float(0, 1e6), "Override: maximum mean KL (nats).")] = None,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the sha256 check of the files.")] = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Parity of a bundle (onnxruntime) against the PyTorch reference: exit 0 pass, 3 parity failure."""
    with user_errors():
        from ple_export.printers import print_verify
        from runtime_harness.verify import VerifyOptions, run_verify

        opts = VerifyOptions(
            reference=None if reference is None else _checkpoint(reference, quiet or as_json),
            prompts=prompts,
            prompt_len=prompt_len,
            steps=steps,
            seed=seed,
            oracle=oracle,
            check=not no_check,
            prefill_chunk=prefill_chunk,
            runtime=runtime,
            overrides={
                "max_rel_error": max_rel_error,
                "min_cosine": min_cosine,
                "min_top1": min_top1,
                "max_mean_kl": max_mean_kl,
            },
        )
        opts.validate()
        with progress_bars(not quiet and not as_json) as progress:
            oracle_of = None
            if opts.reference is not None:  # torch: not imported for genai against our loop
                oracle_of = _oracle(opts.reference, oracle)
            report = run_verify(bundle, opts, oracle_of, progress)
        emit(report.to_json(), as_json, lambda: print_verify(report))
        if not report.passed:
            fail(f"{bundle}: parity failed: {'; '.join(report.failures)}{report.hint()}", EXIT_PARITY_FAILED)


def _checkpoint(source: Path | str, quiet: bool) -> Path:
    """A checkpoint folder as given, or a Hub id resolved: huggingface_hub's cache, or a download."""
    if isinstance(source, Path):
        return source
    from exporter.hub import resolve

    return resolve(source, quiet=quiet)


def _oracle(reference: Path, oracle: str) -> Any:
    """verify's PyTorch reference: one line where torch is missing (the runtime-only install)."""
    try:
        from exporter.reference import reference_for
    except ImportError as e:
        raise UserError(
            f"verify --reference needs torch ({e.name} cannot be imported): install the package with its "
            "dependencies, or run `verify --runtime genai` without --reference"
        ) from None
    return reference_for(reference, oracle)


@app.command()
def generate(
    bundle: Annotated[Path, arg(BUNDLE, "Bundle folder.")],
    prompt: Annotated[str | None, opt(P.Text(), "Text (through the bundle's tokenizer).")] = None,
    prompt_ids: Annotated[Any, opt(P.Ids(), "Token ids, comma-separated (no tokenizer).")] = None,
    max_new_tokens: Annotated[int, opt(TOKENS, "Stop after this many new tokens.")] = 64,
    temperature: Annotated[float, opt(P.Float(0, 100), "0: greedy.")] = 0.0,
    top_k: Annotated[int, opt(P.Int(0, 1 << 24), "Sample among the k likeliest (0: all).")] = 0,
    top_p: Annotated[float, opt(P.Float(0, 1, lo_open=True), "Sample within this probability mass.")] = 1.0,
    seed: Annotated[int, opt(SEED, "Sampling seed.")] = 0,
    threads: Annotated[int, opt(THREADS, "Decoder threads (0: onnxruntime's default).")] = 0,
    prefill_chunk: Annotated[int, opt(CHUNK, CHUNK_HELP)] = DEFAULT_PREFILL_CHUNK,
    runtime: Annotated[str, opt(RUNTIME, RUNTIME_HELP)] = "ours",
    expect: Annotated[Path | None, opt(EXPECT, "A greedy run to agree with (exit 3 if not).")] = None,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the sha256 check of the files.")] = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Generate from a prompt with onnxruntime only (or onnxruntime-genai: --runtime genai); text
    streams to stdout, tok/s to stderr. --expect: the same greedy run elsewhere must agree."""
    with user_errors():
        from ple_export.bundle.manifest import Manifest
        from ple_export.printers import TokenStream
        from runtime_harness.compare.runs import compare_expected, expected_for
        from runtime_harness.genai import open_runtime
        from runtime_harness.generate import bundle_tokenizer, check_prompt
        from runtime_harness.generate import generate as run_generate
        from runtime_harness.sampling import Sampler

        if (prompt is None) == (prompt_ids is None):
            raise UserError("give exactly one of --prompt (text) or --prompt-ids (token ids)")
        sampler = Sampler(temperature, top_k, top_p, seed)
        sampler.validate()
        manifest = Manifest.read(bundle)
        tok = bundle_tokenizer(bundle, manifest)
        if prompt is not None:
            if tok is None:
                raise UserError(f"{bundle}: has no tokenizer.json; give --prompt-ids instead")
            ids = tok.encode(prompt)
        else:
            ids = list(prompt_ids)
        check_prompt(manifest, ids, max_new_tokens)  # before any weights are read
        expected = expected_for(expect, ids, temperature) if expect is not None else None
        session, chunk = open_runtime(bundle, runtime, threads, not no_check, prefill_chunk)
        stream = TokenStream(tok, prompt, shown=not as_json)
        result = run_generate(session, ids, max_new_tokens, sampler, stream, prefill_chunk=chunk)
        if expected is None:
            stream.finish(result, ids, as_json, quiet)
            return
        comparison = compare_expected(manifest, result.tokens, expected)
        silent = quiet or not comparison.agreed  # a failure's stderr is its one line
        stream.finish(result, ids, as_json, silent, {"expected": dataclasses.asdict(comparison)})
        line = comparison.line(str(expect))
        if not comparison.agreed:
            fail(f"{bundle}: {line}", EXIT_PARITY_FAILED)
        if not quiet:
            err.print(line, highlight=False)


@app.command()
def quality(
    bundle: Annotated[Path, arg(BUNDLE, "A quantized bundle.")],
    reference: Annotated[Path, opt(BUNDLE, "The fp32 bundle of the same model.")],
    text: Annotated[Path, opt(P.ExistingFile("text file"), "Held-out text (UTF-8) to measure on.")],
    windows: Annotated[int, opt(P.Int(1, 100_000), "Windows of the text.")] = 8,
    window_tokens: Annotated[int, opt(P.Int(2, 1 << 16), "Tokens per window.")] = 128,
    prefill_chunk: Annotated[int, opt(CHUNK, CHUNK_HELP)] = DEFAULT_PREFILL_CHUNK,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """What quantization costs on text: perplexity (fp32 vs quantized), top-1, KL, cosine, greedy
    agreement; exit 3 when the recipe's thresholds are not met."""
    with user_errors():
        from runtime_harness.quality import QualityOptions, measure, plan

        checked = plan(
            bundle, reference, QualityOptions(text, windows, window_tokens, prefill_chunk=prefill_chunk)
        )
        with progress_bars(not quiet and not as_json) as progress:
            report = measure(checked, progress)
        if as_json:
            sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
        else:
            t = report.thresholds
            out.print(
                f"{report.tokens:,} tokens of {literal(report.text)}: perplexity "
                f"{report.perplexity_reference:.3f} ({report.labels[0]}) -> "
                f"{report.perplexity_quantized:.3f} ({report.labels[1]}) "
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
    bundle: Annotated[Path, arg(BUNDLE, "Bundle folder.")],
    device: Annotated[str, opt(DEVICE, "Device profile (see `ple-export devices`).")] = "pixel-8a",
    prompt_tokens: Annotated[
        Any,  # a tuple of ints (P.Ints); typed `tuple`, typer would take several arguments
        opt(P.Ints(1, 1 << 20), "Prompt length (seeded token ids); a sweep: 128,1024,4096."),
    ] = "64",
    prefill_chunk: Annotated[
        int | None, opt(CHUNK, "Prompt tokens per prefill call (0: one call; default: the device's).")
    ] = None,
    gen_tokens: Annotated[int, opt(TOKENS, "Timed decode steps.")] = 32,
    runs: Annotated[int, opt(P.Int(1, 1000), "Timed runs (in one fresh process per mode).")] = 5,
    warmup: Annotated[int, opt(P.Int(0, 100), "Untimed warm-up runs.")] = 1,
    threads: Annotated[int, opt(THREADS, "Decoder threads (0: every CPU available).")] = 0,
    cold: Annotated[bool, typer.Option(help="Evict the PLE table before each step; count faults.")] = False,
    enforce: Annotated[bool, typer.Option(help="Run inside a memory cgroup limited to the budget.")] = False,
    budget_mb: Annotated[
        float | None, opt(P.Float(0, 1 << 24, lo_open=True), "App memory budget in MiB (default: device's).")
    ] = None,
    seed: Annotated[int, opt(SEED, "Prompt seed.")] = 0,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the sha256 check of the files.")] = False,
    plot: Annotated[Path | None, opt(PLOT, "Draw memory and per-step latency.")] = None,
    baseline: Annotated[Path | None, opt(REPORT, "An earlier profile --json to compare with.")] = None,
    baseline_bundle: Annotated[Path | None, opt(BUNDLE, "A base bundle, profiled in turn with it.")] = None,
    rounds: Annotated[int, opt(P.Int(1, 100), "Paired rounds against --baseline-bundle.")] = 3,
    max_regression: Annotated[float, opt(P.Fraction(), "Allowed regression vs a baseline, e.g. 10%.")] = 0.1,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Latency and memory of a bundle as a phone would run it, against a device's memory budget.
    Exit 4 when --baseline shows a regression beyond --max-regression."""
    with user_errors():
        from ple_export.printers import print_profile
        from runtime_harness import profile as prof

        opts = prof.ProfileOptions(
            device=device,
            prompt_tokens=prompt_tokens[-1],
            sweep=prompt_tokens[:-1],
            prefill_chunk=prefill_chunk,
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
        gate = prof.Gate(baseline, baseline_bundle, rounds, max_regression)
        with progress_bars(not quiet and not as_json) as progress:
            report = prof.profile_gated(bundle, opts, gate, progress)
        if plot is not None:
            prof.plot(report, plot)
        print_profile(report, as_json)
        if report.exit_code:
            raise typer.Exit(report.exit_code)


@app.command()
def devices(as_json: JsonFlag = False, quiet: QuietFlag = False) -> None:
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
    bundle: Annotated[Path, arg(BUNDLE, "Bundle folder.")],
    verify: Annotated[bool, typer.Option(help="Also check every file's sha256 (sizes always are).")] = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """What went where: every file (placement, bytes, sha256) checked present at its size, flash vs
    DRAM, the PLE table's pages per token, each tensor's precision and error, what each pass did.
    Exit 2 when a listed file is missing or of another size (or sha256, with --verify)."""
    with user_errors():
        from ple_export.bundle.files import check_files, check_graph_references, graph_files
        from ple_export.bundle.manifest import Manifest
        from ple_export.printers import BundleSummary, file_problems, print_summary

        manifest = Manifest.read(bundle)
        checks = check_files(bundle, manifest, verify_hashes=verify)  # refuses files that escape it
        problems = file_problems(checks, verify)
        damaged = {c.path for c in checks if c.problem}
        for file in graph_files(manifest).values():
            if file not in damaged:  # a damaged file is reported as such, not parsed
                check_graph_references(bundle, manifest, file)
        summary = BundleSummary(bundle, manifest, {"files_checked": problems}, tensors=True)
        emit(summary.to_json(), as_json, lambda: print_summary(summary, None))
        if problems["problems"]:
            fail(
                f"{bundle}: {problems['problems'][0]}"
                + (f" (and {len(problems['problems']) - 1} more)" if len(problems["problems"]) > 1 else "")
            )


@app.command()
def demo(
    output: Annotated[
        Path, arg(P.OutputDir(), "Working folder: checkpoint/ and bundle/ go inside.", "OUTPUT")
    ] = Path("ple-demo"),
    prompt: Annotated[str, opt(P.Text(), "Text to continue (the trained model).")] = "If the file",
    synthetic: Annotated[
        bool, typer.Option(help="Use a random tiny checkpoint (synth) instead of the trained one.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing demo folder's contents.")] = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """The embedded default end to end: the shipped trained tiny Gemma 4 -> int4 bundle -> verify
    against its PyTorch reference -> text generated by onnxruntime. --synthetic: a random tiny
    checkpoint, exported in fp32 (random weights' flat logits cannot judge int4) and prompted
    with token ids (it has no tokenizer)."""
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
        rv = EXIT_INTERRUPTED
    if rv == EXIT_INTERRUPTED and not said.error:
        # Ctrl-C outside a command's error handling (typer turns it into exit 130 silently), e.g.
        # while an option's value is read
        err.print("[bold red]error:[/] interrupted; no partial output was left behind", highlight=False)
    sys.exit(rv if isinstance(rv, int) else 0)
