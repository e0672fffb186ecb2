"""Parity: our PyTorch module and the ONNX bundle against transformers' Gemma4ForCausalLM (fp32).

Each run: a batch-2 prefill longer than the sliding window, then greedy decode steps with the KV
cache. Logits must agree within 1e-4 of their scale and the greedy tokens must be identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.reference import TorchModel
from runtime_harness import loop
from runtime_harness.session import BundleSession
from tests.conftest import VARIANTS

PROMPT_LEN = 20  # > tiny sliding window (8)
STEPS = 10  # 1 prefill + 9 decode steps


def _prompt(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def hf_greedy(checkpoint: Path, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    from transformers import Gemma4ForCausalLM
    from transformers.cache_utils import DynamicCache

    model = Gemma4ForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cache = DynamicCache(config=model.config)
    ids = prompt
    out = []
    for _ in range(steps):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        out.append(logits)
        ids = logits.argmax(-1, keepdim=True)
    return out


def assert_close(ours: list[np.ndarray], ref: list[torch.Tensor], what: str) -> None:
    assert len(ours) == len(ref)
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        b = b.numpy()
        scale = np.abs(b).max()
        err = np.abs(a - b).max()
        assert err <= 1e-4 * scale, f"{what}: step {step} max |diff| {err:.3g} > 1e-4 * {scale:.3g}"
        assert (a.argmax(-1) == b.argmax(-1)).all(), f"{what}: greedy token differs at step {step}"


@pytest.fixture(scope="module")
def hf_logits(checkpoints: dict[str, Path]) -> dict[str, list[torch.Tensor]]:
    return {
        name: hf_greedy(ckpt, _prompt(VARIANTS[name].vocab_size), STEPS) for name, ckpt in checkpoints.items()
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_module_matches_transformers(variant: str, checkpoints: dict[str, Path], hf_logits) -> None:
    model = TorchModel(checkpoints[variant])
    gen = loop.generate(
        model, _prompt(model.spec.vocab_size).numpy(), STEPS, stop_at_eos=False, keep_logits=True
    )
    assert len(gen.step_logits) == STEPS
    assert_close(gen.step_logits, hf_logits[variant], f"module[{variant}]")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bundle_matches_transformers(variant: str, bundles: dict[str, Path], hf_logits) -> None:
    session = BundleSession(bundles[variant])
    prompt = _prompt(VARIANTS[variant].vocab_size).numpy()
    gen = loop.generate(session, prompt, STEPS, stop_at_eos=False, keep_logits=True)
    assert len(gen.step_logits) == STEPS
    assert_close(gen.step_logits, hf_logits[variant], f"bundle[{variant}]")


def test_sliding_cache_stays_within_window(bundles: dict[str, Path]) -> None:
    """Sliding layers hand back at most window - 1 positions, however long the sequence grows."""
    session = BundleSession(bundles["tiny"])
    spec = VARIANTS["tiny"]
    cache = session.new_cache(1)
    session.forward(np.arange(PROMPT_LEN)[None] % spec.vocab_size, cache)
    for _ in range(3):
        session.forward(np.array([[5]]), cache)
    for layer in spec.kv_layers:
        length = cache.tensors[f"past_key.{layer}"].shape[2]
        expected = spec.sliding_window - 1 if spec.is_sliding(layer) else PROMPT_LEN + 3
        assert length == expected, (layer, length)


@torch.no_grad()
def test_bundle_chunked_prefill_matches_transformers(
    checkpoints: dict[str, Path], bundles: dict[str, Path]
) -> None:
    """A prompt fed in two chunks (12 tokens, then 10 over the non-empty cache, crossing the
    window) gives the logits of one 22-token pass, batch 2, through the current graph in one call
    per chunk (only bundles exported with onnxruntime's GroupQueryAttention take such a chunk one
    batch row at a time)."""
    from transformers import Gemma4ForCausalLM

    prompt = torch.randint(
        0, VARIANTS["tiny"].vocab_size, (2, 22), generator=torch.Generator().manual_seed(3)
    )
    model = Gemma4ForCausalLM.from_pretrained(
        checkpoints["tiny"], dtype=torch.float32, attn_implementation="eager"
    )
    ref = model.eval()(input_ids=prompt).logits
    session = BundleSession(bundles["tiny"])
    assert not session._rows_one_by_one  # our graph takes a batched chunk as it is
    runs = []
    session.decoder.run = lambda *a, _run=session.decoder.run: runs.append(1) or _run(*a)  # type: ignore[method-assign]
    cache = session.new_cache(2)
    first = session.forward(prompt[:, :12].numpy(), cache)
    second = session.forward(prompt[:, 12:].numpy(), cache)
    assert cache.position == 22 and len(runs) == 2  # one decoder call per chunk, both rows at once
    ours = np.concatenate([first, second], axis=1)
    scale = float(ref.abs().max())
    err = float(np.abs(ours - ref.numpy()).max())
    assert err <= 1e-4 * scale, f"chunked prefill: max |diff| {err:.3g} > 1e-4 * {scale:.3g}"


def test_prefill_computes_only_the_logits_asked_for(bundles: dict[str, Path]) -> None:
    """`last_only` feeds logits_positions = [S - 1]: the decoder returns one position's logits, the
    same numbers as the last row of an every-position call (the LM head runs per position)."""
    session = BundleSession(bundles["tiny"])
    prompt = np.arange(3, 3 + PROMPT_LEN)[None] % VARIANTS["tiny"].vocab_size
    every = session.forward(prompt, session.new_cache(1))
    last = session.forward(prompt, session.new_cache(1), last_only=True)
    assert every.shape[1] == PROMPT_LEN and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], every[:, -1], rtol=1e-5, atol=1e-5)
    # the graph itself: asked for positions [2, 0], it returns exactly those two rows
    names = {t.role: t.name for t in session.manifest.graphs.decoder.inputs if t.layer is None}
    cache = session.new_cache(1)
    feeds = {
        names["input_ids"]: prompt,
        names["per_layer_inputs"]: session.per_layer_inputs(prompt),
        names["position_ids"]: np.arange(PROMPT_LEN)[None],
        names["logits_positions"]: np.array([2, 0]),
        **cache.tensors,
    }
    picked = session.decoder.run(["logits"], feeds)[0]
    np.testing.assert_allclose(picked, every[:, [2, 0]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["tiny", "nocap"])
def test_attention_reads_each_cache_once(variant: str, bundles: dict[str, Path], tmp_path: Path) -> None:
    """Attention is written out and never copies a cache: no GroupQueryAttention (which copies every
    cache into a new present; fails when it comes back, checked), one Softmax per layer, and in the
    graph onnxruntime runs every past input is read only by the two attention matmuls of the layers
    attending over it (keys through FusedMatMul's transB) and by Shape: no Concat, Slice or Transpose
    of a cache. The presents are the new positions only: one position per decode step."""
    import onnx
    import onnxruntime as ort

    from exporter.spec import Gemma4Spec

    spec = VARIANTS[variant]
    assert isinstance(spec, Gemma4Spec)
    graph = onnx.load(str(bundles[variant] / "decoder.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "GroupQueryAttention" not in ops
    assert ops.count("Softmax") == spec.num_hidden_layers
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(bundles[variant] / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    past = {i.name for i in optimized.input if i.name.startswith("past_")}
    readers: dict[str, list[str]] = {name: [] for name in past}
    for node in optimized.node:
        for name in set(node.input) & past:
            readers[name].append(node.op_type)
    attending = {
        i: [j for j in range(spec.num_hidden_layers) if spec.kv_source(j) == i] for i in spec.kv_layers
    }
    for name, ops_reading in readers.items():
        matmuls = [op for op in ops_reading if op != "Shape"]
        layer = int(name.rsplit(".", 1)[1])
        kind = "FusedMatMul" if name.startswith("past_key") else "MatMul"
        assert matmuls == [kind] * len(attending[layer]), (name, ops_reading)
    if variant == "tiny":  # the tiny preset shares KV: fewer caches than layers
        assert len(spec.kv_layers) < spec.num_hidden_layers
    session = BundleSession(bundles[variant])
    cache = session.new_cache(1)
    session.forward(np.arange(3, 3 + PROMPT_LEN)[None] % spec.vocab_size, cache)
    names = [t.name for t in session.manifest.graphs.decoder.outputs]
    feeds = {
        session.manifest.graphs.decoder.inputs[0].name: np.array([[5]]),
        "per_layer_inputs": session.per_layer_inputs(np.array([[5]])),
        "position_ids": np.array([[PROMPT_LEN]]),
        "logits_positions": np.array([0]),
        **cache.tensors,
    }
    outputs = dict(zip(names, session.decoder.run(names, feeds), strict=True))
    assert all(v.shape[2] == 1 for n, v in outputs.items() if n.startswith("present_")), "a whole cache"
