"""config.json parsing: presets round-trip, transformers' own serialisation parses the same."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from exporter.config_fields import FLOAT_BOUNDS, INT_BOUNDS
from exporter.family import spec_from_config
from exporter.presets import PRESETS
from exporter.spec import MAX_PARAMETERS, Gemma4Spec
from ple_export.errors import UserError
from tests.conftest import VARIANTS


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_round_trips_through_config_json(name: str) -> None:
    spec = PRESETS[name]
    assert spec_from_config(spec.to_hf_config()) == spec


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_saved_config_parses_to_the_same_spec(name: str) -> None:
    """transformers 5.23 writes full-layer head_dim/KV heads only as per_layer_config overrides."""
    from transformers import Gemma4TextConfig

    spec = VARIANTS[name]
    hf_dict = Gemma4TextConfig.from_dict(spec.to_hf_config()).to_dict()
    assert "global_head_dim" not in hf_dict  # the case this test exists for
    assert Gemma4Spec.from_hf_config(hf_dict) == spec


def test_multimodal_config_uses_text_config() -> None:
    spec = PRESETS["tiny"]
    assert Gemma4Spec.from_hf_config({"model_type": "gemma4", "text_config": spec.to_hf_config()}) == spec


def test_e2b_parameter_count() -> None:
    # Gemma 4 E2B: ~5.1B with vision/audio; the text decoder alone ~4.65B, of which PLE 2.35B.
    spec = PRESETS["e2b"]
    assert spec.ple_dim == 35 * 256
    assert spec.vocab_size_per_layer_input * spec.ple_dim == 2_348_810_240
    assert 4.5e9 < spec.num_parameters() < 4.8e9
    assert len(spec.kv_layers) == 15


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size_per_layer_input": 0}, "Per-Layer Embeddings"),
        ({"hidden_size_per_layer_input": None}, "Per-Layer Embeddings"),
        ({"enable_moe_block": True}, "Mixture-of-Experts"),
        ({"model_type": "llama"}, "unsupported model_type"),
        ({"hidden_size": None}, "hidden_size"),
        (
            {
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1.0},
                }
            },
            "rope_type",
        ),
        ({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ],
)
def test_bad_configs_are_refused_with_a_reason(change: dict, message: str) -> None:
    cfg = PRESETS["tiny"].to_hf_config() | change
    with pytest.raises(UserError, match=message):
        Gemma4Spec.from_hf_config(cfg)


def _hf_layer_facts(cfg: dict) -> tuple[list[int], list[int]]:
    """head_dim and KV heads per layer, as transformers' own config resolves them."""
    from transformers import Gemma4TextConfig

    hf = Gemma4TextConfig.from_dict(cfg)
    layers = [hf.per_layer_config[i] for i in range(hf.num_hidden_layers)]
    return [c.head_dim for c in layers], [c.num_key_value_heads for c in layers]


def _our_layer_facts(spec: Gemma4Spec) -> tuple[list[int], list[int]]:
    n = spec.num_hidden_layers
    return [spec.layer_head_dim(i) for i in range(n)], [spec.layer_kv_heads(i) for i in range(n)]


@pytest.mark.parametrize(
    "change",
    [
        {"global_head_dim": 64, "per_layer_config": {"2": {"head_dim": 32}, "5": {"head_dim": 32}}},
        {"global_head_dim": 64, "per_layer_config": {}},
        {"per_layer_config": {"2": {"head_dim": 32}, "005": {"head_dim": 32}}},  # transformers reads 5
        {
            "per_layer_config": {
                "2": {"head_dim": 32, "num_key_value_heads": 2},
                "5": {"head_dim": 32, "num_key_value_heads": 2},
            }
        },
        {"num_global_key_value_heads": 2, "attention_k_eq_v": False},
        {"num_global_key_value_heads": 2, "attention_k_eq_v": True},
    ],
)
def test_per_layer_head_dims_and_kv_heads_resolve_as_transformers(change: dict) -> None:
    cfg = PRESETS["tiny"].to_hf_config()
    cfg.pop("global_head_dim")
    cfg |= change
    spec = Gemma4Spec.from_hf_config(cfg)
    assert _our_layer_facts(spec) == _hf_layer_facts(cfg)
    assert _our_layer_facts(Gemma4Spec.from_hf_config(spec.to_hf_config())) == _hf_layer_facts(cfg)


def test_unsupported_per_layer_overrides_are_refused() -> None:
    cfg = PRESETS["tiny"].to_hf_config() | {"per_layer_config": {"0": {"head_dim": 8}}}
    with pytest.raises(UserError, match="sliding_attention layer"):
        Gemma4Spec.from_hf_config(cfg)
    cfg = PRESETS["tiny"].to_hf_config() | {"per_layer_config": {"2": {"rms_norm_eps": 1e-5}}}
    with pytest.raises(UserError, match="rms_norm_eps"):
        Gemma4Spec.from_hf_config(cfg)


def test_legacy_rope_type_key_is_read() -> None:
    cfg = PRESETS["tiny"].to_hf_config()
    cfg["rope_parameters"]["full_attention"] = {
        "type": "proportional",
        "rope_theta": 1e6,
        "partial_rotary_factor": 0.25,
    }
    assert Gemma4Spec.from_hf_config(cfg).rope["full_attention"].rope_type == "proportional"


def test_rope_frequencies_match_transformers() -> None:
    """factor scales proportional RoPE only; default RoPE ignores it (as upstream)."""
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    from exporter.gemma4 import rope_inv_freq

    cfg = PRESETS["tiny"].to_hf_config()
    cfg["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "factor": 2.0},
        "full_attention": {
            "rope_type": "proportional",
            "rope_theta": 1e6,
            "partial_rotary_factor": 0.25,
            "factor": 4.0,
        },
    }
    spec = Gemma4Spec.from_hf_config(cfg)
    hf = Gemma4TextRotaryEmbedding(Gemma4TextConfig.from_dict(cfg))
    for lt, dim in (("sliding_attention", spec.head_dim), ("full_attention", spec.global_head_dim)):
        ours = rope_inv_freq(spec.rope[lt], dim)
        assert torch.allclose(ours, getattr(hf, f"{lt}_inv_freq"), rtol=1e-6), lt


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sliding_window": 1}, "sliding_window"),
        ({"rms_norm_eps": None}, "rms_norm_eps"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
        ({"num_hidden_layers": 0, "layer_types": []}, "num_hidden_layers"),
        ({"hidden_size_per_layer_input": -4}, "hidden_size_per_layer_input"),
        ({"final_logit_softcapping": -1.0}, "final_logit_softcapping"),
        ({"use_bidirectional_attention": "all"}, "bidirectional"),
        ({"per_layer_config": [1, 2]}, "per_layer_config"),
    ],
)
def test_more_bad_values_are_refused(change: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        Gemma4Spec.from_hf_config(PRESETS["tiny"].to_hf_config() | change)


def test_bad_rope_values_are_refused() -> None:
    for bad in ({"rope_theta": None}, {"partial_rotary_factor": 2.0}, {"rope_theta": -1.0}):
        cfg = PRESETS["tiny"].to_hf_config()
        cfg["rope_parameters"]["full_attention"] |= bad
        with pytest.raises(UserError, match="rope"):
            Gemma4Spec.from_hf_config(cfg)


def test_vision_bidirectional_flag_is_causal_for_text() -> None:
    cfg = PRESETS["tiny"].to_hf_config() | {"use_bidirectional_attention": "vision"}
    assert Gemma4Spec.from_hf_config(cfg) == PRESETS["tiny"]


# ---- bounds (docs/config-bounds.md) -----------------------------------------------------------------


def _tiny(**changes: Any) -> dict[str, Any]:
    cfg = PRESETS["tiny"].to_hf_config()
    for key, value in changes.items():
        if "." in key:  # rope_parameters.full_attention.rope_theta
            *parents, last = key.split(".")
            node = cfg
            for parent in parents:
                node = node[parent]
            node[last] = value
        else:
            cfg[key] = value
    return cfg


def _refused(cfg: dict[str, Any], *fragments: str) -> str:
    with pytest.raises(UserError) as info:
        Gemma4Spec.from_hf_config(cfg)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and len(message) < 300, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# Every integer field we read; token ids and per-layer values included.
INT_FIELDS = [
    "num_hidden_layers",
    "vocab_size",
    "vocab_size_per_layer_input",
    "hidden_size",
    "hidden_size_per_layer_input",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_global_key_value_heads",
    "head_dim",
    "global_head_dim",
    "sliding_window",
    "num_kv_shared_layers",
    "max_position_embeddings",
    "num_experts",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
]
FLOAT_FIELDS = [
    "rms_norm_eps",
    "final_logit_softcapping",
    "rope_parameters.full_attention.rope_theta",
    "rope_parameters.full_attention.partial_rotary_factor",
    "rope_parameters.full_attention.factor",
    "rope_parameters.sliding_attention.rope_theta",
]


def test_every_bound_is_tested() -> None:
    assert set(INT_FIELDS) == set(INT_BOUNDS)
    assert {f.rsplit(".", 1)[-1] for f in FLOAT_FIELDS} == set(FLOAT_BOUNDS)


def _int_bound_message(field: str) -> str:
    return f"field {field!r} must be an integer in {INT_BOUNDS[field]}"


def _float_bound_message(field: str) -> str:
    return f"field {field!r} must be a number in {FLOAT_BOUNDS[field.rsplit('.', 1)[-1]]}"


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize(
    "kind",
    [
        "too big",
        "huge",
        "astronomic",
        "negative",
        "float",
        "integral float",
        "string",
        "list",
        "object",
        "bool",
    ],
)
def test_integer_fields_are_bounded_and_typed(field: str, kind: str) -> None:
    hi = int(INT_BOUNDS[field].hi)
    value = {
        "too big": hi + 1,
        "huge": 2**70,
        "astronomic": 10**400,
        "negative": -1,
        "float": 1e12,
        "integral float": 4.0,
        "string": "4",
        "list": [[[4]]],
        "object": {"value": 4},
        "bool": True,
    }[kind]
    _refused(_tiny(**{field: value}), _int_bound_message(field))


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize(
    "kind", ["too big", "astronomic", "negative", "nan", "inf", "-inf", "string", "list", "object", "bool"]
)
def test_float_fields_are_bounded_finite_and_typed(field: str, kind: str) -> None:
    hi = FLOAT_BOUNDS[field.rsplit(".", 1)[-1]].hi
    value = {
        "too big": hi * 1.5,
        "astronomic": 10**400,  # an int: float() of it would overflow
        "negative": -1.0,
        "nan": float("nan"),
        "inf": float("inf"),
        "-inf": float("-inf"),
        "string": "1.0",
        "list": [1.0],
        "object": {"value": 1.0},
        "bool": True,  # == 1, inside most ranges: refused for its type
    }[kind]
    _refused(_tiny(**{field: value}), _float_bound_message(field))


def test_per_layer_config_values_are_bounded() -> None:
    for value in (2048, 0, -2, 2.0, True, "32", [32], None):
        cfg = _tiny(per_layer_config={"2": {"head_dim": 32}, "5": {"head_dim": value}})
        if value is None:  # null: not overridden, so the two full layers differ
            _refused(cfg, "same overrides")
        else:
            _refused(cfg, "per_layer_config['5'].head_dim", str(INT_BOUNDS["global_head_dim"]))
        cfg = _tiny(
            per_layer_config={"2": {"num_key_value_heads": value}, "5": {"num_key_value_heads": value}}
        )
        if value is not None:
            _refused(cfg, "per_layer_config['2'].num_key_value_heads", str(INT_BOUNDS["num_key_value_heads"]))


# At the edges of each bound: accepted, and written back as the same spec.
EDGES_ACCEPTED = [
    {"num_hidden_layers": 256, "layer_types": None},
    {"num_hidden_layers": 256, "layer_types": ["full_attention"] * 256, "num_kv_shared_layers": 255},
    {"num_hidden_layers": 1, "layer_types": ["full_attention"], "num_kv_shared_layers": 0},
    {"vocab_size": 2**20, "vocab_size_per_layer_input": 2**20},
    {
        "vocab_size": 1,
        "vocab_size_per_layer_input": 1,
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    {"hidden_size": 65536},
    {"hidden_size": 1},
    {"hidden_size_per_layer_input": 16384},
    {"hidden_size_per_layer_input": 1},
    {"intermediate_size": 262144},
    {"intermediate_size": 1},
    {"num_attention_heads": 256, "num_key_value_heads": 256},
    {"num_attention_heads": 256, "attention_k_eq_v": True, "num_global_key_value_heads": 256},
    {"head_dim": 1024, "global_head_dim": 1024},
    {"head_dim": 2, "global_head_dim": 2},
    {"sliding_window": 2**20},
    {"sliding_window": 2},
    {"max_position_embeddings": 2**24},
    {"max_position_embeddings": 1},
    {"num_experts": 0},
    {"pad_token_id": 511, "bos_token_id": None, "eos_token_id": [511] * 64},
    {"eos_token_id": None},
    {"rms_norm_eps": 1e-12},
    {"rms_norm_eps": 0.99},
    {"final_logit_softcapping": 1},
    {"final_logit_softcapping": 10000.0},
    {"final_logit_softcapping": None},
    {"rope_parameters.full_attention.rope_theta": 1e12},
    {"rope_parameters.sliding_attention.rope_theta": 1},
    {"rope_parameters.full_attention.partial_rotary_factor": 1e-9},
    {"rope_parameters.full_attention.partial_rotary_factor": 1},
    {"rope_parameters.full_attention.factor": 1024},
    {"rope_parameters.full_attention.factor": 1},
]


@pytest.mark.parametrize(
    "change", EDGES_ACCEPTED, ids=lambda c: ",".join(f"{k}={v!r:.12}" for k, v in c.items())
)
def test_values_at_the_bounds_are_accepted(change: dict[str, Any]) -> None:
    spec = Gemma4Spec.from_hf_config(_tiny(**change))
    assert spec.num_parameters() <= MAX_PARAMETERS
    assert Gemma4Spec.from_hf_config(spec.to_hf_config()) == spec


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        # each field within its bound; together far too large
        (
            {"hidden_size": 65536, "intermediate_size": 262144, "vocab_size": 2**20},
            ["parameters", "at most 1e+11"],
        ),
        (
            {
                "num_hidden_layers": 256,
                "layer_types": None,
                "hidden_size_per_layer_input": 16384,
                "vocab_size_per_layer_input": 2**20,
            },
            ["parameters"],
        ),
        ({"pad_token_id": 512}, ["'pad_token_id' must be an integer in [0, 511] (below vocab_size)"]),
        ({"bos_token_id": 512}, ["'bos_token_id'", "[0, 511]"]),
        ({"eos_token_id": [1, 512]}, ["'eos_token_id'", "[0, 511]"]),
        ({"eos_token_id": [1] * 64 + ["x"]}, ["'eos_token_id'", "more than 64"]),  # counted before read
        ({"eos_token_id": [1, [106]]}, ["'eos_token_id'"]),
        ({"num_kv_shared_layers": 6}, ["'num_kv_shared_layers' must be an integer in [0, 5]"]),
        ({"head_dim": 17}, ["'head_dim' must be even"]),
        ({"global_head_dim": 33}, ["'global_head_dim' must be even"]),
        ({"num_key_value_heads": 3}, ["num_attention_heads (4)", "KV heads (3)"]),
        ({"layer_types": "sliding_attention"}, ["'layer_types'", "a list of strings"]),
        ({"layer_types": ["sliding_attention"] * 10**6}, ["'layer_types' must list 6", "a list of 1000000"]),
        ({"layer_types": ["sliding_attention", 1, 2, 3, 4, 5]}, ["layer type 1"]),
        ({"layer_types": [["full_attention"]] * 6}, ["layer type a list of 1"]),
        ({"rope_parameters": "default"}, ["'rope_parameters' must be an object"]),
        (
            {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
            ["rope_parameters has no entry for sliding_attention"],
        ),
        ({"rope_parameters.full_attention.rope_type": ["default"]}, ["rope_type a list of 1"]),
        ({"rope_parameters.full_attention.rope_theta": None}, ["rope_theta", "got null"]),
        ({"hidden_activation": ["gelu_pytorch_tanh"]}, ["hidden_activation a list of 1"]),
        ({"hidden_activation": "gelu\n" * 1000}, ["hidden_activation", "..."]),
        ({"model_type": "x\u2028y" * 1000}, ["model_type"]),
        ({"model_type": 10**5000}, ["model_type ~2**16609"]),
        ({"use_bidirectional_attention": "both"}, ["'use_bidirectional_attention' must be null"]),
        ({"attention_bias": True}, ["attention_bias"]),
        ({"attention_k_eq_v": "yes"}, ["'attention_k_eq_v' must be true or false"]),
        ({"use_double_wide_mlp": 1}, ["'use_double_wide_mlp' must be true or false"]),
        ({"tie_word_embeddings": "false"}, ["'tie_word_embeddings' must be true or false"]),
        ({"enable_moe_block": 1}, ["'enable_moe_block' must be true or false"]),
        ({"num_experts": 8}, ["Mixture-of-Experts"]),
        ({"hidden_size_per_layer_input": 0.0}, ["Per-Layer Embeddings"]),
        ({"per_layer_config": {"\u00b2": {"head_dim": 32}}}, ["entry '\u00b2'"]),  # "²".isdigit()
        ({"per_layer_config": {"9" * 5000: {"head_dim": 32}}}, ["entry '9999"]),
        ({"per_layer_config": {"2": {"head_dim": 32}, "02": {"head_dim": 32}}}, ["distinct"]),
        ({"per_layer_config": {str(i): {} for i in range(7)}}, ["7 entries for 6 layers"]),
        ({"per_layer_config": {"2": {"head_dim": 32}, "3": {"head_dim": 32}}}, ["sliding_attention layer"]),
        ({"per_layer_config": {"2": {"head_dim": [[[32]]]}, "5": {"head_dim": [[[32]]]}}}, ["head_dim"]),
    ],
)
def test_combinations_and_shapes_are_refused(change: dict[str, Any], fragments: list[str]) -> None:
    _refused(_tiny(**change), *fragments)


class _Untouchable:
    """A list entry that must not be looked at: its list is refused for its length first."""

    def __eq__(self, other: object) -> bool:
        raise AssertionError("entry compared before the list's length was checked")

    __hash__ = None  # type: ignore[assignment]


def test_long_lists_are_refused_before_their_entries_are_read() -> None:
    _refused(_tiny(layer_types=[_Untouchable()] * 10**6), "'layer_types' must list 6", "a list of 1000000")
    _refused(_tiny(eos_token_id=[_Untouchable()] * 10**6), "'eos_token_id' lists more than 64")


# The bounds as docs/config-bounds.md states them: a change to a bound must change both.
DOCUMENTED = {
    "num_hidden_layers": "[1, 256]",
    "vocab_size": "[1, 1048576]",
    "vocab_size_per_layer_input": "[1, 1048576]",
    "hidden_size": "[1, 65536]",
    "hidden_size_per_layer_input": "[1, 16384]",
    "intermediate_size": "[1, 262144]",
    "num_attention_heads": "[1, 256]",
    "num_key_value_heads": "[1, 256]",
    "num_global_key_value_heads": "[1, 256]",
    "head_dim": "[2, 1024]",
    "global_head_dim": "[2, 1024]",
    "sliding_window": "[2, 1048576]",
    "num_kv_shared_layers": "[0, 255]",
    "max_position_embeddings": "[1, 16777216]",
    "num_experts": "[0, 4096]",
    "pad_token_id": "[0, 1048575]",
    "bos_token_id": "[0, 1048575]",
    "eos_token_id": "[0, 1048575]",
    "rms_norm_eps": "[1e-12, 1)",
    "final_logit_softcapping": "[1, 10000]",
    "rope_theta": "[1, 1e+12]",
    "partial_rotary_factor": "(0, 1]",
    "factor": "[1, 1024]",
}


def test_bounds_are_the_documented_ones() -> None:
    assert {k: str(v) for k, v in (INT_BOUNDS | FLOAT_BOUNDS).items()} == DOCUMENTED
    assert MAX_PARAMETERS == 10**11


def test_deeply_nested_value_where_a_scalar_is_expected() -> None:
    deep: Any = 6
    for _ in range(5000):  # deeper than the recursion limit: nothing may repr or compare it
        deep = [deep]
    for field in ("num_hidden_layers", "hidden_activation", "rope_parameters", "eos_token_id", "model_type"):
        _refused(_tiny(**{field: deep}), field)
    _refused(_tiny(per_layer_config={"2": {"head_dim": deep}, "5": {"head_dim": deep}}), "head_dim")
    _refused({"model_type": "gemma4", "text_config": deep}, "text_config")


def test_validate_bounds_specs_built_in_python() -> None:
    tiny = PRESETS["tiny"]
    for changes, fragment in [
        ({"sliding_window": 2**70}, "'sliding_window' must be an integer in [2, 1048576]"),
        ({"hidden_size": True}, "'hidden_size'"),
        ({"rms_norm_eps": float("nan")}, "'rms_norm_eps'"),
        ({"num_hidden_layers": 10**12}, "'num_hidden_layers'"),
        ({"final_logit_softcapping": 0.0}, "'final_logit_softcapping'"),
        ({"eos_token_id": (1, 600)}, "'eos_token_id'"),
        ({"eos_token_id": 1}, "'eos_token_id' must be an id or a list"),
        ({"use_double_wide_mlp": None}, "'use_double_wide_mlp'"),
    ]:
        with pytest.raises(UserError, match=re.escape(fragment)):
            tiny.replace(**changes)


def _write_config(folder: Path, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(text)
    return folder


def test_config_json_literals_beyond_floats_and_ints(tmp_path: Path) -> None:
    text = json.dumps(PRESETS["tiny"].to_hf_config())
    for literal, fragment in [
        ("NaN", "got nan"),
        ("Infinity", "got inf"),
        ("-Infinity", "got -inf"),
        ("1e400", "got inf"),  # json reads an overflowing float as inf
        ("1" + "0" * 400, "got ~2**1328"),
        ("1" + "0" * 5000, "not valid JSON"),  # beyond Python's int digit limit
    ]:
        folder = _write_config(
            tmp_path / "ckpt", text.replace('"rms_norm_eps": 1e-06', f'"rms_norm_eps": {literal}')
        )
        with pytest.raises(UserError) as info:
            Gemma4Spec.from_checkpoint_dir(folder)
        assert fragment in str(info.value) and len(str(info.value).splitlines()) == 1, str(info.value)


def test_oversized_config_json_is_not_read(tmp_path: Path) -> None:
    cfg = PRESETS["tiny"].to_hf_config() | {"padding": "x" * (1 << 20)}
    folder = _write_config(tmp_path / "ckpt", json.dumps(cfg))
    with pytest.raises(UserError, match="a config.json is a few KiB"):
        Gemma4Spec.from_checkpoint_dir(folder)
