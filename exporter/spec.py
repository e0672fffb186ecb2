"""Gemma 4 text decoder spec: a typed view of `config.json`, with presets.

Only what the decoder math needs is kept. Parsing is strict where a wrong guess would give wrong
numbers (missing PLE, MoE, unknown RoPE types) and lenient about fields that do not change them.
Every value that is read is bounded to what a real model of the family could have (`INT_BOUNDS`,
`FLOAT_BOUNDS`, `MAX_PARAMETERS`; docs/config-bounds.md says why) and checked as it is read,
before anything is sized from it: a bad config.json is a one-line `UserError` naming the field and
its allowed range, never a hang, a huge allocation or an error from deep inside torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from exporter.config_fields import (
    INT_BOUNDS,
    Range,
    check_float,
    check_int,
    read_config,
    show,
)
from exporter.config_fields import Fields as _Fields
from ple_export.bundle.contract import KV_DTYPE, graph_contract
from ple_export.bundle.manifest import Generation, Graphs, KVCache, KVLayer
from ple_export.errors import UserError

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_ROPE_TYPES = ("default", "proportional")
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)


MAX_EOS_TOKENS = 64
MAX_PARAMETERS = 10**11  # the whole text decoder, PLE table included


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

    # ---- the family ----------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return "gemma4"

    @property
    def checkpoint_prefix(self) -> str:
        """Where `synth` writes the text decoder's tensors (readers accept either layout)."""
        return "model."

    def weight_shapes(self, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint of this spec holds, HF name -> shape, in a fixed order."""
        return hf_weight_shapes(self, prefix)

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

    def kv_layout(self) -> tuple[KVLayer, ...]:
        """The KV cache the bundle exposes: one entry per KV-owning layer."""
        return tuple(
            KVLayer(
                layer=i,
                type=self.layer_types[i],
                kv_heads=self.layer_kv_heads(i),
                head_dim=self.layer_head_dim(i),
                # sliding layers return only the last window-1 positions: the cache never grows past that
                max_length=self.sliding_window - 1 if self.is_sliding(i) else None,
                shared_by=tuple(
                    j for j in range(self.num_hidden_layers) if j != i and self.kv_source(j) == i
                ),
            )
            for i in self.kv_layers
        )

    def kv_cache(self, dtype: str = KV_DTYPE) -> KVCache:
        return KVCache(dtype, self.kv_layout())

    def contract(self, kv_dtype: str = KV_DTYPE) -> Graphs:
        """The graphs' inputs and outputs (`ple_export.bundle.contract`)."""
        return graph_contract(
            self.num_hidden_layers,
            self.hidden_size_per_layer_input,
            self.vocab_size,
            self.kv_layout(),
            kv_dtype,
        )

    def generation(self) -> Generation:
        return Generation(
            vocab_size=self.vocab_size,
            bos_token_id=self.bos_token_id,
            eos_token_ids=tuple(self.eos_token_id),
            pad_token_id=self.pad_token_id,
            final_logit_softcapping=self.final_logit_softcapping,
        )

    @property
    def hf_eos_token_id(self) -> int | list[int]:
        """eos as HF configs spell it: one id, or a list of several."""
        return self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Self:
        spec = dataclasses.replace(self, **changes)
        spec.validate()
        return spec

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Every field within its bound (`INT_BOUNDS`, `FLOAT_BOUNDS`), the fields consistent with
        each other, and the whole model at most `MAX_PARAMETERS`. Cheap: no loop longer than the
        layer count, which is itself checked first."""
        if _no_ple(self.hidden_size_per_layer_input):
            raise UserError(_NO_PLE)
        for name in _SPEC_INTS:
            check_int(name, getattr(self, name))
        check_int("num_global_key_value_heads", self.num_global_key_value_heads, nullable=True)
        n = self.num_hidden_layers
        if not isinstance(self.layer_types, (tuple, list)) or len(self.layer_types) != n:
            got = show(list(self.layer_types) if isinstance(self.layer_types, tuple) else self.layer_types)
            raise UserError(
                f"config.json: field 'layer_types' must list {n} layer types (num_hidden_layers), got {got}"
            )
        bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
        if bad:
            raise UserError(f"config.json: unsupported layer type {show(bad[0])} in layer_types")
        if self.num_kv_shared_layers >= n:
            raise UserError(
                f"config.json: field 'num_kv_shared_layers' must be an integer in [0, {n - 1}] "
                f"(below num_hidden_layers), got {self.num_kv_shared_layers}"
            )
        owners = set(self.layer_types[: self.first_kv_shared_layer])
        if self.num_kv_shared_layers and owners != set(self.layer_types):
            raise UserError("config.json: KV-shared layers use a layer type that no KV-owning layer has")
        for name in ("head_dim", "global_head_dim"):
            if getattr(self, name) % 2:
                value = getattr(self, name)
                raise UserError(f"config.json: field {name!r} must be even (RoPE rotates pairs), got {value}")
        for t in set(self.layer_types):
            if t not in self.rope:
                raise UserError(f"config.json: rope_parameters has no entry for {t}")
        for lt, r in self.rope.items():
            where = f"rope_parameters.{lt}."
            if r.rope_type not in SUPPORTED_ROPE_TYPES:
                raise UserError(f"config.json: unsupported rope_type {show(r.rope_type)} for {lt}")
            check_float(where + "rope_theta", r.theta)
            check_float(where + "partial_rotary_factor", r.partial_rotary_factor)
            check_float(where + "factor", r.factor)
        if self.hidden_activation not in SUPPORTED_ACTIVATIONS:
            raise UserError(f"config.json: unsupported hidden_activation {show(self.hidden_activation)}")
        check_float("rms_norm_eps", self.rms_norm_eps)
        check_float("final_logit_softcapping", self.final_logit_softcapping, nullable=True)
        for name in ("attention_k_eq_v", "use_double_wide_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(
                    f"config.json: field {name!r} must be true or false, got {show(getattr(self, name))}"
                )
        ids = Range(0, self.vocab_size - 1)
        check_int("pad_token_id", self.pad_token_id, ids, nullable=True, note=" (below vocab_size)")
        check_int("bos_token_id", self.bos_token_id, ids, nullable=True, note=" (below vocab_size)")
        if not isinstance(self.eos_token_id, tuple) or len(self.eos_token_id) > MAX_EOS_TOKENS:
            raise UserError(
                f"config.json: field 'eos_token_id' must be an id or a list of at most {MAX_EOS_TOKENS} ids, "
                f"got {show(self.eos_token_id)}"
            )
        for e in self.eos_token_id:
            check_int("eos_token_id", e, ids, note=" (below vocab_size)")
        for i in range(n):
            if self.num_attention_heads % self.layer_kv_heads(i):
                raise UserError(
                    f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                    f"the KV heads ({self.layer_kv_heads(i)}) of layer {i}"
                )
        params = self.num_parameters()
        if params > MAX_PARAMETERS:
            raise UserError(
                f"config.json: the sizes (vocab_size, hidden_size, intermediate_size, num_hidden_layers, "
                f"heads, head dims, PLE width) make {params:.3g} parameters; at most {MAX_PARAMETERS:.0e} "
                "are supported"
            )

    # ---- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> Gemma4Spec:
        """Parse config.json content. Each value is type- and range-checked as it is read, so that
        nothing (a list of layer types, a float) is built from an unchecked size."""
        model_type = cfg.get("model_type")
        if model_type == "gemma4":
            text = cfg.get("text_config")
            if not isinstance(text, dict):
                raise UserError("config.json: model_type 'gemma4' without a 'text_config' object")
            cfg = text
            model_type = cfg.get("model_type", "gemma4_text")
        if model_type != "gemma4_text":
            raise UserError(
                f"config.json: unsupported model_type {show(model_type)} "
                "(supported: 'gemma4_text', 'gemma4', 'gemma3n_text', 'gemma3n')"
            )
        f = _Fields(cfg)
        if f.bool("enable_moe_block", False) or f.int("num_experts", None, null=None):
            raise UserError("config.json: Mixture-of-Experts Gemma 4 checkpoints are not supported")
        bidirectional = cfg.get("use_bidirectional_attention")
        if bidirectional == "all":  # "vision" is causal for text-only input
            raise UserError(
                "config.json: use_bidirectional_attention='all' is not supported (causal decoders only)"
            )
        if bidirectional not in (None, "vision"):
            raise UserError(
                "config.json: field 'use_bidirectional_attention' must be null, 'vision' or 'all', "
                f"got {show(bidirectional)}"
            )
        if not f.bool("tie_word_embeddings", True):
            raise UserError(
                "config.json: tie_word_embeddings=false is not supported (Gemma 4 ties the LM head)"
            )
        if f.bool("attention_bias", False):
            raise UserError(
                "config.json: attention_bias=true is not supported (Gemma 4 projections have no bias)"
            )
        if _no_ple(cfg.get("hidden_size_per_layer_input", 256)):
            raise UserError(_NO_PLE)
        f.int("max_position_embeddings", None, null=None)  # unused, but a corrupt value is an error

        n_layers = f.int("num_hidden_layers")  # bounded: the default layer_types below is this long
        layer_types = _layer_types(cfg.get("layer_types"), n_layers)
        rope = _rope(cfg.get("rope_parameters"), layer_types)
        eos = cfg.get("eos_token_id", 1)
        eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        if len(eos_list) > MAX_EOS_TOKENS:
            raise UserError(f"config.json: field 'eos_token_id' lists more than {MAX_EOS_TOKENS} ids")
        eos_ids = tuple(check_int("eos_token_id", e, note=" (or a list of such)") for e in eos_list)
        k_eq_v = f.bool("attention_k_eq_v", False)
        full_head_dim, full_kv_heads = _full_layer_overrides(cfg, layer_types, k_eq_v)
        act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in SUPPORTED_ACTIVATIONS:
            raise UserError(f"config.json: unsupported hidden_activation {show(act)}")
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
            layer_types=layer_types,
            sliding_window=f.int("sliding_window", 512),
            vocab_size_per_layer_input=f.int("vocab_size_per_layer_input", 262_144),
            hidden_size_per_layer_input=f.int("hidden_size_per_layer_input", 256),
            num_kv_shared_layers=f.int("num_kv_shared_layers", 0, null=0),
            num_global_key_value_heads=full_kv_heads,
            attention_k_eq_v=k_eq_v,
            use_double_wide_mlp=f.bool("use_double_wide_mlp", False),
            final_logit_softcapping=f.float("final_logit_softcapping", None, null=None),
            rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            rope=rope,
            hidden_activation=act,
            pad_token_id=f.int("pad_token_id", 0, null=None),
            bos_token_id=f.int("bos_token_id", 2, null=None),
            eos_token_id=eos_ids,
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
        return cls.from_hf_config(read_config(path))

    # ---- parameter count -----------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.weight_shapes().values())


# ---- the checkpoint's tensors -------------------------------------------------------------------------
def _layer_shapes(spec: Gemma4Spec, i: int) -> dict[str, tuple[int, ...]]:
    h, p = spec.hidden_size, spec.hidden_size_per_layer_input
    hd, kvh, nh = spec.layer_head_dim(i), spec.layer_kv_heads(i), spec.num_attention_heads
    inter = spec.layer_intermediate_size(i)
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "pre_feedforward_layernorm.weight": (h,),
        "post_feedforward_layernorm.weight": (h,),
        "layer_scalar": (1,),
        "self_attn.q_proj.weight": (nh * hd, h),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.o_proj.weight": (h, nh * hd),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
        "per_layer_input_gate.weight": (p, h),
        "per_layer_projection.weight": (h, p),
        "post_per_layer_input_norm.weight": (h,),
    }
    if spec.owns_kv(i):
        shapes["self_attn.k_proj.weight"] = (kvh * hd, h)
        shapes["self_attn.k_norm.weight"] = (hd,)
        if not spec.k_eq_v(i):
            shapes["self_attn.v_proj.weight"] = (kvh * hd, h)
    return shapes


def hf_weight_shapes(spec: Gemma4Spec, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Every tensor a `gemma4_text` checkpoint of this spec holds, HF name -> shape, in a fixed order."""
    h = spec.hidden_size
    out: dict[str, tuple[int, ...]] = {
        prefix + "embed_tokens.weight": (spec.vocab_size, h),
        prefix + "embed_tokens_per_layer.weight": (spec.vocab_size_per_layer_input, spec.ple_dim),
        prefix + "per_layer_model_projection.weight": (spec.ple_dim, h),
        prefix + "per_layer_projection_norm.weight": (spec.hidden_size_per_layer_input,),
    }
    for i in range(spec.num_hidden_layers):
        for suffix, shape in _layer_shapes(spec, i).items():
            out[f"{prefix}layers.{i}.{suffix}"] = shape
    out[prefix + "norm.weight"] = (h,)
    return out


# Integer fields of Gemma4Spec checked against INT_BOUNDS by `validate`; the layer count first, as
# later checks loop over layers.
_SPEC_INTS = (
    "num_hidden_layers",
    "vocab_size",
    "vocab_size_per_layer_input",
    "hidden_size",
    "hidden_size_per_layer_input",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "global_head_dim",
    "sliding_window",
    "num_kv_shared_layers",
)
_NO_PLE = (
    "checkpoint has no Per-Layer Embeddings (hidden_size_per_layer_input is 0/null): "
    "ple-export only exports PLE decoders"
)


def _no_ple(value: Any) -> bool:
    return value is None or (type(value) in (int, float) and value == 0)


def _layer_types(raw: Any, n_layers: int) -> tuple[str, ...]:
    """config.json's layer_types (n_layers is already bounded), with transformers' defaults: 5:1
    sliding:full when absent, and the last layer forced to full."""
    if raw is None or (isinstance(raw, list) and not raw):
        raw = [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)]  # transformers' default 5:1
    if not isinstance(raw, list):
        raise UserError(f"config.json: field 'layer_types' must be a list of strings, got {show(raw)}")
    if len(raw) != n_layers:  # before looking at the entries: the list may be huge
        raise UserError(
            f"config.json: field 'layer_types' must list {n_layers} layer types (num_hidden_layers), "
            f"got {show(raw)}"
        )
    for t in raw:
        if t not in (SLIDING, FULL):
            raise UserError(
                f"config.json: unsupported layer type {show(t)} in layer_types "
                f"(supported: {SLIDING!r}, {FULL!r})"
            )
    types = list(raw)
    if types[-1] != FULL:  # transformers forces the last layer to full
        types[-1] = FULL
    return tuple(types)


def _rope(raw: Any, layer_types: tuple[str, ...]) -> dict[str, RopeSpec]:
    """RoPE of each layer type in use; entries of other (or unknown) keys are not read."""
    if raw is None or (isinstance(raw, dict) and not raw):
        return {lt: ROPE_DEFAULT[lt] for lt in set(layer_types)}
    if not isinstance(raw, dict):
        raise UserError(f"config.json: field 'rope_parameters' must be an object, got {show(raw)}")
    rope: dict[str, RopeSpec] = {}
    for lt in sorted(set(layer_types)):
        p = raw.get(lt)
        if not isinstance(p, dict):
            raise UserError(f"config.json: rope_parameters has no entry for {lt}")
        rtype = p.get("rope_type", p.get("type", "default"))  # "type": the legacy spelling
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise UserError(f"config.json: unsupported rope_type {show(rtype)} for {lt}")
        rf = _Fields(p, f"rope_parameters.{lt}.")
        rope[lt] = RopeSpec(
            rtype, rf.float("rope_theta"), rf.float("partial_rotary_factor", 1.0), rf.float("factor", 1.0)
        )
    return rope


def _layer_index(key: Any, n_layers: int) -> int | None:
    """A per_layer_config key as a layer index (JSON keys are strings; a dict may hold ints)."""
    if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 4:
        key = int(key)
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < n_layers:
        return key
    return None


def _full_layer_overrides(
    cfg: dict[str, Any], layer_types: tuple[str, ...], k_eq_v: bool
) -> tuple[int | None, int | None]:
    """(head_dim, KV heads) of full layers, as transformers' Gemma4TextConfig resolves them.

    Without `per_layer_config`, full layers get `global_head_dim` (default 512) and, only when
    `attention_k_eq_v`, `num_global_key_value_heads`. With it (what `save_pretrained` writes),
    those two keys are ignored and each listed layer takes its overrides; we support overrides of
    head_dim / num_key_value_heads on full layers, the same for all of them."""
    if "per_layer_config" not in cfg:
        head_dim = check_int("global_head_dim", cfg.get("global_head_dim", 512), nullable=True)
        kv_heads = check_int(
            "num_global_key_value_heads", cfg.get("num_global_key_value_heads"), nullable=True
        )
        return head_dim, (kv_heads if k_eq_v else None)
    per_layer = cfg["per_layer_config"]
    if not isinstance(per_layer, dict):
        raise UserError(f"config.json: field 'per_layer_config' must be an object, got {show(per_layer)}")
    if len(per_layer) > len(layer_types):
        raise UserError(
            f"config.json: per_layer_config has {len(per_layer)} entries for {len(layer_types)} layers"
        )
    overrides: dict[int, tuple[int | None, int | None]] = {}
    for key, value in per_layer.items():
        i = _layer_index(key, len(layer_types))
        if i is None or i in overrides or not isinstance(value, dict):
            raise UserError(
                f"config.json: per_layer_config entry {show(key)} is not a (distinct) layer index -> object"
            )
        unsupported = [k for k in value if k not in ("head_dim", "num_key_value_heads")]
        if layer_types[i] != FULL or unsupported:
            what = ", ".join(show(k) for k in (unsupported or list(value))[:3])
            raise UserError(
                f"config.json: per_layer_config[{show(key)}] overrides {what} on a "
                f"{layer_types[i]} layer; only head_dim/num_key_value_heads of full layers are supported"
            )
        where = f"per_layer_config[{show(key)}]."
        overrides[i] = (
            check_int(
                where + "head_dim", value.get("head_dim"), INT_BOUNDS["global_head_dim"], nullable=True
            ),
            check_int(where + "num_key_value_heads", value.get("num_key_value_heads"), nullable=True),
        )
    full_layers = {i for i, t in enumerate(layer_types) if t == FULL}
    if overrides and (set(overrides) != full_layers or len(set(overrides.values())) > 1):
        raise UserError("config.json: per_layer_config must give every full layer the same overrides")
    return next(iter(overrides.values())) if overrides else (None, None)


ROPE_DEFAULT = {
    SLIDING: RopeSpec("default", 10_000.0),
    FULL: RopeSpec("proportional", 1_000_000.0, partial_rotary_factor=0.25),
}
