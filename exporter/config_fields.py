"""Reading a Gemma-family config.json strictly: every value type-checked and bounded as it is read.

The bounds are generous around the largest real Gemma 4 / Gemma 3n values and small enough that no
single value can make parsing, validation or tracing blow up (docs/config-bounds.md says why). A bad
value is a one-line `UserError` naming the field and its allowed range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ple_export.errors import UserError
from ple_export.jsonfile import read_json_object


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; closed unless an end is marked open."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, value: float) -> bool:
        # written so that NaN (every comparison false) is outside
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        lo, hi = (str(x) if isinstance(x, int) else f"{x:g}" for x in (self.lo, self.hi))
        return f"{'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


# Bounds of every config.json value we read: generous around the largest real Gemma 4 / Gemma 3n
# values, small enough that no single value can make parsing, validation or tracing blow up (see
# docs/config-bounds.md for the table and the reasons). Integers are closed ranges.
MAX_LAYERS = 256
MAX_VOCAB = 2**20
INT_BOUNDS: dict[str, Range] = {
    "num_hidden_layers": Range(1, MAX_LAYERS),
    "vocab_size": Range(1, MAX_VOCAB),
    "vocab_size_per_layer_input": Range(1, MAX_VOCAB),
    "hidden_size": Range(1, 65_536),
    "hidden_size_per_layer_input": Range(1, 16_384),  # 0/null: no PLE, refused with its own message
    "intermediate_size": Range(1, 262_144),
    "num_attention_heads": Range(1, 256),
    "num_key_value_heads": Range(1, 256),
    "num_global_key_value_heads": Range(1, 256),
    "head_dim": Range(2, 1024),  # and even: RoPE rotates pairs
    "global_head_dim": Range(2, 1024),
    "sliding_window": Range(2, 2**20),
    "num_kv_shared_layers": Range(0, MAX_LAYERS - 1),  # and below num_hidden_layers
    "max_position_embeddings": Range(1, 2**24),  # not used by the export; checked when present
    "num_experts": Range(0, 4096),  # any positive count is MoE, refused
    "pad_token_id": Range(0, MAX_VOCAB - 1),  # token ids: and below vocab_size
    "bos_token_id": Range(0, MAX_VOCAB - 1),
    "eos_token_id": Range(0, MAX_VOCAB - 1),
}
FLOAT_BOUNDS: dict[str, Range] = {
    "rms_norm_eps": Range(1e-12, 1, hi_open=True),
    "final_logit_softcapping": Range(1, 1e4),
    "rope_theta": Range(1, 1e12),
    "partial_rotary_factor": Range(0, 1, lo_open=True),
    "factor": Range(1, 1024),
}
MISSING: Any = object()
MAX_CONFIG_BYTES = 2**20  # config.json; real ones are a few KiB


def show(value: Any) -> str:
    """A value for a one-line message: short, and safe for any JSON value (no repr of containers,
    which could be deeply nested, nor of integers too long to print)."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, int):
        if abs(value) < 10**15:
            return str(value)
        return f"{'-' if value < 0 else ''}~2**{abs(value).bit_length() - 1}"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = repr(value)  # escapes newlines and other line breaks: stays one line
        return text if len(text) <= 40 else text[:36] + "...'"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    return f"a {type(value).__name__}"


def bound_of(name: str, table: dict[str, Range]) -> Range:
    return table[name.rsplit(".", 1)[-1]]


def check_int(
    name: str, value: Any, bound: Range | None = None, *, nullable: bool = False, note: str = ""
) -> Any:
    """`value` if it is an integer (not a bool, not a float) within `bound` (by default the field's
    entry in INT_BOUNDS), or null where allowed; else a UserError naming the field and the range."""
    if value is None and nullable:
        return None
    bound = bound or bound_of(name, INT_BOUNDS)
    if isinstance(value, bool) or not isinstance(value, int) or not bound.holds(value):
        null = " or null" if nullable else ""
        raise UserError(
            f"config.json: field {name!r} must be an integer in {bound}{note}{null}, got {show(value)}"
        )
    return value


def check_float(name: str, value: Any, bound: Range | None = None, *, nullable: bool = False) -> Any:
    """`value` as a float if it is a finite number within `bound` (compared before any conversion:
    float(10**400) would overflow), or null where allowed; else a UserError naming the field."""
    if value is None and nullable:
        return None
    bound = bound or bound_of(name, FLOAT_BOUNDS)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not bound.holds(value):
        null = " or null" if nullable else ""
        raise UserError(f"config.json: field {name!r} must be a number in {bound}{null}, got {show(value)}")
    return float(value)


class Fields:
    """Typed, bounded reads of config.json fields; a wrong type or value is an error naming the field.

    `default` is used when the key is absent; `null` (if given) is what a JSON null means."""

    def __init__(self, cfg: dict[str, Any], prefix: str = ""):
        self.cfg, self.prefix = cfg, prefix

    def _get(self, key: str, default: Any, null: Any) -> Any:
        if key not in self.cfg:
            if default is MISSING:
                raise UserError(f"config.json: missing required field {self.prefix + key!r}")
            return default
        value = self.cfg[key]
        return null if value is None and null is not MISSING else value

    def int(self, key: str, default: Any = MISSING, null: Any = MISSING) -> Any:
        value = self._get(key, default, null)
        return check_int(self.prefix + key, value, nullable=value is None and null is None)

    def float(self, key: str, default: Any = MISSING, null: Any = MISSING) -> Any:
        value = self._get(key, default, null)
        return check_float(self.prefix + key, value, nullable=value is None and null is None)

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default, default)  # null: the default
        if not isinstance(value, bool):
            raise UserError(
                f"config.json: field {self.prefix + key!r} must be true or false, got {show(value)}"
            )
        return value


def read_config(path: Path) -> dict[str, Any]:
    """A checkpoint folder's config.json as an object, with a one-line error for each way it can be
    missing or unreadable."""
    cfg_path = path / "config.json"
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (export takes the checkpoint folder)")
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path}: missing (an HF checkpoint folder needs config.json)")
    try:
        size = cfg_path.stat().st_size
    except OSError as e:
        raise UserError(f"{cfg_path}: cannot read ({e.strerror or e})") from None
    if size > MAX_CONFIG_BYTES:
        raise UserError(
            f"{cfg_path}: {size} bytes; a config.json is a few KiB (at most {MAX_CONFIG_BYTES} read)"
        )
    return read_json_object(cfg_path)
