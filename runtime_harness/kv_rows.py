"""One past input's cache, appended to in place (format 4 bundles: a present is the new positions only).

A decoder call used to concatenate each past with its new positions and return the whole cache: two
passes over every cache per step, growing with the context. Now the graph attends over the past where
it lies and returns the new positions; `KVRows` appends them to a buffer with room to spare and hands
out the live positions as a view (no copy when batch x kv_heads is 1, the phone case: a contiguous
slice; otherwise numpy makes the contiguous copy onnxruntime needs, what the Concat cost before).

A sliding layer keeps its last `keep` positions (window - 1): the oldest fall off the front, and the
live rows move back to the start only when the spare room is used up (every `slack` decode steps).
A growing layer's buffer is sized for the positions the caller plans (`capacity`) and doubles past it.
"""

from __future__ import annotations

import numpy as np

SLACK = 64  # spare positions of a sliding layer's buffer: one move of window - 1 rows per 64 steps


class KVRows:
    def __init__(
        self, batch: int, heads: int, head_dim: int, dtype: np.dtype, keep: int | None, capacity: int
    ):
        self.keep = keep
        room = keep + SLACK if keep is not None else max(capacity, 1)
        self.buffer = np.empty((batch, heads, room, head_dim), dtype=dtype)
        self.start = self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def view(self) -> np.ndarray:
        """The live positions [B, H, len, D], C-contiguous (what onnxruntime is fed)."""
        live = self.buffer[:, :, self.start : self.end]
        return live if live.flags.c_contiguous else np.ascontiguousarray(live)

    def append(self, rows: np.ndarray) -> None:
        """Add a call's new positions [B, H, S, D]; a sliding layer then keeps its last `keep`."""
        s = rows.shape[2]
        if self.keep is not None and s >= self.keep:  # the chunk alone fills the window
            self.start = self.end = 0
            rows = rows[:, :, s - self.keep :]
            s = self.keep
        if self.end + s > self.buffer.shape[2]:
            self._make_room(s)
        self.buffer[:, :, self.end : self.end + s] = rows
        self.end += s
        if self.keep is not None and len(self) > self.keep:
            self.start = self.end - self.keep

    def _make_room(self, s: int) -> None:
        """Move the live rows to the front (the positions a sliding layer will drop first), or, where
        they and `s` more do not fit, into a bigger buffer (twice what is needed)."""
        live = len(self) if self.keep is None else min(len(self), self.keep - s)
        first = self.end - live
        need = live + s
        if need > self.buffer.shape[2]:
            b, h, _, d = self.buffer.shape
            grown = np.empty((b, h, 2 * need, d), dtype=self.buffer.dtype)
            grown[:, :, :live] = self.buffer[:, :, first : self.end]
            self.buffer = grown
        else:  # numpy copies overlapping ranges correctly
            self.buffer[:, :, :live] = self.buffer[:, :, first : self.end]
        self.start, self.end = 0, live
