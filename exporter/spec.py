"""Gemma 4 text decoder spec: a typed view of `config.json`, with presets.

Only what the decoder math needs is kept. Parsing is strict where a wrong guess would give wrong
numbers (missing PLE, MoE, unknown RoPE types) and lenient about fields that do not change them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import UserError
from exporter.jsonfile import read_json_object

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_ROPE_TYPES = ("default", "proportional")
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)


@dataclass(frozen=True)
class RopeSpec:
    rope_type: str  # "default" | "proportional"
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class Gemma4Spec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # sliding layers
    global_head_dim: int  # full layers
    layer_types: tuple[str, ...]
    sliding_window: int
    vocab_size_per_layer_input: int
    hidden_size_per_layer_input: int
    num_kv_shared_layers: int = 0
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False
    use_double_wide_mlp: bool = False
    final_logit_softcapping: float | None = None
    rms_norm_eps: float = 1e-6
    rope: dict[str, RopeSpec] = field(default_factory=dict)
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: tuple[int, ...] = (1,)

    # ---- derived per-layer facts -------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        # KV heads of full layers when they differ (config.json's top-level key counts only with
        # attention_k_eq_v, a per_layer_config override always: see `_full_layer_overrides`)
        if not self.is_sliding(layer) and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def k_eq_v(self, layer: int) -> bool:
        return self.attention_k_eq_v and not self.is_sliding(layer)

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def owns_kv(self, layer: int) -> bool:
        return layer < self.first_kv_shared_layer

    def kv_source(self, layer: int) -> int:
        """The layer whose keys/values `layer` attends over: itself, or for a KV-shared layer the
        last KV-owning layer of the same type (transformers' `kv_sharing_modes`: "store")."""
        if self.owns_kv(layer):
            return layer
        for j in range(self.first_kv_shared_layer - 1, -1, -1):
            if self.layer_types[j] == self.layer_types[layer]:
                return j
        raise UserError(f"layer {layer} shares KV but no earlier layer of type {self.layer_types[layer]}")

    @property
    def kv_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.owns_kv(i)]

    def layer_intermediate_size(self, layer: int) -> int:
        double = self.use_double_wide_mlp and not self.owns_kv(layer)
        return self.intermediate_size * (2 if double else 1)

    @property
    def ple_dim(self) -> int:
        return self.num_hidden_layers * self.hidden_size_per_layer_input

    @property
    def hf_eos_token_id(self) -> int | list[int]:
        """eos as HF configs spell it: one id, or a list of several."""
        return self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Gemma4Spec:
        spec = dataclasses.replace(self, **changes)
        spec.validate()
        return spec

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        if not self.hidden_size_per_layer_input:
            raise UserError(
                "checkpoint has no Per-Layer Embeddings (hidden_size_per_layer_input is 0/null): "
                "ple-export only exports PLE decoders"
            )
        if self.num_hidden_layers <= 0:
            raise UserError(f"config.json: num_hidden_layers must be positive, got {self.num_hidden_layers}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise UserError(
                f"config.json: layer_types has {len(self.layer_types)} entries, "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        if bad:
            raise UserError(f"config.json: unsupported layer_types {bad}")
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise UserError(f"config.json: num_kv_shared_layers={self.num_kv_shared_layers} out of range")
        owners = set(self.layer_types[: self.first_kv_shared_layer])
        if self.num_kv_shared_layers and owners != set(self.layer_types):
            raise UserError("config.json: KV-shared layers use a layer type that no KV-owning layer has")
        for t in set(self.layer_types):
            if t not in self.rope:
                raise UserError(f"config.json: rope_parameters has no entry for {t}")
        if self.hidden_activation not in SUPPORTED_ACTIVATIONS:
            raise UserError(f"config.json: unsupported hidden_activation {self.hidden_activation!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "global_head_dim",
            "sliding_window",
            "vocab_size_per_layer_input",
            "hidden_size_per_layer_input",
        ):
            if getattr(self, name) <= 0:
                raise UserError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.sliding_window < 2:
            raise UserError(f"config.json: sliding_window must be at least 2, got {self.sliding_window}")
        if not self.rms_norm_eps > 0:
            raise UserError(f"config.json: rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            raise UserError("config.json: final_logit_softcapping must be positive or null")
        for lt, r in self.rope.items():
            if not (r.theta > 0 and r.factor > 0 and 0 < r.partial_rotary_factor <= 1):
                raise UserError(
                    f"config.json: rope_parameters.{lt} needs rope_theta > 0, factor > 0 and "
                    f"0 < partial_rotary_factor <= 1"
                )
        for i in range(self.num_hidden_layers):
            if self.num_attention_heads % self.layer_kv_heads(i):
                raise UserError("config.json: num_attention_heads is not a multiple of the KV heads")

    # ---- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> Gemma4Spec:
        model_type = cfg.get("model_type")
        if model_type == "gemma4":
            text = cfg.get("text_config")
            if not isinstance(text, dict):
                raise UserError("config.json: model_type 'gemma4' without a 'text_config' object")
            cfg = text
            model_type = cfg.get("model_type", "gemma4_text")
        if model_type != "gemma4_text":
            raise UserError(
                f"config.json: unsupported model_type {model_type!r} (supported: 'gemma4_text', 'gemma4')"
            )
        if cfg.get("enable_moe_block") or cfg.get("num_experts"):
            raise UserError("config.json: Mixture-of-Experts Gemma 4 checkpoints are not supported")
        if cfg.get("use_bidirectional_attention") == "all":  # "vision" is causal for text-only input
            raise UserError(
                "config.json: use_bidirectional_attention='all' is not supported (causal decoders only)"
            )

        f = _Fields(cfg)
        n_layers = f.int("num_hidden_layers")
        layer_types = cfg.get("layer_types") or [
            SLIDING if (i + 1) % 6 else FULL
            for i in range(n_layers)  # transformers' default 5:1
        ]
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise UserError("config.json: field 'layer_types' must be a list of strings")
        layer_types = list(layer_types)
        if layer_types and layer_types[-1] != FULL:  # transformers forces the last layer to full
            layer_types[-1] = FULL
        rope_params = cfg.get("rope_parameters") or {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }
        if not isinstance(rope_params, dict):
            raise UserError("config.json: field 'rope_parameters' must be an object")
        rope: dict[str, RopeSpec] = {}
        for lt in sorted(set(layer_types)):
            p = rope_params.get(lt)
            if not isinstance(p, dict):
                raise UserError(f"config.json: rope_parameters has no entry for {lt}")
            rtype = p.get("rope_type", p.get("type", "default"))  # "type": the legacy spelling
            if rtype not in SUPPORTED_ROPE_TYPES:
                raise UserError(f"config.json: unsupported rope_type {rtype!r} for {lt}")
            rf = _Fields(p, f"rope_parameters.{lt}.")
            rope[lt] = RopeSpec(
                rtype, rf.float("rope_theta"), rf.float("partial_rotary_factor", 1.0), rf.float("factor", 1.0)
            )
        eos = cfg.get("eos_token_id", 1)
        eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_list):
            raise UserError("config.json: field 'eos_token_id' must be an integer or a list of integers")
        full_head_dim, full_kv_heads = _full_layer_overrides(cfg, layer_types)
        head_dim = f.int("head_dim", 256)
        spec = cls(
            vocab_size=f.int("vocab_size"),
            hidden_size=f.int("hidden_size"),
            intermediate_size=f.int("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=f.int("num_attention_heads"),
            num_key_value_heads=f.int("num_key_value_heads"),
            head_dim=head_dim,
            global_head_dim=full_head_dim or head_dim,
            layer_types=tuple(layer_types),
            sliding_window=f.int("sliding_window", 512),
            vocab_size_per_layer_input=f.int("vocab_size_per_layer_input", 262_144),
            hidden_size_per_layer_input=f.int("hidden_size_per_layer_input", 256, none_is=0),
            num_kv_shared_layers=f.int("num_kv_shared_layers", 0, none_is=0),
            num_global_key_value_heads=full_kv_heads,
            attention_k_eq_v=f.bool("attention_k_eq_v", False),
            use_double_wide_mlp=f.bool("use_double_wide_mlp", False),
            final_logit_softcapping=f.float("final_logit_softcapping", None),
            rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            rope=rope,
            hidden_activation=str(cfg.get("hidden_activation", "gelu_pytorch_tanh")),
            pad_token_id=f.int("pad_token_id", 0, none_is=None),
            bos_token_id=f.int("bos_token_id", 2, none_is=None),
            eos_token_id=tuple(eos_list),
        )
        if cfg.get("tie_word_embeddings") is False:
            raise UserError(
                "config.json: tie_word_embeddings=false is not supported (Gemma 4 ties the LM head)"
            )
        spec.validate()
        return spec

    def to_hf_config(self) -> dict[str, Any]:
        """config.json content (model_type gemma4_text) that transformers' Gemma4TextConfig reads back."""
        cfg: dict[str, Any] = {
            "architectures": ["Gemma4ForCausalLM"],
            "model_type": "gemma4_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "vocab_size_per_layer_input": self.vocab_size_per_layer_input,
            "hidden_size_per_layer_input": self.hidden_size_per_layer_input,
            "num_kv_shared_layers": self.num_kv_shared_layers,
            "attention_k_eq_v": self.attention_k_eq_v,
            "use_double_wide_mlp": self.use_double_wide_mlp,
            "final_logit_softcapping": self.final_logit_softcapping,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_activation": self.hidden_activation,
            "rope_parameters": {
                lt: {
                    "rope_type": r.rope_type,
                    "rope_theta": r.theta,
                    **(
                        {"partial_rotary_factor": r.partial_rotary_factor}
                        if r.partial_rotary_factor != 1.0
                        else {}
                    ),
                    **({"factor": r.factor} if r.factor != 1.0 else {}),
                }
                for lt, r in sorted(self.rope.items())
            },
            "tie_word_embeddings": True,
            "enable_moe_block": False,
            "attention_bias": False,
            "max_position_embeddings": 131072,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.hf_eos_token_id,
            "torch_dtype": "bfloat16",
        }
        if self.num_global_key_value_heads and not self.attention_k_eq_v:
            # the top-level key only counts with attention_k_eq_v; say it per layer instead
            del cfg["global_head_dim"]
            cfg["per_layer_config"] = {
                str(i): {
                    "head_dim": self.global_head_dim,
                    "num_key_value_heads": self.num_global_key_value_heads,
                }
                for i, t in enumerate(self.layer_types)
                if t == FULL
            }
        elif self.num_global_key_value_heads:
            cfg["num_global_key_value_heads"] = self.num_global_key_value_heads
        return cfg

    @classmethod
    def from_checkpoint_dir(cls, path: Path) -> Gemma4Spec:
        cfg_path = path / "config.json"
        if not path.exists():
            raise UserError(f"{path}: no such checkpoint folder")
        if not path.is_dir():
            raise UserError(f"{path}: not a directory (export takes the checkpoint folder)")
        if not cfg_path.is_file():
            raise UserError(f"{cfg_path}: missing (an HF checkpoint folder needs config.json)")
        return cls.from_hf_config(read_json_object(cfg_path))

    # ---- parameter count -----------------------------------------------------------------------
    def num_parameters(self) -> int:
        from exporter.weights import hf_weight_shapes  # local: avoid an import cycle

        return sum(math.prod(s) for s in hf_weight_shapes(self).values())


_MISSING: Any = object()


def _as_int(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"config.json: field {key!r} must be an integer, got {value!r}")
    return value


class _Fields:
    """Typed reads of config.json fields; a wrong type is an error naming the field."""

    def __init__(self, cfg: dict[str, Any], prefix: str = ""):
        self.cfg, self.prefix = cfg, prefix

    def _get(self, key: str, default: Any, none_is: Any) -> Any:
        if key not in self.cfg:
            if default is _MISSING:
                raise UserError(f"config.json: missing required field {self.prefix + key!r}")
            return default
        value = self.cfg[key]
        if value is None:
            if none_is is _MISSING:
                raise UserError(f"config.json: field {self.prefix + key!r} is null")
            return none_is
        return value

    def int(self, key: str, default: Any = _MISSING, none_is: Any = _MISSING) -> Any:
        value = self._get(key, default, none_is)
        if value is None or value is default or value is none_is:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config.json: field {self.prefix + key!r} must be an integer, got {value!r}")
        return value

    def float(self, key: str, default: Any = _MISSING) -> Any:
        # null means "off" only where the default is None (final_logit_softcapping)
        value = self._get(key, default, None if default is None else _MISSING)
        if value is None or value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config.json: field {self.prefix + key!r} must be a number, got {value!r}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default, default)
        if not isinstance(value, bool):
            raise UserError(f"config.json: field {self.prefix + key!r} must be true or false, got {value!r}")
        return value


def _full_layer_overrides(cfg: dict[str, Any], layer_types: list[str]) -> tuple[int | None, int | None]:
    """(head_dim, KV heads) of full layers, as transformers' Gemma4TextConfig resolves them.

    Without `per_layer_config`, full layers get `global_head_dim` (default 512) and, only when
    `attention_k_eq_v`, `num_global_key_value_heads`. With it (what `save_pretrained` writes),
    those two keys are ignored and each listed layer takes its overrides; we support overrides of
    head_dim / num_key_value_heads on full layers, the same for all of them."""
    if "per_layer_config" not in cfg:
        head_dim = _as_int("global_head_dim", cfg.get("global_head_dim", 512))
        kv_heads = _as_int("num_global_key_value_heads", cfg.get("num_global_key_value_heads"))
        return head_dim, (kv_heads if cfg.get("attention_k_eq_v") else None)
    per_layer = cfg["per_layer_config"]
    if not isinstance(per_layer, dict):
        raise UserError("config.json: field 'per_layer_config' must be an object")
    overrides: list[dict[str, Any]] = []
    for key, value in per_layer.items():
        k = str(key)
        if not k.isdigit() or int(k) >= len(layer_types) or not isinstance(value, dict):
            raise UserError(f"config.json: per_layer_config entry {key!r} is not a layer index -> object")
        if layer_types[int(k)] != FULL or set(value) - {"head_dim", "num_key_value_heads"}:
            raise UserError(
                f"config.json: per_layer_config[{key!r}] overrides {sorted(value)} on a "
                f"{layer_types[int(k)]} layer; only head_dim/num_key_value_heads of full layers are supported"
            )
        overrides.append(value)
    full_layers = sum(t == FULL for t in layer_types)
    if overrides and (len(overrides) != full_layers or any(o != overrides[0] for o in overrides)):
        raise UserError("config.json: per_layer_config must give every full layer the same overrides")
    first = overrides[0] if overrides else {}
    return (
        _as_int("per_layer_config head_dim", first.get("head_dim")),
        _as_int("per_layer_config num_key_value_heads", first.get("num_key_value_heads")),
    )


_ROPE_DEFAULT = {
    SLIDING: RopeSpec("default", 10_000.0),
    FULL: RopeSpec("proportional", 1_000_000.0, partial_rotary_factor=0.25),
}


def _pattern(n_layers: int, period: int) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers))


PRESETS: dict[str, Gemma4Spec] = {
    # Tiny sibling for tests and the embedded default: every feature present at toy sizes.
    "tiny": Gemma4Spec(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,
        layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL),
        sliding_window=8,
        vocab_size_per_layer_input=512,
        hidden_size_per_layer_input=16,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        final_logit_softcapping=30.0,
        rope=dict(_ROPE_DEFAULT),
    ),
    # Gemma 4 E2B (see shared/NOTES.md): hidden 1536, 35 layers [S,S,S,S,F]x7, 20 KV-shared layers.
    "e2b": Gemma4Spec(
        vocab_size=262_144,
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=35,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        layer_types=_pattern(35, 5),
        sliding_window=512,
        vocab_size_per_layer_input=262_144,
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=20,
        use_double_wide_mlp=True,
        final_logit_softcapping=30.0,
        rope=dict(_ROPE_DEFAULT),
        eos_token_id=(1, 106),
    ),
    # Gemma 4 E4B: hidden 2560, 42 layers [S,S,S,S,S,F]x7, 18 KV-shared layers.
    "e4b": Gemma4Spec(
        vocab_size=262_144,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=42,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,
        layer_types=_pattern(42, 6),
        sliding_window=512,
        vocab_size_per_layer_input=262_144,
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=18,
        final_logit_softcapping=30.0,
        rope=dict(_ROPE_DEFAULT),
        eos_token_id=(1, 106),
    ),
}


def get_preset(name: str) -> Gemma4Spec:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})")
    return PRESETS[name]
