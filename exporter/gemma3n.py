"""Gemma 3n text decoder, re-authored for export (numbers match transformers' `Gemma3nForCausalLM`).

Built on Gemma 4's module (`exporter/gemma4.py`): the same PLE embedder, RMSNorm, attention,
RoPE, KV sharing, capped sliding caches and graph I/O. What differs is below, each piece as
transformers 5.23 `models/gemma3n/modeling_gemma3n.py` computes it:

  AltUp     the layers carry 4 streams [4, B, S, H]: expanded from the embedding by magnitude-
            matched projections, predicted before and corrected after each layer by a router's
            4x4 coefficients, collapsed back (unembedded, averaged) before the final norm
  LAuReL    a rank-r side branch of the attention residual; (x + attn + laurel) / sqrt(2)
  sparsity  the first layers' MLP gate keeps relu(g - mean(g) - z * std(g)), z the normal quantile
            of the layer's sparsity, computed once here in fp32 (erfinv does not export)
  PLE       goes into streams 1..3 (not the active stream), gated by the corrected active stream
            scaled by `correct_output_scale`

Export notes: the streams are updated with Concat, never in place (`streams[1:] += u` traces to
ScatterND); no erfinv, TopK or random op reaches the graph (tests/test_gemma3n.py checks).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from exporter.gemma3n_spec import Gemma3nSpec
from exporter.gemma4 import MLP, Attention, Gemma4Decoder, RMSNorm


@functools.cache
def normal_quantile(p: float) -> float:
    """The standard normal's quantile at `p`, as transformers computes it (`Normal(0, 1).icdf` of a
    float32 tensor): implementations differ in the 7th digit, and the cutoff moves with it."""
    with unset_fake_temporarily():  # modules are built under FakeTensorMode for tracing
        return float(torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(p, dtype=torch.float32)))


def magnitude_matched(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x rescaled to the RMS `target` [.., 1] (AltUp's stream projections)."""
    magnitude = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
    return x * target / magnitude


class SparseMLP(MLP):
    """Gemma 4's gated MLP, with activation sparsity on the gate when the layer has it."""

    def __init__(self, hidden: int, inter: int, sparsity: float):
        super().__init__(hidden, inter)
        self.cutoff = normal_quantile(sparsity) if sparsity > 0.0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        if self.cutoff is not None:
            mean = g.mean(-1, keepdim=True)
            std = torch.sqrt(((g - mean) ** 2).mean(-1, keepdim=True))  # population std
            g = F.relu(g - (mean + std * self.cutoff))
        return self.down(F.gelu(g, approximate="tanh") * self.up(x))


class AltUp(nn.Module):
    def __init__(self, spec: Gemma3nSpec):
        super().__init__()
        h, n = spec.hidden_size, spec.altup_num_inputs
        self.n = n
        self.correct_output_scale = nn.Parameter(torch.zeros(h))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.router = nn.Linear(h, n, bias=False)
        self.router_norm = RMSNorm(h, spec.rms_norm_eps)
        self.router_scale = 1.0 / h  # upstream's fp32 buffer `hidden_size**-1.0`

    def modalities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.router(self.router_norm(x) * self.router_scale))

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [n, B, S, H] -> predictions: stream j + sum_i coef[j, i] * stream i."""
        m = self.modalities(streams[0])  # [B, S, n]
        coefs = self.prediction_coefs(m).unflatten(-1, (self.n, self.n)).transpose(-1, -2)
        mixed = torch.matmul(streams.permute(1, 2, 3, 0), coefs)  # [B, S, H, n]
        return mixed.permute(3, 0, 1, 2) + streams

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        """predictions + (activated - prediction 0) * (1 + router coefficients), per stream."""
        coefs = self.correction_coefs(self.modalities(activated)) + 1.0  # [B, S, n]
        innovation = activated - predictions[0]
        return innovation * coefs.permute(2, 0, 1).unsqueeze(-1) + predictions


class Laurel(nn.Module):
    def __init__(self, spec: Gemma3nSpec):
        super().__init__()
        self.left = nn.Linear(spec.hidden_size, spec.laurel_rank, bias=False)
        self.right = nn.Linear(spec.laurel_rank, spec.hidden_size, bias=False)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.right(self.left(x)))


class Gemma3nLayer(nn.Module):
    def __init__(self, spec: Gemma3nSpec, layer: int):
        super().__init__()
        h, eps, p = spec.hidden_size, spec.rms_norm_eps, spec.hidden_size_per_layer_input
        self.attn_norm = RMSNorm(h, eps)
        self.attn = Attention(spec, layer)
        self.post_attn_norm = RMSNorm(h, eps)
        self.mlp_norm = RMSNorm(h, eps)
        self.mlp = SparseMLP(h, spec.layer_intermediate_size(layer), spec.activation_sparsity_pattern[layer])
        self.post_mlp_norm = RMSNorm(h, eps)
        self.altup = AltUp(spec)
        self.laurel = Laurel(spec)
        self.correct_scale = spec.altup_correct_scale
        self.ple_gate = nn.Linear(h, p, bias=False)
        self.ple_proj = nn.Linear(p, h, bias=False)
        self.ple_norm = RMSNorm(h, eps)

    def prepare(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(AltUp's predictions [n, B, S, H], the attention input: the active prediction normed)."""
        predictions = self.altup.predict(streams)
        return predictions, self.attn_norm(predictions[0])

    def forward(self, predictions, x_normed, rotary, kv, allowed, per_layer_input):  # type: ignore[no-untyped-def]
        attn, keys, values = self.attn(x_normed, rotary, kv, allowed)
        x = predictions[0] + self.post_attn_norm(attn)
        x = (x + self.laurel(x_normed)) / math.sqrt(2)
        x = x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        corrected = self.altup.correct(predictions, x)
        first = corrected[0]
        if self.correct_scale:
            first = first * self.altup.correct_output_scale
        g = F.gelu(self.ple_gate(first), approximate="tanh") * per_layer_input
        ple = self.ple_norm(self.ple_proj(g))
        # PLE feeds streams 1..n-1; a Concat, not `corrected[1:] += ple` (ScatterND)
        return torch.cat([corrected[:1], corrected[1:] + ple], dim=0), keys, values


class Gemma3nDecoder(Gemma4Decoder):
    """Gemma 4's decoder graph (same inputs and outputs), with AltUp streams around the layers."""

    layer_class = Gemma3nLayer

    def __init__(self, spec: Gemma3nSpec):
        super().__init__(spec)
        h, extra = spec.hidden_size, spec.altup_num_inputs - 1
        self.altup_projections = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(extra))
        self.altup_unembed_projections = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(extra))

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        target = torch.mean(x**2, dim=-1, keepdim=True) ** 0.5
        streams = [x] + [magnitude_matched(proj(x), target) for proj in self.altup_projections]
        return torch.stack(streams)

    def collapse(self, streams: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        streams = streams.index_select(2, positions)  # only the positions that get logits
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        rest = [
            magnitude_matched(proj(streams[j + 1]), target)
            for j, proj in enumerate(self.altup_unembed_projections)
        ]
        return torch.mean(torch.stack([streams[0], *rest]), dim=0)
