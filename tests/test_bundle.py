"""The bundle on disk: layout, manifest, determinism, and that the PLE table is mapped, not copied."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

from exporter.export import ExportOptions, export_bundle
from exporter.synth import synth_checkpoint
from ple_export.bundle.recipe import QuantRecipe
from tests.conftest import ROOT, VARIANTS


def _load_proto(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def _external(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def test_manifest_describes_every_file(bundles: dict[str, Path]) -> None:
    bundle = bundles["tiny"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    on_disk = {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert {f["path"] for f in manifest["files"]} == on_disk
    for f in manifest["files"]:
        data = (bundle / f["path"]).read_bytes()
        assert f["bytes"] == len(data)
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
    placement = {f["path"]: f["placement"] for f in manifest["files"]}
    assert placement["ple_table.data"] == "flash" and placement["embedder.onnx"] == "flash"
    assert placement["decoder.data"] == "dram" and placement["decoder.onnx"] == "dram"


@pytest.mark.parametrize("graph", ["embedder", "decoder"])
def test_manifest_io_matches_the_graphs(bundles: dict[str, Path], graph: str) -> None:
    bundle = bundles["kv_eq"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["graphs"][graph]
    proto = _load_proto(bundle / entry["file"])
    assert proto.ir_version == manifest["onnx"]["ir_version"] <= 13  # onnxruntime 1.31 loads <= 13
    assert [i.name for i in proto.graph.input] == [d["name"] for d in entry["inputs"]]
    assert [o.name for o in proto.graph.output] == [d["name"] for d in entry["outputs"]]
    elem = {"int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT}
    for values, descs in ((proto.graph.input, entry["inputs"]), (proto.graph.output, entry["outputs"])):
        for value, desc in zip(values, descs, strict=True):
            assert value.type.tensor_type.elem_type == elem[desc["dtype"]], desc["name"]
            dims = value.type.tensor_type.shape.dim
            assert len(dims) == len(desc["shape"]), desc["name"]
            for dim, want in zip(dims, desc["shape"], strict=True):
                if isinstance(want, int):
                    assert dim.dim_value == want, desc["name"]
                else:  # symbolic in both
                    assert dim.dim_param and not dim.HasField("dim_value"), desc["name"]


def test_kv_cache_only_for_kv_owning_layers(bundles: dict[str, Path]) -> None:
    spec = VARIANTS["tiny"]
    manifest = json.loads((bundles["tiny"] / "manifest.json").read_text())
    past = [d for d in manifest["graphs"]["decoder"]["inputs"] if d["role"] in ("past_key", "past_value")]
    assert sorted({d["layer"] for d in past}) == spec.kv_layers == [0, 1, 2, 3]
    shared = {e["layer"]: e["shared_by"] for e in manifest["kv_cache"]["layers"]}
    assert shared == {0: [], 1: [], 2: [5], 3: [4]}  # layer 4 (sliding) reads 3's KV, 5 (full) reads 2's


def test_ple_table_has_its_own_page_aligned_file(bundles: dict[str, Path]) -> None:
    bundle = bundles["tiny"]
    spec = VARIANTS["tiny"]
    table = _load_proto(bundle / "embedder.onnx").graph.initializer
    assert [t.name for t in table] == ["ple_table"]
    ext = _external(table[0])
    assert ext["location"] == "ple_table.data" and int(ext.get("offset", 0)) == 0
    assert table[0].data_type == onnx.TensorProto.BFLOAT16  # the checkpoint's dtype
    assert int(ext["length"]) == spec.vocab_size_per_layer_input * spec.ple_dim * 2
    decoder = _load_proto(bundle / "decoder.onnx")
    assert all(_external(t)["location"] == "decoder.data" for t in decoder.graph.initializer)
    page = json.loads((bundle / "manifest.json").read_text())["ple"]["page_size"]
    for t in decoder.graph.initializer:
        e = _external(t)
        if int(e["length"]) >= page:
            assert int(e["offset"]) % page == 0, t.name


def test_tied_embedding_stored_once(bundles: dict[str, Path]) -> None:
    spec = VARIANTS["tiny"]
    decoder = _load_proto(bundles["tiny"] / "decoder.onnx")
    big = [
        t.name
        for t in decoder.graph.initializer
        if list(t.dims) in ([spec.vocab_size, spec.hidden_size], [spec.hidden_size, spec.vocab_size])
    ]
    assert big == ["embed.weight"]
    users = [n.op_type for n in decoder.graph.node if "embed.weight" in n.input]
    assert sorted(users) == ["Gather", "Gemm"]


def _export_in_subprocess(ckpt: Path, out: Path, hash_seed: str) -> Path:
    code = (
        "import sys; from pathlib import Path; from exporter.export import export_bundle; "
        "export_bundle(Path(sys.argv[1]), Path(sys.argv[2]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run(
        [sys.executable, "-c", code, str(ckpt), str(out)], cwd=ROOT, env=env, check=True, capture_output=True
    )
    return out


def test_same_input_same_bytes(
    checkpoints: dict[str, Path], bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Exports in other processes write the very same bytes, quantized (the default) as in fp32. Hash
    seeds 0 and 1 iterate a set of the two layer-type names in opposite orders, so nothing may
    depend on set order."""
    first = export_bundle(checkpoints["tiny"], tmp_path / "in_process").out_dir
    names = sorted(p.name for p in first.iterdir())
    for seed in ("0", "1"):
        again = _export_in_subprocess(checkpoints["tiny"], tmp_path / f"seed{seed}", seed)
        assert names == sorted(p.name for p in again.iterdir())
        for name in names:
            assert (first / name).read_bytes() == (again / name).read_bytes(), (seed, name)


def test_ple_dtype_option_converts_the_table(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = export_bundle(
        checkpoints["tiny"],
        tmp_path / "fp32",
        ExportOptions(ple_dtype="fp32", page_size=4096, recipe=QuantRecipe.none()),
    )
    table = _load_proto(out.out_dir / "embedder.onnx").graph.initializer[0]
    assert table.data_type == onnx.TensorProto.FLOAT
    assert out.manifest.ple.row_bytes == VARIANTS["tiny"].ple_dim * 4
    assert out.manifest.export_options["page_size"] == 4096


_RSS_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort

    def rss():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}

    before = rss()
    sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    loaded = rss()
    rng = np.random.default_rng(0)
    for _ in range(64):
        sess.run(None, {"input_ids": rng.integers(0, int(sys.argv[2]), (1, 1))})
    after = rss()
    print(json.dumps({"before": before, "loaded": loaded, "after": after}))
""")


@pytest.mark.parametrize("ple", ["none", "int8", "int4"])
def test_onnxruntime_maps_the_ple_table_instead_of_copying_it(ple: str, tmp_path: Path) -> None:
    """bf16 Gather, and GatherBlockQuantized over uint8 codes: onnxruntime reads the table in place."""
    # a 192 MiB bf16 table (65536 rows x 6 layers x 256); the decoder stays tiny
    spec = VARIANTS["tiny"].replace(vocab_size_per_layer_input=65536, hidden_size_per_layer_input=256)
    opts = ExportOptions(recipe=QuantRecipe(weights="none", ple=ple))
    bundle = export_bundle(synth_checkpoint(spec, tmp_path / "ckpt"), tmp_path / "bundle", opts).out_dir
    table_bytes = (bundle / "ple_table.data").stat().st_size
    ple_info = json.loads((bundle / "manifest.json").read_text())["ple"]
    assert ple_info["row_bytes"] == 6 * 256 * {"none": 2, "int8": 1, "int4": 0.5}[ple]
    expected = 65536 * ple_info["bytes_per_token"]  # codes, then scales at the next page boundary
    assert expected <= table_bytes <= expected + 2 * 16384
    probe = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(bundle / "embedder.onnx"), "65536"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    rss = json.loads(probe.stdout)
    anon_growth = rss["after"]["RssAnon"] - rss["before"]["RssAnon"]
    assert anon_growth < table_bytes / 10, f"anonymous RSS grew {anon_growth / 2**20:.1f} MiB: table copied?"
    # control: the same graph with the table inside the protobuf is copied, and the probe sees it
    inline = tmp_path / "inline.onnx"
    onnx.save(onnx.load(str(bundle / "embedder.onnx")), str(inline))
    probe = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(inline), "65536"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    rss = json.loads(probe.stdout)
    assert rss["after"]["RssAnon"] - rss["before"]["RssAnon"] > table_bytes / 2


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_fp16_and_fp32_checkpoints_export_and_match_the_reference(dtype: str, tmp_path: Path) -> None:
    import numpy as np
    import torch

    from exporter.reference import TorchModel
    from runtime_harness import loop
    from runtime_harness.session import BundleSession

    spec = VARIANTS["tiny"]
    ckpt = synth_checkpoint(spec, tmp_path / "ckpt", dtype=dtype)
    bundle = export_bundle(ckpt, tmp_path / "bundle", ExportOptions(recipe=QuantRecipe.none())).out_dir
    table = _load_proto(bundle / "embedder.onnx").graph.initializer[0]
    assert table.data_type == {"fp16": onnx.TensorProto.FLOAT16, "fp32": onnx.TensorProto.FLOAT}[dtype]
    prompt = torch.randint(0, spec.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = loop.generate(TorchModel(ckpt), prompt.numpy(), 4, stop_at_eos=False, keep_logits=True)
    ours = loop.generate(BundleSession(bundle), prompt.numpy(), 4, stop_at_eos=False, keep_logits=True)
    assert ours.rows == ref.rows
    for a, b in zip(ours.step_logits, ref.step_logits, strict=True):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


_ADVICE_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from runtime_harness.measure import memory
    from runtime_harness.session import BundleSession

    bundle, advise = Path(sys.argv[1]), sys.argv[2] == "1"
    table = bundle / "ple_table.data"
    memory.fadvise_dontneed(table)  # uncached, as on a phone after boot
    session = BundleSession(bundle, check=False, ple_random_access=advise)
    rng = np.random.default_rng(0)
    for _ in range(64):
        session.per_layer_inputs(rng.integers(0, 65536, (1, 1)))
    print(json.dumps({"advised": session.ple_advised, "mapped": memory.mapped_rss(table),
                      "read_ahead_kb": memory.read_ahead_kb(table)}))
""")


def test_runtime_reads_ple_rows_not_read_around_windows(tmp_path: Path) -> None:
    """BundleSession advises MADV_RANDOM on onnxruntime's mapping of the table: 64 lookups of random,
    uncached rows map about their own pages, not the kernel's read-around window each."""
    spec = VARIANTS["tiny"].replace(vocab_size_per_layer_input=65536, hidden_size_per_layer_input=256)
    opts = ExportOptions(recipe=QuantRecipe(weights="none", ple="none"))
    bundle = export_bundle(synth_checkpoint(spec, tmp_path / "ckpt"), tmp_path / "bundle", opts).out_dir
    row_bytes = json.loads((bundle / "manifest.json").read_text())["ple"]["row_bytes"]  # 3 KiB: 1-2 pages

    def probe(advise: bool) -> dict[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _ADVICE_PROBE, str(bundle), "1" if advise else "0"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        return json.loads(out.stdout)

    advised = probe(True)
    assert advised["advised"] >= 1
    page = os.sysconf("SC_PAGE_SIZE")
    bound = 64 * (row_bytes // page + 2) * page
    assert advised["mapped"] <= bound, f"{advised['mapped']} B mapped for 64 rows of {row_bytes} B"
    control = probe(False)
    assert control["advised"] == 0
    if (control["read_ahead_kb"] or 0) * 1024 > 4 * page:  # the kernel reads around: the advice matters
        assert control["mapped"] > 2 * bound, control
