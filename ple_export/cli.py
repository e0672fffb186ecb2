"""`ple-export`: a thin typer layer. Flags map onto the config dataclasses; the work lives in
exporter/ and runtime_harness/. Errors a user can fix print one line and exit 2."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from inspect import Parameter, signature
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

# typer 0.29 vendors click; its usage errors are not exported at the top level
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # noqa: E402

from exporter.errors import Terminated, UserError, os_error
from graphs.recipe import QuantRecipe

_DEFAULT_RECIPE = QuantRecipe()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Export Per-Layer-Embedding language models (Gemma 4) to split ONNX bundles: "
    "the PLE table in a flash file, the decoder in DRAM.",
)
err = Console(stderr=True)
out = Console()

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 70  # a bug of ours (EX_SOFTWARE); PLE_EXPORT_DEBUG=1 shows the traceback
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def one_line(text: object) -> str:
    """Control characters spelled out (a path with a newline still prints on one line)."""
    return str(text).translate(_CONTROL)


def literal(text: object) -> str:
    """User-controlled text (paths, tensor names, manifest fields) for console markup: one line,
    shown as is (rich markup escaped, control characters spelled out)."""
    return escape(one_line(text))


def _fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    err.print(f"[bold red]error:[/] {literal(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class _NoteHandler(logging.Handler):
    """The library's notices (`ple_export` logger), e.g. a stale staging folder removed."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"[yellow]note:[/] {literal(record.getMessage())}", highlight=False, soft_wrap=True)


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except UserError as e:
        _fail(str(e))
    except OSError as e:
        _fail(str(os_error(e)))
    except KeyboardInterrupt:
        _fail("interrupted; no partial output was left behind", EXIT_INTERRUPTED)
    except Terminated:
        _fail("terminated; no partial output was left behind", EXIT_TERMINATED)
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:
        if os.environ.get("PLE_EXPORT_DEBUG"):
            raise
        first = (str(e).splitlines() or [""])[0]
        _fail(
            f"internal error ({type(e).__name__}: {first}); this is a bug in ple-export, "
            "rerun with PLE_EXPORT_DEBUG=1 for the traceback",
            EXIT_INTERNAL,
        )


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar per stage on stderr (bytes, or steps for "tracing"); silent when disabled or
    not a terminal."""
    if not enabled or not err.is_terminal:
        yield lambda stage, n, total: None
        return
    bars = Progress(
        TextColumn("{task.description:>12}"),
        BarColumn(),
        TextColumn("{task.fields[amount]:>22}"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, Any] = {}
    steps = {"tracing": "graphs", "warm": "runs", "cold": "runs", "enforced": "runs"}  # not bytes

    def update(stage: str, n: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total, amount="")
        bars.advance(tasks[stage], n)
        done = bars.tasks[tasks[stage]].completed
        amount = f"{done:.0f}/{total} {steps[stage]}" if stage in steps else f"{_human(done)}/{_human(total)}"
        bars.update(tasks[stage], amount=amount)

    with bars:
        yield update


def _emit(payload: dict[str, Any], as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        human()


JsonFlag = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


QuantFlag = Annotated[str, typer.Option(help="Decoder Linear weights: int4 | int8 | none (fp32)")]
BlockFlag = Annotated[int, typer.Option(help="Quantization block along K: 16..256, a power of two")]
SymmetricFlag = Annotated[
    bool, typer.Option("--symmetric/--asymmetric", help="Decoder weights without or with zero points")
]
PleSymmetricFlag = Annotated[
    bool, typer.Option("--ple-symmetric/--ple-asymmetric", help="PLE table without or with zero points")
]
ClipSearchFlag = Annotated[
    bool,
    typer.Option(
        "--clip-search/--no-clip-search",
        help="Shrink each block's range to its least-error clip (off: plain round-to-nearest)",
    ),
]
AccuracyFlag = Annotated[
    int, typer.Option(help="MatMulNBits compute type: 0 (fp32), 1, 4 (int8 compute: fastest on CPU)")
]
PleQuantFlag = Annotated[str, typer.Option(help="PLE table: int8 | int4 | none (float, see --ple-dtype)")]
PleBlockFlag = Annotated[
    int | None, typer.Option(help="PLE quantization block (default: the PLE width for int8, 32 for int4)")
]
KeepFlag = Annotated[
    str | None, typer.Option(help="Tensors kept in fp32, e.g. fp32:ple_gate,ple_proj (names or globs)")
]


# the quantization recipe's flags, shared by `export` and `quantize` (see `_with_recipe_flags`)
_RECIPE_FLAGS: tuple[tuple[str, Any, Any], ...] = (
    ("quant", QuantFlag, _DEFAULT_RECIPE.weights),
    ("block_size", BlockFlag, _DEFAULT_RECIPE.block_size),
    ("symmetric", SymmetricFlag, _DEFAULT_RECIPE.symmetric),
    ("clip_search", ClipSearchFlag, _DEFAULT_RECIPE.clip_search),
    ("accuracy_level", AccuracyFlag, _DEFAULT_RECIPE.accuracy_level),
    ("ple_quant", PleQuantFlag, _DEFAULT_RECIPE.ple),
    ("ple_block_size", PleBlockFlag, _DEFAULT_RECIPE.ple_block_size),
    ("ple_symmetric", PleSymmetricFlag, _DEFAULT_RECIPE.ple_symmetric),
    ("keep", KeepFlag, None),
)


def _with_recipe_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the recipe's flags in place of its `recipe_flags` parameter; it receives
    them as that one dict, for `_recipe` to turn into a QuantRecipe inside its error handling."""
    sig = signature(command, eval_str=True)
    params: list[Parameter] = []
    for p in sig.parameters.values():
        if p.name != "recipe_flags":
            params.append(p)
            continue
        for name, annotation, default in _RECIPE_FLAGS:
            params.append(Parameter(name, p.kind, default=default, annotation=annotation))

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        flags = {name: kwargs.pop(name) for name, _, _ in _RECIPE_FLAGS}
        command(**kwargs, recipe_flags=flags)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def _recipe(flags: dict[str, Any]) -> QuantRecipe:
    from graphs.recipe import parse_keep

    return QuantRecipe(
        weights=flags["quant"],
        block_size=flags["block_size"],
        symmetric=flags["symmetric"],
        accuracy_level=flags["accuracy_level"],
        ple=flags["ple_quant"],
        ple_block_size=flags["ple_block_size"],
        ple_symmetric=flags["ple_symmetric"],
        keep=parse_keep(flags["keep"]),
        clip_search=flags["clip_search"],
    )


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
    with _user_errors():
        from exporter.spec import get_preset
        from exporter.synth import synth_to_folder

        spec = get_preset(preset)
        with _progress(not quiet and not as_json) as progress:
            result = synth_to_folder(
                spec,
                output,
                dtype,
                seed,
                _parse_size(shard_size, "--shard-size"),
                overwrite,
                lambda n, total: progress("synth", n, total),
            )
        _emit(
            result,
            as_json,
            lambda: out.print(
                f"wrote {result['num_parameters'] / 1e6:,.1f}M-parameter {preset} checkpoint "
                f"({_human(result['bytes'])}) to {literal(result['path'])}"
            ),
        )


@app.command()
@_with_recipe_flags
def export(
    checkpoint: Annotated[Path, typer.Argument(help="HF checkpoint folder (config.json + safetensors).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle folder to create.")],
    page_size: Annotated[
        str, typer.Option(help="Alignment of the PLE table and large tensors: 16KiB, 4096, ...")
    ] = "16KiB",
    ple_dtype: Annotated[
        str, typer.Option(help="A float PLE table's dtype: checkpoint | bf16 | fp16 | fp32")
    ] = ("checkpoint"),
    recipe_flags: dict[str, Any] | None = None,  # the recipe's flags: `_with_recipe_flags`
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Export a checkpoint to a bundle: embedder + PLE table (flash), decoder + weights (DRAM)."""
    with _user_errors():
        from exporter.export import ExportOptions, export_bundle

        assert recipe_flags is not None
        recipe = _recipe(recipe_flags)
        opts = ExportOptions(
            page_size=_parse_size(page_size, "--page-size"),
            ple_dtype=ple_dtype,
            recipe=recipe,
            overwrite=overwrite,
        )
        with _progress(not quiet and not as_json) as progress:
            result = export_bundle(checkpoint, output, opts, progress)
        summary = _bundle_summary(result.out_dir, result.manifest) | {"seconds": round(result.seconds, 2)}
        _emit(summary, as_json, lambda: _print_summary(summary, f"exported in {result.seconds:.1f} s"))


@app.command()
@_with_recipe_flags
def quantize(
    bundle: Annotated[Path, typer.Argument(help="An fp32 bundle (export --quant none --ple-quant none).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle folder to create.")],
    recipe_flags: dict[str, Any] | None = None,  # the recipe's flags: `_with_recipe_flags`
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Re-quantize an fp32 bundle into a new one, streamed (weights never whole in memory)."""
    with _user_errors():
        from exporter.quantize import quantize_bundle

        assert recipe_flags is not None
        recipe = _recipe(recipe_flags)
        with _progress(not quiet and not as_json) as progress:
            result = quantize_bundle(bundle, output, recipe, overwrite, progress)
        summary = _bundle_summary(result.out_dir, result.manifest) | {"seconds": round(result.seconds, 2)}
        _emit(summary, as_json, lambda: _print_summary(summary, f"quantized in {result.seconds:.1f} s"))


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
    with _user_errors():
        from runtime_harness.verify import EXIT_PARITY_FAILED, VerifyOptions, run_verify

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
        report = run_verify(bundle, opts)
        if as_json:
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        _print_verify(report)
        if not report["passed"]:
            raise typer.Exit(EXIT_PARITY_FAILED)


def _print_verify(report: dict[str, Any]) -> None:
    s, t = report["summary"], report["thresholds"]
    table = Table(title=None, show_edge=False)
    for col in ("metric", "measured", "threshold"):
        table.add_column(col)
    rows = [
        ("max relative logit error", f"{s['max_rel_error']:.3g}", f"<= {t['max_rel_error']:g}"),
        ("min cosine", f"{s['min_cosine']:.6f}", f">= {t['min_cosine']:g}"),
        ("top-1 agreement (unambiguous)", f"{s['top1_agreement_unambiguous']:.3f}", f">= {t['min_top1']:g}"),
        ("top-1 agreement (all)", f"{s['top1_agreement']:.3f}", ""),
        ("mean KL (nats)", f"{s['mean_kl']:.3g}", f"<= {t['max_mean_kl']:g}"),
        ("mean top-k overlap", f"{s['mean_topk_overlap']:.3f}", f">= {t['min_topk_overlap']:g}"),
        ("near-tie steps", f"{s['ambiguous_steps']}/{s['steps']}", f"margin < {t['near_tie']:g}"),
    ]
    for row in rows:
        table.add_row(*row)
    err.print(
        f"verify {literal(report['bundle'])} ({report['precision']}) against {report['oracle']} "
        f"reference, {report['prompts']} prompts:",
        highlight=False,
    )
    err.print(table)
    if report["passed"]:
        err.print("[green]parity holds[/]")
    else:
        err.print(f"[bold red]parity failed:[/] {literal('; '.join(report['failures']))}", soft_wrap=True)


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
    with _user_errors():
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
            try:
                ids = [int(t) for t in str(prompt_ids).replace(" ", "").split(",") if t]
            except ValueError:
                raise UserError(
                    f"--prompt-ids: not a comma-separated list of integers: {prompt_ids!r}"
                ) from None
        shown: list[str] = [""]
        new: list[int] = []

        def on_token(token: int) -> None:
            new.append(token)
            if as_json:
                return
            if tok is None:
                sys.stdout.write(f"{token} ")
            else:
                text = tok.decode(new)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    sys.stdout.write(text[len(shown[0]) :])
                    shown[0] = text
            sys.stdout.flush()

        if not as_json and tok is not None:
            sys.stdout.write(prompt or "")
        result = run_generate(session, ids, max_new_tokens, sampler, on_token)
        payload = {
            "prompt_ids": ids,
            "tokens": result.tokens,
            "text": tok.decode(result.tokens) if tok is not None else None,
            "stopped_by": result.stopped_by,
            "prefill_seconds": round(result.prefill_seconds, 5),
            "decode_tokens_per_second": round(result.decode_tokens_per_second, 2),
        }
        if as_json:
            sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        else:
            sys.stdout.write("\n")
            err.print(
                f"{len(result.tokens)} tokens ({result.stopped_by}); prefill {len(ids)} tokens in "
                f"{result.prefill_seconds * 1e3:.1f} ms, decode {result.decode_tokens_per_second:.1f} tok/s",
                highlight=False,
            )


EXIT_REGRESSION = 4


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
    with _user_errors():
        from runtime_harness.quality import QualityOptions, compare
        from runtime_harness.verify import EXIT_PARITY_FAILED

        report = compare(bundle, reference, QualityOptions(text, windows, window_tokens))
        if as_json:
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        else:
            t = report["thresholds"]
            out.print(
                f"{report['tokens']:,} tokens of {literal(report['text'])}: perplexity "
                f"{report['perplexity_reference']:.3f} (fp32) -> {report['perplexity_quantized']:.3f} "
                f"(x{report['perplexity_ratio']:.4f}, limit x{t['max_perplexity_ratio']}); "
                f"top-1 {report['top1_agreement']:.3f}, mean KL {report['mean_kl']:.4f}, "
                f"cosine {report['mean_cosine']:.4f}, greedy agreement {report['greedy_agreement']:.2f}",
                highlight=False,
            )
        if not report["passed"]:
            _fail(
                f"{bundle}: quality below the {report['thresholds_for']} thresholds: "
                + "; ".join(report["failures"]),
                EXIT_PARITY_FAILED,
            )


@app.command()
def profile(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    device: Annotated[str, typer.Option(help="Device profile (see `ple-export devices`).")] = "pixel-8a",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length (seeded token ids).")] = 64,
    gen_tokens: Annotated[int, typer.Option(help="Timed decode steps.")] = 32,
    runs: Annotated[int, typer.Option(help="Timed runs (each in a fresh process).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs.")] = 1,
    threads: Annotated[int, typer.Option(help="Decoder threads (0: every CPU available).")] = 0,
    cold: Annotated[
        bool, typer.Option(help="Evict the PLE table before each step; count major faults.")
    ] = False,
    enforce: Annotated[bool, typer.Option(help="Run inside a memory cgroup limited to the budget.")] = False,
    budget_mb: Annotated[
        float | None, typer.Option(help="App memory budget in MiB (default: device's).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Prompt seed.")] = 0,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the sha256 check of the files.")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG: memory breakdown, per-step latency.")
    ] = None,
    baseline: Annotated[Path | None, typer.Option(help="An earlier profile --json to compare with.")] = None,
    max_regression: Annotated[str, typer.Option(help="Allowed regression vs --baseline, e.g. 10%.")] = "10%",
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Latency and memory of a bundle as a phone would run it, against a device's memory budget.
    Exit 4 when --baseline shows a regression beyond --max-regression."""
    with _user_errors():
        from runtime_harness import profile as prof

        tolerance = _parse_fraction(max_regression, "--max-regression")
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
        base = prof.load_report(baseline) if baseline is not None else None
        with _progress(not quiet and not as_json) as progress:
            report = prof.run_profile(bundle, opts, progress)
        if plot is not None:
            prof.plot(report, plot)
        regressions = prof.compare_baseline(report, base, tolerance) if base is not None else []
        report["regressions"] = regressions
        if as_json:
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        else:
            out.print(prof.render_table(report))
        for line in regressions:
            err.print(f"[bold red]regression:[/] {literal(line)}", soft_wrap=True)
        if regressions:
            raise typer.Exit(EXIT_REGRESSION)


@app.command()
def devices(as_json: JsonFlag = False) -> None:
    """The device profiles `profile` knows, every figure with its source."""
    with _user_errors():
        from runtime_harness.devices import list_devices, render_devices

        rows = list_devices()
        if as_json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        else:
            out.print(render_devices(rows))


def _parse_fraction(text: str, flag: str) -> float:
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UserError(f"{flag}: cannot read {text!r} (examples: 10%, 0.1)") from None
    if not 0 <= value < 10:
        raise UserError(f"{flag}: must be between 0% and 1000%, got {text!r}")
    return value


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    verify: Annotated[bool, typer.Option(help="Also check every file's size and sha256.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """What went where, in bytes: flash vs DRAM, the PLE table's bytes and pages per token."""
    with _user_errors():
        from exporter import manifest as manifest_mod

        manifest = manifest_mod.load(bundle)
        summary = _bundle_summary(bundle, manifest)
        checks = _check_bundle(bundle, manifest, verify)
        if verify:
            summary["verify"] = checks
        _emit(summary, as_json, lambda: _print_summary(summary, None))
        if verify and summary["verify"]["problems"]:
            _fail(f"{bundle}: {summary['verify']['problems'][0]}")


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
    with _user_errors():
        from exporter import assets
        from exporter.export import ExportOptions, export_bundle
        from exporter.manifest import is_earlier_bundle
        from exporter.outdir import check_output, staged_output
        from exporter.spec import get_preset
        from exporter.synth import is_earlier_checkpoint, synth_to_folder
        from graphs.recipe import QuantRecipe
        from runtime_harness.generate import bundle_tokenizer, generate
        from runtime_harness.session import BundleSession
        from runtime_harness.verify import VerifyOptions, run_verify

        ckpt_dir, bundle_dir = output / "checkpoint", output / "bundle"
        source = None if synthetic else Path(assets.__file__).parent / "tiny_trained"
        if source is not None and not (source / "config.json").is_file():
            raise UserError(f"{source}: the embedded trained checkpoint is missing from this install")
        ours = is_earlier_checkpoint if source is None else _is_copy_of(source)
        if output.exists() and not output.is_dir():
            raise UserError(f"{output}: exists and is not a directory")
        if output.is_dir():
            check_output(ckpt_dir, overwrite, ours, "a demo checkpoint")
            check_output(bundle_dir, overwrite, is_earlier_bundle, "a ple-export bundle", [ckpt_dir])
        with _progress(not quiet and not as_json) as progress:
            if source is None:
                synth_to_folder(
                    get_preset("tiny"),
                    ckpt_dir,
                    overwrite=overwrite,
                    progress=lambda n, t: progress("synth", n, t),
                )
            else:
                with staged_output(ckpt_dir, overwrite, ours, "a demo checkpoint") as tmp:
                    for f in sorted(source.iterdir()):
                        if f.is_file() and not f.name.startswith(("_", ".")) and f.suffix != ".py":
                            shutil.copyfile(f, tmp / f.name)
            # random weights make quantization's numbers meaningless: the synthetic demo stays fp32
            recipe = QuantRecipe.none() if synthetic else QuantRecipe()
            result = export_bundle(
                ckpt_dir, bundle_dir, ExportOptions(recipe=recipe, overwrite=overwrite), progress
            )
        report = run_verify(bundle_dir, VerifyOptions(reference=ckpt_dir, prompts=2, steps=8))
        session = BundleSession(bundle_dir, check=False, allow_spinning=False)  # checked by verify
        tok = bundle_tokenizer(session)
        ids = tok.encode(prompt) if tok is not None else [2, 17, 42, 99, 7, 300, 12, 5]
        generate(session, ids, 4)  # warm-up
        gen = generate(session, ids, 32)
        text = tok.decode(gen.tokens) if tok is not None else None
        summary = _bundle_summary(bundle_dir, result.manifest) | {
            "checkpoint": str(ckpt_dir),
            "seconds": round(result.seconds, 2),
            "parity": {k: report[k] for k in ("precision", "passed", "failures", "summary", "thresholds")},
            "generation": {
                "prompt": prompt if tok is not None else None,
                "prompt_ids": ids,
                "tokens": gen.tokens,
                "text": text,
                "decode_tokens_per_second": round(gen.decode_tokens_per_second, 1),
            },
        }

        def human() -> None:
            _print_summary(summary, f"exported in {result.seconds:.1f} s")
            s = report["summary"]
            verdict = "[green]parity holds[/]" if report["passed"] else "[bold red]parity failed[/]"
            out.print(
                f"verify ({report['precision']} vs PyTorch fp32): {verdict}; "
                f"cosine >= {s['min_cosine']:.4f}, "
                f"top-1 {s['top1_agreement']:.2f}, mean KL {s['mean_kl']:.3g}"
            )
            out.print("onnxruntime:")
            if text is not None:  # the model's text as it is, newlines included (Text: no markup)
                out.print(Text(prompt) + Text(text, style="bold"), soft_wrap=True)
            else:
                out.print(str(gen.tokens))
            out.print(
                f"  {len(gen.tokens)} tokens at {gen.decode_tokens_per_second:,.0f} tok/s on this toy model"
            )
            out.print(
                f"next: ple-export generate {literal(bundle_dir)} --prompt '...'; "
                f"ple-export profile {literal(bundle_dir)} --device pixel-8a"
            )

        _emit(summary, as_json, human)
        if not report["passed"]:
            _fail(f"{bundle_dir}: parity failed ({'; '.join(report['failures'])})", 3)


def _is_copy_of(source: Path) -> Callable[[Path], bool]:
    names = {f.name for f in source.iterdir() if f.is_file()}

    def ours(folder: Path) -> bool:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return False
        return all(e.name in names and e.is_file(follow_symlinks=False) for e in entries)

    return ours


# ---- helpers -------------------------------------------------------------------------------------


def _parse_size(text: str, flag: str) -> int:
    units = {
        "KIB": 1 << 10,
        "MIB": 1 << 20,
        "GIB": 1 << 30,
        "KB": 1 << 10,
        "MB": 1 << 20,
        "GB": 1 << 30,
        "K": 1 << 10,
        "M": 1 << 20,
        "G": 1 << 30,
        "B": 1,
    }
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            t, mult = t[: -len(unit)], units[unit]
            break
    else:
        mult = 1
    try:
        value = int(float(t) * mult)
    except (ValueError, OverflowError):
        raise UserError(f"{flag}: cannot read size {text!r} (examples: 2GB, 16KiB, 4096)") from None
    if value <= 0:
        raise UserError(f"{flag}: size must be positive, got {text!r}")
    return value


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _bundle_summary(bundle: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    files = manifest["files"]
    by_place: dict[str, int] = {}
    for f in files:
        by_place[f["placement"]] = by_place.get(f["placement"], 0) + f["bytes"]
    ple = manifest["ple"]
    spec = manifest["model"]["spec"]
    return {
        "bundle": str(bundle),
        "model": {
            "family": manifest["model"]["family"],
            "num_parameters": manifest["model"]["num_parameters"],
            "layers": spec["num_hidden_layers"],
            "hidden_size": spec["hidden_size"],
            "kv_layers": [entry["layer"] for entry in manifest["kv_cache"]["layers"]],
        },
        "bytes": {
            "flash": by_place.get("flash", 0),
            "dram": by_place.get("dram", 0),
            "other": by_place.get("none", 0),
        },
        "ple": {
            "dtype": ple["dtype"],
            "rows": ple["rows"],
            "row_bytes": ple["row_bytes"],
            "page_size": ple["page_size"],
            "pages_per_token": ple["pages_per_token"],
        },
        "files": [{k: f[k] for k in ("path", "bytes", "placement", "role")} for f in files],
        "quantization": _quant_summary(manifest.get("quantization")),
    }


def _quant_summary(section: Any) -> dict[str, Any]:
    """Tensors by precision with their mean weight error, and the recipe (as the manifest says:
    `manifest.load` checked the types)."""
    if not section:
        return {"recipe": None, "by_precision": {}}
    by: dict[str, dict[str, Any]] = {}
    for name, t in section["tensors"].items():
        key = str(t.get("precision", "?"))
        entry = by.setdefault(key, {"tensors": 0, "errors": [], "kept": []})
        entry["tensors"] += 1
        if isinstance(t.get("rel_weight_error"), int | float):
            entry["errors"].append(float(t["rel_weight_error"]))
        if "kept_float_because" in t:
            entry["kept"].append(name)
    for entry in by.values():
        errors = entry.pop("errors")
        entry["mean_rel_weight_error"] = round(sum(errors) / len(errors), 6) if errors else None
    return {"recipe": section["recipe"], "by_precision": by, "tensors": section["tensors"]}


def _print_summary(summary: dict[str, Any], headline: str | None) -> None:
    if headline:
        out.print(f"[green]{headline}[/]: {literal(summary['bundle'])}")
    table = Table(title=None, show_edge=False)
    for col in ("file", "placement", "role", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for f in summary["files"]:
        table.add_row(
            Text(one_line(f["path"])),
            Text(one_line(f["placement"])),
            Text(one_line(f["role"])),
            _human(f["bytes"]),
        )
    out.print(table)
    b, ple, m = summary["bytes"], summary["ple"], summary["model"]
    out.print(
        f"flash {_human(b['flash'])} | DRAM {_human(b['dram'])} | "
        f"{m['num_parameters'] / 1e6:,.1f}M parameters, {m['layers']} layers, "
        f"KV cache in {len(m['kv_layers'])} layers"
    )
    pages = ple["pages_per_token"]
    out.print(
        f"PLE table: {ple['rows']:,} rows x {ple['row_bytes']:,} B ({literal(ple['dtype'])}); a token reads "
        f"{pages['min']}-{pages['max']} (mean {pages['mean']}) page(s) of {ple['page_size'] // 1024} KiB"
    )
    q = summary["quantization"]
    if q["recipe"]:
        r = q["recipe"]
        weights = f"weights {literal(r.get('weights'))}"
        if r.get("weights") != "none":  # block and zero points mean nothing for a float decoder
            weights += (
                f" (block {literal(r.get('block_size'))}, "
                f"{'symmetric' if r.get('symmetric') else 'asymmetric'}, "
                f"{'clip search' if r.get('clip_search') else 'round to nearest'}, accuracy level "
                f"{literal(r.get('accuracy_level'))})"
            )
        out.print(f"recipe: {weights}, PLE table {literal(r.get('ple'))}")
        for precision, e in sorted(q["by_precision"].items()):
            err = e["mean_rel_weight_error"]
            kept = f"; kept: {literal(', '.join(e['kept'][:4]))}" if e["kept"] else ""
            out.print(
                f"  {literal(precision):>5}: {e['tensors']} tensors"
                + (f", mean relative weight error {err:.4f}" if err is not None else "")
                + kept
            )
    if "verify" in summary:
        v = summary["verify"]
        out.print(
            "[green]verified[/]: sizes and sha256 match"
            if not v["problems"]
            else f"[red]{len(v['problems'])} problem(s)[/]"
        )


def _check_bundle(bundle: Path, manifest: dict[str, Any], verify: bool) -> dict[str, Any]:
    """Refuse a bundle whose files escape it (UserError); with `verify`, also list missing files and
    size or sha256 mismatches."""
    from exporter.bundle_files import check_files, check_graph_references

    checks = check_files(bundle, manifest, verify_hashes=verify)
    for graph in ("embedder", "decoder"):
        check_graph_references(bundle, manifest, manifest["graphs"][graph]["file"])
    problems = [f"{c.path} {c.problem}" for c in checks if c.problem]
    return {"checked": len(checks), "problems": problems}


def main() -> None:
    """Console entry: usage errors become one line too (typer would draw a multi-line box)."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    logger = logging.getLogger("ple_export")
    if not any(isinstance(h, _NoteHandler) for h in logger.handlers):
        logger.addHandler(_NoteHandler())
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
