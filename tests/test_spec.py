"""config.json parsing: presets round-trip, transformers' own serialisation parses the same."""

from __future__ import annotations

import pytest
import torch

from exporter.errors import UserError
from exporter.spec import PRESETS, Gemma4Spec
from tests.conftest import VARIANTS


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_round_trips_through_config_json(name: str) -> None:
    spec = PRESETS[name]
    assert Gemma4Spec.from_hf_config(spec.to_hf_config()) == spec


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
