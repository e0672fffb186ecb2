"""onnxruntime-genai runs the bundle: `model.onnx` + `genai_config.json` written by export and
quantize, greedy tokens and logits identical to our own loop, the PLE table still mapped from flash,
and the CLI's `--runtime genai`."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter.export import ExportOptions, export_bundle
from exporter.presets import get_preset
from exporter.synth import synth_checkpoint
from ple_export.bundle.format import GENAI_CONFIG_FILE, GENAI_MODEL_FILE, MANIFEST_FILE, FileRole, Placement
from ple_export.bundle.genai import genai_config, genai_shape
from ple_export.bundle.manifest import Manifest
from ple_export.bundle.recipe import QuantRecipe
from ple_export.errors import UserError
from runtime_harness import loop
from runtime_harness.genai import GenaiModel
from runtime_harness.session import BundleSession
from runtime_harness.verify import GENAI_MAX_REL
from tests.conftest import ROOT
from tests.test_cli import assert_user_error, cli

NEW_TOKENS = 40


def _prompt(manifest: Manifest, length: int, seed: int = 0) -> list[int]:
    """A prompt past the sliding window: <bos> then seeded ids (onnxruntime-genai adds no <bos>)."""
    rng = np.random.default_rng(seed)
    bos = manifest.generation.bos_token_id or 0
    return [bos] + rng.integers(3, manifest.generation.vocab_size, length - 1).tolist()


def _both(bundle: Path, prompt: list[int], n: int = NEW_TOKENS) -> tuple[loop.Generation, loop.Generation]:
    """Greedy generations of our loop and onnxruntime-genai's, prompts in the config's chunks."""
    genai = GenaiModel(bundle)
    ours = loop.generate(
        BundleSession(bundle),
        prompt,
        n,
        stop_at_eos=False,
        keep_logits=True,
        prefill_chunk=genai.prefill_chunk,
    )
    theirs = loop.generate(
        genai, prompt, n, stop_at_eos=False, keep_logits=True, prefill_chunk=genai.prefill_chunk
    )
    return ours, theirs


def _assert_same(ours: loop.Generation, theirs: loop.Generation) -> None:
    assert len(ours.tokens) == len(theirs.tokens) >= 32
    assert theirs.tokens == ours.tokens
    for a, b in zip(ours.step_logits, theirs.step_logits, strict=True):
        assert float(np.abs(a - b).max()) <= GENAI_MAX_REL * float(np.abs(a).max())


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_embedded_default_generates_the_same_tokens_under_genai(trained: dict[str, Path], kind: str) -> None:
    """The shipped trained model (window 32), fp32 and int4 (quantize wrote the files too): a
    70-token prompt in the config's chunks and 40 greedy tokens, identical to our loop."""
    bundle = trained[kind]
    manifest = Manifest.read(bundle)
    window = manifest.kv_cache.sliding_window
    assert window is not None and 2 * window < 70
    ours, theirs = _both(bundle, _prompt(manifest, 70))
    _assert_same(ours, theirs)
    # the tokens are not one repeated id: the comparison can tell two runtimes apart
    assert len(set(ours.tokens)) > 3


@pytest.mark.parametrize("variant", ["tiny", "nocap"])
def test_synthetic_presets_past_their_window(bundles: dict[str, Path], variant: str) -> None:
    """Window 8 (prompt chunks of 4 in the config): KV-shared layers (tiny) and every layer owning
    its cache with two KV heads (nocap)."""
    bundle = bundles[variant]
    manifest = Manifest.read(bundle)
    config = json.loads((bundle / GENAI_CONFIG_FILE).read_text())
    assert (
        config["search"]["chunk_size"] == 4
        and config["model"]["decoder"]["sliding_window"]["window_size"] == 4
    )
    ours, theirs = _both(bundle, _prompt(manifest, 29, seed=3), n=36)
    _assert_same(ours, theirs)


def test_a_wrong_cap_in_the_config_is_caught(trained: dict[str, Path], tmp_path: Path) -> None:
    """The test can fail: a config whose window is one off makes onnxruntime-genai's presets
    disagree with the graph's, and the run fails (the arithmetic the emitter asserts matters)."""
    bundle = tmp_path / "b"
    shutil.copytree(trained["fp32"], bundle)
    config = json.loads((bundle / GENAI_CONFIG_FILE).read_text())
    window = config["model"]["decoder"]["sliding_window"]
    assert window["window_size"] == 16
    window["window_size"] = 17  # the same bytes long: the size check passes, the sha256 is skipped
    (bundle / GENAI_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    manifest = Manifest.read(bundle)
    with pytest.raises(RuntimeError):
        loop.generate(GenaiModel(bundle, check=False), _prompt(manifest, 70), 8, prefill_chunk=16)


_RSS = """
import sys
from pathlib import Path
import numpy as np
from runtime_harness import loop
from runtime_harness.genai import GenaiModel, import_genai
from runtime_harness.measure import memory
import_genai()  # the libraries' own memory is not the bundle's
bundle = Path(sys.argv[1])
before = memory.status()
model = GenaiModel(bundle)
prompt = [2] + np.random.default_rng(0).integers(3, 65536, 199).tolist()
loop.generate(model, prompt, 8, prefill_chunk=model.prefill_chunk)
after = memory.status()
grown = [after[k] - before[k] for k in ("RssAnon", "VmHWM")]
print(*grown, memory.mapped_rss(bundle / "ple_table.data"))
"""


def test_the_ple_table_stays_mapped_under_genai(tmp_path: Path) -> None:
    """A 384 MiB float PLE table: onnxruntime-genai maps it from ple_table.data (file-backed pages of
    that mapping are resident), and anonymous memory grows by far less than the table over loading
    and a generation that reads 200 rows (measured: 40-70 MiB, the decoder's weights and buffers)."""
    spec = get_preset("tiny").replace(
        vocab_size=65536, vocab_size_per_layer_input=65536, hidden_size_per_layer_input=256
    )
    ckpt = synth_checkpoint(spec, tmp_path / "ck", seed=2)
    opts = ExportOptions(recipe=QuantRecipe.none(), ple_dtype="fp32")
    bundle = export_bundle(ckpt, tmp_path / "b", opts).out_dir
    shutil.rmtree(ckpt)
    manifest = Manifest.read(bundle)
    table = manifest.ple.rows * manifest.ple.bytes_per_token
    assert table >= 384 << 20
    proc = subprocess.run(
        [sys.executable, "-c", _RSS, str(bundle)], capture_output=True, text=True, cwd=ROOT, check=True
    )
    anon, peak, mapped = map(int, proc.stdout.split())
    assert mapped > 0, "ple_table.data is not mapped"
    assert anon < table // 3, f"anonymous memory grew {anon >> 20} MiB for a {table >> 20} MiB table"
    # and never in between: the peak (mapped table pages included) stays under the table's size
    assert peak < table, f"the peak grew {peak >> 20} MiB for a {table >> 20} MiB table"


def test_export_lists_the_files_with_roles(trained: dict[str, Path]) -> None:
    manifest = Manifest.read(trained["int4"])
    model, config = manifest.file(GENAI_MODEL_FILE), manifest.file(GENAI_CONFIG_FILE)
    assert model is not None and model.role == FileRole.GENAI_MODEL and model.placement == Placement.NONE
    assert config is not None and config.role == FileRole.GENAI_CONFIG
    # graph only: the weights stay in decoder.data / ple_table.data
    decoder = manifest.file(manifest.graphs.decoder.file)
    assert decoder is not None and model.bytes < decoder.bytes + 64 * 1024
    assert manifest.export_options["genai"] is True


def test_no_genai_exports_none_and_the_runtime_says_how(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = export_bundle(checkpoints["tiny"], tmp_path / "b", ExportOptions(genai=False)).out_dir
    assert not (out / GENAI_MODEL_FILE).exists() and not (out / GENAI_CONFIG_FILE).exists()
    with pytest.raises(UserError, match="no onnxruntime-genai files .* re-export"):
        GenaiModel(out)
    proc = cli("generate", out, "--prompt-ids", "2,5,6", "--runtime", "genai", cwd=tmp_path)
    assert_user_error(proc, "no onnxruntime-genai files", "re-export")


def test_config_numbers_come_from_the_manifest(trained: dict[str, Path]) -> None:
    manifest = Manifest.read(trained["int4"])
    kv = manifest.kv_cache.layers
    config = genai_config(manifest, 16)
    decoder = config["model"]["decoder"]
    assert decoder["num_hidden_layers"] == len(kv) == 4
    assert (
        decoder["sliding_window"]["layers"] == [k.layer for k in kv if k.max_length is not None] == [0, 1, 3]
    )
    cap = kv[0].max_length
    assert cap == 31 and decoder["sliding_window"]["window_size"] == cap - 15
    assert config["search"]["chunk_size"] == 16 and config["search"]["past_present_share_buffer"] is False
    assert genai_config(manifest, 0)["model"]["decoder"]["sliding_window"]["window_size"] == cap - 1
    assert decoder["inputs"]["past_key_names"] == "past_key.%d"
    assert config["model"]["eos_token_id"] == 1 and config["model"]["vocab_size"] == 2048


def test_layouts_the_config_cannot_describe_are_refused(trained: dict[str, Path]) -> None:
    manifest = Manifest.read(trained["int4"])
    layers = manifest.kv_cache.layers
    gap = dataclasses.replace(
        manifest.kv_cache, layers=(*layers[:2], dataclasses.replace(layers[3], layer=5))
    )
    with pytest.raises(UserError, match="must be the first layers"):
        genai_shape(manifest.replace(kv_cache=gap), 4)
    two = (dataclasses.replace(layers[0], max_length=15), *layers[1:])
    with pytest.raises(UserError, match="one window"):
        genai_shape(manifest.replace(kv_cache=dataclasses.replace(manifest.kv_cache, layers=two)), 4)
    assert genai_shape(manifest, 31).window_size == 1  # the longest chunk a window of 32 takes
    with pytest.raises(UserError, match="leaves no window"):
        genai_shape(manifest, 32)


def test_cli_generate_and_verify_under_genai(trained: dict[str, Path], tmp_path: Path) -> None:
    from exporter import assets

    bundle = trained["int4"]
    args = ("generate", bundle, "--prompt", "The while statement", "--max-new-tokens", "24", "--json")
    ours, theirs = cli(*args, cwd=tmp_path), cli(*args, "--runtime", "genai", cwd=tmp_path)
    assert ours.returncode == theirs.returncode == 0, theirs.stderr
    assert json.loads(theirs.stdout)["tokens"] == json.loads(ours.stdout)["tokens"]
    ckpt = Path(assets.__file__).parent / "tiny_trained"
    proc = cli("verify", bundle, "--reference", ckpt, "--runtime", "genai", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["runtime"] == "genai" and report["passed"]
    agreement = report["agreement_with_our_loop"]
    assert agreement["same_top1"] and agreement["max_rel_logit_diff"] <= GENAI_MAX_REL
    assert agreement["steps"] == 3 * 8
    alone = cli("verify", bundle, "--runtime", "genai", "--json", cwd=tmp_path)  # our loop, no checkpoint
    assert alone.returncode == 0, alone.stderr
    report = json.loads(alone.stdout)
    assert report["reference"] is None and report["oracle"] == "our-loop" and report["passed"]
    assert (
        report["agreement_with_our_loop"]["steps"] == 3 * 8
        and report["summary"]["max_rel_error"] <= GENAI_MAX_REL
    )
    assert_user_error(cli("verify", bundle, cwd=tmp_path), "needs --reference CHECKPOINT", "--runtime genai")
    bad = cli(
        "generate", bundle, "--prompt-ids", "2,5", "--runtime", "genai", "--prefill-chunk", "7", cwd=tmp_path
    )
    assert_user_error(bad, "--prefill-chunk 7", "--genai-chunk")


def test_the_genai_commands_need_no_torch(trained: dict[str, Path], tmp_path: Path) -> None:
    """The runtime-only install (docs/deploy.md, the ARM job): with torch and transformers unimportable,
    `generate` and `verify --runtime genai` (no checkpoint) still run; `verify --reference` does not."""
    from tests.test_cli import ENV

    blocked = tmp_path / "blocked"  # a sitecustomize that makes `import torch` fail
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text(
        "import sys\nsys.modules['torch'] = sys.modules['transformers'] = None\n"
    )
    env = {**ENV, "PYTHONPATH": f"{blocked}:{ENV.get('PYTHONPATH', str(ROOT))}"}
    bundle = trained["int4"]
    for args in (
        ("generate", bundle, "--prompt-ids", "2,5,6", "--max-new-tokens", "4", "--runtime", "genai"),
        ("verify", bundle, "--runtime", "genai", "--prompts", "1", "--steps", "4"),
    ):
        proc = cli(*args, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
    proc = cli("verify", bundle, "--reference", ROOT, "--prompts", "1", cwd=tmp_path, env=env)
    assert_user_error(proc, "verify --reference needs torch", "--runtime genai")  # the block works


def test_verify_without_a_checkpoint_can_fail(trained: dict[str, Path], tmp_path: Path) -> None:
    """`verify --runtime genai` with our loop as the reference fails (exit 3) when onnxruntime-genai's
    model computes something else: here its logits scaled by 1.001 (top-1 unchanged)."""
    import onnx
    from onnx import helper

    bundle = tmp_path / "b"
    shutil.copytree(trained["int4"], bundle)
    model = onnx.load(bundle / GENAI_MODEL_FILE, load_external_data=False)
    producer = next(n for n in model.graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_unscaled"
    scale = helper.make_tensor("logits_scale", onnx.TensorProto.FLOAT, [], [1.001])
    model.graph.initializer.append(scale)
    model.graph.node.append(helper.make_node("Mul", ["logits_unscaled", "logits_scale"], ["logits"]))
    onnx.save(model, bundle / GENAI_MODEL_FILE)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())  # --no-check skips hashes, not sizes
    entry = next(f for f in manifest["files"] if f["path"] == GENAI_MODEL_FILE)
    entry["bytes"] = (bundle / GENAI_MODEL_FILE).stat().st_size
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    proc = cli("verify", bundle, "--runtime", "genai", "--no-check", "--prompts", "1", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "onnxruntime-genai differs from our loop" in proc.stderr and "Traceback" not in proc.stderr


def test_the_genai_model_is_checked_like_every_file(trained: dict[str, Path], tmp_path: Path) -> None:
    """inspect --verify and the runtime's trust checks cover model.onnx: a changed byte is caught, and
    external data pointing outside the listed files is refused before onnxruntime-genai opens it."""
    bundle = tmp_path / "b"
    shutil.copytree(trained["int4"], bundle)
    path = bundle / GENAI_MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert_user_error(cli("inspect", bundle, "--verify", cwd=tmp_path), GENAI_MODEL_FILE, "sha256")
    with pytest.raises(UserError, match="sha256"):
        GenaiModel(bundle)
    shutil.copyfile(trained["int4"] / GENAI_MODEL_FILE, path)
    text = path.read_bytes().replace(b"decoder.data", b"elsewhere.xy")
    path.write_bytes(text)
    with pytest.raises(UserError, match="'elsewhere.xy', which the manifest does not list"):
        GenaiModel(bundle, check=False)


def test_compare_runs_allows_a_flip_only_at_a_near_tie() -> None:
    from runtime_harness.compare.runs import compare_runs

    same = compare_runs([5, 6, 7], [5, 6, 7], [2.0, 2.0, 2.0], 0.5)
    assert same.agreed and same.first_difference is None and same.steps == 3
    decided = compare_runs([5, 9, 7], [5, 6, 7], [2.0, 0.8, 2.0], 0.5)
    assert not decided.agreed and decided.first_difference == 1 and decided.expected_margin == 0.8
    tie = compare_runs([5, 9, 1], [5, 6, 7], [2.0, 0.003, 2.0], 0.5)
    assert tie.agreed and tie.first_difference == 1 and "near-tie" in tie.line("x86.json")


def test_generate_expect_from_the_cli(trained: dict[str, Path], tmp_path: Path) -> None:
    """`generate --expect` on its own greedy output passes under both runtimes; a token changed at a
    decided step fails with exit 3 in one line; another prompt, sampling, or a file without margins
    are refused (exit 2)."""
    bundle = trained["int4"]
    base = ("generate", bundle, "--prompt", "The while statement", "--max-new-tokens", "24")
    recorded = cli(*base, "--json", cwd=tmp_path)
    assert recorded.returncode == 0, recorded.stderr
    (tmp_path / "x86.json").write_text(recorded.stdout)
    doc = json.loads(recorded.stdout)
    assert len(doc["margins"]) == len(doc["tokens"]) == 24
    for runtime in ("ours", "genai"):
        proc = cli(*base, "--expect", "x86.json", "--runtime", runtime, cwd=tmp_path)
        assert proc.returncode == 0 and "the same 24 tokens as x86.json" in proc.stderr, proc.stderr
    step = next(i for i, m in enumerate(doc["margins"]) if m >= 0.5)
    changed = doc | {"tokens": [t + (i == step) for i, t in enumerate(doc["tokens"])]}
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    proc = cli(*base, "--expect", "changed.json", cwd=tmp_path)
    assert_user_error(proc, f"at step {step} (a decided step", code=3)
    assert_user_error(cli(*base[:3], "The while", "--expect", "x86.json", cwd=tmp_path), "another prompt")
    assert_user_error(cli(*base, "--expect", "x86.json", "--temperature", "0.7", cwd=tmp_path), "greedy")
    (tmp_path / "nomargins.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "margins"}))
    assert_user_error(cli(*base, "--expect", "nomargins.json", cwd=tmp_path), "margins")


class _Appends:
    """onnxruntime-genai's generator, recording the length of every append."""

    def __init__(self, generator: object):
        self.generator, self.lengths = generator, []

    def append_tokens(self, ids: np.ndarray) -> None:
        self.lengths.append(ids.shape[1])
        self.generator.append_tokens(ids)  # type: ignore[attr-defined]

    def get_logits(self) -> object:
        return self.generator.get_logits()  # type: ignore[attr-defined]


def test_every_prompt_goes_in_the_configs_chunks(trained: dict[str, Path]) -> None:
    """onnxruntime-genai chunks only a generator's first prompt; GenaiModel chunks every call (a
    second prompt over a filled cache too), so working memory stays bounded; logits as our loop's."""
    genai = GenaiModel(trained["int4"])
    chunk = genai.prefill_chunk
    assert chunk == 16
    cache = genai.new_cache(1, positions=200)
    cache.generator = _Appends(cache.generator)
    first, second = _prompt(genai.manifest, 40), _prompt(genai.manifest, 50, seed=1)
    genai.forward(np.array([first]), cache, last_only=True)
    logits = genai.forward(np.array([second]), cache, last_only=True)
    assert cache.generator.lengths == [16, 16, 8, 16, 16, 16, 2]
    ours = BundleSession(trained["int4"])
    mine = ours.new_cache(1)
    loop.prefill(ours, np.array([first]), mine, chunk)
    np.testing.assert_array_equal(logits[:, -1], loop.prefill(ours, np.array([second]), mine, chunk))


def test_a_generator_holds_the_positions_asked_for(trained: dict[str, Path]) -> None:
    """new_cache(positions=N) sets onnxruntime-genai's max_length (its default, the whole context,
    sized a 484 MiB buffer on the 595M model): past N tokens the generator refuses."""
    genai = GenaiModel(trained["int4"])
    cache = genai.new_cache(1, positions=12)
    genai.forward(np.array([_prompt(genai.manifest, 10)]), cache, last_only=True)
    with pytest.raises(RuntimeError):
        genai.forward(np.array([_prompt(genai.manifest, 4, seed=1)]), cache, last_only=True)
    roomy = genai.new_cache(1)
    genai.forward(np.array([_prompt(genai.manifest, 14)]), roomy, last_only=True)
