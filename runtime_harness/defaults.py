"""Defaults of the runtime that the CLI shows in --help without importing numpy or onnxruntime."""

# Prompt tokens per prefill call: defined (and its measurement told) with the bundle format, since
# the onnxruntime-genai config a bundle carries is written with it.
from ple_export.bundle.format import DEFAULT_PREFILL_CHUNK

__all__ = ["DEFAULT_PREFILL_CHUNK", "RUNTIMES"]

# `generate` / `verify --runtime`: our onnxruntime loop, or onnxruntime-genai on the bundle's model.onnx
RUNTIMES = ("ours", "genai")
