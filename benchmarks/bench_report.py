"""The benchmark's figures: medians of repeats, paired ratios, and the tables that print them."""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from typing import Any

from runtime_harness.loop import decode_rate

Json = dict[str, Any]


def spread(values: list[float]) -> Json:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def agreement(tokens: list[int], ref: list[int]) -> Json:
    first = next((i for i, (a, b) in enumerate(zip(tokens, ref, strict=True)) if a != b), None)
    return {
        "match": sum(a == b for a, b in zip(tokens, ref, strict=True)),
        "of": len(ref),
        "first_divergence": first,
    }


def summarize(
    args: argparse.Namespace,
    spec: Any,
    context: Json,
    records: dict[str, list[Json]],
    bandwidth: list[Json],
    sizes: dict[str, Json],
    profiles: Json,
    loads: list[float],
    notes: list[str],
) -> Json:
    cpus = os.cpu_count() or 1
    engines = args.engines
    prompt_len = context["prompt_len"]
    bw_key = f"gb_s_{args.threads}t"
    bw = {k: spread([b[k] for b in bandwidth]) for k in ("gb_s_1t", bw_key)}
    rep: Json = {
        "checkpoint": str(args.checkpoint),
        "num_parameters": spec.num_parameters(),
        "vocab_size": spec.vocab_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "hidden_size": spec.hidden_size,
        "prompt_len": prompt_len,
        "new_tokens": context["new_tokens"],
        "threads": args.threads,
        "repeats": args.repeats,
        "cpus": cpus,
        "peer_genai": str(args.peer_genai) if args.peer_genai else None,
        "read_bandwidth_gb_s": bw,
        "load_avg_1m": spread(loads),
        "engines": {},
        "ratios": {},
        "agreement_vs_transformers": {},
        "profiles": profiles,
        "notes": notes,
    }
    for engine in engines:
        recs = records[engine]
        decode = [decode_rate(r["warm"]["steps_s"]) for r in recs]
        e: Json = {
            "load_s": spread([r["load_s"] for r in recs]),
            "decode_tok_s": spread(decode),
            "decode_tok_s_cold": spread([decode_rate(r["cold"]["steps_s"]) for r in recs]),
            "decode_step_p90_ms": spread([_p90(r["warm"]["steps_s"]) * 1e3 for r in recs]),
            "prefill_tok_s": spread([prompt_len / r["warm"]["prefill_s"] for r in recs]),
            "ttft_ms": spread([r["warm"]["ttft_s"] * 1e3 for r in recs]),
            "ttft_cold_ms": spread([r["cold"]["ttft_s"] * 1e3 for r in recs]),
            "peak_rss_mb": spread([r["measure"]["peak_rss_mb"] for r in recs]),
            "peak_rss_anon_mb": spread([r["measure"]["peak_rss_anon_mb"] for r in recs]),
            "peak_rss_file_mb": spread([r["measure"]["peak_rss_file_mb"] for r in recs]),
            "rss_after_load_mb": {k: v / (1 << 20) for k, v in recs[-1]["status_after_load"].items()},
            "decode_steps": len(recs[0]["warm"]["steps_s"]),
            "tokens": recs[0]["cold"]["tokens"],
            "tokens_identical_cold_warm": all(r["cold"]["tokens"] == r["warm"]["tokens"] for r in recs),
        }
        if engine in sizes:
            e["bytes"] = sizes[engine]
        streamed = sizes[engine]["graph"]["streamed"] if engine in sizes else recs[0].get("streamed_bytes")
        e["streamed_bytes_per_token"] = streamed
        if streamed:
            achieved = streamed * e["decode_tok_s"]["median"] / 1e9
            e["achieved_gb_s"] = achieved
            e["achieved_vs_read_bw"] = achieved / bw[bw_key]["median"]
        if engine in context["bundles"]:
            dram = sizes[engine]["decoder_weights"]
            e["achieved_gb_s_manifest_dram"] = dram * e["decode_tok_s"]["median"] / 1e9
        rep["engines"][engine] = e

    def paired(a: str, b: str, metric: Callable[[Json], float]) -> Json | None:
        if a not in records or b not in records:
            return None
        return spread([metric(x) / metric(y) for x, y in zip(records[a], records[b], strict=True)])

    def dec(r: Json) -> float:
        return decode_rate(r["warm"]["steps_s"])

    def pre(r: Json) -> float:
        return prompt_len / float(r["warm"]["prefill_s"])

    others = ("peer", "transformers", "torch", "fp32", "int4-genai")
    pairs = [(o, x) for o in context["ours_int4"] for x in others] + [("int4-genai", "peer")]
    for ours, other in pairs:
        for label, fn in (("decode", dec), ("prefill", pre)):
            if (v := paired(ours, other, fn)) is not None:
                rep["ratios"][f"{ours}/{other} {label} tok/s"] = v
    for key in ("peak_rss_mb", "peak_rss_anon_mb", "peak_rss_file_mb"):

        def rss(r: Json, key: str = key) -> float:
            return float(r["measure"][key]) or float("nan")

        rss_pairs = [(o, x) for o in context["ours_int4"] for x in ("peer", "int4-genai")]
        for ours, other in [*rss_pairs, ("int4-genai", "peer")]:
            if (v := paired(ours, other, rss)) is not None:
                rep["ratios"][f"{ours}/{other} {key}"] = v
    if "transformers" in records:
        ref = rep["engines"]["transformers"]["tokens"]
        for engine in engines:
            if engine != "transformers":
                rep["agreement_vs_transformers"][engine] = agreement(rep["engines"][engine]["tokens"], ref)
    if max(loads) > cpus + 0.5:
        notes.append(
            f"WARNING: 1-min load average reached {max(loads):.1f} on {cpus} CPUs (this benchmark keeps "
            f"about {args.threads} busy itself): other processes competed for the cores; figures and "
            "even ratios are unreliable. Rerun on a quiet machine."
        )
    for engine in engines:
        if not rep["engines"][engine]["tokens_identical_cold_warm"]:
            notes.append(f"note: {engine} produced different tokens in its cold and warm runs")
    return rep


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def _fmt(s: Json | None, digits: int = 1) -> str:
    """median, and ±half the min-max range as % of the median when there are several values."""
    if not s:
        return "-"
    text = f"{s['median']:,.{digits}f}"
    if s["n"] > 1 and s["median"]:
        text += f" ±{50 * (s['max'] - s['min']) / abs(s['median']):.0f}%"
    return text


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}"


def print_report(rep: Json) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    out = Console(width=max(Console().width, 180))
    bw = rep["read_bandwidth_gb_s"]
    bw_t = bw[f"gb_s_{rep['threads']}t"]
    table = Table(
        title=escape(
            f"{rep['checkpoint']}: {rep['num_parameters'] / 1e6:.4g}M params, "
            f"{rep['num_hidden_layers']} layers, hidden {rep['hidden_size']}, vocab {rep['vocab_size']}; "
            f"prompt {rep['prompt_len']}, "
            f"{rep['new_tokens']} greedy tokens, batch 1, {rep['threads']} threads"
        ),
        caption=escape(
            f"median ±half the min-max range (% of median) of {rep['repeats']} fresh processes per engine; "
            f"read bandwidth "
            f"{_fmt(bw['gb_s_1t'], 2)} GB/s (1 thread), {_fmt(bw_t, 2)} GB/s ({rep['threads']} threads)"
        ),
    )
    cols = (
        "engine",
        "decode tok/s",
        "prefill tok/s",
        "TTFT ms",
        "load s",
        "peak RSS MiB",
        "RssAnon MiB",
        "RssFile MiB",
        "streamed MB/tok",
        "achieved GB/s (% of read bw)",
        "greedy = HF /64",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "engine" else "right", no_wrap=True)
    for name, e in rep["engines"].items():
        agree = rep["agreement_vs_transformers"].get(name)
        ach = (
            f"{e['achieved_gb_s']:.2f} ({100 * e['achieved_vs_read_bw']:.0f}%)"
            if "achieved_gb_s" in e
            else "-"
        )
        table.add_row(
            name,
            _fmt(e["decode_tok_s"]),
            _fmt(e["prefill_tok_s"]),
            _fmt(e["ttft_ms"]),
            _fmt(e["load_s"], 2),
            _fmt(e["peak_rss_mb"], 0),
            _fmt(e["peak_rss_anon_mb"], 0),
            _fmt(e["peak_rss_file_mb"], 0),
            _mb(e.get("streamed_bytes_per_token")),
            ach,
            "ref" if name == "transformers" else (f"{agree['match']}" if agree else "-"),
        )
    out.print(table)

    sizes = Table(title="bytes on disk (MB)")
    for col in (
        "engine",
        "DRAM",
        "flash",
        "total",
        "decoder weights (DRAM)",
        "streamed / token",
        "gathered (rows only)",
    ):
        sizes.add_column(col, justify="left" if col == "engine" else "right")
    for name, e in rep["engines"].items():
        b = e.get("bytes")
        if b:
            sizes.add_row(
                name,
                _mb(b.get("dram")),
                _mb(b.get("flash")),
                _mb(b["total"]),
                _mb(b.get("decoder_weights")),
                _mb(b["graph"]["streamed"]),
                _mb(b["graph"]["gathered"]),
            )
    if sizes.row_count:
        out.print(sizes)
        out.print("(the peer's folder has no DRAM/flash split: one model.onnx.data)", style="dim")

    for pair, r in rep["ratios"].items():
        out.print(f"{pair}: x{_fmt(r, 2)}")
    for name, a in rep["agreement_vs_transformers"].items():
        out.print(
            f"greedy tokens {name} vs transformers fp32: {a['match']}/{a['of']} agree, "
            f"first divergence at step {a['first_divergence']}"
        )
    for name, prof in rep["profiles"].items():
        dec, pre = prof["decode"], prof["prefill"]
        ptab = Table(
            title=escape(
                f"{name}: onnxruntime profile of the warm run (profiling adds overhead). Decode: "
                f"{dec['kernel_ms']:.2f} ms of kernels per step ({prof['decode_steps']} steps), model_run "
                f"median {dec['run_ms_median'] or 0:.2f} ms. Prefill: {pre['kernel_ms']:.1f} ms of kernels, "
                f"model_run {pre['run_ms_median'] or 0:.1f} ms"
            )
        )
        for col in ("#", "decode op", "ms/step", "share", "calls/step", "prefill op", "ms", "share "):
            ptab.add_column(col, justify="left" if "op" in col else "right")
        for i in range(min(12, max(len(dec["ops"]), len(pre["ops"])))):
            d = dec["ops"][i] if i < len(dec["ops"]) else None
            q = pre["ops"][i] if i < len(pre["ops"]) else None
            ptab.add_row(
                str(i + 1),
                *(
                    (d["op"], f"{d['ms']:.3f}", f"{100 * d['share']:.1f}%", f"{d['calls']:.0f}")
                    if d
                    else ("",) * 4
                ),
                *((q["op"], f"{q['ms']:.1f}", f"{100 * q['share']:.1f}%") if q else ("",) * 3),
            )
        out.print(ptab)
    load = rep["load_avg_1m"]
    out.print(
        f"wall {rep['wall_s']:.0f}s; 1-min load average {load['min']:.1f}-{load['max']:.1f} "
        f"on {rep['cpus']} CPUs"
    )
    for note in rep["notes"]:
        out.print(note, style="yellow", markup=False)
