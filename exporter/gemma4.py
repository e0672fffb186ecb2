"""Gemma 4 text decoder, re-authored for export (numbers match transformers' `Gemma4ForCausalLM`).

Split as the bundle is split:
  PLEEmbedder    input_ids -> per_layer_inputs           lookup only; its table lives in flash
  Gemma4Decoder  input_ids, per_layer_inputs, position_ids, past KV -> logits, new KV positions

KV cache: explicit tensors for KV-owning layers only (`spec.kv_layers`). A present is the call's new
positions; the caller appends it to the past (`advance_past`), a sliding layer's cut to the last
`sliding_window - 1` positions (what the next token can see), as transformers'
`DynamicSlidingWindowLayer` keeps them. Attention reads past and new keys where they lie, never
concatenated; KV-shared layers attend over their source layer's. It is written out as grouped
matmuls (see `grouped_attention`); RoPE exports as onnxruntime's `RotaryEmbedding`.

Upstream references are to transformers 5.23 `models/gemma4/modeling_gemma4.py`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exporter.spec import SLIDING, Gemma4Spec, RopeSpec


class RMSNorm(nn.Module):
    """Gemma4RMSNorm: x * (mean(x^2) + eps)^-0.5 * weight, computed in fp32.

    Gemma 4 multiplies by `weight` directly (no `1 + weight` as in Gemma 2/3). `with_scale=False`
    is the weightless v_norm.
    """

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # upstream uses torch.pow(.., -0.5), not rsqrt, "to address compiler differences"
        out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.type_as(x)


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies, [head_dim // 2]. "proportional" rotates only the first
    `partial_rotary_factor` of the angles (exponents still over the full head_dim) and leaves the
    rest at frequency 0 (transformers `_compute_proportional_rope_parameters`)."""
    if rope.rope_type == "proportional":
        angles = int(rope.partial_rotary_factor * head_dim // 2)
        exps = torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim
        inv = 1.0 / (rope.theta**exps)
        inv = torch.cat([inv, torch.zeros(head_dim // 2 - angles)])
        return inv / rope.factor
    # default: `factor` does not apply (transformers' compute_default_rope_parameters ignores it)
    return 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, S, heads, hd]; cos/sin: [B, S, hd]
    return x * cos.unsqueeze(2) + rotate_half(x) * sin.unsqueeze(2)


class Rotary:
    """RoPE at the current tokens' positions for one layer type; `rotary(x)` rotates
    x [B, S, heads, hd] and returns it as [B, S, heads * hd].

    Under `torch.onnx.export` each rotation is one `com.microsoft::RotaryEmbedding` node. That op
    looks angles up by position id in a [rows, hd / 2] cache; the cache here holds only the current
    tokens' angles (row b * S + i for token i of batch row b), computed once per layer type, so no
    max-context-sized table sits in DRAM.
    """

    def __init__(self, position_ids: torch.Tensor, inv_freq: torch.Tensor):
        b, s = position_ids.shape
        freqs = position_ids[..., None].to(inv_freq.dtype) * inv_freq  # [B, S, hd/2]
        self.exporting = torch.onnx.is_in_onnx_export()
        if self.exporting:
            self.cos, self.sin = freqs.cos().reshape(b * s, -1), freqs.sin().reshape(b * s, -1)
            self.rows = torch.arange(b * s).view(b, s)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, s, heads, hd = x.shape
        if self.exporting:
            return torch.onnx.ops.symbolic(
                "com.microsoft::RotaryEmbedding",
                (x.reshape(b, s, heads * hd), self.rows, self.cos, self.sin),
                dict(num_heads=heads, interleaved=0),
                dtype=x.dtype,
                shape=(b, s, heads * hd),
                version=1,
            )
        return apply_rope(x, self.cos, self.sin).reshape(b, s, heads * hd)


def causal_window(s: int, t: int, window: int | None) -> torch.Tensor:
    """Which of T cached keys each of the S newest queries sees, [S, T] bool. The cache holds the
    T positions up to and including the new tokens, so key j is at distance (T - S + i) - j from
    query i; a sliding window keeps distances below `window` (HF's: itself and window - 1 before)."""
    q_at = torch.arange(s)[:, None] + (t - s)
    distance = q_at - torch.arange(t)[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    return allowed


KV = tuple[torch.Tensor, torch.Tensor]  # a KV layer's (past, new) keys or values, [B, kvh, P | S, hd]


def grouped_attention(
    q: torch.Tensor,  # [B, S, nh * hd]: normed, rotated
    keys: KV,  # (past, new): never concatenated
    values: KV,
    n_heads: int,
    allowed: torch.Tensor,  # [S, P + S] bool, `causal_window`
) -> torch.Tensor:
    """Causal grouped-query attention over past + new keys, written out: out [B, S, nh * hd].

    The past and the new keys are not concatenated (that copied the whole cache every step, and the
    present outputs returned it again): their scores are, [.., G*S, P + S], and the probabilities
    are split again for the two value matmuls. The cache is read once per layer, where it lies.
    The query heads that share a KV head are stacked as rows of one matmul (upstream repeats K/V
    instead), so each KV head's keys are read once per layer, not once per query head.

    Not onnxruntime's `GroupQueryAttention`: that kernel zeroes and fills a new present buffer and
    runs one small GEMM per query head (595M model: written out x1.06-1.09 decode)."""
    b, s, _ = q.shape
    # a half-precision cache (export --kv-dtype float16) stores K/V rounded; attention runs in fp32
    past_k, new_k = (k.to(q.dtype) for k in keys)
    past_v, new_v = (v.to(q.dtype) for v in values)
    kvh, p, hd = past_k.shape[1], past_k.shape[2], past_k.shape[3]
    groups = n_heads // kvh
    qh = q.view(b, s, n_heads, hd).transpose(1, 2).reshape(b, kvh, groups * s, hd)
    # scaling is 1.0: q and k are RMS-normed
    on_keys = [torch.matmul(qh, past_k.transpose(2, 3)), torch.matmul(qh, new_k.transpose(2, 3))]
    scores = torch.cat(on_keys, dim=-1)
    t = scores.shape[-1]
    scores = scores.view(b, kvh, groups, s, t).masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores.float(), dim=-1).to(q.dtype).view(b, kvh, groups * s, t)
    # two Slices (torch.split with a symbolic size traces to a sequence of tensors)
    out = torch.matmul(probs[..., :p], past_v) + torch.matmul(probs[..., p:], new_v)  # [B, kvh, G*S, hd]
    return out.view(b, n_heads, s, hd).transpose(1, 2).reshape(b, s, -1)


class Attention(nn.Module):
    def __init__(self, spec: Gemma4Spec, layer: int):
        super().__init__()
        h, nh = spec.hidden_size, spec.num_attention_heads
        self.head_dim = spec.layer_head_dim(layer)
        self.n_heads = nh
        self.n_kv_heads = spec.layer_kv_heads(layer)
        self.owns_kv = spec.owns_kv(layer)
        self.k_eq_v = spec.k_eq_v(layer)
        self.wq = nn.Linear(h, nh * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps)
        self.wo = nn.Linear(nh * self.head_dim, h, bias=False)
        if self.owns_kv:  # KV-shared layers own no K/V projections
            self.wk = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
            self.wv = None if self.k_eq_v else nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps)
            self.v_norm = RMSNorm(self.head_dim, spec.rms_norm_eps, with_scale=False)

    def new_kv(self, x: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the new tokens, [B, S, kv_heads * hd] each (keys rotated)."""
        b, s, _ = x.shape
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        # attention_k_eq_v: values are the raw key projection (before k_norm and RoPE)
        v = k if self.wv is None else self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        return rotary(self.k_norm(k)), self.v_norm(v).reshape(b, s, -1)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, H]
        rotary: Rotary,
        # a KV-owning layer: new K, new V [B, S, kvh * hd], past K, past V; a KV-shared layer: its
        # source's (past, new) keys and values (the source layer has run)
        kv: tuple[Any, ...],
        allowed: torch.Tensor,  # [S, P + S] bool: `causal_window` of this layer's type
    ) -> tuple[torch.Tensor, KV, KV]:
        """Output [B, S, H] and the (past, new) keys and values of the KV layer attended to; the new
        ones [B, kvh, S, hd], in the cache's dtype, are the layer's present outputs."""
        b, s, _ = x.shape
        q = rotary(self.q_norm(self.wq(x).view(b, s, self.n_heads, self.head_dim)))
        if self.owns_kv:
            k_new, v_new, past_k, past_v = kv
            kvh, hd = past_k.shape[1], past_k.shape[3]
            new_k = k_new.view(b, s, kvh, hd).transpose(1, 2).to(past_k.dtype)
            new_v = v_new.view(b, s, kvh, hd).transpose(1, 2).to(past_v.dtype)
            keys, values = (past_k, new_k), (past_v, new_v)
        else:  # the source's cache: attended over where it lies, no copy
            keys, values = kv
        out = grouped_attention(q, keys, values, self.n_heads, allowed)
        return self.wo(out), keys, values


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: Gemma4Spec, layer: int):
        super().__init__()
        h, eps = spec.hidden_size, spec.rms_norm_eps
        self.attn_norm = RMSNorm(h, eps)
        self.attn = Attention(spec, layer)
        self.post_attn_norm = RMSNorm(h, eps)
        self.mlp_norm = RMSNorm(h, eps)
        self.mlp = MLP(h, spec.layer_intermediate_size(layer))
        self.post_mlp_norm = RMSNorm(h, eps)
        p = spec.hidden_size_per_layer_input
        self.ple_gate = nn.Linear(h, p, bias=False)
        self.ple_proj = nn.Linear(p, h, bias=False)
        self.ple_norm = RMSNorm(h, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))  # a buffer upstream; loaded from the checkpoint

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the layer's input, its attention input): the decoder computes the attention input once
        and feeds it to this layer's new K/V and to `forward`."""
        return x, self.attn_norm(x)

    def forward(self, x, x_normed, rotary, kv, allowed, per_layer_input):  # type: ignore[no-untyped-def]
        """The layer's output and the (past, new) keys and values of the KV layer it attends to.
        x_normed = attn_norm(x), from `prepare`."""
        attn, keys, values = self.attn(x_normed, rotary, kv, allowed)
        x = x + self.post_attn_norm(attn)
        x = x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        # PLE: gate -> act -> * per_layer_input -> projection -> norm -> residual add
        g = F.gelu(self.ple_gate(x), approximate="tanh") * per_layer_input
        x = x + self.ple_norm(self.ple_proj(g))
        return x * self.layer_scalar, keys, values


class PLEEmbedder(nn.Module):
    """Lookup-only PLE: input_ids [B, S] -> per_layer_inputs [B, S, L, P] (fp32).

    Upstream `get_per_layer_inputs`: `embed_tokens_per_layer(ids) * sqrt(P)`, with the scale cast
    to the table's dtype (`Gemma4TextScaledWordEmbedding`). Ids outside the PLE vocabulary read
    row 0 (the padding row), as Gemma 3n does; Gemma 4's table covers the whole vocabulary.
    """

    def __init__(self, spec: Gemma4Spec, table_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.num_layers = spec.num_hidden_layers
        self.width = spec.hidden_size_per_layer_input
        self.vocab = spec.vocab_size_per_layer_input
        self.ple_table = nn.Parameter(torch.zeros(self.vocab, spec.ple_dim, dtype=table_dtype))
        self.scale = self.scale_for(self.width, table_dtype)

    @staticmethod
    def scale_for(width: int, table_dtype: torch.dtype) -> float:
        """sqrt(width) rounded to the table's dtype, as upstream's `embed_scale.to(weight.dtype)`."""
        return float(torch.tensor(width**0.5, dtype=table_dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        in_range = (input_ids >= 0) & (input_ids < self.vocab)
        ids = torch.where(in_range, input_ids, torch.zeros_like(input_ids))
        rows = F.embedding(ids, self.ple_table).float() * self.scale
        return rows.view(*input_ids.shape, self.num_layers, self.width)


class Gemma4Decoder(nn.Module):
    """Everything but the PLE lookup. Inputs:
    input_ids [B, S] int64, per_layer_inputs [B, S, L, P] f32, position_ids [B, S] int64,
    logits_positions [N] int64 (which of the S new tokens get logits, 0 <= p < S: a prefill needs
    only its last), then past_key/past_value [B, kvh, P_i, hd] for each KV-owning layer in
    `spec.kv_layers` order.
    Outputs: logits [B, N, V], then present_key/present_value per KV-owning layer.
    """

    layer_class: type[nn.Module] = DecoderLayer

    def __init__(self, spec: Gemma4Spec):
        super().__init__()
        self.spec = spec
        h = spec.hidden_size
        self.embed = nn.Embedding(spec.vocab_size, h)
        self.ple_projection = nn.Linear(h, spec.ple_dim, bias=False)
        self.ple_projection_norm = RMSNorm(spec.hidden_size_per_layer_input, spec.rms_norm_eps)
        self.layers = nn.ModuleList(self.layer_class(spec, i) for i in range(spec.num_hidden_layers))
        self.final_norm = RMSNorm(h, spec.rms_norm_eps)
        # RoPE frequencies are not in checkpoints: the exporter binds them from `rope_buffers(spec)`.
        for name, value in rope_buffers(spec).items():
            self.register_buffer(name, value)

    def forward(self, input_ids, per_layer_inputs, position_ids, logits_positions, *past):  # type: ignore[no-untyped-def]
        spec = self.spec
        kv_layers = spec.kv_layers
        assert len(past) == 2 * len(kv_layers)
        b, s = input_ids.shape
        h = spec.hidden_size
        # upstream scales by sqrt(hidden) cast to the embedding dtype (exact for fp32)
        x = self.embed(input_ids) * (h**0.5)
        # project_per_layer_inputs: (RMSNorm(proj(x) / sqrt(H)) + per_layer_inputs) / sqrt(2)
        proj = self.ple_projection(x) * (h**-0.5)
        proj = self.ple_projection_norm(
            proj.view(b, s, spec.num_hidden_layers, spec.hidden_size_per_layer_input)
        )
        per_layer = (proj + per_layer_inputs) * (2.0**-0.5)
        x = self.expand(x)

        rope: dict[str, Rotary] = {}
        allowed: dict[str, torch.Tensor] = {}
        for lt in sorted(set(spec.layer_types)):  # sorted: graph order must not depend on hash seeds
            rope[lt] = Rotary(position_ids, getattr(self, f"rope_inv_freq_{lt}"))
            # every cache of a layer type holds the same positions: one mask per type
            first = next(j for j, i in enumerate(kv_layers) if spec.layer_types[i] == lt)
            window = spec.sliding_window if lt == SLIDING else None
            allowed[lt] = causal_window(s, past[2 * first].shape[2] + s, window)

        presents: list[torch.Tensor] = []  # the new positions' K and V of each KV-owning layer
        # KV-owning layer -> its (past, new) keys and values (KV-shared layers attend over these)
        caches: dict[int, tuple[KV, KV]] = {}
        for i, layer in enumerate(self.layers):
            lt = spec.layer_types[i]
            src = spec.kv_source(i)
            x, x_normed = layer.prepare(x)
            if src == i:
                j = kv_layers.index(i)
                kv: tuple[torch.Tensor, ...] = (
                    *layer.attn.new_kv(x_normed, rope[lt]),
                    past[2 * j],
                    past[2 * j + 1],
                )
            else:
                kv = caches[src]
            x, keys, values = layer(x, x_normed, rope[lt], kv, allowed[lt], per_layer[:, :, i, :])
            if src == i:  # the caller appends the new positions to its cache (`advance_past`)
                caches[i] = (keys, values)
                presents += [keys[1], values[1]]

        # the head (the largest matmul: vocab x hidden) only where logits are asked for
        x = self.final_norm(self.collapse(x, logits_positions))
        logits = F.linear(x, self.embed.weight)  # tied LM head
        if spec.final_logit_softcapping is not None:
            cap = spec.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return (logits, *presents)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden state the layers carry, from the scaled embedding [B, S, H] (Gemma 4: itself)."""
        return x

    def collapse(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B, N, H] at the positions that get logits, from what the layers carried."""
        return x.index_select(1, positions)


def rope_buffers(spec: Gemma4Spec) -> dict[str, torch.Tensor]:
    """Values of the decoder's non-checkpoint tensors, by our name."""
    out = {}
    for lt in sorted(set(spec.layer_types)):
        dim = spec.head_dim if lt == SLIDING else spec.global_head_dim
        out[f"rope_inv_freq_{lt}"] = rope_inv_freq(spec.rope[lt], dim)
    return out


def advance_past(
    spec: Gemma4Spec, past: list[torch.Tensor], presents: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The next call's past: each KV layer's new positions appended to its past, a sliding layer's
    cut to the window - 1 positions the next token can see (what the bundle's runtime does)."""
    out = []
    for j, i in enumerate(spec.kv_layers):
        for kind in (0, 1):
            grown = torch.cat([past[2 * j + kind], presents[2 * j + kind]], dim=2)
            out.append(grown[:, :, -(spec.sliding_window - 1) :] if spec.is_sliding(i) else grown)
    return out


def empty_past(spec: Gemma4Spec, batch: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    past = []
    for i in spec.kv_layers:
        shape = (batch, spec.layer_kv_heads(i), 0, spec.layer_head_dim(i))
        past += [torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)]
    return past
