"""The load stage: a Hugging Face checkpoint folder as a spec plus its tensors, mapped to our names.

Nothing is read but config.json and the safetensors headers; tensor data is streamed later, in row
chunks (`rows`, `ple_rows`), by the layout stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporter import dtypes
from exporter.family import read_spec
from exporter.safetensors_io import TensorInfo, iter_row_chunks, open_checkpoint, read_rows, read_tensor
from exporter.spec import Gemma4Spec
from exporter.weights import map_checkpoint
from ple_export.bundle.format import PLE_TABLE_TENSOR
from ple_export.bundle.manifest import ModelInfo
from ple_export.errors import UserError

CHUNK_BYTES = 64 << 20


@dataclass
class Checkpoint:
    path: Path
    spec: Gemma4Spec
    tensors: dict[str, TensorInfo]
    mapping: dict[str, str]  # our name -> HF name

    def info(self, our_name: str) -> TensorInfo:
        return self.tensors[self.mapping[our_name]]

    @property
    def ple_dtype(self) -> str:
        """The PLE table's dtype in the checkpoint: bf16 | fp16 | fp32."""
        return dtypes.FROM_SAFETENSORS[self.info(PLE_TABLE_TENSOR).dtype]

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            family=self.spec.family,
            spec=self.spec.to_dict(),
            num_parameters=self.spec.num_parameters(),
            source={
                "dtypes": sorted({self.tensors[n].dtype for n in self.mapping.values()}),
                "num_tensors": len(self.mapping),
            },
        )

    def rows(self, our_name: str) -> Iterator[np.ndarray]:
        """float32 row chunks of a tensor (what quantization reads)."""
        info = self.info(our_name)
        for start, stop in iter_row_chunks(info, CHUNK_BYTES // 2):
            yield read_rows(info, start, stop, "float32")

    def ple_rows(self, target: str) -> Iterator[np.ndarray]:
        """The PLE table's rows in the target dtype; bytes pass through untouched when dtypes agree."""
        info = self.info(PLE_TABLE_TENSOR)
        for start, stop in iter_row_chunks(info, CHUNK_BYTES):
            if self.ple_dtype == target:
                yield read_rows(info, start, stop, "raw")
            else:
                rows = read_rows(info, start, stop, "float32")
                yield (
                    torch.from_numpy(rows)
                    .to(dtypes.TORCH[target])
                    .view(torch.uint16 if target != "fp32" else torch.float32)
                    .numpy()
                )


def read_checkpoint(path: Path) -> Checkpoint:
    spec = read_spec(path)
    tensors = open_checkpoint(path)
    mapping = map_checkpoint(spec, tensors)
    for hf_name in mapping.values():
        if tensors[hf_name].dtype not in dtypes.FROM_SAFETENSORS:
            raise UserError(
                f"tensor {hf_name} has dtype {tensors[hf_name].dtype} (weights must be bf16, fp16 or fp32)"
            )
    ckpt = Checkpoint(path, spec, tensors, mapping)
    _check_altup_coefficients(ckpt)
    return ckpt


def _check_altup_coefficients(ckpt: Checkpoint) -> None:
    """Gemma 3n's AltUp coefficients are trained clipped to `altup_coef_clip` (and not clipped at
    inference): a value outside it means the checkpoint is not what its config says."""
    clip = getattr(ckpt.spec, "altup_coef_clip", None)
    if ckpt.spec.family != "gemma3n" or clip is None:
        return
    for i in range(ckpt.spec.num_hidden_layers):
        for kind in ("prediction_coefs", "correction_coefs"):
            name = f"layers.{i}.altup.{kind}.weight"
            peak = float(np.abs(read_tensor(ckpt.info(name))).max())
            if not peak <= clip:
                raise UserError(
                    f"tensor {ckpt.mapping[name]}: AltUp coefficient of magnitude {peak:.6g} outside "
                    f"altup_coef_clip {clip:g} (config.json)"
                )
