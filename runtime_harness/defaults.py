"""Defaults of the runtime that the CLI shows in --help without importing numpy or onnxruntime."""

# Prompt tokens per prefill call unless a device profile or the caller says otherwise. Measured on
# the 595M model (int4, 2 threads, fresh processes): a 1024-token prompt's first token in 1.91-1.96 s
# at 128-token chunks, 2.02-2.04 s at 256, 2.02-2.21 s at 512, 2.47-2.61 s in one call; peak RSS
# 373-380 / 409-448 / 533-549 / 662 MiB. At 4096 tokens: 9.6 s and 477 MiB at 128, 29.4 s and
# 3,709 MiB in one call (docs/profiling.md, "Chunked prefill").
DEFAULT_PREFILL_CHUNK = 128
