"""fuse_rms_norm: Gemma's traced RMSNorm -> SimplifiedLayerNormalization, same outputs under
onnxruntime (graph optimizations off, so what runs is what the pass wrote)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

from exporter.gemma4 import Gemma4Decoder, RMSNorm
from graphs.cleanup import clean, op_counts
from graphs.fusions.rms_norm import SLN, fuse_rms_norm
from tests.conftest import VARIANTS
from tests.graphs.helpers import decoder_feeds, export_module, run_unoptimized, unoptimized_session

EPS = 1e-6


class Block(nn.Module):
    """Weighted and weightless norms, as the decoder uses them: over the hidden axis of
    [B, S, H] and over the head axis of [B, S, heads, hd], the weightless one as the output."""

    def __init__(self, hidden: int = 32, heads: int = 2, eps: float = EPS):
        super().__init__()
        self.heads = heads
        self.norm = RMSNorm(hidden, eps)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.head_norm = RMSNorm(hidden // heads, eps)
        self.v_norm = RMSNorm(hidden // heads, eps, with_scale=False)
        with torch.no_grad():  # a scale that is not all ones, so a dropped weight shows
            self.norm.weight.uniform_(0.5, 1.5)
            self.head_norm.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        y = self.proj(self.norm(x)).view(b, s, self.heads, h // self.heads)
        return self.v_norm(self.head_norm(y) * 2.0 + 1.0)


class OtherAxisNorm(nn.Module):
    """Not an RMSNorm over the last axis: the mean runs over the sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.pow(x.pow(2).mean(1, keepdim=True) + EPS, -0.5)


class NoEpsNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.pow(x.pow(2).mean(-1, keepdim=True), -0.5)


class SqrtNorm(nn.Module):
    """Exponent -1 instead of -0.5: normalizes by the mean square, not its root."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + EPS, -1.0)


def _export(module: nn.Module, x: torch.Tensor) -> ir.Model:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    return export_module(module, (x,), ({0: batch, 1: seq},))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return run_unoptimized(model, {model.graph.inputs[0].name: x})[0]


def _n_norms(module: nn.Module) -> int:
    return sum(isinstance(m, RMSNorm) for m in module.modules())


@pytest.mark.parametrize("cleaned", [False, True], ids=["raw", "cleaned"])
def test_fuses_every_norm_with_the_same_outputs(cleaned: bool) -> None:
    torch.manual_seed(0)
    module = Block()
    x = torch.randn(2, 5, 32)
    model = _export(module, x)
    if cleaned:
        clean(model)
    before = _run(model, x.numpy())
    initializers = dict(model.graph.initializers)
    output_names = [v.name for v in model.graph.outputs]

    assert fuse_rms_norm(model) == _n_norms(module) == 3

    counts = op_counts(model)
    assert counts[SLN] == 3
    assert counts["ReduceMean"] == counts["Pow"] == counts["CastLike"] == 0
    after = _run(model, x.numpy())
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(after, module(x).numpy(), rtol=1e-5, atol=1e-5)
    norms = [n for n in model.graph if n.op_type == SLN]
    for node in norms:
        assert node.domain == ""
        assert node.attributes["axis"].as_int() == -1
        assert node.attributes["stash_type"].as_int() == 1
        assert node.attributes["epsilon"].as_float() == pytest.approx(EPS)
    assert [n.inputs[1].name for n in norms[:2]] == ["norm.weight", "head_norm.weight"]
    ones = norms[2].inputs[1]  # the weightless norm: a real Constant of ones, not an initializer
    assert ones.producer() is not None and ones.producer().op_type == "Constant"
    np.testing.assert_array_equal(ones.const_value.numpy(), np.ones(16, np.float32))
    assert dict(model.graph.initializers) == initializers
    assert model.graph.outputs[0].producer() is norms[2]  # the graph output, under its name
    assert [v.name for v in model.graph.outputs] == output_names


def test_fp16_norms_keep_their_casts_inside() -> None:
    """x in fp16: the norm casts x (and its weight) to fp32 and the result back to fp16; the fused
    op takes the fp16 tensors and computes in fp32 (stash_type=1)."""
    torch.manual_seed(0)
    module = Block().half()
    x = torch.randn(2, 5, 32, dtype=torch.float16)
    model = _export(module, x)
    before = _run(model, x.numpy())
    casts = op_counts(model)["Cast"]

    assert fuse_rms_norm(model) == 3

    after = _run(model, x.numpy())
    assert after.dtype == np.float16
    np.testing.assert_allclose(after.astype(np.float32), before.astype(np.float32), rtol=4e-3, atol=4e-3)
    counts = op_counts(model)
    assert counts["CastLike"] == 0
    assert counts["Cast"] == casts - 5  # each norm's Cast of x, each weighted norm's Cast of w
    norms = [n for n in model.graph if n.op_type == SLN]
    assert [n.inputs[0].dtype for n in norms] == [ir.DataType.FLOAT16] * 3
    assert norms[0].inputs[0] is model.graph.inputs[0] and norms[0].inputs[1].name == "norm.weight"


@pytest.mark.parametrize("module", [OtherAxisNorm(), NoEpsNorm(), SqrtNorm()], ids=lambda m: type(m).__name__)
def test_leaves_other_normalizations_alone(module: nn.Module) -> None:
    x = torch.randn(2, 5, 8)
    model = _export(module, x)
    counts = op_counts(model)
    assert fuse_rms_norm(model) == 0
    assert op_counts(model) == counts


def test_shares_one_ones_constant_per_width() -> None:
    class TwoWeightless(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = RMSNorm(8, EPS, with_scale=False)
            self.b = RMSNorm(8, EPS, with_scale=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) + 1.0)

    x = torch.randn(2, 5, 8)
    model = _export(TwoWeightless(), x)
    before = _run(model, x.numpy())
    assert fuse_rms_norm(model) == 2
    scales = {n.inputs[1] for n in model.graph if n.op_type == SLN}
    assert len(scales) == 1
    np.testing.assert_allclose(_run(model, x.numpy()), before, rtol=1e-5, atol=1e-5)


def test_never_reads_an_initializer() -> None:
    """At export time initializers hold fake or lazily quantized tensors: reading one is a bug."""
    torch.manual_seed(0)
    module = Block()
    x = torch.randn(2, 5, 32)
    model = _export(module, x)
    real = {}

    reads: list[str] = []

    def boom() -> ir.TensorProtocol:  # recorded too: a caught exception must not hide the read
        reads.append("read")
        raise AssertionError("a pass read an initializer")

    for value in model.graph.initializers.values():
        real[value.name] = value.const_value
        assert value.shape is not None and value.dtype is not None
        value.const_value = ir.LazyTensor(boom, dtype=value.dtype, shape=value.shape, name=value.name)

    assert fuse_rms_norm(model) == 3

    assert not reads
    for value in model.graph.initializers.values():
        value.const_value = real[value.name]
    with torch.no_grad():
        np.testing.assert_allclose(_run(model, x.numpy()), module(x).numpy(), rtol=1e-5, atol=1e-5)


# The exported tiny decoders (fp32 bundles of the parity variants, and one re-quantized to int4),
# loaded with their external data, fused, saved elsewhere: same logits and KV under onnxruntime.


def _bundle_before_after(
    bundle: Path, out: Path, passes: Callable[[ir.Model], object]
) -> tuple[ir.Model, list[np.ndarray], list[np.ndarray]]:
    before_session = unoptimized_session(str(bundle / "decoder.onnx"))
    feeds = decoder_feeds(before_session)
    before = before_session.run(None, feeds)
    model = ir.load(bundle / "decoder.onnx")
    passes(model)
    out.mkdir()
    ir.save(model, out / "decoder.onnx", external_data="decoder.data")
    after = unoptimized_session(str(out / "decoder.onnx")).run(None, feeds)
    return model, before, after


@pytest.mark.parametrize("variant", [*VARIANTS, "tiny_int4"])
@pytest.mark.parametrize("cleaned", [False, True], ids=["raw", "cleaned"])
def test_bundle_decoder_same_outputs(
    variant: str, cleaned: bool, bundles: dict[str, Path], int4_bundle: Path, tmp_path: Path
) -> None:
    bundle = int4_bundle if variant == "tiny_int4" else bundles[variant]
    spec = VARIANTS[variant.removesuffix("_int4")]

    def passes(model: ir.Model) -> None:
        if cleaned:
            clean(model)
        fuse_rms_norm(model)

    model, before, after = _bundle_before_after(bundle, tmp_path / "fused", passes)

    counts = op_counts(model)
    norms = _n_norms(Gemma4Decoder(spec))
    # K=V layers: k_norm and v_norm normalize the same tensor; clean's CSE shares it (export runs
    # clean, so a bundle's decoder has it either way)
    norms -= sum(spec.owns_kv(i) and spec.k_eq_v(i) for i in range(spec.num_hidden_layers))
    # export also folds each residual Add + following norm into one SkipSimplifiedLayerNormalization
    assert counts[SLN] + counts["com.microsoft::SkipSimplifiedLayerNormalization"] == norms
    assert counts["ReduceMean"] == 0
    assert len(after) == len(before)
    scale = float(np.abs(before[0]).max())
    for b, a in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
