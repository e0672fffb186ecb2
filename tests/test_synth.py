from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from exporter.presets import get_preset
from exporter.safetensors_io import INDEX_FILE, SINGLE_FILE, open_checkpoint, read_tensor
from exporter.spec import FULL, Gemma4Spec, hf_weight_shapes
from exporter.synth import NORM, NORMAL, UNIFORM, init_rule, synth_checkpoint, synth_total_bytes
from ple_export.errors import UserError

TINY = get_preset("tiny")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tiny_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_checkpoint(TINY, tmp_path_factory.mktemp("tiny") / "ckpt", max_shard_bytes=300_000)


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    a = _digests(synth_checkpoint(TINY, tmp_path / "a", seed=3))
    b = _digests(synth_checkpoint(TINY, tmp_path / "b", seed=3))
    c = _digests(synth_checkpoint(TINY, tmp_path / "c", seed=4))
    assert set(a) == {"config.json", "generation_config.json", SINGLE_FILE}
    assert a == b
    assert a[SINGLE_FILE] != c[SINGLE_FILE]


def test_sharding_does_not_change_values(tmp_path: Path, tiny_sharded: Path) -> None:
    single = open_checkpoint(synth_checkpoint(TINY, tmp_path / "single"))
    sharded = open_checkpoint(tiny_sharded)
    assert len({i.path for i in sharded.values()}) > 1
    assert set(single) == set(sharded)
    for name in single:
        np.testing.assert_array_equal(read_tensor(single[name], "raw"), read_tensor(sharded[name], "raw"))


@pytest.mark.parametrize("dtype, code", [("bf16", "BF16"), ("fp16", "F16"), ("fp32", "F32")])
def test_dtypes_progress_and_config(tmp_path: Path, dtype: str, code: str) -> None:
    seen: list[int] = []
    out = synth_checkpoint(TINY, tmp_path, dtype=dtype, progress=seen.append)
    infos = open_checkpoint(out)
    shapes = hf_weight_shapes(TINY)
    assert list(infos) == list(shapes)  # written in hf_weight_shapes order
    assert all(infos[n].shape == s and infos[n].dtype == code for n, s in shapes.items())
    assert sum(seen) == synth_total_bytes(TINY, dtype) == sum(i.nbytes for i in infos.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    assert Gemma4Spec.from_hf_config(cfg) == TINY
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    # fp32 and bf16 draw the same stream: bf16 is the rounded fp32
    if dtype == "fp32":
        bf = open_checkpoint(synth_checkpoint(TINY, tmp_path / "bf"))
        name = "model.layers.0.mlp.down_proj.weight"
        f32 = read_tensor(infos[name])
        np.testing.assert_allclose(read_tensor(bf[name]), f32, rtol=2**-8)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="dtype 'int8'"):
        synth_checkpoint(TINY, tmp_path, dtype="int8")
    with pytest.raises(UserError, match="seed"):
        synth_checkpoint(TINY, tmp_path, seed=-1)
    with pytest.raises(ValueError, match="no init rule"):
        init_rule("model.layers.0.mystery.bias", (4,), TINY)


def test_init_rules_and_statistics(tiny_sharded: Path) -> None:
    infos = open_checkpoint(tiny_sharded)
    pre = "model.layers.0."
    assert init_rule(pre + "self_attn.q_norm.weight", (16,), TINY) == (NORM, 0.5)
    assert init_rule(pre + "self_attn.k_norm.weight", (32,), TINY) == (NORM, 32**-0.25)
    assert init_rule(pre + "input_layernorm.weight", (64,), TINY) == (NORM, 1.0)
    assert init_rule("model.norm.weight", (64,), TINY) == (NORM, 1.0)
    assert init_rule("model.per_layer_projection_norm.weight", (16,), TINY) == (NORM, 1.0)
    assert init_rule(pre + "post_per_layer_input_norm.weight", (64,), TINY) == (NORM, 1.0)
    assert init_rule(pre + "layer_scalar", (1,), TINY) == (UNIFORM, 1.0)
    assert init_rule("model.embed_tokens.weight", (512, 64), TINY) == (NORMAL, 64**-0.5)
    assert init_rule("model.embed_tokens_per_layer.weight", (512, 96), TINY) == (NORMAL, 16**-0.5)
    assert init_rule(pre + "mlp.down_proj.weight", (64, 256), TINY) == (NORMAL, 256**-0.5)
    assert init_rule("model.per_layer_model_projection.weight", (96, 64), TINY) == (NORMAL, 64**-0.5)
    assert init_rule(pre + "per_layer_input_gate.weight", (16, 64), TINY) == (NORMAL, 64**-0.5)
    assert init_rule(pre + "per_layer_projection.weight", (64, 16), TINY) == (NORMAL, 16**-0.5)
    for name, info in infos.items():
        kind, scale = init_rule(name, info.shape, TINY)
        x = read_tensor(info)
        if kind == UNIFORM:
            assert x.min() >= 0.5 and x.max() <= 1.0, name
        elif kind == NORM:
            assert abs(x.mean() / scale - 1) < 0.1 and 0.03 < x.std() / scale < 0.2, name
        else:
            assert abs(x.mean()) < 0.1 * scale and 0.85 < x.std() / scale < 1.15, name


def test_transformers_loads_sharded_checkpoint(tiny_sharded: Path) -> None:
    assert (tiny_sharded / INDEX_FILE).exists()
    cfg = transformers.AutoConfig.from_pretrained(tiny_sharded)
    assert type(cfg).__name__ == "Gemma4TextConfig"
    d = cfg.to_dict()  # head_dim is a per-layer attribute: read the global value from the dict
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "sliding_window",
        "vocab_size_per_layer_input",
        "hidden_size_per_layer_input",
        "num_kv_shared_layers",
        "use_double_wide_mlp",
        "final_logit_softcapping",
    ):
        assert d[field] == getattr(TINY, field), field
    assert list(cfg.layer_types) == list(TINY.layer_types)
    # transformers 5.23 folds global_head_dim into per-layer overrides of the full layers
    per_layer = d["per_layer_config"]
    assert {int(k) for k in per_layer} == {i for i, t in enumerate(TINY.layer_types) if t == FULL}
    assert all(v["head_dim"] == TINY.global_head_dim for v in per_layer.values())
    assert cfg.dtype == torch.bfloat16

    loaded: Any = transformers.Gemma4ForCausalLM.from_pretrained(
        tiny_sharded, dtype=torch.float32, output_loading_info=True
    )
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = model.state_dict()
    ours = open_checkpoint(tiny_sharded)
    for name in (
        "model.embed_tokens_per_layer.weight",
        "model.layers.2.self_attn.q_norm.weight",
        "model.layers.5.layer_scalar",
        "model.layers.3.mlp.up_proj.weight",
    ):
        np.testing.assert_array_equal(state[name].numpy(), read_tensor(ours[name]))


def _logit_rel_error(folder: Path, vocab: int, qk_norm_factor: float = 1.0) -> float:
    """max |logits32 - logits64| / max |logits64| on a 24-token random prompt (eager attention)."""
    models = [
        transformers.Gemma4ForCausalLM.from_pretrained(folder, dtype=dt, attn_implementation="eager")
        for dt in (torch.float32, torch.float64)
    ]
    if qk_norm_factor != 1.0:
        for m in models:
            for n, p in m.named_parameters():
                if n.endswith(("q_norm.weight", "k_norm.weight")):
                    p.data *= p.shape[0] ** qk_norm_factor
    ids = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        l32 = models[0](ids).logits.double()
        l64 = models[1](ids).logits
    assert l64.std() > 0.1  # not degenerate
    return float((l32 - l64).abs().max() / l64.abs().max())


def test_well_conditioned_tiny(tiny_sharded: Path) -> None:
    assert _logit_rel_error(tiny_sharded, TINY.vocab_size) < 1e-4


def test_well_conditioned_wide_heads(tmp_path: Path) -> None:
    spec = TINY.replace(
        head_dim=256, global_head_dim=512, hidden_size=256, num_attention_heads=2, intermediate_size=256
    )
    folder = synth_checkpoint(spec, tmp_path)
    good = _logit_rel_error(folder, spec.vocab_size)
    assert good < 1e-4
    # q/k norm weights of ~1 (undoing the head_dim**-0.25 scale) saturate softmax: much worse.
    bad = _logit_rel_error(folder, spec.vocab_size, qk_norm_factor=0.25)
    assert bad > 10 * good
