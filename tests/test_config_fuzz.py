"""Fuzzing config.json parsing (docs/config-bounds.md).

Real configs (the tiny and e2b presets, transformers' per_layer_config spelling, the multimodal
`gemma4` wrapper) are mutated: values replaced by other JSON types, huge, negative, non-finite or
deeply nested values; keys deleted or added; lists shortened, lengthened or blown up. Parsing must
either give a spec that validates, is at most MAX_PARAMETERS and writes back as itself, or raise a
one-line UserError; nothing else, and never take more than LIMIT_S. `PLE_FUZZ=nightly` runs longer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import Phase, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from exporter.config_fields import FLOAT_BOUNDS, INT_BOUNDS
from exporter.family import read_spec, spec_from_config
from exporter.gemma3n_spec import Gemma3nSpec
from exporter.presets import get_preset
from exporter.spec import MAX_PARAMETERS, Gemma4Spec
from ple_export.errors import UserError
from tests.conftest import VARIANTS

LIMIT_S = 2.0  # per example; parsing a real config takes well under a millisecond
# No explain phase: it traces every line, which makes a 1 MiB config.json scan exceed LIMIT_S and
# would report that instead of the failure being explained.
NO_EXPLAIN = settings(phases=[p for p in Phase if p is not Phase.explain])


def _transformers_spelling(cfg: dict[str, Any]) -> dict[str, Any]:
    """Full-layer head_dim as per_layer_config overrides, as transformers 5.23's save_pretrained."""
    cfg = copy.deepcopy(cfg)
    head_dim = cfg.pop("global_head_dim")
    cfg["per_layer_config"] = {
        str(i): {"head_dim": head_dim} for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"
    }
    return cfg


BASES: dict[str, dict[str, Any]] = {
    "tiny": get_preset("tiny").to_hf_config(),
    "e2b": get_preset("e2b").to_hf_config(),
    "tiny_transformers": _transformers_spelling(get_preset("tiny").to_hf_config()),
    "kv_eq": VARIANTS["kv_eq"].to_hf_config(),
    "gemma4_tiny": {
        "model_type": "gemma4",
        "architectures": ["Gemma4ForConditionalGeneration"],
        "text_config": get_preset("tiny").to_hf_config(),
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 768},
    },
    "gemma4_e2b": {"model_type": "gemma4", "text_config": get_preset("e2b").to_hf_config()},
    # Gemma 3n: the multimodal wrapper layout (as released) and a bare text config
    "gemma3n_tiny": get_preset("gemma3n-tiny").to_hf_config(),
    "gemma3n_e2b_text": get_preset("gemma3n-e2b").to_hf_config()["text_config"],
}
# Keys worth adding where they are missing (the reader's whole vocabulary) and a few unknown ones.
KEYS = sorted(
    {k for cfg in BASES.values() for k in cfg}
    | {k for cfg in BASES.values() for k in cfg.get("text_config", {})}
    | {
        "global_head_dim",
        "num_global_key_value_heads",
        "per_layer_config",
        "num_experts",
        "use_bidirectional_attention",
        "text_config",
        "type",
        "factor",
        "partial_rotary_factor",
        "rope_theta",
        "rope_type",
        "head_dim",
        "num_key_value_heads",
        "0",
        "5",
        "34",
        "unknown_key",
    }
)

# What the reader looks at: three replacements in four aim at these.
FIELDS = (
    set(INT_BOUNDS)
    | set(FLOAT_BOUNDS)
    | {
        "model_type",
        "text_config",
        "layer_types",
        "rope_parameters",
        "rope_type",
        "type",
        "per_layer_config",
        "hidden_activation",
        "attention_k_eq_v",
        "use_double_wide_mlp",
        "tie_word_embeddings",
        "attention_bias",
        "enable_moe_block",
        "use_bidirectional_attention",
    }
)

# ---- values ------------------------------------------------------------------------------------------

SPECIAL: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    3,
    255,
    256,
    257,
    2**20,
    2**31,
    2**63,
    2**70,
    10**12,
    10**400,
    -(10**400),
    0.0,
    -0.0,
    0.25,
    1.0,
    1.5,
    4.0,
    1e12,
    1e-300,
    5e-324,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "0",
    "8",
    "NaN",
    "sliding_attention",
    "full_attention",
    "default",
    "proportional",
    "yarn",
    "gelu_pytorch_tanh",
    "gemma4",
    "gemma4_text",
    "vision",
    "all",
    "line\nbreak",
    "x\u2028y",
    [],
    {},
]
scalars = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _nest(value: Any, depth: int, in_dicts: bool) -> Any:
    for _ in range(depth):
        value = {"v": value} if in_dicts else [value]
    return value


nested = st.builds(_nest, scalars, st.integers(1, 300), st.booleans())
# lists as long as a layer count, a bit more, or absurd (must be refused before being walked)
long_lists = st.builds(lambda v, n: [v] * n, scalars, st.sampled_from([0, 1, 5, 6, 7, 35, 257, 100_000]))


def _near(old: Any) -> st.SearchStrategy[Any]:
    """Values related to the one being replaced: off by one, scaled, negated, re-typed."""
    if isinstance(old, bool) or not isinstance(old, (int, float)):
        return st.just(old)
    out: list[Any] = [old + 1, old - 1, -old, old * 2, old * 10**6, old * 2**40]
    if isinstance(old, int) and abs(old) < 2**1000:
        out += [float(old), str(old)]  # float(10**400) overflows; str of a 5000-digit int raises
    if isinstance(old, float):
        out += [old * 1e300, old / 1e300, repr(old), int(old) if math.isfinite(old) else 0]
    return st.sampled_from(out)


# the classes of bad value each bound is tested with in test_spec.py
hostile = st.sampled_from(
    [math.nan, math.inf, -math.inf, True, False, None, 10**400, 2**70, -1, 0, 1e12, 4.0, "4", [4], {"v": 4}]
)


def _values(old: Any) -> st.SearchStrategy[Any]:
    # hostile values and values near the old one twice as likely as the rest
    return st.one_of(hostile, hostile, _near(old), _near(old), scalars, json_values, nested, long_lists)


# ---- mutations ----------------------------------------------------------------------------------------

Path_ = tuple[Any, ...]


def _paths(node: Any, prefix: Path_ = ()) -> list[Path_]:
    """Paths to every value below `node`; of a long list only the first few and the last."""
    out: list[Path_] = []
    if isinstance(node, dict):
        children: list[tuple[Any, Any]] = list(node.items())
    elif isinstance(node, list):
        idx = [*range(min(len(node), 8)), *([len(node) - 1] if len(node) > 8 else [])]
        children = [(i, node[i]) for i in idx]
    else:
        return out
    for key, child in children:
        out.append((*prefix, key))
        if isinstance(child, (dict, list)) and len(prefix) < 6:  # not into deeply nested junk
            out += _paths(child, (*prefix, key))
    return out


def _at(cfg: Any, path: Path_) -> Any:
    for key in path:
        cfg = cfg[key]
    return cfg


def _mutate(data: st.DataObject, cfg: dict[str, Any]) -> str:
    """One random edit of `cfg` in place; returns what was done (for the failure report)."""
    paths = _paths(cfg)
    kind = data.draw(st.sampled_from(["replace", "replace", "delete", "add", "resize"]), label="kind")
    if not paths:  # everything deleted
        kind = "add"
    containers: list[Path_] = [()] + [p for p in paths if isinstance(_at(cfg, p), (dict, list))]
    if kind == "resize":
        lists = [p for p in containers if isinstance(_at(cfg, p), list)]
        if lists:
            path = data.draw(st.sampled_from(lists), label="list")
            items = _at(cfg, path)
            flat = [x for x in items[:8] if not isinstance(x, (dict, list))] or [None]
            filler = data.draw(
                st.one_of(st.sampled_from(flat), scalars), label="filler"
            )  # flat: files stay small
            n = data.draw(st.sampled_from([0, 1, len(items) - 1, len(items) + 1, 2 * len(items), 100_000]))
            items[:] = (items + [filler] * max(0, n - len(items)))[: max(n, 0)]
            return f"resize {path} to {n}"
        kind = "add"
    if kind == "delete":
        keys = [p for p in paths if isinstance(_at(cfg, p[:-1]), dict)]
        if keys:
            path = data.draw(st.sampled_from(keys), label="delete")
            del _at(cfg, path[:-1])[path[-1]]
            return f"delete {path}"
        kind = "add"
    if kind == "add":
        dicts = [p for p in containers if isinstance(_at(cfg, p), dict)]
        path = data.draw(st.sampled_from(dicts), label="into")
        key = data.draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), label="key")
        _at(cfg, path)[key] = data.draw(_values(None), label="value")
        return f"add {(*path, key)}"
    fields = [p for p in paths if p[-1] in FIELDS]
    aimed = bool(fields) and data.draw(st.integers(0, 3), label="aimed") > 0  # 3 in 4
    path = data.draw(st.sampled_from(fields if aimed else paths), label="replace")
    parent = _at(cfg, path[:-1])
    parent[path[-1]] = data.draw(_values(parent[path[-1]]), label="value")
    return f"replace {path}"


def _mutated(data: st.DataObject) -> dict[str, Any]:
    name = data.draw(st.sampled_from(sorted(BASES)), label="base")
    cfg = copy.deepcopy(BASES[name])
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        note(_mutate(data, cfg))
    return cfg


# ---- the property --------------------------------------------------------------------------------------


class _TooSlow(BaseException):  # BaseException: no `except Exception` in the code under test hides it
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _TooSlow(f"one example took more than {LIMIT_S} s")


def _assert_sane(spec: Gemma4Spec) -> None:
    """An envelope written independently of spec.py's checks (so that loosening one is caught): what
    the export needs to build and trace a model without overflow, NaN or shape errors."""
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.type in ("int", "int | None") and value is not None:
            assert type(value) is int and 0 <= value <= 2**24, (f.name, value)
        if f.type == "bool":
            assert type(value) is bool, (f.name, value)
    floats = [spec.rms_norm_eps, spec.final_logit_softcapping or 1.0]
    floats += [x for r in spec.rope.values() for x in (r.theta, r.factor)]
    assert all(type(x) is float and 1e-15 < x < 1e15 for x in floats), floats
    # a tiny fraction rotates no angle at all: harmless
    assert all(
        type(r.partial_rotary_factor) is float and 0 < r.partial_rotary_factor <= 1
        for r in spec.rope.values()
    )
    assert 0 < spec.num_hidden_layers == len(spec.layer_types) <= 1024
    assert spec.head_dim % 2 == 0 and spec.global_head_dim % 2 == 0
    ids = [spec.pad_token_id, spec.bos_token_id, *spec.eos_token_id]
    assert all(type(i) is int and 0 <= i < spec.vocab_size for i in ids if i is not None), ids
    assert all(spec.num_attention_heads % spec.layer_kv_heads(i) == 0 for i in range(spec.num_hidden_layers))
    if isinstance(spec, Gemma3nSpec):
        n = spec.num_hidden_layers
        assert len(spec.intermediate_sizes) == len(spec.activation_sparsity_pattern) == n
        assert all(type(x) is int and 0 < x <= 2**24 for x in spec.intermediate_sizes)
        assert all(type(p) is float and 0 <= p < 1 for p in spec.activation_sparsity_pattern)
        assert spec.altup_num_inputs == 4 and spec.altup_active_idx == 0 and 0 < spec.laurel_rank <= 2**24


def _event(what: str) -> None:  # statistics: pytest --hypothesis-show-statistics
    if currently_in_test_context():
        event(what)


def check_outcome(parse: Callable[[], Gemma4Spec]) -> Gemma4Spec | None:
    """Run `parse` under a wall-clock bound: a sound, bounded spec, or None after a one-line UserError."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    try:
        try:
            spec = parse()
        except UserError as e:
            message = str(e)
            assert message.strip() and len(message.splitlines()) == 1, repr(message)
            assert len(message) < 500, f"{len(message)}-character message: {message[:200]}..."
            _event(f"refused: {' '.join(message.split()[:4])}")
            return None
        spec.validate()
        assert spec.num_parameters() <= MAX_PARAMETERS
        _assert_sane(spec)
        assert spec_from_config(spec.to_hf_config()) == spec
        _event("accepted")
        return spec
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@NO_EXPLAIN
@given(data=st.data())
def test_mutated_configs_parse_or_refuse_in_one_line(data: st.DataObject) -> None:
    cfg = _mutated(data)
    check_outcome(lambda: spec_from_config(cfg))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-ckpt")


@NO_EXPLAIN
@given(data=st.data())
def test_mutated_config_json_files_parse_or_refuse_in_one_line(data: st.DataObject, ckpt_dir: Path) -> None:
    """The same through config.json: JSON's NaN/Infinity literals, string keys, the nesting limit."""
    cfg = _mutated(data)
    (ckpt_dir / "config.json").write_text(json.dumps(cfg, allow_nan=True))
    check_outcome(lambda: read_spec(ckpt_dir))


@pytest.mark.parametrize(
    "change",
    [
        {"sliding_window": 2**70},  # died inside torch.export
        {"num_hidden_layers": 10**12},  # hung building the default layer_types
        {"num_hidden_layers": 1e12},
        {"num_hidden_layers": 10**12, "layer_types": None},
        {"layer_types": ["sliding_attention"] * 10**6},
        {"rope_parameters": {f"k{i}": {} for i in range(10**5)}},
        {"per_layer_config": {str(i): {} for i in range(10**5)}},
        {"eos_token_id": list(range(10**6))},
        {"hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 256, "layer_types": None},
    ],
    ids=lambda c: ",".join(c),
)
def test_campaign_findings_are_refused_quickly(change: dict[str, Any]) -> None:
    assert check_outcome(lambda: Gemma4Spec.from_hf_config(BASES["tiny"] | change)) is None


def test_rope_theta_beyond_float_is_refused_quickly() -> None:  # raised OverflowError
    cfg = copy.deepcopy(BASES["tiny"])
    cfg["rope_parameters"]["full_attention"]["rope_theta"] = 10**400
    assert check_outcome(lambda: Gemma4Spec.from_hf_config(cfg)) is None
