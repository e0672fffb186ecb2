"""The graphs' I/O contract, defined once: names, element types, dims and roles of every input and
output of the embedder and the decoder, for a model's sizes and KV layout.

The tracer names the graphs' inputs and outputs from it (and declares the same dynamic dims), the
manifest records it, and the runtime wires itself from the manifest's copy:

    embedder  input_ids [batch, sequence] -> per_layer_inputs [batch, sequence, L, P]
    decoder   input_ids, per_layer_inputs, position_ids, logits_positions, past_key.i, past_value.i
              -> logits [batch, logits, vocab], present_key.i, present_value.i   (i: KV-owning layers)

A present is the call's new positions [batch, kv_heads, sequence, head_dim]: the runtime appends it to
its cache and feeds the cache (a sliding layer's last max_length positions) as the next past.
"""

from __future__ import annotations

from collections.abc import Sequence

from ple_export.bundle.format import DECODER_FILE, EMBEDDER_FILE, KV_KINDS, Role
from ple_export.bundle.manifest import GraphIO, Graphs, KVLayer, TensorIO

BATCH, SEQUENCE, LOGITS = "batch", "sequence", "logits"
KV_DTYPE = "float32"  # the default; `export --kv-dtype float16` halves the cache
KV_DTYPES = {"fp32": "float32", "fp16": "float16"}  # `export --kv-dtype` -> the element type


def past_name(kind: str, layer: int) -> str:
    return f"past_{kind}.{layer}"


def present_name(kind: str, layer: int) -> str:
    return f"present_{kind}.{layer}"


def past_length(layer: int) -> str:
    """The symbolic length of layer `layer`'s past: every KV layer has its own."""
    return f"past_sequence_{layer}"


def whole_cache_length(kv: KVLayer) -> str:
    """A present's length where it is the whole cache (format 3, onnxruntime-genai's model): past and
    new positions, a sliding layer's capped."""
    past = past_length(kv.layer)
    return f"{past} + {SEQUENCE}" if kv.max_length is None else f"min({past} + {SEQUENCE}, {kv.max_length})"


def graph_contract(
    num_layers: int, ple_width: int, vocab_size: int, kv_layers: Sequence[KVLayer], kv_dtype: str = KV_DTYPE
) -> Graphs:
    """The embedder's and the decoder's inputs and outputs, in graph order."""
    ids = TensorIO(Role.INPUT_IDS.value, "int64", (BATCH, SEQUENCE), Role.INPUT_IDS)
    per_layer = TensorIO(
        Role.PER_LAYER_INPUTS.value,
        "float32",
        (BATCH, SEQUENCE, num_layers, ple_width),
        Role.PER_LAYER_INPUTS,
    )
    inputs = [
        ids,
        per_layer,
        TensorIO(Role.POSITION_IDS.value, "int64", (BATCH, SEQUENCE), Role.POSITION_IDS),
        TensorIO(Role.LOGITS_POSITIONS.value, "int64", (LOGITS,), Role.LOGITS_POSITIONS),
    ]
    outputs = [TensorIO(Role.LOGITS.value, "float32", (BATCH, LOGITS, vocab_size), Role.LOGITS)]
    for kv in kv_layers:
        for kind in KV_KINDS:
            inputs.append(
                TensorIO(
                    past_name(kind, kv.layer),
                    kv_dtype,
                    (BATCH, kv.kv_heads, past_length(kv.layer), kv.head_dim),
                    Role(f"past_{kind}"),
                    kv.layer,
                )
            )
            outputs.append(
                TensorIO(
                    present_name(kind, kv.layer),
                    kv_dtype,
                    (BATCH, kv.kv_heads, SEQUENCE, kv.head_dim),  # the new positions only
                    Role(f"present_{kind}"),
                    kv.layer,
                )
            )
    return Graphs(
        embedder=GraphIO(EMBEDDER_FILE, (ids,), (per_layer,)),
        decoder=GraphIO(DECODER_FILE, tuple(inputs), tuple(outputs)),
    )
