"""Random inputs for an exported decoder graph: S new tokens over a past of P positions."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


def decoder_feeds(session: ort.InferenceSession, seq: int = 5, past: int = 3) -> dict[str, np.ndarray]:
    """One batch row: onnxruntime's GroupQueryAttention takes S > 1 new tokens over a non-empty past
    one row at a time (BundleSession splits such calls; tests/test_parity.py covers batch 2)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        shape = arg.shape
        if arg.name == "input_ids":
            feeds[arg.name] = rng.integers(0, 256, (1, seq)).astype(np.int64)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.arange(past, past + seq, dtype=np.int64)[None]
        elif arg.name == "logits_positions":  # every new token's logits
            feeds[arg.name] = np.arange(seq, dtype=np.int64)
        elif arg.name == "per_layer_inputs":
            feeds[arg.name] = rng.standard_normal((1, seq, shape[2], shape[3])).astype(np.float32)
        else:  # past key / value [B, kv_heads, past, head_dim]
            feeds[arg.name] = rng.standard_normal((1, shape[1], past, shape[3])).astype(np.float32)
    return feeds
