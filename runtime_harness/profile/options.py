"""What `ple-export profile` measures: one field per flag that shapes the measurement."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ple_export.errors import UserError

MIB = 1 << 20


@dataclass(frozen=True)
class ProfileOptions:
    """Output flags (`--json`, `--plot PNG`, `--baseline JSON`, `--max-regression`) are the CLI's: it
    renders, plots and compares the report."""

    device: str = "pixel-8a"
    prompt_tokens: int = 64  # the longest prompt of the sweep: the verdict is judged there
    sweep: tuple[int, ...] = ()  # shorter prompts, each run warm in its own process (cost vs context)
    prefill_chunk: int | None = None  # prompt tokens per prefill call; None: the device's, 0: one call
    gen_tokens: int = 32  # timed decode steps after the prefill's first token
    runs: int = 5  # timed runs, in one fresh process per mode
    warmup: int = 1
    threads: int = 0  # decoder intra-op threads; 0: every CPU this process may run on
    cold: bool = False
    enforce: bool = False
    budget_mb: float | None = None  # MiB; default: the device's app budget
    seed: int = 0  # prompt token ids are drawn from it
    verify: bool = True  # sha256 every file first; the files are then dropped from the page cache again

    def validate(self) -> None:
        for name in ("prompt_tokens", "gen_tokens", "runs"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if any(not 1 <= n < self.prompt_tokens for n in self.sweep):
            raise UserError(
                f"the context sweep {self.sweep} must be shorter prompts than {self.prompt_tokens}"
            )
        if self.prefill_chunk is not None and self.prefill_chunk < 0:
            raise UserError(f"--prefill-chunk must be 0 (one call) or more, got {self.prefill_chunk}")
        if self.warmup < 0 or self.threads < 0:
            raise UserError("--warmup and --threads must be 0 or more")
        if self.budget_mb is not None and not (self.budget_mb > 0 and math.isfinite(self.budget_mb)):
            raise UserError(f"--budget-mb must be a positive number of MiB, got {self.budget_mb}")
