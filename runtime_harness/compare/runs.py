"""Two greedy generations of the same bundle and prompt compared, e.g. on x86 and on an ARM phone
(`generate --expect x86.json`): the tokens must agree until the first step the expected run itself
barely decided (its top-2 logit margin under the recipe class's `near_tie`), where another CPU's
kernels may round the other way; after such a divergence the contexts differ and nothing more is
compared.

Measured (trained tiny model, a 70-token prompt then 40 steps fed x86's greedy tokens, our loop,
x86-64 AVX2 vs emulated aarch64; docs/deploy.md, "On ARM"): fp32 max |logit difference| 1.2e-5 on
every ISA; int4 (MatMulNBits with int8 compute, accuracy level 4) 0.133 (1.7% of the logit scale)
with dotprod (Neoverse N1, and qemu's `max` with SVE/i8mm: the same numbers), 0.181 (2.7%, median
0.082) on plain NEON (Cortex-A72), where one top-1 flipped at a step x86 decided by 0.003. A top-1
flip needs a margin under twice the difference, so the parity table's near-tie margins (fp32 1e-3,
int8 0.2, int4 0.5 > 2 x 0.181) cover each class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ple_export.bundle.manifest import Manifest
from ple_export.errors import UserError
from ple_export.jsonfile import read_json_object
from runtime_harness.compare.thresholds import PARITY, recipe_class


@dataclass(frozen=True)
class RunComparison:
    steps: int  # steps compared
    agreed: bool
    first_difference: int | None  # step index, None: identical
    expected_margin: float | None  # the expected run's margin at that step
    near_tie: float

    def line(self, where: str) -> str:
        if self.first_difference is None:
            return f"the same {self.steps} tokens as {where}"
        i, m = self.first_difference, self.expected_margin
        verdict = "a near-tie there" if self.agreed else "a decided step"
        return (
            f"tokens differ from {where} at step {i} ({verdict}: its top-2 margin {m:.3g}, "
            f"near-tie < {self.near_tie:g})"
        )


def expected_run(doc: Mapping[str, Any], where: str) -> tuple[list[int], list[int], list[float]]:
    """prompt ids, tokens and margins of a `generate --json` output."""

    def ints(key: str) -> list[int]:
        value = doc.get(key)
        if not isinstance(value, list) or not all(type(v) is int for v in value):
            raise UserError(f"{where}: {key!r} is not a list of token ids; not a `generate --json` output")
        return value

    margins = doc.get("margins")
    if not isinstance(margins, list) or not all(isinstance(m, (int, float)) for m in margins):
        raise UserError(f"{where}: no 'margins' list; write it with `ple-export generate --json` (greedy)")
    return ints("prompt_ids"), ints("tokens"), [float(m) for m in margins]


def compare_runs(
    tokens: Sequence[int], expected: Sequence[int], margins: Sequence[float], near_tie: float
) -> RunComparison:
    steps = min(len(tokens), len(expected))
    for i in range(steps):
        if tokens[i] != expected[i]:
            margin = margins[i] if i < len(margins) else 0.0
            return RunComparison(i + 1, margin < near_tie, i, margin, near_tie)
    return RunComparison(steps, True, None, None, near_tie)  # over the shorter run's steps


def expected_for(path: Path, ids: list[int], temperature: float) -> tuple[list[int], list[float]]:
    """`--expect FILE`: its tokens and margins, for this prompt, greedy."""
    if temperature != 0:
        raise UserError("--expect compares greedy runs: leave --temperature at 0")
    prompt_ids, tokens, margins = expected_run(read_json_object(path), str(path))
    if prompt_ids != ids:
        raise UserError(
            f"{path}: was generated from another prompt ({len(prompt_ids)} ids, this one {len(ids)})"
        )
    return tokens, margins


def compare_expected(
    manifest: Manifest, tokens: Sequence[int], expected: tuple[list[int], list[float]]
) -> RunComparison:
    """`tokens` against the expected run, near-ties as the bundle's recipe class defines them."""
    near_tie = PARITY[recipe_class(manifest.recipe, manifest.kv_cache.dtype)].near_tie
    return compare_runs(tokens, expected[0], expected[1], near_tie)
