"""The small Gemma 3n PLE model with trained weights in exporter/assets/tiny_trained_gemma3n (issue #18).

The Gemma 3n sibling of exporter/assets/tiny_trained, made by `python -m exporter.assets.train_tiny
--family gemma3n` (its CORPUS.md says from what and what was measured); nothing is trained here. The
checks: the shipped files are the script's model (wrapper layout, AltUp coefficients within the clip,
PLE on); the int4 bundle meets the `quality` thresholds the Gemma 4 model meets (tests/test_quality.py,
same options, same table); transformers' Gemma3nForCausalLM (our `--oracle transformers`) continues
held-out prompts exactly as our fp32 bundle does; the held-out perplexity clearly beats the best
unigram model, and random weights of the same shape do not.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from exporter import assets
from exporter.assets import train_tiny as tt
from exporter.family import read_spec
from exporter.gemma3n_spec import Gemma3nSpec
from exporter.safetensors_io import open_checkpoint, read_tensor
from exporter.synth import synth_checkpoint
from ple_export.bundle.recipe import QuantRecipe
from runtime_harness import loop
from runtime_harness.compare.thresholds import PARITY, QUALITY
from runtime_harness.quality import QualityOptions, compare
from runtime_harness.session import BundleSession
from tests.conftest import swap_int4_codes
from tests.test_tiny_trained import HELDOUT_WINDOWS, MIN_UNIGRAM_RATIO

ASSET = Path(assets.__file__).parent / "tiny_trained_gemma3n"
GEMMA4_ASSET = Path(assets.__file__).parent / "tiny_trained"

# The options tests/test_quality.py measures the Gemma 4 model with; the thresholds are the int4
# class's of runtime_harness/compare/thresholds.py, the same table as for Gemma 4.
OPTS = QualityOptions(ASSET / tt.HELDOUT_FILE, windows=6, window_tokens=128, greedy_steps=16)
# As in tests/test_tiny_trained.py (HELDOUT_WINDOWS, MIN_UNIGRAM_RATIO from there): perplexity on the first
# 64 held-out windows (8,128 tokens) must beat the best unigram there by that factor.
GREEDY_TOKENS = 24
PROMPTS = 4  # held-out prompts for the greedy comparison, spread over the text
PROMPT_TOKENS = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained3n(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped trained tiny Gemma 3n: its fp32 bundle and the int4 bundle quantized from it (as
    tests/conftest.py's `trained` does for the Gemma 4 model)."""
    from exporter.export import ExportOptions, export_bundle
    from exporter.quantize import quantize_bundle

    root = tmp_path_factory.mktemp("trained_gemma3n")
    fp32 = export_bundle(ASSET, root / "fp32", ExportOptions(recipe=QuantRecipe.none())).out_dir
    int4 = quantize_bundle(fp32, root / "int4", QuantRecipe()).out_dir
    return {"fp32": fp32, "int4": int4}


@pytest.fixture(scope="module")
def tok() -> Any:
    return Tokenizer.from_file(str(ASSET / "tokenizer.json"))


@pytest.fixture(scope="module")
def heldout_ids(tok: Any) -> list[int]:
    text = (ASSET / tt.HELDOUT_FILE).read_text(encoding="utf-8")
    return list(tok.encode(text, add_special_tokens=False).ids)


@pytest.fixture(scope="module")
def oracle() -> Any:
    """transformers' Gemma3nForCausalLM on the checkpoint, as `verify --oracle transformers` builds it."""
    from exporter.reference import TransformersModel

    torch.manual_seed(0)
    model = TransformersModel(ASSET).model
    assert type(model).__name__ == "Gemma3nForCausalLM"
    return model


def _perplexity(model: Any, ids: list[int]) -> float:
    nll, count = tt.model_nll(model, ids)
    assert count == len(ids)
    return math.exp(nll / count)


# ---- the files -------------------------------------------------------------------------------------
def test_checkpoint_is_the_scripts_spec() -> None:
    spec = read_spec(ASSET)
    assert isinstance(spec, Gemma3nSpec) and spec == tt.SPEC_GEMMA3N
    # the features the tiny preset has, kept in the trained model
    assert spec.layer_types.count("full_attention") and spec.layer_types.count("sliding_attention")
    shared = spec.layer_types[-spec.num_kv_shared_layers :]
    assert len(set(shared)) == 2  # KV-shared layers of both types
    sparse = [t for t, p in zip(spec.layer_types, spec.activation_sparsity_pattern, strict=True) if p > 0]
    assert len(set(sparse)) == 2  # sparse layers of both types
    assert len(set(spec.intermediate_sizes)) > 1
    assert spec.vocab_size_per_layer_input < spec.vocab_size
    infos = open_checkpoint(ASSET)
    assert {n: i.shape for n, i in infos.items()} == spec.weight_shapes(spec.checkpoint_prefix)
    assert all(n.startswith("model.language_model.") for n in infos)  # the released wrapper layout
    assert {i.dtype for i in infos.values()} == {tt.SAVE_DTYPE}


def test_altup_within_clip_and_ple_on() -> None:
    spec = read_spec(ASSET)
    assert isinstance(spec, Gemma3nSpec) and spec.altup_coef_clip is not None
    infos = open_checkpoint(ASSET)
    pre = spec.checkpoint_prefix
    for i in range(spec.num_hidden_layers):
        for kind in ("prediction_coefs", "correction_coefs"):
            coefs = read_tensor(infos[f"{pre}layers.{i}.altup.{kind}.weight"])
            assert np.abs(coefs).max() <= spec.altup_coef_clip, (i, kind)
        # zero (transformers' init) would switch the per-layer inputs off
        scale = read_tensor(infos[f"{pre}layers.{i}.altup.correct_output_scale"])
        assert np.abs(scale).min() > 0.1, i


def test_tokenizer_is_the_gemma4_siblings(tok: Any, heldout_ids: list[int]) -> None:
    assert (ASSET / "tokenizer.json").read_bytes() == (GEMMA4_ASSET / "tokenizer.json").read_bytes()
    assert (ASSET / tt.HELDOUT_FILE).read_bytes() == (GEMMA4_ASSET / tt.HELDOUT_FILE).read_bytes()
    assert tok.get_vocab_size() == tt.SPEC_GEMMA3N.vocab_size
    # ids past the PLE vocabulary occur in the held-out text: that path is exercised
    assert any(t >= tt.SPEC_GEMMA3N.vocab_size_per_layer_input for t in heldout_ids)


# ---- (a) quality -----------------------------------------------------------------------------------
def test_int4_meets_the_quality_thresholds(trained3n: dict[str, Path], heldout_ids: list[int]) -> None:
    report = compare(trained3n["int4"], trained3n["fp32"], OPTS)
    assert report.thresholds_for == "int4" and report.thresholds == QUALITY["int4"]
    assert report.passed, report.failures
    assert report.perplexity_ratio >= 1.0 - 1e-3  # quantization does not improve a model
    # the trained model, not noise: test_quality.py's bar (the best unigram of the text: ~513)
    assert report.perplexity_reference < 80, report.perplexity_reference
    assert report.perplexity_reference * MIN_UNIGRAM_RATIO < tt.oracle_unigram_perplexity(heldout_ids)


def test_a_broken_quantizer_fails_them(
    trained3n: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thresholds bite on this model too: swap the two codes of every byte (a packing bug)."""
    from exporter.quantize import quantize_bundle

    swap_int4_codes(monkeypatch)
    broken = quantize_bundle(trained3n["fp32"], tmp_path / "broken", QuantRecipe()).out_dir
    report = compare(broken, trained3n["fp32"], OPTS)
    assert not report.passed and report.perplexity_ratio > QUALITY["int4"].max_perplexity_ratio


# ---- (b) transformers' Gemma3nForCausalLM against our fp32 bundle ----------------------------------
def _prompts(heldout_ids: list[int]) -> list[list[int]]:
    """PROMPTS held-out prompts (<bos> first) spread over the text, the first one holding an id past
    the PLE vocabulary."""
    ple_vocab = tt.SPEC_GEMMA3N.vocab_size_per_layer_input
    first = next(i for i, t in enumerate(heldout_ids) if t >= ple_vocab)
    starts = [max(0, first - PROMPT_TOKENS // 2)]
    stride = len(heldout_ids) // PROMPTS
    starts += [k * stride for k in range(1, PROMPTS)]
    return [[tt.BOS_ID, *heldout_ids[s : s + PROMPT_TOKENS - 1]] for s in starts]


def test_greedy_matches_transformers(trained3n: dict[str, Path], oracle: Any, heldout_ids: list[int]) -> None:
    session = BundleSession(trained3n["fp32"], threads=1)
    prompts = _prompts(heldout_ids)
    assert any(t >= tt.SPEC_GEMMA3N.vocab_size_per_layer_input for t in prompts[0])
    for prompt in prompts:
        with torch.no_grad():
            out = oracle.generate(
                torch.tensor([prompt]),
                max_new_tokens=GREEDY_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tt.PAD_ID,
            )
        expected = out[0, len(prompt) :].tolist()
        got = loop.generate(session, prompt, GREEDY_TOKENS, stop_at_eos=False).tokens
        assert list(got) == expected, prompt
        assert len(expected) == GREEDY_TOKENS


def test_window_logits_match_transformers(
    trained3n: dict[str, Path], oracle: Any, heldout_ids: list[int]
) -> None:
    """Teacher-forced over a whole held-out window (past the sliding window, in chunks): every
    position's logits within verify's fp32 bound of transformers'."""
    window = tt.heldout_chunks(heldout_ids)[1]
    assert any(t >= tt.SPEC_GEMMA3N.vocab_size_per_layer_input for t in window)  # PLE row 0 read
    with torch.no_grad():
        expected = oracle(torch.tensor([window])).logits[0].double().numpy()
    session = BundleSession(trained3n["fp32"], threads=1)
    got = loop.score(session, np.array([window], dtype=np.int64), session.new_cache(1), 48)[0]
    rel = float(np.abs(got - expected).max() / np.abs(expected).max())
    assert rel <= PARITY["fp32"].max_rel_error, rel
    assert (got.argmax(-1) == expected.argmax(-1)).all()


# ---- (c) it learnt something -----------------------------------------------------------------------
def test_heldout_perplexity_beats_unigram(oracle: Any, heldout_ids: list[int]) -> None:
    ids = heldout_ids[: HELDOUT_WINDOWS * (tt.SEQ_LEN - 1)]
    ppl = _perplexity(oracle, ids)
    unigram = tt.oracle_unigram_perplexity(ids)
    assert ppl * MIN_UNIGRAM_RATIO < unigram, (ppl, unigram)


def test_random_weights_miss_the_perplexity_bar(tmp_path: Path, heldout_ids: list[int]) -> None:
    """The bar above means something: the same model with random weights is far from it."""
    random = tt.load_trained(synth_checkpoint(tt.SPEC_GEMMA3N, tmp_path / "random", seed=1)).eval()
    ids = heldout_ids[: HELDOUT_WINDOWS * (tt.SEQ_LEN - 1)]
    few = ids[: 8 * (tt.SEQ_LEN - 1)]
    assert _perplexity(random, few) * MIN_UNIGRAM_RATIO > tt.oracle_unigram_perplexity(ids)
