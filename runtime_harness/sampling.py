"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling (seeded)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ple_export.errors import UserError


@dataclass(frozen=True)
class Sampler:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 0

    def validate(self) -> None:
        if not (self.temperature == self.temperature) or not 0 <= self.temperature <= 100:
            raise UserError(f"--temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def picker(self) -> Callable[[np.ndarray], np.ndarray]:
        """logits [B, V] -> token ids [B], with this sampler's own seeded generator."""
        self.validate()
        rng = self.rng()
        return lambda logits: self(logits, rng)

    def __call__(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """logits [B, V] -> token ids [B]."""
        if self.greedy:
            return logits.argmax(-1)
        out = np.empty(logits.shape[0], dtype=np.int64)
        for row, z in enumerate(logits.astype(np.float64) / self.temperature):
            order = np.argsort(-z, kind="stable")
            if self.top_k:
                order = order[: self.top_k]
            p = np.exp(z[order] - z[order[0]])
            p /= p.sum()
            if self.top_p < 1:
                keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
                order, p = order[:keep], p[:keep] / p[:keep].sum()
            out[row] = order[rng.choice(len(order), p=p)]
        return out
