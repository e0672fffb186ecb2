"""The quantization recipe: which precision each tensor of a bundle gets, as one frozen value.

`export` and `quantize` build it from their flags; the passes read it; the manifest records it.

    decoder Linear weights  --quant int4|int8|none, --block-size, --symmetric/--asymmetric,
                            --accuracy-level          -> MatMulNBits (tied embedding: one copy,
                                                         GatherBlockQuantized + MatMulNBits)
    PLE table               --ple-quant int8|int4|none -> GatherBlockQuantized, in flash
    kept in float           --keep ple_gate,ple_proj   -> names or globs of our tensor names
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ple_export.errors import UserError

WEIGHT_QUANTS = ("int4", "int8", "none")
PLE_QUANTS = ("int8", "int4", "none")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
MIN_BLOCK = 16  # MatMulNBits and GatherBlockQuantized: a power of two >= 16
MAX_BLOCK = 256


# Decoder weights every recipe keeps in float, by family (globs over our names): Gemma 3n's AltUp
# router and prediction/correction coefficients (tiny, and int4 noise there moves every stream).
FAMILY_FLOAT: dict[str, tuple[str, ...]] = {"gemma3n": ("layers.*.altup.*",)}


def bits_of(quant: str) -> int:
    return {"int4": 4, "int8": 8}[quant]


@dataclass(frozen=True)
class QuantRecipe:
    weights: str = "int4"
    # int4 block 256 with zero points and clip search (4.14 bits a weight). MatMulNBits' largest
    # block: the fastest decode measured here (its int8-compute kernel pays per block, so a larger
    # block is less work per weight): x1.35-1.56 the peer's decode over six runs, where block 128
    # gave x1.15-1.40 in the same runs. Clip search brings its weight error down to plain block
    # 128's on the trained tiny model's weights (and on Gaussian ones), and perplexity and KL with
    # it. Heavy-tailed weights lose more at block 256: `--block-size 128` (or 64) for those.
    # docs/quantization.md has the numbers
    block_size: int = 256
    symmetric: bool = False
    accuracy_level: int = 4  # MatMulNBits' compute type: 4 = int8 compute (2x faster here than 0)
    clip_search: bool = True  # each block's range shrunk for the least squared error (quant/blockwise.py)
    ple: str = "int8"
    ple_block_size: int | None = None  # None: the PLE width for int8 (one scale per layer slice), 32 for int4
    ple_symmetric: bool = True  # the PLE table's zero points (no measured gain; 1 more byte a block)
    scales_dtype: str = "float32"  # PLE scales: float32 | float16 (the table's output takes this type)
    keep: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def none(cls) -> QuantRecipe:
        return cls(weights="none", ple="none")

    def validate(self) -> None:
        if self.weights not in WEIGHT_QUANTS:
            raise UserError(f"--quant must be one of {', '.join(WEIGHT_QUANTS)}; got {self.weights!r}")
        if self.ple not in PLE_QUANTS:
            raise UserError(f"--ple-quant must be one of {', '.join(PLE_QUANTS)}; got {self.ple!r}")
        for flag, size in (("--block-size", self.block_size), ("--ple-block-size", self.ple_block_size)):
            if size is None:
                continue
            if not MIN_BLOCK <= size <= MAX_BLOCK or size & (size - 1):
                raise UserError(f"{flag} must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}, got {size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise UserError(f"--accuracy-level must be one of 0, 1, 2, 3, 4; got {self.accuracy_level}")
        if self.scales_dtype not in ("float32", "float16"):
            raise UserError(f"scales dtype must be float32 or float16, got {self.scales_dtype!r}")

    def keeps(self, name: str) -> bool:
        return any(_matches(pattern, name) for pattern in self.keep)

    def check_keep(self, names: Iterable[str]) -> None:
        """Every --keep pattern must name at least one quantizable tensor."""
        names = list(names)
        for pattern in self.keep:
            if not any(_matches(pattern, n) for n in names):
                sample = ", ".join(sorted(names)[:6])
                raise UserError(
                    f"--keep {pattern!r} matches no quantizable tensor (names look like: {sample}, ...)"
                )

    def block_for(self, k: int) -> int | None:
        """The block size for a weight whose input dimension is `k`: the recipe's if it divides `k`,
        else the largest power of two >= 16 below it that does; None if none does (kept in float)."""
        size = self.block_size
        while size >= MIN_BLOCK:
            if k % size == 0:
                return size
            size //= 2
        return None

    def ple_block_for(self, ple_dim: int, row: int) -> int | None:
        wanted = self.ple_block_size or (ple_dim if self.ple == "int8" else 32)
        size = min(wanted, MAX_BLOCK)
        while size >= MIN_BLOCK:
            if row % size == 0 and size & (size - 1) == 0:
                return size
            size //= 2
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep"] = list(self.keep)
        return d


def _matches(pattern: str, name: str) -> bool:
    """A pattern is a glob over our tensor names; a bare word matches a name component
    (`ple_gate` matches `layers.3.ple_gate.weight`)."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name or pattern in name.split(".")


def parse_keep(text: str | None) -> tuple[str, ...]:
    """`--keep fp32:ple_gate,ple_proj` or `--keep ple_gate,ple_proj` (kept tensors stay fp32)."""
    if not text:
        return ()
    precision, sep, names = text.partition(":")
    if sep and precision not in ("fp32", "float32"):
        raise UserError(f"--keep: only fp32 is supported as the kept precision, got {precision!r}")
    patterns = tuple(p.strip() for p in (names if sep else text).split(",") if p.strip())
    if not patterns:
        raise UserError("--keep: no tensor names given (e.g. --keep fp32:ple_gate,ple_proj)")
    return patterns
