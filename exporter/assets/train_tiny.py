"""Train the small Gemma 4 PLE model with real weights in `exporter/assets/tiny_trained` (issue #5).

Random weights give flat logits whose top-1 flips on noise, so quantization quality measured on
them means nothing. This script makes a checkpoint that has learnt something:

- corpus: text that CPython 3.11.7 ships in its standard library, under the PSF License: the
  documentation topics of `pydoc_data.topics` (what `help("if")` prints: the language reference
  and built-in types as plain text) and the docstrings of the standard library's modules, classes
  and functions (`corpus_documents`); every 20th document is held out for perplexity;
- tokenizer: byte-level BPE trained with `tokenizers` on the training split, <pad>=0, <eos>=1,
  <bos>=2 (the ids of `Gemma4Spec`), a `<bos>` prepended on encode;
- model: the `tiny` preset made a little larger (`SPEC`), initialised by `exporter.synth`'s rules
  and trained with transformers' `Gemma4ForCausalLM` (AdamW, single CPU thread, deterministic);
  saved in bf16 in the HF layout our exporter reads.

Everything is seeded and runs on one thread with `torch.use_deterministic_algorithms(True)`: the same
seed on the same machine gives byte-identical files. Run from the repository root, for about five
minutes of one CPU core:

    python -m exporter.assets.train_tiny            # writes exporter/assets/tiny_trained
    python -m exporter.assets.train_tiny --out /tmp/x --steps 20   # a quick trial elsewhere
    python -m exporter.assets.train_tiny --family gemma3n   # the Gemma 3n sibling (CORPUS.md there)

Only for developers: needs the test extras (transformers, tokenizers); nothing in the exporter
imports it.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import shutil
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.family import read_spec
from exporter.gemma3n_spec import Gemma3nSpec
from exporter.presets import get_preset
from exporter.reference import _gemma3n_causal_lm
from exporter.safetensors_writer import SafetensorsWriter
from exporter.spec import Gemma4Spec, hf_weight_shapes
from exporter.synth import chunk_rows, generate_chunk, init_rule, write_hf_configs

ASSET_DIR = Path(__file__).resolve().parent / "tiny_trained"
HELDOUT_FILE = "heldout.txt"

# The corpus (see `corpus_documents`): its documents joined by blank lines hash to this.
CORPUS_SHA256 = "fd1a331b91af49a36155392283db67854658d66dcfe657f6bce2f7446b5e5171"
MIN_DOC_CHARS = 80  # shorter docstrings ("Return self.") are left out
HELDOUT_EVERY = 20  # every 20th document is held out: 5%

VOCAB_SIZE = 2048
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")  # ids 0, 1, 2: Gemma4Spec's pad/eos/bos defaults
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2

# The tiny preset's shape (sliding + full layers, KV sharing, double-wide MLP on KV-shared layers,
# softcapping), a little larger. The sliding window is shorter than the training context so that
# sliding and full layers differ.
SPEC: Gemma4Spec = get_preset("tiny").replace(
    vocab_size=VOCAB_SIZE,
    vocab_size_per_layer_input=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    global_head_dim=64,
    sliding_window=32,
    hidden_size_per_layer_input=32,
)

SEED = 0
SEQ_LEN = 128  # tokens per training window and per held-out chunk, <bos> included
BATCH = 16
STEPS = 600
LR = 3e-3
WARMUP = 30
WEIGHT_DECAY = 0.05
GRAD_CLIP = 1.0
SAVE_DTYPE = "BF16"  # safetensors dtype of the shipped weights
# How long the training takes, for CORPUS.md (a constant, so that the file is the same from run to run):
# measured on the development machine, 2 cores shared with other work.
TRAIN_TIME = (
    "about 0.55 s a step, 5.5 minutes in all, on an idle core; 9 to 24 minutes of wall time when the "
    "shared 2-core development machine was busy"
)
# Gemma 3n (issue #18): its tiny preset made larger like SPEC; the rarest 256 ids past the PLE vocab.
SPEC_GEMMA3N: Gemma3nSpec = get_preset("gemma3n-tiny").replace(  # type: ignore[assignment]
    vocab_size=VOCAB_SIZE,
    vocab_size_per_layer_input=VOCAB_SIZE - 256,
    hidden_size=128,
    intermediate_size=256,
    intermediate_sizes=(256, 192, 256, 320, 256, 192, 256, 256, 128, 256),
    head_dim=32,
    global_head_dim=32,
    sliding_window=32,
    hidden_size_per_layer_input=32,
)
TRAIN_TIME_GEMMA3N = "0.82-0.88 s a step, 8-9 minutes on one core of the busy 2-core machine"
FAMILIES = {"gemma4": (SPEC, ASSET_DIR), "gemma3n": (SPEC_GEMMA3N, ASSET_DIR.parent / "tiny_trained_gemma3n")}
GENERATION_PROMPTS = ("If the file", "Return a new", 'The "while" statement')
GENERATION_TOKENS = 40


# ---- corpus ----------------------------------------------------------------------------------------
def _docstrings(stdlib: Path) -> list[str]:
    """Docstrings (modules, classes, functions) of the standard library's .py files, files in sorted
    path order and each file's in line order; test packages and site-packages left out."""
    out: list[str] = []
    for path in sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix()):
        parts = path.relative_to(stdlib).parts
        if any(p in ("site-packages", "test", "tests", "idle_test") for p in parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        nodes = [n for n in ast.walk(tree) if isinstance(n, _DOC_NODES)]
        nodes.sort(key=lambda n: getattr(n, "lineno", 0))
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOC_CHARS:
                out.append(doc.strip())
    return out


_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def corpus_documents(check: bool = True) -> list[str]:
    """The corpus as documents: the pydoc topics (sorted by key), then the standard library's
    docstrings; exact repeats dropped. With `check`, refuses any text but the one the shipped files
    were made from (CPython 3.11.7's)."""
    import pydoc_data.topics

    topics: dict[str, str] = pydoc_data.topics.topics
    docs = [topics[k].strip("\n") for k in sorted(topics)]
    docs += _docstrings(Path(sysconfig.get_paths()["stdlib"]))
    docs = list(dict.fromkeys(docs))
    digest = hashlib.sha256("\n\n".join(docs).encode("utf-8")).hexdigest()
    if check and digest != CORPUS_SHA256:
        raise SystemExit(
            f"this Python's pydoc topics and docstrings differ from CPython 3.11.7's (sha256 {digest}); "
            "pass --any-corpus to train on them anyway (the files will differ from the shipped ones)"
        )
    return docs


def split_corpus(docs: list[str]) -> tuple[str, str]:
    """(train, held-out) text: every HELDOUT_EVERY-th document is held out; documents are joined by
    a blank line."""
    held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    return "\n\n".join(train), "\n\n".join(held)


# ---- tokenizer -------------------------------------------------------------------------------------
def train_tokenizer(train: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([train], trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, EOS_ID, BOS_ID]
    return tok


def tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
    }


# ---- evaluation ------------------------------------------------------------------------------------
def heldout_chunks(ids: list[int]) -> list[list[int]]:
    """The held-out token ids cut into windows of SEQ_LEN - 1, each behind a <bos>: every held-out
    token is predicted exactly once (the first of a window from <bos> alone)."""
    n = SEQ_LEN - 1
    return [[BOS_ID, *ids[i : i + n]] for i in range(0, len(ids), n)]


def model_nll(model: Any, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood (nats, float64) of the held-out tokens, and their count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in heldout_chunks(ids):
            x = torch.tensor([chunk])
            logits = model(x).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += len(chunk) - 1
    return total, count


def unigram_perplexity(train_ids: list[int], heldout_ids: list[int], vocab: int) -> float:
    """Per-token perplexity on the held-out ids of the train split's add-one-smoothed unigram."""
    counts = Counter(train_ids)
    denom = len(train_ids) + vocab
    nll = -sum(math.log((counts[t] + 1) / denom) for t in heldout_ids)
    return math.exp(nll / len(heldout_ids))


def oracle_unigram_perplexity(heldout_ids: list[int]) -> float:
    """exp(entropy) of the held-out ids' own frequencies: the best any unigram model can do there."""
    counts = Counter(heldout_ids)
    n = len(heldout_ids)
    return math.exp(-sum(c * math.log(c / n) for c in counts.values()) / n)


def greedy(model: Any, tok: Any, prompt: str, new_tokens: int) -> str:
    """`new_tokens` greedy tokens by transformers' own `generate` (its loop and KV cache), EOS
    included like any other token."""
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID
        )
    return str(tok.decode(out[0].tolist(), skip_special_tokens=True))


# ---- model -----------------------------------------------------------------------------------------
def build_model(spec: Gemma4Spec, seed: int) -> Any:
    """transformers' Gemma4ForCausalLM or Gemma3nForCausalLM, fp32, with `exporter.synth`'s init."""
    import transformers

    if isinstance(spec, Gemma3nSpec):
        text = {k: v for k, v in spec.to_hf_config()["text_config"].items() if k != "model_type"}
        config: Any = transformers.Gemma3nTextConfig.from_dict({**text, "torch_dtype": "float32"})
        causal_lm: Any = transformers.Gemma3nForCausalLM
    else:
        cfg = spec.to_hf_config()
        cfg["torch_dtype"] = "float32"
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        causal_lm = transformers.Gemma4ForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = causal_lm(config).float()
    state = {}
    for name, (model_name, shape) in _tensor_names(spec).items():
        assert not shape or shape[0] <= chunk_rows(shape)  # one chunk: small tensors only
        x = generate_chunk(name, shape, init_rule(name, shape, spec), seed, 0, np.float32)
        state[model_name] = torch.from_numpy(np.ascontiguousarray(x))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing  # tied to the embedding
    return model


def _tensor_names(spec: Gemma4Spec) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checkpoint tensor name -> (name in the transformers model, shape): Gemma 3n renames."""
    if not isinstance(spec, Gemma3nSpec):
        return {name: (name, shape) for name, shape in hf_weight_shapes(spec).items()}
    pre = spec.checkpoint_prefix
    return {n: ("model." + n[len(pre) :], s) for n, s in spec.weight_shapes(pre).items()}


def clip_altup(model: Any, clip: float) -> dict[str, float]:
    """Clamp a Gemma 3n model's AltUp coefficients to +-clip (transformers does so only in training
    forwards; our exporter refuses any past the clip); returns each kind's largest magnitude before."""
    peaks = {}
    for kind in ("prediction_coefs", "correction_coefs"):
        weights = [getattr(layer.altup, kind).weight.data for layer in model.model.layers]
        peaks[kind] = max(float(w.abs().max()) for w in weights)
        for w in weights:
            w.clamp_(-clip, clip)
    return peaks


def train(model: Any, train_ids: list[int], steps: int, seed: int, log: bool = True) -> float:
    """AdamW on random windows of the training ids; returns the last step's loss."""
    data = torch.tensor(train_ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        progress = (step - WARMUP) / max(1, steps - WARMUP)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    model.train()
    loss_value = float("nan")
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(data) - SEQ_LEN, (BATCH,), generator=gen)
        body = torch.stack([data[s : s + SEQ_LEN - 1] for s in starts.tolist()])
        x = torch.cat([torch.full((BATCH, 1), BOS_ID, dtype=torch.long), body], dim=1)
        for group in opt.param_groups:
            group["lr"] = LR * lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        loss_value = loss.detach().item()
        if log and (step % 50 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss_value:.4f}  {time.perf_counter() - t0:6.1f}s", flush=True)
    model.eval()
    return loss_value


def save_checkpoint(model: Any, spec: Gemma4Spec, out: Path) -> None:
    """config.json, generation_config.json and model.safetensors (bf16) in the HF layout."""
    write_hf_configs(spec, out, "bfloat16")
    state = model.state_dict()
    names = _tensor_names(spec)
    with SafetensorsWriter(out, [(n, SAVE_DTYPE, s) for n, (_, s) in names.items()]) as writer:
        for name, (model_name, shape) in names.items():
            x = state[model_name].detach().float().contiguous().numpy()
            assert x.shape == shape, (name, x.shape, shape)
            writer.write(name, x)


def load_trained(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    import transformers

    if read_spec(folder).family == "gemma3n":  # as `verify --oracle transformers` builds it
        return _gemma3n_causal_lm(folder, dtype)
    return transformers.Gemma4ForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")


def logit_rel_error(folder: Path, ids: list[int]) -> float:
    """max |logits32 - logits64| / max |logits64| over the first held-out chunk."""
    x = torch.tensor([heldout_chunks(ids)[0]])
    with torch.no_grad():
        l32 = load_trained(folder, torch.float32)(x).logits.double()
        l64 = load_trained(folder, torch.float64)(x).logits
    return float((l32 - l64).abs().max() / l64.abs().max())


# ---- CORPUS.md -------------------------------------------------------------------------------------
def _corpus_section(m: dict[str, Any]) -> str:
    return f"""## Corpus

Text that CPython 3.11.7 ships in its standard library (`corpus_documents` in the script), as
{m["documents"]:,} documents:
- the {m["topics"]} documentation topics of `pydoc_data.topics` (what `help("if")` prints: the
  language reference and the built-in types pages as plain text), in sorted-key order;
- then the docstrings of the standard library's modules, classes and functions ({MIN_DOC_CHARS}
  characters or longer; test packages left out), files in sorted path order, each file's in line
  order; exact repeats dropped.

Joined by blank lines: {m["corpus_chars"]:,} characters, sha256 `{CORPUS_SHA256}`; the script
refuses to train on other text unless told to.

License: the Python Software Foundation License Version 2 (the PSF License Agreement in
`LICENSE.txt` of the standard library folder, and https://docs.python.org/3/license.html for the
documentation). Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved. The PSF
license permits use, copying and distribution of derivative works with that notice.

Split: every {HELDOUT_EVERY}th document is held out ({m["heldout_chars"]:,} characters, shipped here
as `{HELDOUT_FILE}`); the other {m["train_chars"]:,} characters are the training split.

"""


def _measured_section(m: dict[str, Any]) -> str:
    samples = "\n\n".join(f"```\n{text}\n```" for _, text in m["samples"])
    return f"""## Measured (bf16 weights as shipped, computed in fp32 by transformers)

Held-out per-token perplexity, in windows of {SEQ_LEN - 1} tokens behind a `<bos>`, every held-out
token predicted once ({m["heldout_tokens"]:,} tokens):

| model | perplexity |
| --- | --- |
| this model | {m["ppl_model"]:.2f} |
| unigram of the training split (add-one smoothing) | {m["ppl_unigram"]:.2f} |
| unigram fitted on the held-out text itself (a unigram's best) | {m["ppl_oracle_unigram"]:.2f} |
| uniform over the vocabulary | {VOCAB_SIZE} |

fp32 vs fp64 logits on the first held-out window: max |l32 - l64| / max |l64| =
{m["logit_rel_error"]:.2e}.

Greedy generation, {GENERATION_TOKENS} tokens after each prompt (small models loop):

{samples}
"""


def corpus_md(m: dict[str, Any]) -> str:
    s = SPEC
    layers = "/".join("S" if t == "sliding_attention" else "F" for t in s.layer_types)
    cap = s.final_logit_softcapping
    heads = f"{s.num_attention_heads} query heads, {s.num_key_value_heads} KV head"
    return f"""# tiny_trained: a small Gemma 4 PLE model with trained weights

Made by `python -m exporter.assets.train_tiny` (issue #5). Random weights give flat logits whose
top-1 flips on noise; this model has learnt its corpus, so quantization can be judged by it.

{_corpus_section(m)}## Tokenizer (`tokenizer.json`)

Byte-level BPE trained with `tokenizers` on the training split, {VOCAB_SIZE} tokens:
`<pad>`=0, `<eos>`=1, `<bos>`=2, then the 256 byte symbols and the merges. Encoding prepends
`<bos>`. The training split is {m["train_tokens"]:,} tokens ({m["chars_per_token"]:.2f} characters a
token), the held-out split {m["heldout_tokens"]:,}.

## Model

`gemma4_text`, the `tiny` preset made larger (`SPEC` in the script):
- hidden {s.hidden_size}, intermediate {s.intermediate_size} (doubled on the KV-shared layers);
- {s.num_hidden_layers} layers `{layers}` (S: sliding window {s.sliding_window}, F: full), the last
  {s.num_kv_shared_layers} sharing the KV of earlier layers;
- {heads}, head_dim {s.head_dim} (sliding), {s.global_head_dim} (full);
- PLE width {s.hidden_size_per_layer_input}, vocabulary {s.vocab_size}, final logit softcap {cap};
- {m["parameters"]:,} parameters, bf16 in `model.safetensors` ({m["safetensors_bytes"]:,} bytes).

Training: transformers' `Gemma4ForCausalLM` (eager attention) initialised by `exporter.synth`'s
rules (seed {SEED}); AdamW (lr {LR}, betas 0.9/0.95, weight decay {WEIGHT_DECAY} on matrices,
{WARMUP} warm-up steps then cosine to a tenth), gradient clipping {GRAD_CLIP}; {STEPS} steps of
{BATCH} random windows of {SEQ_LEN} tokens (`<bos>` first) from the training split, about
{STEPS * BATCH * (SEQ_LEN - 1) / m["train_tokens"]:.1f} passes over it; one CPU thread.
Time: {TRAIN_TIME}.

Determinism: everything is seeded, the tokenizer trains on one thread and the model on one torch
thread with `torch.use_deterministic_algorithms(True)`. Two runs of the script on the development
machine wrote byte-identical files. That holds for one machine and these versions (Python
{platform.python_version()}, torch {torch.__version__}, transformers {m["transformers"]}, tokenizers
{m["tokenizers"]}); another CPU family (other SIMD kernels) or another version may round differently.

{_measured_section(m)}"""


def corpus_md_gemma3n(m: dict[str, Any]) -> str:
    s, peaks = SPEC_GEMMA3N, m["altup_peaks"]
    kinds = "/".join("S" if t == "sliding_attention" else "F" for t in s.layer_types)
    return f"""# tiny_trained_gemma3n: a small Gemma 3n PLE model with trained weights

The Gemma 3n sibling of `../tiny_trained` (issue #18), made the same way by `python -m
exporter.assets.train_tiny --family gemma3n` with the same corpus and tokenizer (its copy: same ids).

{_corpus_section(m)}## Model

The released layout (config.json `gemma3n` with a `gemma3n_text` `text_config`, tensors
`model.language_model.*`); `SPEC_GEMMA3N` in the script, the `gemma3n-tiny` preset made larger:
hidden {s.hidden_size}, layers `{kinds}` (S: window {s.sliding_window}), the last {s.num_kv_shared_layers}
KV-shared, FFN sizes per layer, gate-sparse first layers, PLE over the first
{s.vocab_size_per_layer_input} of {s.vocab_size} ids. {m["parameters"]:,} parameters, bf16
({m["safetensors_bytes"]:,} bytes).

Trained as the Gemma 4 sibling ({STEPS} steps, one thread, seed {SEED}) in transformers'
`Gemma3nForCausalLM` (eager; the multimodal class needs timm), then its AltUp coefficients clamped to
`altup_coef_clip` {s.altup_coef_clip:g} (`clip_altup`). Time: {TRAIN_TIME_GEMMA3N}. As shipped: AltUp
coefficients up to {peaks["prediction_coefs"]:.3g} (prediction), {peaks["correction_coefs"]:.3g}
(correction); |`correct_output_scale`| >= {m["min_correct_scale"]:.3g}. Two runs wrote byte-identical
files (Python {platform.python_version()}, torch {torch.__version__}, transformers {m["transformers"]}).

{_measured_section(m)}"""


# ---- main ------------------------------------------------------------------------------------------
def make(
    out: Path, steps: int = STEPS, seed: int = SEED, check_corpus: bool = True, family: str = "gemma4"
) -> None:
    """Train the tokenizer (Gemma 3n: copy the Gemma 4 model's) and the model; write them, the
    held-out text and CORPUS.md to `out`."""
    if family != "gemma4" and out.resolve() == ASSET_DIR.resolve():
        raise SystemExit(f"{out} holds the Gemma 4 model: write the {family} one elsewhere")
    _deterministic(seed)
    out.mkdir(parents=True, exist_ok=True)
    docs = corpus_documents(check_corpus)
    train_text, heldout_text = split_corpus(docs)
    (out / HELDOUT_FILE).write_text(heldout_text, encoding="utf-8")

    spec = FAMILIES[family][0]
    if family == "gemma3n":
        from tokenizers import Tokenizer

        if (ASSET_DIR / HELDOUT_FILE).read_text(encoding="utf-8") != heldout_text:
            raise SystemExit(f"{ASSET_DIR} was not made from this corpus: train it first")
        shutil.copyfile(ASSET_DIR / "tokenizer.json", out / "tokenizer.json")
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    else:
        tok = train_tokenizer(train_text)
        tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    train_ids = tok.encode(train_text, add_special_tokens=False).ids

    model = build_model(spec, seed)
    t0 = time.perf_counter()
    train(model, train_ids, steps, seed)
    print(f"trained in {(time.perf_counter() - t0) / 60:.1f} minutes", flush=True)
    if isinstance(spec, Gemma3nSpec):
        print(f"AltUp coefficients before the clamp: {clip_altup(model, spec.altup_coef_clip or math.inf)}")
    save_checkpoint(model, spec, out)
    report(out, check_corpus, family)


def report(out: Path, check_corpus: bool = True, family: str = "gemma4") -> dict[str, Any]:
    """Measure the checkpoint in `out` as shipped (bf16 weights, fp32 compute) and write CORPUS.md.
    Needs only the files and the corpus, not the training: deterministic."""
    import pydoc_data.topics

    import tokenizers
    import transformers
    from tokenizers import Tokenizer

    _deterministic(SEED)
    docs = corpus_documents(check_corpus)
    train_text, heldout_text = split_corpus(docs)
    if (out / HELDOUT_FILE).read_text(encoding="utf-8") != heldout_text:
        raise SystemExit(f"{out / HELDOUT_FILE} is not the held-out split of this corpus")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    train_ids = tok.encode(train_text, add_special_tokens=False).ids
    heldout_ids = tok.encode(heldout_text, add_special_tokens=False).ids
    if read_spec(out) != (spec := FAMILIES[family][0]):
        raise SystemExit(f"{out}: config.json is not the {family} model of this script")
    shipped = load_trained(out)
    nll, count = model_nll(shipped, heldout_ids)
    metrics: dict[str, Any] = {
        "documents": len(docs),
        "topics": len(pydoc_data.topics.topics),
        "corpus_chars": len("\n\n".join(docs)),
        "train_chars": len(train_text),
        "heldout_chars": len(heldout_text),
        "train_tokens": len(train_ids),
        "heldout_tokens": count,
        "chars_per_token": len(train_text) / len(train_ids),
        "parameters": sum(math.prod(s) for s in spec.weight_shapes().values()),
        "safetensors_bytes": (out / "model.safetensors").stat().st_size,
        "ppl_model": math.exp(nll / count),
        "ppl_unigram": unigram_perplexity(train_ids, heldout_ids, VOCAB_SIZE),
        "ppl_oracle_unigram": oracle_unigram_perplexity(heldout_ids),
        "logit_rel_error": logit_rel_error(out, heldout_ids),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "samples": [(p, greedy(shipped, tok, p, GENERATION_TOKENS)) for p in GENERATION_PROMPTS],
    }
    if isinstance(spec, Gemma3nSpec):  # as loaded from the files
        scale = torch.cat([layer.altup.correct_output_scale for layer in shipped.model.layers]).abs()
        metrics.update(altup_peaks=clip_altup(shipped, math.inf), min_correct_scale=float(scale.min()))
    print(json.dumps({k: v for k, v in metrics.items() if k != "samples"}, indent=2))
    for prompt, sample in metrics["samples"]:
        print(f"greedy from {prompt!r}: {sample!r}")
    md = corpus_md_gemma3n(metrics) if family == "gemma3n" else corpus_md(metrics)
    (out / "CORPUS.md").write_text(md, encoding="utf-8")
    return metrics


def _deterministic(seed: int) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--family", choices=list(FAMILIES), default="gemma4", help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, help="output folder (default: the family's asset folder)")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--any-corpus", action="store_true", help="use this Python's text even if it differs from 3.11.7's"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only measure the checkpoint in --out, rewrite CORPUS.md"
    )
    args = parser.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers starts its thread pool
    out = args.out if args.out is not None else FAMILIES[args.family][1]
    if args.report_only:
        report(out, check_corpus=not args.any_corpus, family=args.family)
    else:
        make(out, args.steps, args.seed, check_corpus=not args.any_corpus, family=args.family)


if __name__ == "__main__":
    main()
