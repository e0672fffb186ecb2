"""What the graph-pass tests share: onnxruntime with its own optimizations off (so a test sees
exactly the graph a pass wrote), the torch export they start from, and decoder inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch


def unoptimized_session(proto: bytes | str) -> ort.InferenceSession:
    """A session on a model (bytes or path) with onnxruntime's graph optimizations off, 1 thread."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"])


def run_unoptimized(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of an in-memory model, run by `unoptimized_session`."""
    return unoptimized_session(ir.serde.serialize_model(model).SerializeToString()).run(None, feeds)


def export_module(
    module: torch.nn.Module, args: tuple[Any, ...], dynamic_shapes: Any, opset_version: int | None = 18
) -> ir.Model:
    """`module` traced by torch.onnx (dynamo, no onnxscript optimization), at an IR version
    onnxruntime 1.31 loads."""
    program = torch.onnx.export(
        module.eval(),
        args,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        opset_version=opset_version,
        optimize=False,
        verbose=False,
    )
    assert program is not None
    model = program.model
    model.ir_version = 10
    return model


def decoder_feeds(session: ort.InferenceSession, seq: int = 5, past: int = 3) -> dict[str, np.ndarray]:
    """One batch row, S new tokens over a past of P (tests/test_parity.py covers batch 2)."""
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
