"""The quantization recipe's command-line flags, declared once and given to `export` and `quantize`
(`with_recipe_flags`), turned into a `QuantRecipe` inside the command's error handling."""

from __future__ import annotations

import functools
from collections.abc import Callable
from inspect import Parameter, signature
from typing import Annotated, Any

import typer

from ple_export import params as P
from ple_export.bundle.recipe import (
    ACCURACY_LEVELS,
    MAX_BLOCK,
    MIN_BLOCK,
    PLE_QUANTS,
    WEIGHT_QUANTS,
    QuantRecipe,
)
from ple_export.params import opt

_DEFAULT_RECIPE = QuantRecipe()

BLOCK = P.PowerOfTwo(MIN_BLOCK, MAX_BLOCK)
QuantFlag = Annotated[str, opt(P.Choice(WEIGHT_QUANTS), "Decoder Linear weights (none: fp32).")]
BlockFlag = Annotated[int, opt(BLOCK, "Quantization block along K.")]
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
    int,
    opt(
        P.Int(min(ACCURACY_LEVELS), max(ACCURACY_LEVELS)),
        "MatMulNBits compute type: 0 (fp32), 1, 4 (int8 compute: fastest on CPU).",
    ),
]
PleQuantFlag = Annotated[str, opt(P.Choice(PLE_QUANTS), "PLE table (none: float, see --ple-dtype).")]
PleBlockFlag = Annotated[
    int | None, opt(BLOCK, "PLE quantization block (default: the PLE width for int8, 32 for int4).")
]
KeepFlag = Annotated[
    Any, opt(P.Keep(), "Tensors kept in fp32, e.g. fp32:ple_gate,ple_proj (names or globs).")
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


def with_recipe_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the recipe's flags in place of its `recipe_flags` parameter; it receives
    them as that one dict, for `recipe_from_flags` to turn into a QuantRecipe inside its error handling."""
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


def recipe_from_flags(flags: dict[str, Any]) -> QuantRecipe:
    return QuantRecipe(
        weights=flags["quant"],
        block_size=flags["block_size"],
        symmetric=flags["symmetric"],
        accuracy_level=flags["accuracy_level"],
        ple=flags["ple_quant"],
        ple_block_size=flags["ple_block_size"],
        ple_symmetric=flags["ple_symmetric"],
        keep=tuple(flags["keep"] or ()),
        clip_search=flags["clip_search"],
    )
