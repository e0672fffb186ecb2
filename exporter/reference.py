"""The PyTorch reference: our modules with real weights from a checkpoint (for parity and benchmarks)."""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.export import read_checkpoint
from exporter.gemma4 import Gemma4Decoder, PLEEmbedder, empty_past, rope_buffers
from exporter.safetensors_io import read_tensor
from exporter.spec import Gemma4Spec


def load_reference(
    checkpoint: Path, dtype: torch.dtype = torch.float32
) -> tuple[Gemma4Spec, PLEEmbedder, Gemma4Decoder]:
    ckpt = read_checkpoint(checkpoint)
    spec = ckpt.spec
    embedder = PLEEmbedder(spec, table_dtype=dtype)
    decoder = Gemma4Decoder(spec)
    state = {name: torch.from_numpy(read_tensor(ckpt.info(name))) for name in ckpt.mapping}
    embedder.load_state_dict({"ple_table": state.pop("ple_table")}, strict=True)
    decoder.load_state_dict(state | rope_buffers(spec), strict=True)
    return spec, embedder.to(dtype).eval(), decoder.to(dtype).eval()


@torch.no_grad()
def greedy_logits(
    spec: Gemma4Spec, embedder: PLEEmbedder, decoder: Gemma4Decoder, prompt: torch.Tensor, steps: int
) -> list[torch.Tensor]:
    """Last-position logits of the prefill, then of each of `steps - 1` greedy decode steps."""
    b, s = prompt.shape
    dtype = next(decoder.parameters()).dtype
    past = empty_past(spec, b, dtype)
    positions = torch.arange(s)[None].expand(b, -1)
    ids = prompt
    out: list[torch.Tensor] = []
    for _ in range(steps):
        last = torch.tensor([ids.shape[1] - 1])
        logits, *past = decoder(ids, embedder(ids).to(dtype), positions, last, *past)
        out.append(logits[:, -1])
        ids = logits[:, -1].argmax(-1, keepdim=True)
        positions = positions[:, -1:] + 1
    return out
