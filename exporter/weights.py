"""Weight-name mapping, as data: HF Gemma 4 / Gemma 3n checkpoint names -> our module's names.

`map_checkpoint` consumes every tensor it maps; a missing, unexpected or mis-shaped tensor is an
error naming it. Names are relative to the text-decoder prefix (`model.` for `gemma4_text`,
`model.language_model.` for multimodal `gemma4`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from exporter.spec import Gemma4Spec
from ple_export.bundle.format import PLE_TABLE_TENSOR
from ple_export.errors import UserError

# HF name (below the text prefix) -> our name. Shapes come from `_shapes` below.
GLOBAL_MAP: dict[str, str] = {
    "embed_tokens.weight": "embed.weight",  # also the LM head (tied)
    "embed_tokens_per_layer.weight": PLE_TABLE_TENSOR,  # lives in the embedder graph (flash)
    "per_layer_model_projection.weight": "ple_projection.weight",
    "per_layer_projection_norm.weight": "ple_projection_norm.weight",
    "norm.weight": "final_norm.weight",
}
LAYER_MAP: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
    "layer_scalar": "layer_scalar",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
    "per_layer_input_gate.weight": "ple_gate.weight",
    "per_layer_projection.weight": "ple_proj.weight",
    "post_per_layer_input_norm.weight": "ple_norm.weight",
}
# Gemma 3n (exporter/gemma3n.py): no layer_scalar; AltUp, LAuReL and the stream projections added.
GEMMA3N_GLOBAL_MAP: dict[str, str] = GLOBAL_MAP | {
    f"{kind}.{j}.weight": f"{kind}.{j}.weight"
    for kind in ("altup_projections", "altup_unembed_projections")
    for j in range(3)
}
GEMMA3N_LAYER_MAP: dict[str, str] = {k: v for k, v in LAYER_MAP.items() if k != "layer_scalar"} | {
    "altup.correct_output_scale": "altup.correct_output_scale",
    "altup.correction_coefs.weight": "altup.correction_coefs.weight",
    "altup.prediction_coefs.weight": "altup.prediction_coefs.weight",
    "altup.modality_router.weight": "altup.router.weight",
    "altup.router_norm.weight": "altup.router_norm.weight",
    "laurel.linear_left.weight": "laurel.left.weight",
    "laurel.linear_right.weight": "laurel.right.weight",
    "laurel.post_laurel_norm.weight": "laurel.norm.weight",
}
NAME_MAPS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "gemma4": (GLOBAL_MAP, LAYER_MAP),
    "gemma3n": (GEMMA3N_GLOBAL_MAP, GEMMA3N_LAYER_MAP),
}
FAMILY_NAMES = {"gemma4": "Gemma 4", "gemma3n": "Gemma 3n"}
# Present in some checkpoints but unused by the math: tied LM head, KV projections of KV-shared layers
# (transformers' `_keys_to_ignore_on_load_unexpected`).
_KV_SUFFIXES = (
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.k_norm.weight",
    "self_attn.v_norm.weight",
)
TEXT_PREFIXES = ("model.language_model.", "model.")
# Multimodal gemma4 checkpoints: towers we do not export.
NON_TEXT_PREFIXES = (
    "model.vision_tower.",
    "model.audio_tower.",
    "model.embed_vision.",
    "model.embed_audio.",
    "vision_tower.",
    "audio_tower.",
    "multi_modal_projector.",
)


class HasShape(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...


def our_name(hf_suffix: str, family: str = "gemma4") -> str | None:
    """Our name for an HF name below the text prefix, or None if the name is not ours to map."""
    global_map, layer_map = NAME_MAPS[family]
    if hf_suffix in global_map:
        return global_map[hf_suffix]
    if hf_suffix.startswith("layers."):
        parts = hf_suffix.split(".", 2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2] in layer_map:
            return f"layers.{parts[1]}.{layer_map[parts[2]]}"
    return None


def detect_prefix(names: Mapping[str, object]) -> str:
    for prefix in TEXT_PREFIXES:
        if f"{prefix}embed_tokens.weight" in names:
            return prefix
    raise UserError(
        "checkpoint has no token embedding (looked for 'model.embed_tokens.weight' and "
        "'model.language_model.embed_tokens.weight'): not a Gemma 4 / Gemma 3n text checkpoint"
    )


def map_checkpoint(spec: Gemma4Spec, tensors: Mapping[str, HasShape]) -> dict[str, str]:
    """Map a checkpoint's tensors onto our names. Returns our name -> HF name.

    Fails naming the first missing tensor, the first unexpected one, or the first whose shape
    disagrees with config.json.
    """
    prefix = detect_prefix(tensors)
    expected = spec.weight_shapes(prefix)
    remaining = dict(tensors)
    mapping: dict[str, str] = {}
    for hf_name, shape in expected.items():
        if hf_name not in remaining:
            raise UserError(f"checkpoint is missing tensor {hf_name} (expected shape {list(shape)})")
        got = tuple(remaining.pop(hf_name).shape)
        if got != shape:
            raise UserError(f"tensor {hf_name} has shape {list(got)} but config.json implies {list(shape)}")
        name = our_name(hf_name[len(prefix) :], spec.family)
        assert name is not None, hf_name  # the tables above cover every expected name
        mapping[name] = hf_name
    for hf_name in list(remaining):
        suffix = hf_name[len(prefix) :] if hf_name.startswith(prefix) else None
        ignorable = (
            hf_name.startswith(NON_TEXT_PREFIXES)
            or hf_name in ("lm_head.weight", "model.lm_head.weight")
            or (
                suffix is not None
                and suffix.startswith("layers.")
                and suffix.endswith(_KV_SUFFIXES)
                and suffix.split(".")[1].isdigit()
                and int(suffix.split(".")[1]) < spec.num_hidden_layers
                and not spec.owns_kv(int(suffix.split(".")[1]))
            )
        )
        if ignorable:
            remaining.pop(hf_name)
    if remaining:
        name = sorted(remaining)[0]
        more = f" (and {len(remaining) - 1} more)" if len(remaining) > 1 else ""
        raise UserError(
            f"checkpoint has unexpected tensor {name}{more}: "
            f"not part of a {FAMILY_NAMES[spec.family]} text decoder"
        )
    return mapping
