"""Named specs for `ple-export synth --preset` and the tests: real shapes of the family's released
models, and tiny siblings with every feature at toy sizes."""

from __future__ import annotations

from exporter.gemma3n_spec import Gemma3nSpec
from exporter.spec import FULL, ROPE_DEFAULT, SLIDING, Gemma4Spec, RopeSpec
from ple_export.errors import UserError


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
        rope=dict(ROPE_DEFAULT),
    ),
    # ~330M parameters (228M decoder, 101M PLE table): big enough that decode is weight-bandwidth
    # bound, small enough for CI runners (the ARM profiling workflow, benchmarks/latency.py).
    "small": Gemma4Spec(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        global_head_dim=256,
        layer_types=_pattern(12, 6),
        sliding_window=512,
        vocab_size_per_layer_input=32768,
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=4,
        use_double_wide_mlp=False,
        final_logit_softcapping=30.0,
        rope=dict(ROPE_DEFAULT),
    ),
    # Gemma 4 E2B (docs/config-bounds.md has its sizes): hidden 1536, 35 layers [S,S,S,S,F]x7, 20 KV-shared.
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
        rope=dict(ROPE_DEFAULT),
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
        rope=dict(ROPE_DEFAULT),
        eos_token_id=(1, 106),
    ),
}


def _gemma3n(n_layers: int, shared: int, inter: int) -> Gemma3nSpec:
    """Gemma 3n E2B/E4B (transformers' defaults and the public converters; the table in
    docs/architecture.md): hidden 2048, every 5th layer full, the first 10 layers 95% sparse."""
    return Gemma3nSpec(
        vocab_size=262_400,
        hidden_size=2048,
        intermediate_size=inter,
        num_hidden_layers=n_layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        global_head_dim=256,
        layer_types=_pattern(n_layers, 5),
        sliding_window=512,
        vocab_size_per_layer_input=262_144,
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=shared,
        final_logit_softcapping=30.0,
        rope={SLIDING: RopeSpec("default", 10_000.0), FULL: RopeSpec("default", 1_000_000.0)},
        eos_token_id=(1, 106),
        intermediate_sizes=(inter,) * n_layers,
        activation_sparsity_pattern=(0.95,) * 10 + (0.0,) * (n_layers - 10),
    )


PRESETS["gemma3n-e2b"] = _gemma3n(30, 10, 8192)
# ~300M parameters, as Gemma 4's `small`: for benchmarks and CI runners (4 sparse layers, 4 KV-shared).
PRESETS["gemma3n-small"] = _gemma3n(30, 10, 8192).replace(
    vocab_size=32768,
    vocab_size_per_layer_input=32768,
    hidden_size=1024,
    num_hidden_layers=12,
    layer_types=_pattern(12, 5),
    head_dim=128,
    global_head_dim=128,
    num_kv_shared_layers=4,
    intermediate_size=4096,
    intermediate_sizes=(4096,) * 12,
    activation_sparsity_pattern=(0.95,) * 4 + (0.0,) * 8,
)
PRESETS["gemma3n-e4b"] = _gemma3n(35, 15, 16384)
# Tiny Gemma 3n: every feature at toy sizes and no config value at its default (defaults hide bugs):
# per-layer FFN sizes, sparse layers of both types, KV-shared layers of both types, a PLE vocabulary
# smaller than the vocabulary (ids past it read PLE row 0), window 8.
PRESETS["gemma3n-tiny"] = Gemma3nSpec(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=10,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=16,
    layer_types=_pattern(10, 5),
    sliding_window=8,
    vocab_size_per_layer_input=384,
    hidden_size_per_layer_input=16,
    num_kv_shared_layers=4,
    final_logit_softcapping=25.0,
    rms_norm_eps=1e-5,
    rope={SLIDING: RopeSpec("default", 20_000.0), FULL: RopeSpec("default", 500_000.0)},
    intermediate_sizes=(128, 96, 128, 160, 128, 96, 128, 128, 64, 128),
    activation_sparsity_pattern=(0.95, 0.95, 0.9, 0.9, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0),
    altup_coef_clip=5.0,
    laurel_rank=8,
    max_position_embeddings=4096,
)


def get_preset(name: str) -> Gemma4Spec:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})")
    return PRESETS[name]
