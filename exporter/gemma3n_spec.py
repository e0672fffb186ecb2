"""Gemma 3n text decoder spec: what Gemma 3n adds to Gemma 4's (`exporter/spec.py`), as a subclass.

Gemma 3n shares Gemma 4's attention (q/k RMS-normed, weightless v norm, scaling 1), KV sharing and
Per-Layer Embeddings, and adds per layer: AltUp (4 hidden streams, a router and predict/correct
coefficients), LAuReL (a low-rank side branch of the attention residual), activation sparsity in the
first layers' MLP gate, and a per-layer FFN size. One head size and plain RoPE on both layer types.
`docs/architecture.md` has the delta table. Upstream: transformers 5.23 `models/gemma3n`.

config.json is either `gemma3n_text` or the multimodal `gemma3n` with a `text_config` (its vision
and audio towers are not exported; token ids follow `Gemma3nForCausalLM`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exporter.config_fields import INT_BOUNDS, Range, check_float, check_int, show
from exporter.config_fields import Fields as _Fields
from exporter.spec import FULL, MAX_EOS_TOKENS, SLIDING, SUPPORTED_ACTIVATIONS, Gemma4Spec, RopeSpec
from ple_export.errors import UserError

FAMILY = "gemma3n"
MODEL_TYPES = ("gemma3n_text", "gemma3n")
ALTUP_STREAMS = 4  # what every released Gemma 3n uses; the export supports exactly this
ROPE_THETA = {SLIDING: 10_000.0, FULL: 1_000_000.0}  # `rope_local_base_freq`, `rope_theta`
_SPARSITY = Range(0.0, 1.0, hi_open=True)  # a layer's target sparsity; 0: dense
_CLIP = Range(0.0, 1e6, lo_open=True)
_LAUREL = Range(1, 16_384)


@dataclass(frozen=True)
class Gemma3nSpec(Gemma4Spec):
    intermediate_sizes: tuple[int, ...] = ()  # per layer (config.json: one int or a list)
    activation_sparsity_pattern: tuple[float, ...] = ()  # per layer; 0.0 = dense
    altup_num_inputs: int = ALTUP_STREAMS
    altup_active_idx: int = 0
    altup_coef_clip: float | None = 120.0
    altup_correct_scale: bool = True
    laurel_rank: int = 64
    max_position_embeddings: int = 32_768

    @property
    def family(self) -> str:
        return FAMILY

    @property
    def checkpoint_prefix(self) -> str:
        return "model.language_model."  # the multimodal wrapper's layout, as released

    def layer_intermediate_size(self, layer: int) -> int:
        return self.intermediate_sizes[layer]

    def weight_shapes(self, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
        return gemma3n_weight_shapes(self, prefix)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        n = check_int("num_hidden_layers", self.num_hidden_layers)
        if self.altup_num_inputs != ALTUP_STREAMS:
            raise UserError(
                f"config.json: altup_num_inputs must be {ALTUP_STREAMS} (every released Gemma 3n), "
                f"got {show(self.altup_num_inputs)}"
            )
        if self.altup_active_idx != 0:
            raise UserError(
                f"config.json: altup_active_idx must be 0 (the released models' active stream), "
                f"got {show(self.altup_active_idx)}"
            )
        for name in ("intermediate_sizes", "activation_sparsity_pattern"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != n:
                field = "intermediate_size" if name == "intermediate_sizes" else name
                raise UserError(
                    f"config.json: field {field!r} must list {n} values (num_hidden_layers), "
                    f"got {show(value)}"
                )
        for size in self.intermediate_sizes:
            check_int("intermediate_size", size)
        for p in self.activation_sparsity_pattern:
            check_float("activation_sparsity_pattern", p, _SPARSITY)
        check_float("altup_coef_clip", self.altup_coef_clip, _CLIP, nullable=True)
        check_int("laurel_rank", self.laurel_rank, _LAUREL)
        check_int("max_position_embeddings", self.max_position_embeddings)
        if not isinstance(self.altup_correct_scale, bool):
            raise UserError(
                "config.json: field 'altup_correct_scale' must be true or false, "
                f"got {show(self.altup_correct_scale)}"
            )
        if self.head_dim != self.global_head_dim or any(r.rope_type != "default" for r in self.rope.values()):
            raise UserError("config.json: Gemma 3n has one head size and default RoPE on both layer types")
        super().validate()

    # ---- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> Gemma3nSpec:
        """Parse a `gemma3n` (multimodal wrapper: its text_config) or `gemma3n_text` config.json."""
        if cfg.get("model_type") == "gemma3n":
            text = cfg.get("text_config")
            if not isinstance(text, dict):
                raise UserError("config.json: model_type 'gemma3n' without a 'text_config' object")
            cfg = text
        if cfg.get("model_type", "gemma3n_text") != "gemma3n_text":
            raise UserError(f"config.json: text_config has model_type {show(cfg.get('model_type'))}")
        f = _Fields(cfg)
        if not f.bool("tie_word_embeddings", True):
            raise UserError(
                "config.json: tie_word_embeddings=false is not supported (Gemma 3n ties the LM head)"
            )
        if f.bool("attention_bias", False):
            raise UserError("config.json: attention_bias=true is not supported (Gemma 3n has no biases)")
        act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in SUPPORTED_ACTIVATIONS:
            raise UserError(f"config.json: unsupported hidden_activation {show(act)}")
        n = f.int("num_hidden_layers", 35)
        head_dim = f.int("head_dim", 256)
        layer_types = _layer_types(cfg.get("layer_types"), n)
        spec = cls(
            vocab_size=f.int("vocab_size", 262_400),
            hidden_size=f.int("hidden_size", 2048),
            intermediate_size=0,  # replaced below by the first per-layer size
            num_hidden_layers=n,
            num_attention_heads=f.int("num_attention_heads", 8),
            num_key_value_heads=f.int("num_key_value_heads", 2),
            head_dim=head_dim,
            global_head_dim=head_dim,
            layer_types=layer_types,
            sliding_window=f.int("sliding_window", 512),
            vocab_size_per_layer_input=f.int("vocab_size_per_layer_input", 262_144),
            hidden_size_per_layer_input=f.int("hidden_size_per_layer_input", 256),
            num_kv_shared_layers=f.int("num_kv_shared_layers", 15, null=0),
            final_logit_softcapping=f.float("final_logit_softcapping", 30.0, null=None),
            rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            rope=_rope(cfg, layer_types),
            hidden_activation=act,
            pad_token_id=f.int("pad_token_id", 0, null=None),
            bos_token_id=f.int("bos_token_id", 2, null=None),
            eos_token_id=_eos(cfg.get("eos_token_id", 1)),
            intermediate_sizes=_per_layer(cfg.get("intermediate_size", 16_384), n, "intermediate_size"),
            activation_sparsity_pattern=_sparsity(cfg.get("activation_sparsity_pattern"), n),
            altup_num_inputs=check_int("altup_num_inputs", cfg.get("altup_num_inputs", 4), Range(1, 64)),
            altup_active_idx=check_int("altup_active_idx", cfg.get("altup_active_idx", 0), Range(0, 63)),
            altup_coef_clip=check_float(
                "altup_coef_clip", cfg.get("altup_coef_clip", 120.0), _CLIP, nullable=True
            ),
            altup_correct_scale=f.bool("altup_correct_scale", True),
            laurel_rank=check_int("laurel_rank", cfg.get("laurel_rank", 64), _LAUREL),
            max_position_embeddings=f.int("max_position_embeddings", 32_768),
        )
        spec = spec.replace(intermediate_size=spec.intermediate_sizes[0])  # validates
        return spec

    def to_hf_config(self) -> dict[str, Any]:
        """config.json content in the released wrapper layout: model_type `gemma3n` and a
        `gemma3n_text` text_config that transformers' Gemma3nTextConfig reads back."""
        text: dict[str, Any] = {
            "model_type": "gemma3n_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": list(self.intermediate_sizes),
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "vocab_size_per_layer_input": self.vocab_size_per_layer_input,
            "hidden_size_per_layer_input": self.hidden_size_per_layer_input,
            "num_kv_shared_layers": self.num_kv_shared_layers,
            "final_logit_softcapping": self.final_logit_softcapping,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_activation": self.hidden_activation,
            "rope_parameters": {
                lt: {"rope_type": "default", "rope_theta": r.theta} for lt, r in sorted(self.rope.items())
            },
            "activation_sparsity_pattern": list(self.activation_sparsity_pattern),
            "altup_num_inputs": self.altup_num_inputs,
            "altup_active_idx": self.altup_active_idx,
            "altup_coef_clip": self.altup_coef_clip,
            "altup_correct_scale": self.altup_correct_scale,
            "laurel_rank": self.laurel_rank,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": True,
            "attention_bias": False,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.hf_eos_token_id,
            "torch_dtype": "bfloat16",
        }
        return {
            "architectures": ["Gemma3nForConditionalGeneration"],
            "model_type": "gemma3n",
            "text_config": text,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.hf_eos_token_id,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        }


def gemma3n_weight_shapes(spec: Gemma3nSpec, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Every tensor of a Gemma 3n text decoder, HF name -> shape, in a fixed order (a real
    checkpoint also holds k/v projections of KV-shared layers: `exporter.weights` ignores them)."""
    h, p, n_in = spec.hidden_size, spec.hidden_size_per_layer_input, spec.altup_num_inputs
    out: dict[str, tuple[int, ...]] = {
        prefix + "embed_tokens.weight": (spec.vocab_size, h),
        prefix + "embed_tokens_per_layer.weight": (spec.vocab_size_per_layer_input, spec.ple_dim),
        prefix + "per_layer_model_projection.weight": (spec.ple_dim, h),
        prefix + "per_layer_projection_norm.weight": (p,),
    }
    for kind in ("altup_projections", "altup_unembed_projections"):
        for j in range(n_in - 1):
            out[f"{prefix}{kind}.{j}.weight"] = (h, h)
    nh, kvh, hd, r = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim, spec.laurel_rank
    for i in range(spec.num_hidden_layers):
        inter = spec.layer_intermediate_size(i)
        layer: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "pre_feedforward_layernorm.weight": (h,),
            "post_feedforward_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (nh * hd, h),
            "self_attn.q_norm.weight": (hd,),
            "self_attn.o_proj.weight": (h, nh * hd),
            "mlp.gate_proj.weight": (inter, h),
            "mlp.up_proj.weight": (inter, h),
            "mlp.down_proj.weight": (h, inter),
            "altup.correct_output_scale": (h,),
            "altup.correction_coefs.weight": (n_in, n_in),
            "altup.prediction_coefs.weight": (n_in * n_in, n_in),
            "altup.modality_router.weight": (n_in, h),
            "altup.router_norm.weight": (h,),
            "laurel.linear_left.weight": (r, h),
            "laurel.linear_right.weight": (h, r),
            "laurel.post_laurel_norm.weight": (h,),
            "per_layer_input_gate.weight": (p, h),
            "per_layer_projection.weight": (h, p),
            "post_per_layer_input_norm.weight": (h,),
        }
        if spec.owns_kv(i):
            layer["self_attn.k_proj.weight"] = (kvh * hd, h)
            layer["self_attn.v_proj.weight"] = (kvh * hd, h)
            layer["self_attn.k_norm.weight"] = (hd,)
        for suffix, shape in layer.items():
            out[f"{prefix}layers.{i}.{suffix}"] = shape
    out[prefix + "norm.weight"] = (h,)
    return out


def _eos(eos: Any) -> tuple[int, ...]:
    eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    if len(eos_list) > MAX_EOS_TOKENS:
        raise UserError(f"config.json: field 'eos_token_id' lists more than {MAX_EOS_TOKENS} ids")
    return tuple(check_int("eos_token_id", e, note=" (or a list of such)") for e in eos_list)


def _per_layer(raw: Any, n: int, name: str) -> tuple[int, ...]:
    """One integer for every layer, or a list of one per layer (as transformers accepts)."""
    if isinstance(raw, list):
        if len(raw) != n:
            raise UserError(
                f"config.json: field {name!r} must list {n} values (num_hidden_layers), got {show(raw)}"
            )
        return tuple(check_int(name, v, INT_BOUNDS[name]) for v in raw)
    return (check_int(name, raw),) * n


def _sparsity(raw: Any, n: int) -> tuple[float, ...]:
    """Each layer's activation sparsity; transformers' default: 0.95 for the first 10 layers (when
    there are more than 10), dense after."""
    if raw is None:
        sparse = 10 if n > 10 else 0
        return (0.95,) * sparse + (0.0,) * (n - sparse)
    if not isinstance(raw, list):
        raw = [raw] * n  # one value for all layers
    if len(raw) != n:
        raise UserError(
            f"config.json: field 'activation_sparsity_pattern' must list {n} values (num_hidden_layers), "
            f"got {show(raw)}"
        )
    return tuple(check_float("activation_sparsity_pattern", v, _SPARSITY) for v in raw)


def _layer_types(raw: Any, n: int) -> tuple[str, ...]:
    """layer_types, with Gemma 3n's default (every 5th layer full; the last is not forced)."""
    if raw is None:
        return tuple(FULL if (i + 1) % 5 == 0 else SLIDING for i in range(n))
    if not isinstance(raw, list) or len(raw) != n or any(t not in (SLIDING, FULL) for t in raw):
        raise UserError(
            f"config.json: field 'layer_types' must list {n} of {SLIDING!r}/{FULL!r}, got {show(raw)}"
        )
    return tuple(raw)


def _rope(cfg: dict[str, Any], layer_types: tuple[str, ...]) -> dict[str, RopeSpec]:
    """Default RoPE per layer type: `rope_parameters` (new configs) or the released configs'
    `rope_local_base_freq` (sliding) and `rope_theta` (full)."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise UserError(f"config.json: field 'rope_parameters' must be an object, got {show(params)}")
    if cfg.get("rope_scaling") is not None:
        raise UserError("config.json: rope_scaling is not supported for Gemma 3n (default RoPE only)")
    legacy = {SLIDING: cfg.get("rope_local_base_freq"), FULL: cfg.get("rope_theta")}
    rope = {}
    for lt in sorted(set(layer_types)):
        entry = (params or {}).get(lt)
        if entry is not None and not isinstance(entry, dict):
            raise UserError(f"config.json: rope_parameters.{lt} must be an object, got {show(entry)}")
        entry = entry or {}
        rtype = entry.get("rope_type", "default")
        if rtype != "default":
            raise UserError(f"config.json: unsupported rope_type {show(rtype)} for {lt} (Gemma 3n: default)")
        theta = entry.get("rope_theta", legacy[lt] if legacy[lt] is not None else ROPE_THETA[lt])
        rope[lt] = RopeSpec("default", check_float(f"rope_parameters.{lt}.rope_theta", theta))
    return rope
