"""Deterministic random HF Gemma 4 / Gemma 3n checkpoints, written in streaming row chunks.

Values depend only on (seed, tensor name, shape, dtype): each tensor is cut into fixed row chunks
of at most `CHUNK_ELEMS` elements (a function of the shape alone), and chunk k is drawn from its own
`numpy.random.Generator(PCG64(SeedSequence([seed, sha256(name)[:8], k])))`. Chunks are independent,
so they are generated on a few threads and written in order; shard size never changes a value.

The initialisation is well conditioned for Gemma 4, which RMS-normalises q and k over head_dim and
does not scale attention scores by 1/sqrt(head_dim): see `init_rule`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from exporter.safetensors_writer import SafetensorsWriter
from exporter.spec import Gemma4Spec
from ple_export.errors import UserError
from ple_export.outdir import staged_output

# CLI dtype -> (safetensors code, HF torch_dtype name, numpy dtype)
DTYPES: dict[str, tuple[str, str, Any]] = {
    "bf16": ("BF16", "bfloat16", ml_dtypes.bfloat16),
    "fp16": ("F16", "float16", np.float16),
    "fp32": ("F32", "float32", np.float32),
}
CHUNK_ELEMS = 16 << 20  # 64 MiB of float32; part of the value stream's definition, do not change

# Init kinds: NORMAL = scale * N(0, 1); NORM = scale * (1 + 0.1 * N(0, 1)); UNIFORM = scale * U[0.5, 1).
NORMAL, NORM, UNIFORM = "normal", "norm", "uniform"

_Scale = Callable[[tuple[int, ...], Gemma4Spec], float]
# (name suffixes, kind, scale); the first rule whose suffix ends "." + name wins.
_RULES: tuple[tuple[tuple[str, ...], str, _Scale], ...] = (
    # q/k RMSNorm weights ~ head_dim**-0.25 each: q.k over head_dim then has unit variance.
    (("self_attn.q_norm.weight", "self_attn.k_norm.weight"), NORM, lambda s, spec: s[0] ** -0.25),
    (("layer_scalar",), UNIFORM, lambda s, spec: 1.0),
    # Gemma 3n AltUp: a non-zero correct_output_scale (zero, the HF init, switches PLE off); mixing
    # coefficients well inside altup_coef_clip and small: every layer multiplies the streams by
    # (1 + coefficients), and at 0.3 that compounds over 15 layers into a model where float noise
    # moves logits by 1e-4 of their scale (0.1: 5e-6, as Gemma 4's synthetic models); the router
    # sees RMSNorm(x) / hidden, so weights of sqrt(fan_in) give routed values of unit scale.
    (("altup.correct_output_scale",), NORM, lambda s, spec: 1.0),
    (("altup.prediction_coefs.weight", "altup.correction_coefs.weight"), NORMAL, lambda s, spec: 0.1),
    (("altup.modality_router.weight",), NORMAL, lambda s, spec: s[1] ** 0.5),
    # Gemma 4's RMSNorm multiplies by the weight itself (no +1 offset).
    (
        (
            "layernorm.weight",
            ".norm.weight",
            "post_per_layer_input_norm.weight",
            "per_layer_projection_norm.weight",
            "router_norm.weight",
            "post_laurel_norm.weight",
        ),
        NORM,
        lambda s, spec: 1.0,
    ),
    # Embeddings are multiplied by sqrt(width) in the model.
    (("embed_tokens_per_layer.weight",), NORMAL, lambda s, spec: spec.hidden_size_per_layer_input**-0.5),
    ((".embed_tokens.weight",), NORMAL, lambda s, spec: spec.hidden_size**-0.5),
    # Linear layers: fan_in**-0.5.
    (
        (
            "_proj.weight",
            "per_layer_input_gate.weight",
            "per_layer_projection.weight",
            "per_layer_model_projection.weight",
            "linear_left.weight",
            "linear_right.weight",
            *(f"_projections.{j}.weight" for j in range(3)),  # Gemma 3n's AltUp stream projections
        ),
        NORMAL,
        lambda s, spec: s[1] ** -0.5,
    ),
)


def init_rule(name: str, shape: tuple[int, ...], spec: Gemma4Spec) -> tuple[str, float]:
    """(kind, scale) used to initialise tensor `name`; see `_RULES`."""
    dotted = "." + name
    for suffixes, kind, scale in _RULES:
        if dotted.endswith(suffixes):
            if kind == NORMAL and len(shape) != 2:
                raise ValueError(f"tensor {name}: weight with shape {list(shape)} is not 2-D")
            return kind, float(scale(shape, spec))
    raise ValueError(f"no init rule for tensor {name}")


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows per generation chunk for a tensor of this shape (fixed, independent of sharding)."""
    return max(1, CHUNK_ELEMS // max(1, math.prod(shape[1:])))


def generate_chunk(
    name: str, shape: tuple[int, ...], rule: tuple[str, float], seed: int, k: int, out_dtype: Any
) -> np.ndarray:
    """Rows [k*chunk_rows, ...) of the tensor, converted to `out_dtype`."""
    rows_per = chunk_rows(shape)
    n_rows = shape[0] if shape else 1
    start, stop = k * rows_per, min((k + 1) * rows_per, n_rows)
    row_shape = shape[1:]
    n = (stop - start) * math.prod(row_shape)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _name_key(name), k])))
    kind, scale = rule
    if kind == UNIFORM:
        x = rng.random(n, dtype=np.float32)
        x *= np.float32(0.5)
        x += np.float32(0.5)
    else:
        x = rng.standard_normal(n, dtype=np.float32)
        if kind == NORM:
            x *= np.float32(0.1)
            x += np.float32(1.0)
    x *= np.float32(scale)
    x = x.reshape((stop - start, *row_shape)) if shape else x.reshape(())
    return x if out_dtype is np.float32 else x.astype(out_dtype)


def synth_total_bytes(spec: Gemma4Spec, dtype: str = "bf16") -> int:
    """Bytes of tensor data `synth_checkpoint` writes (the total for a progress bar)."""
    code_size = np.dtype(_dtype(dtype)[2]).itemsize
    return sum(math.prod(s) for s in spec.weight_shapes().values()) * code_size


def _dtype(dtype: str) -> tuple[str, str, Any]:
    if dtype not in DTYPES:
        raise UserError(
            f"unknown dtype {dtype!r} for a synthetic checkpoint (choose from: {', '.join(DTYPES)})"
        )
    return DTYPES[dtype]


def write_hf_configs(spec: Gemma4Spec, out_dir: Path, torch_dtype: str) -> None:
    """config.json and generation_config.json of a checkpoint of `spec`, as HF writes them."""
    cfg = spec.to_hf_config()
    cfg["torch_dtype"] = torch_dtype
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.hf_eos_token_id,
        "pad_token_id": spec.pad_token_id,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def synth_checkpoint(
    spec: Gemma4Spec,
    out_dir: Path,
    dtype: str = "bf16",
    seed: int = 0,
    max_shard_bytes: int = 2 << 30,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write config.json, generation_config.json and the safetensors shards of a random checkpoint.

    `progress` is called with the number of bytes just written (an increment). Returns `out_dir`.
    """
    code, torch_name, np_dtype = _dtype(dtype)
    if seed < 0:
        raise UserError(f"seed must be non-negative, got {seed}")
    out_dir = Path(out_dir)
    shapes = spec.weight_shapes(spec.checkpoint_prefix)
    rules = {name: init_rule(name, shape, spec) for name, shape in shapes.items()}  # fail before writing

    out_dir.mkdir(parents=True, exist_ok=True)
    write_hf_configs(spec, out_dir, torch_name)

    jobs = [
        (name, k)
        for name, shape in shapes.items()
        for k in range(math.ceil((shape[0] if shape else 1) / chunk_rows(shape)))
    ]
    workers = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    with (
        SafetensorsWriter(out_dir, [(n, code, s) for n, s in shapes.items()], max_shard_bytes) as writer,
        ThreadPoolExecutor(workers) as pool,
    ):
        pending: deque[tuple[str, Future[np.ndarray]]] = deque()

        def drain_one() -> None:
            name, fut = pending.popleft()
            arr = fut.result()
            writer.write(name, arr)
            if progress is not None:
                progress(arr.nbytes)

        try:
            for name, k in jobs:
                pending.append(
                    (name, pool.submit(generate_chunk, name, shapes[name], rules[name], seed, k, np_dtype))
                )
                if len(pending) >= 2 * workers:
                    drain_one()
            while pending:
                drain_one()
        finally:
            for _, fut in pending:
                fut.cancel()
    return out_dir


_SYNTH_FILES = re.compile(
    r"config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors"
)


def is_earlier_checkpoint(folder: Path) -> bool:
    """May `synth --overwrite` replace `folder`? Only if it holds nothing but the regular files a
    synthetic checkpoint consists of (config.json, generation_config.json, safetensors, index)."""
    try:
        entries = list(os.scandir(folder))
        return any(e.name == "config.json" for e in entries) and all(
            _SYNTH_FILES.fullmatch(e.name) and e.is_file(follow_symlinks=False) for e in entries
        )
    except OSError:
        return False


def synth_to_folder(
    spec: Gemma4Spec,
    out_dir: Path,
    dtype: str = "bf16",
    seed: int = 0,
    max_shard_bytes: int = 2 << 30,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """`synth_checkpoint` into a folder that is complete or absent; `progress(advance, total)`."""
    total = synth_total_bytes(spec, dtype)
    report = (lambda n: progress(n, total)) if progress else None
    with staged_output(Path(out_dir), overwrite, is_earlier_checkpoint, "a synthetic checkpoint") as tmp:
        synth_checkpoint(spec, tmp, dtype, seed, max_shard_bytes, report)
    return {
        "path": str(Path(out_dir).absolute()),
        "bytes": total,
        "num_parameters": spec.num_parameters(),
        "dtype": dtype,
        "seed": seed,
    }
