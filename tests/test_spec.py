"""config.json parsing: presets round-trip, transformers' own serialisation parses the same."""

from __future__ import annotations

import pytest

from exporter.spec import PRESETS, Gemma4Spec
from ple_export.errors import UserError
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
