"""Trace the re-authored modules to ONNX without materialising a single weight.

The modules are built under `FakeTensorMode`, so tracing costs no memory for weights; the traced
graphs come out with placeholder initializers named by our module names (`layers.3.attn.wq.weight`),
which `exporter.layout` later binds to external data streamed from the checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import onnx_ir as ir
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from exporter import dtypes
from exporter.family import decoder_for
from exporter.gemma4 import PLEEmbedder
from exporter.spec import Gemma4Spec
from ple_export.bundle.contract import BATCH, KV_DTYPE, LOGITS, SEQUENCE, past_length
from ple_export.bundle.format import IR_VERSION, OPSET
from ple_export.bundle.manifest import GraphIO


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C (or SIGTERM, when the CLI turned it into an exception) during tracing must stop the
    export. An exception raised inside dynamo can come back wrapped as an ordinary error, and
    torch.onnx.export then silently retries with another capture strategy; remember the signal and
    raise again once tracing returns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    watched = [signal.SIGINT] + [signal.SIGTERM] * callable(signal.getsignal(signal.SIGTERM))
    previous = {s: signal.getsignal(s) for s in watched}
    caught: list[signal.Signals] = []

    def on_signal(signum: int, frame: Any) -> None:
        signum = signal.Signals(signum)
        caught.append(signum)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)  # raises (KeyboardInterrupt, errors.Terminated)
        raise KeyboardInterrupt

    for s in watched:
        signal.signal(s, on_signal)
    try:
        yield
    finally:
        for s in watched:
            signal.signal(s, previous[s])
    if caught:
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)
        raise KeyboardInterrupt


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx.export is chatty (warnings, progress prints); keep the CLI's stderr readable."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch").setLevel(level)


def _finish(model: ir.Model, contract: GraphIO, graph_name: str) -> ir.Model:
    """Name the traced graph's inputs and outputs as the contract says (the tracer's order is the
    forward's argument order, which is the contract's)."""
    for value, tensor in zip(model.graph.inputs, contract.inputs, strict=True):
        value.name = tensor.name
    for value, tensor in zip(model.graph.outputs, contract.outputs, strict=True):
        value.name = tensor.name
    model.graph.name = graph_name
    model.ir_version = IR_VERSION
    model.producer_name = "ple-export"
    model.producer_version = ""
    _strip_metadata(model)
    return model


def _strip_metadata(model: ir.Model) -> None:
    """Drop what the tracer records for debugging: per-node stack traces with absolute source paths,
    fx names, symbol ids. They make the files depend on where the code is installed."""
    model.doc_string = None
    model.metadata_props.clear()
    graph = model.graph
    graph.doc_string = None
    graph.metadata_props.clear()
    for value in [*graph.inputs, *graph.initializers.values()]:
        value.metadata_props.clear()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        node.metadata_props.clear()
        node.doc_string = None
        for value in node.outputs:
            value.metadata_props.clear()


def trace_decoder(spec: Gemma4Spec, kv_dtype: str = KV_DTYPE) -> ir.Model:
    """The decoder graph with dynamic batch, sequence and per-layer past lengths; its KV caches in
    `kv_dtype` (the attention itself computes in fp32 either way)."""
    with _interruptible(), _quiet(), FakeTensorMode(allow_non_fake_inputs=True):
        module = decoder_for(spec).eval()
        b, s, p = 2, 5, 3
        ids = torch.zeros(b, s, dtype=torch.int64)
        per_layer_inputs = torch.zeros(b, s, spec.num_hidden_layers, spec.hidden_size_per_layer_input)
        past = []
        batch, seq = torch.export.Dim(BATCH), torch.export.Dim(SEQUENCE)
        past_shapes = []
        for kv in spec.kv_layout():
            shape = (b, kv.kv_heads, p, kv.head_dim)
            past += [
                torch.zeros(shape, dtype=dtypes.TORCH[dtypes.FROM_ONNX_NAME[kv_dtype]]),
                torch.zeros(shape, dtype=dtypes.TORCH[dtypes.FROM_ONNX_NAME[kv_dtype]]),
            ]
            # every KV layer gets its own past length: sliding layers stop at window - 1
            past_len = torch.export.Dim(past_length(kv.layer))
            past_shapes += [{0: batch, 2: past_len}, {0: batch, 2: past_len}]
        logits_positions = torch.tensor([0, 1, 3, 4])  # 4: a length no other dimension has here
        dynamic_shapes = (
            {0: batch, 1: seq},
            {0: batch, 1: seq},
            {0: batch, 1: seq},
            {0: torch.export.Dim(LOGITS)},
            tuple(past_shapes),
        )
        program = torch.onnx.export(
            module,
            (ids, per_layer_inputs, ids.clone(), logits_positions, *past),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            optimize=False,
            verbose=False,
        )
    assert program is not None
    return _finish(program.model, spec.contract(kv_dtype).decoder, "decoder")


def trace_embedder(spec: Gemma4Spec, table_dtype: torch.dtype) -> ir.Model:
    """The lookup-only PLE embedder: input_ids -> per_layer_inputs."""
    with _interruptible(), _quiet(), FakeTensorMode(allow_non_fake_inputs=True):
        module = PLEEmbedder(spec, table_dtype).eval()
        ids = torch.zeros(2, 5, dtype=torch.int64)
        batch, seq = torch.export.Dim(BATCH), torch.export.Dim(SEQUENCE)
        program = torch.onnx.export(
            module,
            (ids,),
            dynamo=True,
            dynamic_shapes=({0: batch, 1: seq},),
            opset_version=OPSET,
            optimize=False,
            verbose=False,
        )
    assert program is not None
    return _finish(program.model, spec.contract().embedder, "ple_embedder")
