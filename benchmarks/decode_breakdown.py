"""How much of a decode step is MatMulNBits: a bundle's decoder against the same graph with every
MatMulNBits replaced by a near-free stand-in of the same output shape (one Pad or Slice), same
feeds, same KV cache, one process, 2 threads.

    python benchmarks/decode_breakdown.py BUNDLE [--prompt-len 128] [--steps 48] [--rounds 5]

The stand-in graph computes garbage, but every other node runs on tensors of its real shapes, so
`step(full) - step(stand-in)` is the time MatMulNBits takes inside a real step, measured by the
wall clock (onnxruntime's profiler adds ~6 us to every node, which swamps the small ones). The two
sessions alternate whole rounds, with an idle gap between them (a session's thread pool spins
after each run); per-step medians, then the median over rounds. The stand-in model is built in
memory; its other initializers are read from the bundle's own files, nothing is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from runtime_harness import loop
from runtime_harness.session import BundleSession


def without_matmul_nbits(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Every MatMulNBits [.., K] -> [.., N] becomes one node of the same output shape that only moves
    min(K, N) floats: Pad with zeros (N > K) or Slice (N <= K). Returns the model and how many nodes
    were replaced; initializers only those nodes read are dropped."""
    g = model.graph
    nodes, replaced = [], 0
    for n in g.node:
        if n.op_type != "MatMulNBits":
            nodes.append(n)
            continue
        attrs = {a.name: a.i for a in n.attribute}
        k, n_out, y = attrs["K"], attrs["N"], n.output[0]
        if n_out > k:  # pads: begin of each of the 3 axes, then end of each
            pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, n_out - k], np.int64), f"{y}.pads")
            g.initializer.append(pads)
            nodes.append(helper.make_node("Pad", [n.input[0], pads.name], [y]))
        else:
            bounds = [
                numpy_helper.from_array(np.array([v], np.int64), f"{y}.{name}")
                for name, v in (("start", 0), ("end", n_out), ("axis", -1))
            ]
            g.initializer.extend(bounds)
            nodes.append(helper.make_node("Slice", [n.input[0], *(b.name for b in bounds)], [y]))
        replaced += 1
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return model, replaced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    session = BundleSession(args.bundle, threads=args.threads, check=False)
    real = session.decoder
    decoder_file = args.bundle / session.manifest.graphs.decoder.file
    stand_in, replaced = without_matmul_nbits(onnx.load(str(decoder_file), load_external_data=False))
    opts = real.get_session_options()  # BundleSession's own (threads, no arena, ...)
    # the in-memory model's external initializers resolve against the bundle's folder
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(args.bundle))
    stripped = ort.InferenceSession(stand_in.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    vocab = session.manifest.generation.vocab_size
    prompt = np.random.RandomState(1234).randint(3, vocab, args.prompt_len).astype(np.int64)

    class SwapAfterPrefill:
        """The loop's hook: the real decoder prefills; `decoder` runs every decode step (its presents
        grow the cache as the real ones do)."""

        def __init__(self, decoder: ort.InferenceSession):
            self.decoder = decoder

        def before(self, step: int) -> None:
            session.decoder = real if step == 0 else self.decoder

        def after(self, step: int, seconds: float, logits: np.ndarray) -> None:
            pass

    def step_times(decoder: ort.InferenceSession) -> float:
        """The median decode step (`BundleSession.forward`, PLE lookup included) of one generation."""
        time.sleep(0.1)
        gen = loop.generate(
            session, prompt, args.steps + 1, stop_at_eos=False, hook=SwapAfterPrefill(decoder)
        )
        time.sleep(0.1)
        return statistics.median(gen.step_seconds)

    full: list[float] = []
    rest: list[float] = []
    for r in range(args.rounds):
        order = [(real, full), (stripped, rest)]
        for decoder, out in order if r % 2 == 0 else order[::-1]:
            out.append(step_times(decoder))
    f, o = statistics.median(full), statistics.median(rest)
    result = {
        "bundle": str(args.bundle),
        "matmul_nbits_nodes": replaced,
        "step_ms": f * 1e3,
        "step_without_matmul_nbits_ms": o * 1e3,
        "matmul_nbits_share": (f - o) / f,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"decode step {f * 1e3:.2f} ms; without its {replaced} MatMulNBits {o * 1e3:.2f} ms: "
            f"MatMulNBits {100 * (f - o) / f:.0f}% of a step"
        )


if __name__ == "__main__":
    main()
