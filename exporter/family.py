"""The model families `ple-export` exports, by config.json `model_type`: each one a spec class
(`exporter/spec.py`, `exporter/gemma3n_spec.py`) and a decoder module (`exporter/gemma4.py`,
`exporter/gemma3n.py`) over the same graph contract, PLE embedder and weight streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.config_fields import read_config
from exporter.gemma3n import Gemma3nDecoder
from exporter.gemma3n_spec import MODEL_TYPES as GEMMA3N_TYPES
from exporter.gemma3n_spec import Gemma3nSpec
from exporter.gemma4 import Gemma4Decoder
from exporter.spec import Gemma4Spec

DECODERS: dict[str, type[Gemma4Decoder]] = {"gemma4": Gemma4Decoder, "gemma3n": Gemma3nDecoder}
# Decoder weights every recipe keeps in float, by our names (globs): AltUp's router and its
# prediction/correction coefficients (tiny, and int4 noise there moves every stream).
FLOAT_WEIGHTS: dict[str, tuple[str, ...]] = {"gemma4": (), "gemma3n": ("layers.*.altup.*",)}


def spec_from_config(cfg: dict[str, Any]) -> Gemma4Spec:
    """The spec of a config.json object, of the family its model_type names."""
    if cfg.get("model_type") in GEMMA3N_TYPES:
        return Gemma3nSpec.from_hf_config(cfg)
    return Gemma4Spec.from_hf_config(cfg)


def read_spec(checkpoint: Path) -> Gemma4Spec:
    return spec_from_config(read_config(checkpoint))


def decoder_for(spec: Gemma4Spec) -> Gemma4Decoder:
    return DECODERS[spec.family](spec)
