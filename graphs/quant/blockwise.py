"""Blockwise round-to-nearest (RTN) quantization of `[rows, K]` weights, and the byte layouts that
onnxruntime's `com.microsoft.MatMulNBits` and `com.microsoft.GatherBlockQuantized` read.

Pure numpy, no graph code: graph passes call these and build the nodes. Everything works row by
row, so a weight can be streamed a few rows at a time: quantizing or packing rows `[a:b]` alone
gives exactly rows `[a:b]` of doing the whole tensor (concatenate chunk outputs along axis 0).

Rules are those of onnxruntime's own MatMulNBits quantizer, `MlasQuantizeBlockwise` in
onnxruntime/core/mlas/lib/q4_dq.cpp (`range2scale`, `range2scalezp`,
`BlockwiseQuantizer::quantizeAndTranspose`), called by `matmul_nbits_quantizer.py` through the
`quantize_matmul_{4,8}bits` bindings; tests/graphs/test_blockwise.py checks them byte for byte:

    blocks run along K (the last axis): block j of a row holds columns [j*bs, (j+1)*bs). A partial
    last block is zero-padded for its range, as ORT's quantizer pads K (a 0 never changes m below,
    and the asymmetric range holds 0 anyway); codes exist for the K real columns only.
    symmetric, zero point 2**(bits-1) (8 or 128): m = the block's value of largest magnitude (the
        minimum on a tie), scale = -m / 2**(bits-1). So m maps to code 0, the scale is negative
        when m > 0, and a value of the other sign near |m| clips at code 2**bits - 1.
    asymmetric: lo = min(block min, 0), hi = max(block max, 0), scale = (hi - lo) / (2**bits - 1),
        zero point = roundf(-lo / scale) clamped to [0, 2**bits - 1]; 0 when scale == 0.
    code = clamp(roundf(w * (1 / scale) + zero_point), 0, 2**bits - 1), 1 / 0 taken as 0;
        float32 arithmetic, roundf rounds halves away from zero, the scale used is the stored one.
    dequantized w = (code - zero_point) * scale

Clip search (optional, `clip_search=True`): before those rules, each block's range [lo, hi] is
shrunk by the factor f of `CLIP_GRID` (1 first) that minimises the block's squared error
sum((w - w_hat)**2); the rules above then run on [f * lo, f * hi] unchanged, so the bytes are
read exactly as plain RTN's. Values beyond the shrunk range clip to the end codes. Like the
range clipping of llama.cpp's k-quants and AWQ's clip search (without activations): a block's
largest values cost more to the scale of all its weights than their own clipping costs.

Error: |w - w_hat| <= |scale| / 2 inside the grid [(0 - zp) * scale, (2**bits - 1 - zp) * scale];
a value outside it (the clipped end above) is off by its distance to the grid, at most |scale|
unless a float16 scale is subnormal (|scale| < 6.1e-5: block ranges below ~5e-4 at 4 bits
symmetric, ~8e-3 at 8 bits), where the stored scale has few bits and the grid can end short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

SUPPORTED_BITS = (4, 8)
# clip search: the factors a block's range [lo, hi] is shrunk by, 1.0 (plain RTN) first. Five
# factors down to 0.8 gave all but ~0.5% of the error reduction of 17 down to 0.6, measured on
# Gaussian and Student-t weights at block 128 and 256
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8)


@dataclass(frozen=True)
class BlockQuantized:
    """Codes and quantization parameters of a `[rows, K]` weight, blocks of `block_size` along K."""

    codes: np.ndarray  # uint8 [rows, K], each in [0, 2**bits), unpacked
    scales: np.ndarray  # float32 or float16 [rows, n_blocks], n_blocks = ceil(K / block_size)
    zero_points: np.ndarray | None  # uint8 [rows, n_blocks]; None: symmetric, zero point 2**(bits-1)
    bits: int
    block_size: int

    @property
    def n_blocks(self) -> int:
        return int(self.scales.shape[1])

    def zero_points_or_default(self) -> np.ndarray:  # uint8 [rows, n_blocks]
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)


class MatMulNBitsInputs(NamedTuple):
    b: np.ndarray  # uint8 [N, n_blocks, block_size * bits / 8]
    scales: np.ndarray  # [N, n_blocks], the type of input A
    zero_points: np.ndarray | None  # uint8 [N, ceil(n_blocks * bits / 8)]; None: default 2**(bits-1)


class GatherBlockQuantizedInputs(NamedTuple):
    data: np.ndarray  # uint8 [rows, K * bits / 8]
    scales: np.ndarray  # float32 or float16 [rows, n_blocks]; the output takes this type
    zero_points: np.ndarray | None  # uint8 [rows, ceil(n_blocks * bits / 8)]; None: 2**(bits-1)


def _roundf(x: np.ndarray) -> np.ndarray:
    """C `roundf`: halves away from zero (numpy's `round` goes to even). `x - trunc(x)` is exact."""
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= 0.5, np.sign(x), np.zeros_like(x))


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def quantize_blockwise(
    w: npt.ArrayLike,
    bits: int,
    block_size: int,
    symmetric: bool,
    scale_dtype: npt.DTypeLike = np.float32,
    clip_search: bool = False,
) -> BlockQuantized:
    """Quantize `w` `[rows, K]` (HF Linear layout: rows = out features) in blocks along K.

    Scales are stored as `scale_dtype` (float32 or float16) and the codes computed from the stored
    scale, as ORT does for float16 weights. `w` must be finite. `clip_search`: each block's range
    is first shrunk by the factor of `CLIP_GRID` that gives it the least squared error (module
    docstring); without it, exactly ORT's quantizer.
    """
    _check_bits(bits)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    scale_dtype = np.dtype(scale_dtype)
    if scale_dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"scale_dtype must be float32 or float16, got {scale_dtype}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a [rows, K] weight, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weight has non-finite values")
    rows, k = w.shape
    n_blocks = -(-k // block_size)
    qmax = (1 << bits) - 1

    padded = np.zeros((rows, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(rows, n_blocks, block_size)  # [rows, n_blocks, block_size]
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)  # [rows, n_blocks]
    if clip_search:
        shrink = _best_shrink(blocks, lo, hi, bits, symmetric, scale_dtype)
        lo, hi = lo * shrink, hi * shrink
    scales, zp, zero_points = _grid(lo, hi, bits, symmetric, scale_dtype)
    codes = _codes(blocks, scales, zp, qmax).reshape(rows, -1)[:, :k]
    return BlockQuantized(np.ascontiguousarray(codes), scales, zero_points, bits, block_size)


def _grid(
    lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool, scale_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(stored scales, zero points as float32, stored zero points or None) of blocks whose values
    span [lo, hi], by ORT's rules (module docstring)."""
    qmax, mid = (1 << bits) - 1, 1 << (bits - 1)
    if symmetric:  # range2scale
        m = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scales = (-m / np.float32(mid)).astype(scale_dtype)
        return scales, np.full(lo.shape, mid, dtype=np.float32), None
    # range2scalezp: the zero point comes from the float32 scale, before it is stored
    lo, hi = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
    scale_f = (hi - lo) / np.float32(qmax)
    zp_f = np.divide(-lo, scale_f, out=np.zeros_like(lo), where=scale_f != 0)
    zp = np.clip(_roundf(zp_f), 0, qmax)
    return scale_f.astype(scale_dtype), zp, zp.astype(np.uint8)


def _codes(blocks: np.ndarray, scales: np.ndarray, zp: np.ndarray, qmax: int) -> np.ndarray:
    """uint8 codes `[rows, n_blocks, block_size]` from the stored scales."""
    stored = scales.astype(np.float32)
    if not np.isfinite(stored).all():
        raise ValueError(f"a scale overflows {scales.dtype}")
    inv = np.divide(np.float32(1), stored, out=np.zeros_like(stored), where=stored != 0)
    x = blocks * inv[:, :, None] + zp[:, :, None]  # float32, two roundings as in C (no fma)
    return np.clip(_roundf(x), 0, qmax).astype(np.uint8)


def _best_shrink(
    blocks: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool, scale_dtype: np.dtype
) -> np.ndarray:
    """Per block, the factor of `CLIP_GRID` whose range [lo * f, hi * f] quantizes the block with the
    least squared error (the first on a tie, so never worse than f = 1, plain RTN)."""
    qmax = np.float32((1 << bits) - 1)
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    best = np.ones(lo.shape, dtype=np.float32)
    for f in CLIP_GRID:
        f32 = np.float32(f)
        scales, zp, _ = _grid(lo * f32, hi * f32, bits, symmetric, scale_dtype)
        stored = scales.astype(np.float32)[:, :, None]
        inv = np.divide(np.float32(1), stored, out=np.zeros_like(stored), where=stored != 0)
        # the codes as _codes makes them, but rint for roundf: they differ only on exact halves,
        # which do not matter for choosing a factor; in place, float32, to keep the search cheap
        q = np.multiply(blocks, inv)
        q += zp[:, :, None]
        np.rint(q, out=q)
        np.clip(q, 0, qmax, out=q)
        q -= zp[:, :, None]
        q *= stored
        q -= blocks
        err = np.einsum("rbk,rbk->rb", q, q)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, f32, best)
    return best


def dequantize_blockwise(q: BlockQuantized) -> np.ndarray:
    """`(code - zero_point) * scale` as float32 `[rows, K]`."""
    k = q.codes.shape[1]
    block_of_column = np.arange(k) // q.block_size
    zp = q.zero_points_or_default().astype(np.int32)[:, block_of_column]
    scale = q.scales.astype(np.float32)[:, block_of_column]
    return (q.codes.astype(np.int32) - zp).astype(np.float32) * scale


def _pack_last_axis(x: np.ndarray, bits: int, fill: int) -> np.ndarray:
    """uint8 `[rows, n]` codes -> `[rows, ceil(n * bits / 8)]` bytes; for 4 bits element 2i in the
    low nibble of byte i, 2i+1 in the high one; an odd tail is paired with `fill`."""
    x = x.astype(np.uint8)
    if bits == 8:
        return np.ascontiguousarray(x)
    if x.shape[1] % 2:
        x = np.concatenate([x, np.full((x.shape[0], 1), fill, dtype=np.uint8)], axis=1)
    return np.ascontiguousarray(x[:, 0::2] | (x[:, 1::2] << 4))


def _check_op_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"onnxruntime wants block_size a power of two >= 16, got {block_size}")


def pack_matmul_nbits(q: BlockQuantized) -> MatMulNBitsInputs:
    """Inputs B, scales and zero_points of `MatMulNBits(K=K, N=rows, bits, block_size)`.

    B is `[N, n_blocks, blob_size]`, blob_size = block_size * bits / 8: each block's codes packed
    along K (4 bits: even k in the low nibble). Codes past K are 0 bytes, as ORT's quantizer leaves
    them (its kernels never use them). Zero points for 4 bits: two blocks a byte, even block low,
    an odd count's last high nibble 8 (MLAS's fill). Omit them when symmetric: the op's default is
    2**(bits-1). Scales and zero points are 2-D, as in ORT 1.31's schema and quantizer.
    """
    _check_op_block_size(q.block_size)
    rows, k = q.codes.shape
    mid = 1 << (q.bits - 1)
    codes = np.zeros((rows, q.n_blocks * q.block_size), dtype=np.uint8)  # padding: code 0, as ORT
    codes[:, :k] = q.codes
    b = _pack_last_axis(codes, q.bits, mid).reshape(rows, q.n_blocks, q.block_size * q.bits // 8)
    packed_zp = None if q.zero_points is None else _pack_last_axis(q.zero_points, q.bits, mid)
    return MatMulNBitsInputs(b, q.scales, packed_zp)


def pack_gather_block_quantized(q: BlockQuantized) -> GatherBlockQuantizedInputs:
    """Inputs data, scales and zero_points of `GatherBlockQuantized(bits, block_size,
    gather_axis=0, quantize_axis=-1)` over a `[rows, K]` table with uint8 data.

    8 bits: data is the codes (an int8 code XOR 0x80). 4 bits: `[rows, K/2]`, even column in the
    low nibble; the op infers the width as 2 * data.shape[-1], so K must be even. Zero points are
    packed like the data (4 bits: two blocks a byte); omit them when symmetric (default 2**(bits-1)).
    """
    _check_op_block_size(q.block_size)
    k = q.codes.shape[1]
    if q.bits == 4 and k % 2:
        raise ValueError(f"GatherBlockQuantized with bits=4 holds two columns a byte: K={k} is odd")
    mid = 1 << (q.bits - 1)
    data = _pack_last_axis(q.codes, q.bits, mid)
    packed_zp = None if q.zero_points is None else _pack_last_axis(q.zero_points, q.bits, mid)
    return GatherBlockQuantizedInputs(data, q.scales, packed_zp)


@dataclass
class ErrorMeter:
    """`||w - w_hat|| / ||w||` (Frobenius, in float64) accumulated over row chunks of a tensor."""

    err2: float = 0.0
    norm2: float = 0.0

    def add(self, w: npt.ArrayLike, w_hat: npt.ArrayLike) -> None:
        w64 = np.asarray(w, dtype=np.float64)
        self.err2 += float(np.square(w64 - np.asarray(w_hat, dtype=np.float64)).sum())
        self.norm2 += float(np.square(w64).sum())

    @property
    def value(self) -> float:
        """The relative error; 0 for two zero tensors."""
        if self.norm2 == 0.0:
            return 0.0 if self.err2 == 0.0 else float("inf")
        return float(self.err2**0.5 / self.norm2**0.5)


def relative_error(w: npt.ArrayLike, w_hat: npt.ArrayLike) -> float:
    """`||w - w_hat|| / ||w||` of one tensor."""
    meter = ErrorMeter()
    meter.add(w, w_hat)
    return meter.value
