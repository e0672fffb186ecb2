"""Gemma 3n: the second PLE family, exported, quantized and checked against transformers.

Parity is against transformers' `Gemma3nForCausalLM` (fp32, eager, its DynamicCache), built from
the checkpoint's text_config with the `model.language_model.*` tensors (exporter/reference.py):
prompts longer than the sliding window with ids past the PLE vocabulary, then greedy decode steps,
at Gemma 4's thresholds (tests/test_parity.py). Three tiny shapes: like E2B (a third of the layers
KV-shared, uniform FFN), like E4B (3/7 shared, a denser sparsity pattern) and the `gemma3n-tiny`
preset (per-layer FFN sizes, sparse layers of both types).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter.export import ExportOptions, export_bundle
from exporter.gemma3n import SparseMLP, normal_quantile
from exporter.gemma3n_spec import Gemma3nSpec
from exporter.presets import _pattern, get_preset
from exporter.quantize import quantize_bundle
from exporter.reference import TorchModel, TransformersModel
from exporter.synth import synth_checkpoint
from exporter.weights import map_checkpoint
from ple_export.bundle.format import DECODER_FILE, EMBEDDER_FILE
from ple_export.bundle.manifest import Manifest
from ple_export.bundle.recipe import QuantRecipe
from runtime_harness import loop
from runtime_harness.session import BundleSession
from tests.test_cli import assert_user_error, cli
from tests.test_genai import _assert_same, _both
from tests.test_genai import _prompt as genai_prompt
from tests.test_parity import assert_close

TINY = get_preset("gemma3n-tiny")
VARIANTS: dict[str, Gemma3nSpec] = {
    "ffn": TINY,  # per-layer FFN sizes, 5 sparse layers (one full), 4 KV-shared of both types
    "e2b_like": TINY.replace(
        num_hidden_layers=15,
        layer_types=_pattern(15, 5),
        num_kv_shared_layers=5,
        intermediate_sizes=(96,) * 15,
        intermediate_size=96,
        activation_sparsity_pattern=(0.95,) * 5 + (0.0,) * 10,
        num_key_value_heads=1,
    ),
    "e4b_like": TINY.replace(
        hidden_size=48,
        num_hidden_layers=7,
        layer_types=_pattern(4, 4) + _pattern(3, 3),  # S S S F | S S F: 3 shared of both types
        num_kv_shared_layers=3,
        intermediate_sizes=(192,) * 7,
        intermediate_size=192,
        activation_sparsity_pattern=(0.95, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0),
        altup_correct_scale=False,
    ),
}
PROMPT_LEN, STEPS = 20, 10  # > the window (8); 1 prefill + 9 decode steps
# ops the traced decoder must not hold: erfinv does not export, in-place stream updates trace to
# scatters, topk/random are what a literal port of the sparse gate would bring
FORBIDDEN_OPS = {"Erf", "ScatterND", "ScatterElements", "TopK", "RandomNormal", "RandomNormalLike"}
FORBIDDEN_OPS |= {"RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _prompt(spec: Gemma3nSpec) -> np.ndarray:
    """Two rows of seeded ids over the whole vocabulary: some are past the PLE vocabulary."""
    ids = torch.randint(0, spec.vocab_size, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(7))
    ids[:, 5] = spec.vocab_size - 1
    assert (ids >= spec.vocab_size_per_layer_input).any() and (ids < spec.vocab_size_per_layer_input).any()
    return ids.numpy()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma3n")
    return {
        name: synth_checkpoint(spec, root / name, max_shard_bytes=300_000, seed=3)
        for name, spec in VARIANTS.items()
    }


@pytest.fixture(scope="module")
def fp32(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma3n-bundles")
    opts = ExportOptions(recipe=QuantRecipe.none())
    return {name: export_bundle(ck, root / name, opts).out_dir for name, ck in ckpts.items()}


@pytest.fixture(scope="module")
def int4(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default recipe (int4 block 256 with clip search, int8 PLE), exported directly."""
    return export_bundle(ckpts["ffn"], tmp_path_factory.mktemp("gemma3n-int4") / "b").out_dir


@pytest.fixture(scope="module")
def hf_logits(ckpts: dict[str, Path]) -> dict[str, list[np.ndarray]]:
    out = {}
    for name, ck in ckpts.items():
        gen = loop.generate(
            TransformersModel(ck), _prompt(VARIANTS[name]), STEPS, stop_at_eos=False, keep_logits=True
        )
        out[name] = gen.step_logits
    return out


def _close(ours: list[np.ndarray], theirs: list[np.ndarray], what: str) -> None:
    assert_close(ours, [torch.from_numpy(t) for t in theirs], what)


# ---- parity --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_module_matches_transformers(variant: str, ckpts: dict[str, Path], hf_logits) -> None:
    gen = loop.generate(
        TorchModel(ckpts[variant]), _prompt(VARIANTS[variant]), STEPS, stop_at_eos=False, keep_logits=True
    )
    _close(gen.step_logits, hf_logits[variant], f"module[{variant}]")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bundle_matches_transformers(variant: str, fp32: dict[str, Path], hf_logits) -> None:
    session = BundleSession(fp32[variant])
    gen = loop.generate(session, _prompt(VARIANTS[variant]), STEPS, stop_at_eos=False, keep_logits=True)
    _close(gen.step_logits, hf_logits[variant], f"bundle[{variant}]")


def test_chunked_prefill_splitting_a_window_matches_transformers(fp32: dict[str, Path], hf_logits) -> None:
    """Chunks of 3 tokens: chunk boundaries fall inside the window of 8."""
    session = BundleSession(fp32["ffn"])
    gen = loop.generate(session, _prompt(TINY), STEPS, stop_at_eos=False, keep_logits=True, prefill_chunk=3)
    _close(gen.step_logits, hf_logits["ffn"], "bundle[ffn], prefill in chunks of 3")


def test_correct_output_scale_reaches_the_logits(ckpts: dict[str, Path]) -> None:
    """PLE enters streams 1..3 through `correct_output_scale`: zeroing it must change the logits (a
    synthetic checkpoint at HF's zero init would hide a wrong PLE path)."""
    model = TorchModel(ckpts["ffn"])
    ids = _prompt(TINY)[:1]
    before = model.forward(ids, model.new_cache(1))
    for layer in model.decoder.layers:
        layer.altup.correct_output_scale.data.zero_()
    after = model.forward(ids, model.new_cache(1))
    assert np.abs(before - after).max() > 1e-2 * np.abs(before).max()


def test_sparsity_cutoff_is_transformers_quantile() -> None:
    """z is computed by transformers' own call, in fp32: the float differs from Python's
    statistics.NormalDist in the 7th digit, which would move the cutoff."""
    from statistics import NormalDist

    z = normal_quantile(0.95)
    assert z == float(torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(0.95)))
    assert abs(z - NormalDist().inv_cdf(0.95)) < 1e-6
    mlp = SparseMLP(16, 4096, 0.95)
    with torch.no_grad():
        g = mlp.gate(torch.randn(3, 16))
        mean, std = g.mean(-1, keepdim=True), g.std(-1, keepdim=True, unbiased=False)
        kept = (g > mean + z * std).float().mean().item()
    assert 0.03 < kept < 0.07  # ~5% of a Gaussian gate survives


# ---- the bundle ----------------------------------------------------------------------------------------
def _ops(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}


def test_decoder_op_set_has_no_erfinv_scatter_topk_or_random(fp32: dict[str, Path], int4: Path) -> None:
    for bundle in (fp32["ffn"], int4):
        ops = _ops(bundle / DECODER_FILE)
        assert not ops & FORBIDDEN_OPS, sorted(ops & FORBIDDEN_OPS)
        assert "RotaryEmbedding" in ops and "Relu" in ops  # RoPE as onnxruntime's op; the sparse gate
    assert "MatMulNBits" in _ops(int4 / DECODER_FILE)
    # the embedder stays a lookup: no matmul, nothing that reads the decoder's weights
    for bundle in (fp32["ffn"], int4):
        assert not {"MatMul", "Gemm", "MatMulNBits"} & _ops(bundle / EMBEDDER_FILE)


def test_manifest_names_the_family_and_who_reads_whose_cache(fp32: dict[str, Path]) -> None:
    manifest = Manifest.read(fp32["ffn"])
    assert manifest.model.family == "gemma3n"
    assert manifest.model.context_length == TINY.max_position_embeddings
    layers = manifest.kv_cache.layers
    assert [kv.layer for kv in layers] == TINY.kv_layers == [0, 1, 2, 3, 4, 5]
    shared = {kv.layer: kv.shared_by for kv in layers}
    assert shared[5] == (6, 7, 8) and shared[4] == (9,)  # last sliding / full owners
    names = {t.name for t in manifest.graphs.decoder.inputs}
    assert sum(n.startswith("past_key") for n in names) == len(TINY.kv_layers)
    assert manifest.ple.rows == TINY.vocab_size_per_layer_input < TINY.vocab_size
    assert manifest.ple.out_of_range_ids == "read row 0"  # as transformers' get_per_layer_inputs


def test_int4_keeps_the_altup_router_and_coefficients_float(int4: Path) -> None:
    manifest = Manifest.read(int4)
    assert manifest.quantization is not None
    tensors = manifest.quantization.tensors
    for i in range(TINY.num_hidden_layers):
        for name in ("router", "prediction_coefs", "correction_coefs"):
            record = tensors[f"layers.{i}.altup.{name}.weight"]
            assert record.kept_float_because == "kept float by the model family", record
        assert tensors[f"layers.{i}.laurel.left.weight"].precision == "int4"
    decoder = onnx.load(str(int4 / DECODER_FILE), load_external_data=False)
    floats = {t.name for t in decoder.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert {"layers.0.altup.router.weight", "layers.0.altup.correct_output_scale"} <= floats
    assert manifest.quantization.recipe.weights == "int4"


RECIPES = {
    "int8": QuantRecipe(weights="int8"),
    "int4_b128_sym": QuantRecipe(block_size=128, symmetric=True, clip_search=False),
    "ple_int4": QuantRecipe(ple="int4"),
    "keep_laurel": QuantRecipe(keep=("laurel",)),
    "ple_only": QuantRecipe(weights="none"),
}
# Prefill logits' cosine to fp32, floors from this synthetic model: random weights have no
# structure for int4 to keep (Gemma 4's tiny preset measures 0.67-0.86 at int4, this one 0.25-0.82;
# int8 0.996 / 0.990), so int4 is only checked to run and stay correlated here; its quality is
# checked on the trained tiny Gemma 3n (tests/test_gemma3n_trained.py).
MIN_COSINE = {"int8": 0.98, "ple_only": 0.9999}


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_runs(name: str, fp32: dict[str, Path], tmp_path: Path) -> None:
    recipe = RECIPES[name]
    bundle = quantize_bundle(fp32["ffn"], tmp_path / name, recipe).out_dir
    manifest = Manifest.read(bundle)
    assert manifest.quantization is not None and manifest.quantization.recipe == recipe
    tensors = manifest.quantization.tensors
    router = tensors["layers.2.altup.router.weight"]
    assert router.precision == "fp32", router
    wq = tensors["layers.2.mlp.gate.weight"]
    assert wq.precision == (recipe.weights if recipe.weights != "none" else "fp32"), wq
    if recipe.keep:
        assert tensors["layers.2.laurel.left.weight"].kept_float_because == "kept by --keep"
    assert manifest.quantization.ple is not None and manifest.quantization.ple.precision == recipe.ple
    prompt = _prompt(TINY)
    a = loop.generate(BundleSession(fp32["ffn"]), prompt, 1, stop_at_eos=False, keep_logits=True).step_logits[
        0
    ]
    b = loop.generate(BundleSession(bundle), prompt, 3, stop_at_eos=False, keep_logits=True).step_logits[0]
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert np.isfinite(b).all() and cosine.min() > MIN_COSINE.get(name, 0.1), cosine


def test_sparse_gate_survivors_under_int4(ckpts: dict[str, Path]) -> None:
    """int4 noise on a sparse layer's gate moves its mean and std, so the cutoff moves: measure
    which of the ~5% surviving activations survive both in fp32 and with the gate weight through
    the default recipe's blockwise int4 (docs/quantization.md quotes this)."""
    from graphs.quant.blockwise import dequantize_blockwise, quantize_blockwise

    model = TorchModel(ckpts["ffn"])
    recipe = QuantRecipe()
    x = torch.randn(64, TINY.hidden_size, generator=torch.Generator().manual_seed(0))
    for i, sparsity in enumerate(TINY.activation_sparsity_pattern):
        if sparsity == 0:
            continue
        mlp = model.decoder.layers[i].mlp
        w = mlp.gate.weight.detach().numpy()
        block = recipe.block_for(w.shape[1])
        q = quantize_blockwise(w, 4, block, symmetric=False, clip_search=True)
        w4 = torch.from_numpy(dequantize_blockwise(q)[:, : w.shape[1]].astype(np.float32))

        def survivors(weight: torch.Tensor, mlp: SparseMLP = mlp) -> torch.Tensor:
            g = x @ weight.T
            mean, std = g.mean(-1, keepdim=True), g.std(-1, keepdim=True, unbiased=False)
            assert mlp.cutoff is not None
            return g > mean + mlp.cutoff * std

        a, b = survivors(mlp.gate.weight.detach()), survivors(w4)
        jaccard = (a & b).sum().item() / (a | b).sum().item()
        assert jaccard > 0.6, f"layer {i}: survivors overlap {jaccard:.2f}"


# ---- reading checkpoints -------------------------------------------------------------------------------
class _Shape:
    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def test_released_layout_extras_are_ignored_never_fatal() -> None:
    """A released checkpoint holds k/v projections and norms for KV-shared layers and the vision
    and audio towers: the mapping ignores them and maps every text tensor."""
    prefix = "model.language_model."
    tensors = {n: _Shape(s) for n, s in TINY.weight_shapes(prefix).items()}
    hd, kvh, h = TINY.head_dim, TINY.num_key_value_heads, TINY.hidden_size
    for i in range(TINY.first_kv_shared_layer, TINY.num_hidden_layers):
        tensors[f"{prefix}layers.{i}.self_attn.k_proj.weight"] = _Shape((kvh * hd, h))
        tensors[f"{prefix}layers.{i}.self_attn.v_proj.weight"] = _Shape((kvh * hd, h))
        tensors[f"{prefix}layers.{i}.self_attn.k_norm.weight"] = _Shape((hd,))
    tensors["model.vision_tower.timm_model.conv_stem.conv.weight"] = _Shape((64, 3, 3, 3))
    tensors["model.audio_tower.conformer.0.attention.attn.q_proj.weight"] = _Shape((1536, 1536))
    tensors["model.embed_vision.embedding.weight"] = _Shape((128, 2048))
    mapping = map_checkpoint(TINY, tensors)
    assert set(mapping.values()) == set(TINY.weight_shapes(prefix))
    assert mapping["layers.3.altup.router.weight"] == f"{prefix}layers.3.altup.modality_router.weight"


def test_transformers_config_parses_to_the_same_spec() -> None:
    """transformers' own serialisation of our config, and a released-style config (legacy rope keys,
    one intermediate size for all layers, an eos list), parse to the specs they describe."""
    from transformers import Gemma3nTextConfig

    from exporter.family import spec_from_config

    text = TINY.to_hf_config()["text_config"]
    hf_dict = Gemma3nTextConfig.from_dict({k: v for k, v in text.items() if k != "model_type"}).to_dict()
    assert spec_from_config(hf_dict | {"model_type": "gemma3n_text"}) == TINY
    released = {k: v for k, v in text.items() if k not in ("rope_parameters", "intermediate_size")}
    released |= {"rope_theta": 500_000.0, "rope_local_base_freq": 20_000.0, "intermediate_size": 128}
    spec = spec_from_config({"model_type": "gemma3n", "text_config": released})
    assert spec.rope == TINY.rope and spec.intermediate_sizes == (128,) * TINY.num_hidden_layers


# ---- bad input -----------------------------------------------------------------------------------------
def _bad_config(ck: Path, tmp_path: Path, **text_changes: object) -> Path:
    """A copy of a checkpoint folder whose text_config differs (weights shared by symlink)."""
    out = tmp_path / "bad"
    out.mkdir()
    for f in ck.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["text_config"].update(text_changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"altup_num_inputs": 3}, "altup_num_inputs must be 4"),
        ({"altup_active_idx": 1}, "altup_active_idx must be 0"),
        ({"activation_sparsity_pattern": [0.95] * 3}, "'activation_sparsity_pattern' must list 10 values"),
        ({"intermediate_size": [128] * 11}, "'intermediate_size' must list 10 values"),
        ({"activation_sparsity_pattern": [1.0] * 10}, "activation_sparsity_pattern"),
        ({"altup_coef_clip": 0.05}, "outside altup_coef_clip 0.05"),
    ],
)
def test_bad_gemma3n_input_is_one_line(
    change: dict[str, object], needle: str, ckpts: dict[str, Path], tmp_path: Path
) -> None:
    ck = _bad_config(ckpts["ffn"], tmp_path, **change)
    out = tmp_path / "out"
    proc = cli("export", ck, "-o", out, "--quant", "none", cwd=tmp_path)
    line = assert_user_error(proc, needle)
    if "coef_clip" in needle:
        assert "altup." in line and "_coefs.weight" in line  # names the tensor
    assert not out.exists()


# ---- the commands and the other runtime ----------------------------------------------------------------
def test_cli_synth_export_verify_generate(tmp_path: Path) -> None:
    """The issue's user story: synth a preset, export it, verify against transformers, generate."""
    assert cli("synth", "--preset", "gemma3n-tiny", "-o", "ck", cwd=tmp_path).returncode == 0
    # fp32: random weights give flat logits that no quantized bundle follows (verify says so)
    proc = cli("export", "ck", "-o", "bundle", "--quant", "none", "--ple-quant", "none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = cli("verify", "bundle", "--reference", "ck", "--oracle", "transformers", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["passed"] is True
    ids = "2,5,400,7"  # 400: past the PLE vocabulary (384)
    proc = cli("generate", "bundle", "--prompt-ids", ids, "--max-new-tokens", "6", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tokens"]) == 6
    proc = cli(
        "profile",
        "bundle",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--runs",
        "1",
        "--json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)


def test_onnxruntime_genai_runs_the_bundle_unchanged(int4: Path) -> None:
    manifest = Manifest.read(int4)
    ours, theirs = _both(int4, genai_prompt(manifest, 29, seed=3), n=36)
    _assert_same(ours, theirs)
