"""Shared fixtures: synthetic checkpoints in real HF format and bundles exported from them."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e`
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

from exporter.presets import get_preset  # noqa: E402
from exporter.spec import Gemma4Spec  # noqa: E402

# Fuzzers (hypothesis): seeded and bounded by default so CI stays fast; `PLE_FUZZ=nightly` runs many
# more examples with fresh randomness.
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "nightly", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("PLE_FUZZ", "ci"))

# Parity variants named by the issue: the tiny preset; double-wide MLP + K=V attention; softcap off
# (that one also has no KV sharing, so every layer owns its cache).
VARIANTS: dict[str, Gemma4Spec] = {
    "tiny": get_preset("tiny"),
    "kv_eq": get_preset("tiny").replace(
        attention_k_eq_v=True, num_global_key_value_heads=2, use_double_wide_mlp=True
    ),
    "nocap": get_preset("tiny").replace(
        final_logit_softcapping=None, num_kv_shared_layers=0, use_double_wide_mlp=False, num_key_value_heads=2
    ),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from exporter.synth import synth_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name, spec in VARIANTS.items():
        # sharded on purpose: the loader must follow model.safetensors.index.json
        out[name] = synth_checkpoint(spec, root / name, max_shard_bytes=400_000, seed=1)
    return out


@pytest.fixture(scope="session")
def bundles(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from exporter.export import ExportOptions, export_bundle
    from ple_export.bundle.recipe import QuantRecipe

    root = tmp_path_factory.mktemp("bundles")
    fp32 = ExportOptions(recipe=QuantRecipe.none())  # the reference bundles: parity is strict in fp32
    return {name: export_bundle(ckpt, root / name, fp32).out_dir for name, ckpt in checkpoints.items()}


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped trained tiny Gemma 4 (it has a tokenizer and held-out text): its fp32 bundle and
    the int4 bundle quantized from it, as `demo` and the README use them."""
    from exporter import assets
    from exporter.export import ExportOptions, export_bundle
    from exporter.quantize import quantize_bundle
    from ple_export.bundle.recipe import QuantRecipe

    root = tmp_path_factory.mktemp("trained")
    ckpt = Path(assets.__file__).parent / "tiny_trained"
    fp32 = export_bundle(ckpt, root / "fp32", ExportOptions(recipe=QuantRecipe.none())).out_dir
    int4 = quantize_bundle(fp32, root / "int4", QuantRecipe()).out_dir
    return {"fp32": fp32, "int4": int4, "root": root, "checkpoint": ckpt}


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small matrices: one thread is as fast, and does not fight other work for the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def swap_int4_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A packing bug for the thresholds to catch: the two int4 codes of every byte swapped."""
    from graphs import weight_plan

    real = weight_plan.BlockQuant.pack

    def swapped(self: weight_plan.BlockQuant, q):  # type: ignore[no-untyped-def]
        out = real(self, q)
        if self.part == "data" and self.bits == 4:
            out = ((out & 0x0F) << 4) | (out >> 4)
        return out

    monkeypatch.setattr(weight_plan.BlockQuant, "pack", swapped)
