"""The onnxruntime-genai files of a bundle: `genai_config.json`, every number from the manifest.

onnxruntime-genai (the runtime Android/iOS apps embed) runs `model.onnx` (graphs/genai_model.py:
the embedder spliced in front of the decoder, graph only, weights referenced in place) with the
config below. What it must agree with, and the arithmetic relied on:

- the KV inputs are `past_key.%d` / `past_value.%d` for `%d` in 0..N-1: the KV-owning layers are
  the first N layers (the KV-sharing ones, last in Gemma 4, have no cache); `num_hidden_layers` is N;
  per-layer heads and head sizes are read from the graph's inputs by onnxruntime-genai itself;
- a sliding layer's present is capped at `max_length` = window - 1 positions in the graph.
  onnxruntime-genai (CPU) allocates each listed sliding layer's present as
  `min(total, window_size + max(chunk_size - 1, cache_slack))`, so with prefill chunks of C tokens
  `window_size` = max_length - (C - 1) and `cache_slack` = 1 (<= C - 1) give the graph's cap at every
  call, prefill chunk or decode step; `slide_inputs` / `slide_key_value_cache` stay off (the graph
  keeps its own window and position ids), and `past_present_share_buffer` is off (presents change
  length until the cap);
- the model has no `logits_positions` input and declares logits `[batch, 1, vocab]`: onnxruntime-genai
  treats it as pruned and reads the last position's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ple_export.bundle.contract import past_name, present_name
from ple_export.bundle.format import GENAI_MODEL_FILE, KV_KINDS, Role
from ple_export.bundle.manifest import Manifest
from ple_export.errors import UserError

MODEL_TYPE = "gemma4_text"  # onnxruntime-genai's decoder-only Gemma 4 text model ("gemma4" wants vision)
CACHE_SLACK = 1


@dataclass(frozen=True)
class GenaiShape:
    """What the config says about the KV cache, derived from the manifest and checked."""

    kv_layers: int  # the first N layers own a cache
    sliding_layers: tuple[int, ...]  # which of them are capped
    cap: int | None  # the sliding presents' max length (window - 1)
    chunk: int  # prefill chunk the config asks for (0: none)

    @property
    def slack(self) -> int:
        """What onnxruntime-genai allocates beyond `window_size`: a chunk's worth, at least the slack."""
        return max(self.chunk - 1, CACHE_SLACK)

    @property
    def window_size(self) -> int | None:
        return None if self.cap is None else self.cap - self.slack

    def allocated(self, total: int) -> int:
        """onnxruntime-genai's length of a sliding layer's present after `total` positions."""
        assert self.window_size is not None
        return min(total, self.window_size + self.slack)


def genai_chunk(manifest: Manifest, wanted: int) -> int:
    """The prefill chunk the config can take: `wanted`, at most half a sliding window (the config's
    window_size is the cap minus the chunk, and must stay positive)."""
    window = manifest.kv_cache.sliding_window
    return wanted if window is None else max(1, min(wanted, window // 2))


def genai_shape(manifest: Manifest, chunk: int) -> GenaiShape:
    """The KV layout as onnxruntime-genai sees it; refuses a bundle it cannot describe."""
    layers = manifest.kv_cache.layers
    owners = [kv.layer for kv in layers]
    if owners != list(range(len(owners))):
        raise UserError(
            f"the KV-owning layers are {owners}: onnxruntime-genai numbers caches 0..N-1, so they must be "
            "the first layers"
        )
    caps = {kv.max_length for kv in layers if kv.max_length is not None}
    if len(caps) > 1:
        raise UserError(f"sliding layers are capped at {sorted(caps)}: onnxruntime-genai takes one window")
    cap = caps.pop() if caps else None
    shape = GenaiShape(len(owners), tuple(kv.layer for kv in layers if kv.max_length is not None), cap, chunk)
    if cap is not None:
        assert shape.window_size is not None
        if shape.window_size < 1:
            raise UserError(f"a prefill chunk of {chunk} tokens leaves no window of {cap + 1} to slide")
        # the arithmetic the config relies on: its allocation is the graph's cap, early and late
        for total in (1, cap - 1, cap, cap + 1, cap + chunk, 10 * (cap + 1)):
            assert shape.allocated(total) == min(total, cap), (total, shape)
    return shape


def _name_pattern(name: str, layer: int) -> str:
    pattern = name.replace(f".{layer}", ".%d")
    assert pattern != name and pattern.replace("%d", str(layer)) == name, name
    return pattern


def genai_config(manifest: Manifest, chunk: int) -> dict[str, Any]:
    """genai_config.json for the bundle's model.onnx, prefill in chunks of `chunk` tokens (0: none)."""
    shape = genai_shape(manifest, chunk)
    spec, gen, kv = manifest.model.spec, manifest.generation, manifest.kv_cache.layers
    decoder = manifest.graphs.decoder
    for role in (Role.INPUT_IDS, Role.POSITION_IDS):
        if decoder.input(role) is None:
            raise UserError(f"the decoder has no {role.value} input: not a bundle onnxruntime-genai can run")
    logits = decoder.output(Role.LOGITS)
    assert logits is not None
    first = kv[0].layer
    patterns = {
        f"{side}_{kind}_names": _name_pattern(name(kind, first), first)
        for side, name in (("past", past_name), ("present", present_name))
        for kind in KV_KINDS
    }
    context = manifest.model.context_length or gen.vocab_size
    model: dict[str, Any] = {
        "filename": GENAI_MODEL_FILE,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "head_size": kv[0].head_dim,
        "hidden_size": manifest.model.hidden_size,
        "num_attention_heads": int(spec["num_attention_heads"]),
        "num_key_value_heads": kv[0].kv_heads,
        "num_hidden_layers": shape.kv_layers,
        "inputs": {
            "input_ids": Role.INPUT_IDS.value,
            "position_ids": Role.POSITION_IDS.value,
            "past_key_names": patterns["past_key_names"],
            "past_value_names": patterns["past_value_names"],
        },
        "outputs": {
            "logits": logits.name,
            "present_key_names": patterns["present_key_names"],
            "present_value_names": patterns["present_value_names"],
        },
    }
    if shape.cap is not None:
        model["sliding_window"] = {
            "window_size": shape.window_size,
            "cache_slack": CACHE_SLACK,
            "layers": list(shape.sliding_layers),
            "slide_inputs": False,
            "slide_key_value_cache": False,
        }
    search: dict[str, Any] = {
        "do_sample": False,
        "max_length": context,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": False,
        "top_k": 1,
    }
    if chunk:
        search["chunk_size"] = chunk
    eos = list(gen.eos_token_ids)
    return {
        "model": {
            "type": MODEL_TYPE,
            "vocab_size": gen.vocab_size,
            "context_length": context,
            "bos_token_id": gen.bos_token_id if gen.bos_token_id is not None else 0,
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": gen.pad_token_id if gen.pad_token_id is not None else 0,
            "decoder": model,
        },
        "search": search,
    }
