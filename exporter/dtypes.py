"""Floating-point weight dtypes by our short names, and what each library calls them."""

from __future__ import annotations

import torch

TORCH: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ONNX_NAME = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FROM_ONNX_NAME = {v: k for k, v in ONNX_NAME.items()}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
FROM_SAFETENSORS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
