"""Gemma 4 text decoder, re-authored for export (numbers match transformers' `Gemma4ForCausalLM`).

Split as the bundle is split:
  PLEEmbedder    input_ids -> per_layer_inputs           lookup only; its table lives in flash
  Gemma4Decoder  input_ids, per_layer_inputs, position_ids, past KV -> logits, present KV

KV cache: explicit tensors for KV-owning layers only (`spec.kv_layers`). A full layer's present is
past + new; a sliding layer's present keeps only the last `sliding_window - 1` positions (what the
next token can see), as transformers' `DynamicSlidingWindowLayer` does. KV-shared layers attend
over their source layer's past + new keys/values.

Upstream references are to transformers 5.23 `models/gemma4/modeling_gemma4.py`.
"""

from __future__ import annotations

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

    def new_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the new tokens, [B, kv_heads, S, hd] each."""
        b, s, _ = x.shape
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        # attention_k_eq_v: values are the raw key projection (before k_norm and RoPE)
        v = k if self.wv is None else self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        k = apply_rope(self.k_norm(k), cos, sin).transpose(1, 2)
        v = self.v_norm(v).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: torch.Tensor,  # [B, S, H]
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,  # [B, kvh, T, hd]: past + new
        values: torch.Tensor,
        allowed: torch.Tensor,  # [B, S, T] bool
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)  # [B, nh, S, hd]
        groups = self.n_heads // self.n_kv_heads
        # heads h*G..h*G+G-1 share KV head h (upstream repeat_kv); group them instead of repeating K/V
        q = q.reshape(b, self.n_kv_heads, groups * s, self.head_dim)
        scores = torch.matmul(q, keys.transpose(2, 3))  # scaling is 1.0: q and k are RMS-normed
        scores = scores.view(b, self.n_kv_heads, groups, s, -1)
        scores = scores.masked_fill(~allowed[:, None, None, :, :], torch.finfo(scores.dtype).min)
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype).view(b, self.n_kv_heads, groups * s, -1)
        out = torch.matmul(probs, values)  # [B, kvh, G*S, hd]
        out = out.view(b, self.n_heads, s, self.head_dim).transpose(1, 2).reshape(b, s, -1)
        return self.wo(out)


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

    def forward(self, x, x_normed, cos, sin, keys, values, allowed, per_layer_input):  # type: ignore[no-untyped-def]
        # x_normed = attn_norm(x), computed once by the caller (it also feeds this layer's new K/V)
        x = x + self.post_attn_norm(self.attn(x_normed, cos, sin, keys, values, allowed))
        x = x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        # PLE: gate -> act -> * per_layer_input -> projection -> norm -> residual add
        g = F.gelu(self.ple_gate(x), approximate="tanh") * per_layer_input
        x = x + self.ple_norm(self.ple_proj(g))
        return x * self.layer_scalar


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
    then past_key/past_value [B, kvh, P_i, hd] for each KV-owning layer in `spec.kv_layers` order.
    Outputs: logits [B, S, V], then present_key/present_value per KV-owning layer.
    """

    def __init__(self, spec: Gemma4Spec):
        super().__init__()
        self.spec = spec
        h = spec.hidden_size
        self.embed = nn.Embedding(spec.vocab_size, h)
        self.ple_projection = nn.Linear(h, spec.ple_dim, bias=False)
        self.ple_projection_norm = RMSNorm(spec.hidden_size_per_layer_input, spec.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_hidden_layers))
        self.final_norm = RMSNorm(h, spec.rms_norm_eps)
        # RoPE frequencies are not in checkpoints: the exporter binds them from `rope_buffers(spec)`.
        for name, value in rope_buffers(spec).items():
            self.register_buffer(name, value)

    def forward(self, input_ids, per_layer_inputs, position_ids, *past):  # type: ignore[no-untyped-def]
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

        rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for lt in sorted(set(spec.layer_types)):  # sorted: graph order must not depend on hash seeds
            inv = getattr(self, f"rope_inv_freq_{lt}")
            freqs = position_ids[..., None].float() * inv  # [B, S, hd/2]
            emb = torch.cat((freqs, freqs), dim=-1)
            rope[lt] = (emb.cos(), emb.sin())

        q_pos = position_ids[:, :, None]  # [B, S, 1]

        def allowed(layer_type: str, keys: torch.Tensor) -> torch.Tensor:
            # key j of T sits at position pos0 - (T - S) + j: the cache holds the T - S positions before
            t = keys.shape[2]
            k_pos = position_ids[:, :1, None] - (t - s) + torch.arange(t)[None, None, :]  # [B, 1, T]
            ok = k_pos <= q_pos
            if layer_type == SLIDING:
                ok = ok & (q_pos - k_pos < spec.sliding_window)
            return ok  # [B, S, T]

        presents: list[torch.Tensor] = []
        full_kv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # source -> K, V, mask
        for i, layer in enumerate(self.layers):
            lt = spec.layer_types[i]
            cos, sin = rope[lt]
            src = spec.kv_source(i)
            x_normed = layer.attn_norm(x)
            if src == i:
                j = kv_layers.index(i)
                k_new, v_new = layer.attn.new_kv(x_normed, cos, sin)
                keys = torch.cat([past[2 * j], k_new], dim=2)
                values = torch.cat([past[2 * j + 1], v_new], dim=2)
                full_kv[i] = (keys, values, allowed(lt, keys))
                if lt == SLIDING:  # the next token sees at most window - 1 earlier positions
                    keep = spec.sliding_window - 1
                    presents += [keys[:, :, -keep:], values[:, :, -keep:]]
                else:
                    presents += [keys, values]
            keys, values, mask = full_kv[src]
            x = layer(x, x_normed, cos, sin, keys, values, mask, per_layer[:, :, i, :])

        x = self.final_norm(x)
        logits = F.linear(x, self.embed.weight)  # tied LM head
        if spec.final_logit_softcapping is not None:
            cap = spec.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return (logits, *presents)


def rope_buffers(spec: Gemma4Spec) -> dict[str, torch.Tensor]:
    """Values of the decoder's non-checkpoint tensors, by our name."""
    out = {}
    for lt in sorted(set(spec.layer_types)):
        dim = spec.head_dim if lt == SLIDING else spec.global_head_dim
        out[f"rope_inv_freq_{lt}"] = rope_inv_freq(spec.rope[lt], dim)
    return out


def empty_past(spec: Gemma4Spec, batch: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    past = []
    for i in spec.kv_layers:
        shape = (batch, spec.layer_kv_heads(i), 0, spec.layer_head_dim(i))
        past += [torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)]
    return past
