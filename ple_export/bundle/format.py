"""The bundle format's names and numbers, spelled once: what a writer writes and a reader expects.

Every file name, file role, placement and graph I/O role of a bundle is defined here; everything
else (the exporter, the runtime, the CLI, the benchmarks) imports them. docs/bundle-format.md is the
prose of the same.
"""

from __future__ import annotations

from enum import StrEnum

FORMAT = "ple-export-bundle"
# 4: present_* outputs hold the call's new positions only, appended to the cache by the runtime (up
# to 3: the whole cache, past and new, capped, fed back as it is); 3: onnxruntime-genai's files (roles
# genai_model, genai_config); 2: the decoder's logits_positions input (1: logits at every new token)
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
APPENDING_KV_SINCE = 4  # the first format whose presents are the new positions only
IR_VERSION = 10  # onnx 1.23 writes 14 by default; onnxruntime 1.31 loads at most 13
OPSET = 18
MS_DOMAIN = "com.microsoft"

# the PLE table's tensor: our name of it in a checkpoint, and its initializer in the embedder graph
PLE_TABLE_TENSOR = "ple_table"
MANIFEST_FILE = "manifest.json"
EMBEDDER_FILE = "embedder.onnx"
PLE_TABLE_FILE = "ple_table.data"
DECODER_FILE = "decoder.onnx"
DECODER_DATA_FILE = "decoder.data"
TOKENIZER_FILE = "tokenizer.json"
# onnxruntime-genai's: the embedder + decoder as one graph (weights referenced in place), its config
GENAI_MODEL_FILE = "model.onnx"
GENAI_CONFIG_FILE = "genai_config.json"
# copied from the checkpoint when present (role metadata, placement none)
METADATA_FILES = (
    TOKENIZER_FILE,
    "tokenizer_config.json",
    "generation_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
)

# Prompt tokens per prefill call unless a device profile or the caller says otherwise (the runtime's
# default, and the chunk written into genai_config.json). Measured on the 595M model (int4, 2 threads,
# fresh processes): a 1024-token prompt's first token in 1.91-1.96 s at 128-token chunks, 2.02-2.04 s
# at 256, 2.02-2.21 s at 512, 2.47-2.61 s in one call; peak RSS 373-380 / 409-448 / 533-549 / 662 MiB.
# At 4096 tokens: 9.6 s and 477 MiB at 128, 29.4 s and 3,709 MiB in one call (docs/profiling.md).
DEFAULT_PREFILL_CHUNK = 128

# External data: a tensor at least a page long starts at a page boundary, so onnxruntime maps it in
# place; a shorter one at a SIMD-friendly boundary.
SMALL_ALIGNMENT = 64


def aligned(position: int, nbytes: int, page_size: int) -> int:
    """Where a tensor of `nbytes` written after `position` bytes of a data file starts."""
    alignment = page_size if nbytes >= page_size else SMALL_ALIGNMENT
    return -(-position // alignment) * alignment


class Placement(StrEnum):
    """Where a file lives on the phone: flash (memory-mapped, paged in on demand) or DRAM."""

    FLASH = "flash"
    DRAM = "dram"
    NONE = "none"


class FileRole(StrEnum):
    EMBEDDER_GRAPH = "embedder_graph"
    PLE_TABLE = "ple_table"
    DECODER_GRAPH = "decoder_graph"
    DECODER_WEIGHTS = "decoder_weights"
    METADATA = "metadata"
    GENAI_MODEL = "genai_model"
    GENAI_CONFIG = "genai_config"


FILE_ROLES: dict[str, tuple[Placement, FileRole]] = {
    EMBEDDER_FILE: (Placement.FLASH, FileRole.EMBEDDER_GRAPH),
    PLE_TABLE_FILE: (Placement.FLASH, FileRole.PLE_TABLE),
    DECODER_FILE: (Placement.DRAM, FileRole.DECODER_GRAPH),
    DECODER_DATA_FILE: (Placement.DRAM, FileRole.DECODER_WEIGHTS),
    # read by onnxruntime-genai only (our runtime loads the two graphs): no placement of their own
    GENAI_MODEL_FILE: (Placement.NONE, FileRole.GENAI_MODEL),
    GENAI_CONFIG_FILE: (Placement.NONE, FileRole.GENAI_CONFIG),
}


def file_role(name: str) -> tuple[Placement, FileRole]:
    """Placement and role of a bundle file by its name (anything not ours is metadata)."""
    return FILE_ROLES.get(name, (Placement.NONE, FileRole.METADATA))


class Role(StrEnum):
    """What a graph input or output carries."""

    INPUT_IDS = "input_ids"
    PER_LAYER_INPUTS = "per_layer_inputs"
    POSITION_IDS = "position_ids"
    LOGITS_POSITIONS = "logits_positions"
    PAST_KEY = "past_key"
    PAST_VALUE = "past_value"
    LOGITS = "logits"
    PRESENT_KEY = "present_key"
    PRESENT_VALUE = "present_value"


KV_KINDS = ("key", "value")
