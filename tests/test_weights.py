"""Weight-name mapping: every tensor consumed, leftovers and gaps named."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from exporter.presets import get_preset
from exporter.spec import hf_weight_shapes
from exporter.weights import map_checkpoint
from ple_export.errors import UserError

SPEC = get_preset("tiny")


@dataclass
class Fake:
    shape: tuple[int, ...]


def _tensors(prefix: str = "model.") -> dict[str, Fake]:
    return {name: Fake(shape) for name, shape in hf_weight_shapes(SPEC, prefix).items()}


def test_text_checkpoint_maps_every_tensor_once() -> None:
    tensors = _tensors()
    mapping = map_checkpoint(SPEC, tensors)
    assert sorted(mapping.values()) == sorted(tensors)
    assert mapping["ple_table"] == "model.embed_tokens_per_layer.weight"
    assert mapping["layers.3.attn.wk.weight"] == "model.layers.3.self_attn.k_proj.weight"
    assert "layers.4.attn.wk.weight" not in mapping  # KV-shared layer: no K/V projections


def test_multimodal_checkpoint_uses_language_model_and_skips_towers() -> None:
    tensors = _tensors("model.language_model.") | {
        "model.vision_tower.encoder.layers.0.mlp.weight": Fake((4, 4)),
        "model.audio_tower.conv.weight": Fake((2,)),
        "model.embed_vision.embedding_projection.weight": Fake((3, 3)),
    }
    mapping = map_checkpoint(SPEC, tensors)
    assert mapping["embed.weight"] == "model.language_model.embed_tokens.weight"
    assert len(mapping) == len(hf_weight_shapes(SPEC))


def test_stale_kv_projections_of_shared_layers_are_ignored() -> None:
    # some checkpoints still carry them; transformers ignores them on load
    tensors = _tensors() | {
        "model.layers.5.self_attn.k_proj.weight": Fake((32, 64)),
        "lm_head.weight": Fake((512, 64)),
    }
    assert "model.layers.5.self_attn.k_proj.weight" not in map_checkpoint(SPEC, tensors).values()


def test_missing_tensor_is_named() -> None:
    tensors = _tensors()
    del tensors["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(UserError, match=r"missing tensor model\.layers\.2\.mlp\.up_proj\.weight"):
        map_checkpoint(SPEC, tensors)


def test_unexpected_tensor_is_named() -> None:
    tensors = _tensors() | {"model.layers.0.self_attn.rotary.inv_freq": Fake((8,))}
    with pytest.raises(UserError, match=r"unexpected tensor model\.layers\.0\.self_attn\.rotary\.inv_freq"):
        map_checkpoint(SPEC, tensors)


def test_misshapen_tensor_is_named_with_both_shapes() -> None:
    tensors = _tensors()
    tensors["model.per_layer_model_projection.weight"] = Fake((96, 63))
    with pytest.raises(
        UserError, match=r"per_layer_model_projection\.weight has shape \[96, 63\].*\[96, 64\]"
    ):
        map_checkpoint(SPEC, tensors)


def test_no_embedding_means_not_gemma4() -> None:
    with pytest.raises(UserError, match="not a Gemma 4 / Gemma 3n text checkpoint"):
        map_checkpoint(SPEC, {"transformer.wte.weight": Fake((10, 4))})
