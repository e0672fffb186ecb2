"""The PyTorch references a bundle is checked and measured against, as models the one decode loop
(`runtime_harness.loop`) drives:

    TorchModel         our modules (`exporter/gemma4.py`) with the checkpoint's weights
    TransformersModel  transformers' `Gemma4ForCausalLM` (eager attention, DynamicCache): the oracle
                       we did not write (a test dependency, imported only when asked for)

Both take token ids and return numpy logits, as a `BundleSession` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.checkpoint import read_checkpoint
from exporter.config_fields import read_config
from exporter.family import decoder_for, read_spec
from exporter.gemma4 import Gemma4Decoder, PLEEmbedder, advance_past, empty_past, rope_buffers
from exporter.safetensors_io import open_checkpoint, read_tensor
from exporter.spec import Gemma4Spec
from ple_export.bundle.format import PLE_TABLE_TENSOR
from ple_export.bundle.manifest import Manifest
from ple_export.errors import UserError

Forward = Callable[[list[int]], np.ndarray]  # new token ids -> the last one's logits [V], keeping its cache


def load_reference(
    checkpoint: Path, dtype: torch.dtype = torch.float32
) -> tuple[Gemma4Spec, PLEEmbedder, Gemma4Decoder]:
    ckpt = read_checkpoint(checkpoint)
    spec = ckpt.spec
    embedder = PLEEmbedder(spec, table_dtype=dtype)
    decoder = decoder_for(spec)
    state = {name: torch.from_numpy(read_tensor(ckpt.info(name))) for name in ckpt.mapping}
    embedder.load_state_dict({PLE_TABLE_TENSOR: state.pop(PLE_TABLE_TENSOR)}, strict=True)
    decoder.load_state_dict(state | rope_buffers(spec), strict=True)
    return spec, embedder.to(dtype).eval(), decoder.to(dtype).eval()


@dataclass
class _TorchCache:
    past: list[torch.Tensor]
    position: int = 0


class TorchModel:
    """Our modules in eager PyTorch, fp32 by default."""

    def __init__(self, checkpoint: Path, dtype: torch.dtype = torch.float32):
        self.spec, self.embedder, self.decoder = load_reference(checkpoint, dtype)
        self.dtype = dtype
        self.eos_ids = frozenset(self.spec.eos_token_id)

    def new_cache(self, batch: int, positions: int | None = None) -> _TorchCache:
        return _TorchCache(empty_past(self.spec, batch, self.dtype))

    @torch.no_grad()
    def forward(self, input_ids: np.ndarray, cache: _TorchCache, last_only: bool = False) -> np.ndarray:
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        b, s = ids.shape
        positions = torch.arange(cache.position, cache.position + s)[None].expand(b, -1)
        wanted = torch.tensor([s - 1]) if last_only else torch.arange(s)
        logits, *new = self.decoder(ids, self.embedder(ids).to(self.dtype), positions, wanted, *cache.past)
        cache.past, cache.position = advance_past(self.spec, cache.past, new), cache.position + s
        return logits.float().numpy()


class TransformersModel:
    """transformers' Gemma4ForCausalLM or Gemma3nForCausalLM, eager attention, with its DynamicCache."""

    def __init__(self, checkpoint: Path, dtype: torch.dtype = torch.float32):
        try:
            from transformers import AutoModelForCausalLM
            from transformers.cache_utils import DynamicCache
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise UserError(
                "--oracle transformers needs transformers installed (pip install transformers)"
            ) from None
        hf_logging.disable_progress_bar()  # stderr is ours: progress bars only under our switch
        if read_spec(checkpoint).family == "gemma3n":
            self.model = _gemma3n_causal_lm(checkpoint, dtype)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                checkpoint, dtype=dtype, attn_implementation="eager"
            ).eval()
        self._cache = DynamicCache
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = frozenset({eos} if isinstance(eos, int) else set(eos or []))

    def new_cache(self, batch: int, positions: int | None = None) -> Any:
        return self._cache(config=self.model.config)

    @torch.no_grad()
    def forward(self, input_ids: np.ndarray, cache: Any, last_only: bool = False) -> np.ndarray:
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        keep = {"logits_to_keep": 1} if last_only else {}
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, **keep)
        return out.logits.float().numpy()


def _gemma3n_causal_lm(checkpoint: Path, dtype: torch.dtype) -> Any:
    """transformers' Gemma3nForCausalLM on a checkpoint's text weights. The multimodal wrapper
    (`Gemma3nForConditionalGeneration`) cannot be built without timm and pillow, so the text
    decoder is built from `text_config` and given the `model.language_model.*` tensors renamed to
    `model.*` (towers dropped; the unused K/V projections of KV-shared layers too, as upstream's
    `_keys_to_ignore_on_load_unexpected` does)."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    cfg = read_config(checkpoint)
    text = cfg.get("text_config", cfg)
    config = Gemma3nTextConfig.from_dict({k: v for k, v in text.items() if k != "model_type"})
    config._attn_implementation = "eager"
    model: Any = Gemma3nForCausalLM(config)
    tensors = open_checkpoint(checkpoint)
    prefix = next(p for p in ("model.language_model.", "model.") if p + "embed_tokens.weight" in tensors)
    state = {
        "model." + name[len(prefix) :]: torch.from_numpy(read_tensor(info))
        for name, info in tensors.items()
        if name.startswith(prefix)
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    shared_kv = [k for k in unexpected if ".self_attn.k_" in k or ".self_attn.v_" in k]
    if set(unexpected) - set(shared_kv) or set(missing) - {"lm_head.weight"}:
        raise UserError(f"{checkpoint}: transformers' Gemma3nForCausalLM does not take these weights")
    model.tie_weights()
    return model.to(dtype).eval()


ORACLES: dict[str, Callable[[Path], Any]] = {"ours": TorchModel, "transformers": TransformersModel}


# The oracle takes a long prompt in chunks too, so `verify --prompt-len` stays within memory on the
# reference side (transformers' DynamicCache and our modules both continue over a filled cache).
ORACLE_CHUNK = 128


def sequence(model: Any, chunk: int = ORACLE_CHUNK) -> Forward:
    """A fresh sequence of `model`: each call feeds new tokens (in chunks of `chunk`, each asking for
    its last position's logits only) and returns the last new token's logits [V]."""
    cache = model.new_cache(1)

    def forward(ids: list[int]) -> np.ndarray:
        x = np.array([ids], dtype=np.int64)
        for i in range(0, x.shape[1], chunk):
            logits = model.forward(x[:, i : i + chunk], cache, last_only=True)
        return logits[0, -1]

    return forward


def check_same_model(manifest: Manifest, checkpoint: Path) -> None:
    """The reference must be the checkpoint the bundle came from (same spec), or nothing compares."""
    spec = json.loads(json.dumps(read_spec(checkpoint).to_dict()))
    mine = manifest.model.spec
    differing = sorted(k for k in spec if k in mine and spec[k] != mine[k] and k != "eos_token_id")
    if differing:
        raise UserError(
            f"{checkpoint}: not the checkpoint of this bundle (config differs in {', '.join(differing[:4])})"
        )


def reference_for(checkpoint: Path, oracle: str = "ours") -> Callable[[Manifest], Callable[[], Forward]]:
    """What `verify` takes: given the bundle's manifest, load the oracle's model of `checkpoint`,
    check it is the bundle's model, and hand out fresh sequences of it."""

    def build(manifest: Manifest) -> Callable[[], Forward]:
        model = ORACLES[oracle](checkpoint)
        check_same_model(manifest, checkpoint)
        return lambda: sequence(model)

    return build
