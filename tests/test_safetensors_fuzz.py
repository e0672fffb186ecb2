"""Differential fuzzing of our safetensors header validation against the official library.

Valid small files are generated (by hand, as a JSON tree we can bend, or with `safetensors.numpy.save`),
then mutated: offsets, shapes, dtypes, duplicate and extra keys, entry and metadata forms, names with
surrogate escapes or control characters, number spellings (-0, 4.0, 2**64), nesting, JSON whitespace,
the header-size field, stray or missing data bytes, flipped header bytes, truncation.

Oracle: `safetensors.safe_open` (and `safetensors.deserialize` for the tensor bytes). Whatever it
refuses, `read_header` must refuse with a one-line UserError; whatever it reads, we read alike (names,
dtypes, shapes, and the bytes at our offsets and through `read_tensor`), except for the documented ways
we are stricter, each recognised here independently of our reader and required to be named in our message:
- a duplicate key anywhere (the format forbids them; the official library keeps the last);
- a tensor entry that is not an object with exactly dtype, shape, data_offsets (the official library
  ignores other keys and reads `[dtype, shape, offsets]`), or JSON nested deeper than 64 levels, which
  only such an ignored value can be in a header the official library reads;
- a dtype that is not a JSON string (serde reads `{"F32": null}` as F32);
and, when reading data, dtypes other than BF16, F16, F32 (the header opens; `read_tensor` refuses
with a UserError). Any other exception from our side fails the test.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors import deserialize, safe_open
from safetensors.numpy import save as official_save

from exporter.safetensors_io import read_header, read_tensor
from ple_export.errors import UserError

# `Dtype::bitsize` in huggingface/safetensors safetensors/src/tensor.rs (0.8): the format's dtypes.
OFFICIAL_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
READABLE = ("BF16", "F16", "F32")
TENSOR_KEYS = ("dtype", "shape", "data_offsets")
NAME_CHARS = list("ab.z_0") + ["\n", "\x00", "\x7f", " ", "é", "€", "😀", "\u2028", '"', "\\", "/"]
JSON_DEPTH_LIMIT = 64  # ple_export.jsonfile.MAX_NESTING


# ---- a JSON tree we can bend ---------------------------------------------------------------------


@dataclass
class Obj:
    """A JSON object as its pairs, in order; duplicate keys allowed."""

    pairs: list[tuple[Any, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Raw:
    """A token written verbatim: `-0`, `4.0`, `NaN`, a string with a lone surrogate escape..."""

    text: str


def dump(node: Any, ascii_only: bool) -> str:
    if isinstance(node, Obj):
        return "{" + ",".join(f"{dump(k, ascii_only)}:{dump(v, ascii_only)}" for k, v in node.pairs) + "}"
    if isinstance(node, list):
        return "[" + ",".join(dump(v, ascii_only) for v in node) + "]"
    if isinstance(node, Raw):
        return node.text
    return json.dumps(node, ensure_ascii=ascii_only)  # lone surrogates become lone \uXXXX escapes


def nested(depth: int) -> Any:
    node: Any = []
    for _ in range(depth - 1):
        node = [node]
    return node


@dataclass
class Case:
    header: Any
    data: bytes
    lead: str = ""  # before the JSON text
    trail: str = ""  # after it
    ascii_only: bool = True
    size_field: int | None = None  # None: the header's length (+ size_delta)
    size_delta: int = 0
    data_cut: int = 0  # bytes dropped from the end of the data
    extra: bytes = b""  # bytes appended after the data
    flips: list[tuple[int, int]] = field(default_factory=list)  # (position, byte) in the header
    file_cut: int | None = None  # keep only this many bytes of the file
    raw_header: bytes | None = None  # a header written by the official library, used as is

    def to_bytes(self) -> bytes:
        if self.raw_header is not None:
            blob = bytearray(self.raw_header)
        else:
            text = self.lead + dump(self.header, self.ascii_only) + self.trail
            blob = bytearray(text.encode("utf-8", "surrogatepass"))  # a raw surrogate: invalid UTF-8
        for pos, byte in self.flips:
            if blob:
                blob[pos % len(blob)] = byte
        n = len(blob) + self.size_delta if self.size_field is None else self.size_field
        out = (n % (1 << 64)).to_bytes(8, "little") + bytes(blob)
        out += self.data[: max(0, len(self.data) - self.data_cut)] + self.extra
        return out if self.file_cut is None else out[: self.file_cut % (len(out) + 1)]


def entries(case: Case) -> list[Obj]:
    h = case.header
    if not isinstance(h, Obj):
        return []
    return [v for k, v in h.pairs if k != "__metadata__" and isinstance(v, Obj)]


def field_index(entry: Obj, key: str) -> int | None:
    return next((i for i, (k, _) in enumerate(entry.pairs) if k == key), None)


# ---- valid files -----------------------------------------------------------------------------------

names = st.text(st.sampled_from(NAME_CHARS), max_size=5).filter(lambda s: s != "__metadata__")
dtypes = st.one_of(st.sampled_from(READABLE), st.sampled_from(sorted(OFFICIAL_BITS)))
shapes = st.lists(st.integers(0, 4), max_size=3)
meta_text = st.text(st.sampled_from(NAME_CHARS), max_size=4)


@st.composite
def valid_cases(draw: st.DrawFn) -> Case:
    specs = draw(st.lists(st.tuples(names, dtypes, shapes), max_size=4))
    fixed: list[tuple[str, str, list[int], int]] = []
    for i, (name, dtype, shape) in enumerate(specs):
        if any(name == f[0] for f in fixed):
            name += f"#{i}"  # unique names (drawing them unique makes hypothesis discard many examples)
        if math.prod(shape) * OFFICIAL_BITS[dtype] % 8:
            shape = [*shape, 8]  # sub-byte dtypes: a whole number of bytes
        fixed.append((name, dtype, shape, math.prod(shape) * OFFICIAL_BITS[dtype] // 8))
    layout = draw(st.permutations(range(len(fixed))))  # data order differs from header order
    begins, pos = {}, 0
    for i in layout:
        begins[i] = pos
        pos += fixed[i][3]
    data = random.Random(draw(st.integers(0, 2**32 - 1))).randbytes(pos)
    pairs: list[tuple[Any, Any]] = []
    for i, (name, dtype, shape, nbytes) in enumerate(fixed):
        fields = [("dtype", dtype), ("shape", shape), ("data_offsets", [begins[i], begins[i] + nbytes])]
        pairs.append((name, Obj(draw(st.permutations(fields)))))
    meta = draw(st.none() | st.lists(st.tuples(meta_text, meta_text), max_size=2))
    if meta is not None:
        meta_obj = Obj(list(dict(meta).items()))
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", meta_obj))
    return Case(
        Obj(pairs),
        data,
        lead=draw(st.sampled_from(["", "", " ", "\n\t\r "])),
        trail=draw(st.sampled_from(["", "", " ", "       ", "\r\n"])),
        ascii_only=draw(st.booleans()),
    )


NUMPY_DTYPES = [np.float16, np.float32, ml_dtypes.bfloat16, np.int64, np.uint8, np.bool_, np.complex64]


@st.composite
def official_cases(draw: st.DrawFn) -> Case:
    """A file written by `safetensors.numpy.save` (header padded with spaces to 8 bytes)."""
    arrays = {}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for name in set(draw(st.lists(names, max_size=3))):
        dtype = draw(st.sampled_from(NUMPY_DTYPES))
        shape = tuple(draw(shapes))
        arrays[name] = rng.integers(0, 256, (*shape, np.dtype(dtype).itemsize), np.uint8).view(dtype)[..., 0]
    meta = draw(st.none() | st.lists(st.tuples(meta_text, meta_text), max_size=2))
    blob = official_save(arrays, metadata=None if meta is None else dict(meta))
    n = int.from_bytes(blob[:8], "little")
    return Case(None, blob[8 + n :], raw_header=blob[8 : 8 + n])


# ---- mutations ---------------------------------------------------------------------------------------

Draw = Callable[[st.SearchStrategy[Any]], Any]
INTS = [0, 1, 4, 2**32, 2**40, 2**61, 2**63, 2**64 - 1, 2**64, -1]
NOT_INTS = [Raw("-0"), Raw("4.0"), Raw("1e1"), Raw("NaN"), Raw("Infinity"), True, None, "4", 2.5]


def m_offset_delta(draw: Draw, case: Case) -> None:
    es = entries(case)
    if es:
        e = draw(st.sampled_from(es))
        i = field_index(e, "data_offsets")
        if i is not None and isinstance(e.pairs[i][1], list) and len(e.pairs[i][1]) == 2:
            offsets = list(e.pairs[i][1])
            j = draw(st.integers(0, 1))
            if type(offsets[j]) is int:
                offsets[j] += draw(st.integers(-9, 9))
            e.pairs[i] = ("data_offsets", offsets)


def m_offset_value(draw: Draw, case: Case) -> None:
    es = entries(case)
    if es:
        e = draw(st.sampled_from(es))
        i = field_index(e, "data_offsets")
        if i is not None and isinstance(e.pairs[i][1], list) and e.pairs[i][1]:
            offsets = list(e.pairs[i][1])
            offsets[draw(st.integers(0, len(offsets) - 1))] = draw(st.sampled_from(INTS + NOT_INTS))
            e.pairs[i] = ("data_offsets", offsets)


def m_offsets_form(draw: Draw, case: Case) -> None:
    es = entries(case)
    if es:
        e = draw(st.sampled_from(es))
        i = field_index(e, "data_offsets")
        if i is not None and isinstance(e.pairs[i][1], list) and len(e.pairs[i][1]) == 2:
            b, end = e.pairs[i][1]
            form = draw(st.sampled_from([[b], [b, end, end], Obj([("0", b), ("1", end)]), b, None, []]))
            e.pairs[i] = ("data_offsets", form)


def m_shape(draw: Draw, case: Case) -> None:
    es = entries(case)
    if not es:
        return
    e = draw(st.sampled_from(es))
    i = field_index(e, "shape")
    if i is None or not isinstance(e.pairs[i][1], list):
        return
    shape = list(e.pairs[i][1])
    how = draw(st.sampled_from(["set", "append", "pop", "form", "keep_size", "zero_big"]))
    if how == "set" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from([0, 2, 3, *INTS, *NOT_INTS]))
    elif how == "append":
        shape.insert(draw(st.integers(0, len(shape))), draw(st.sampled_from([0, 1, 2, 2**64 - 1, 2**64])))
    elif how == "pop" and shape:
        shape.pop(draw(st.integers(0, len(shape) - 1)))
    elif how == "form":
        e.pairs[i] = ("shape", draw(st.sampled_from([None, 3, "3", Obj([]), [shape]])))
        return
    elif how == "keep_size":
        shape = same_count(draw, shape)
    elif how == "zero_big":  # the official running product: [0, 2**40, 2**40] fine, [2**40, 2**40, 0] not
        big = draw(st.sampled_from([2**32, 2**40, 2**63]))
        shape = draw(st.sampled_from([[*shape, 0, big, big], [big, big, 0, *shape], [big, 0, big]]))
    e.pairs[i] = ("shape", shape)


def same_count(draw: Draw, shape: list[Any]) -> list[Any]:
    if not all(type(d) is int for d in shape):
        return shape
    return draw(st.sampled_from([[math.prod(shape)], [1, *shape], [*shape, 1], shape[::-1]]))


def running_product_fits(shape: list[int]) -> bool:
    """The official element count, a running product of the dims, stays below 2**64."""
    count = 1
    for d in shape:
        count *= d
        if count >= 1 << 64:
            return False
    return True


def v_reshape(draw: Draw, case: Case) -> None:
    """Another shape with the same element count: valid."""
    for e in entries(case):
        i = field_index(e, "shape")
        if i is not None and draw(st.booleans()):
            shape = same_count(draw, e.pairs[i][1])
            if running_product_fits(shape):
                e.pairs[i] = ("shape", shape)


def v_same_size_dtype(draw: Draw, case: Case) -> None:
    """Another dtype of the same bit size: valid."""
    for e in entries(case):
        i = field_index(e, "dtype")
        if i is not None and draw(st.booleans()):
            bits = OFFICIAL_BITS[e.pairs[i][1]]
            e.pairs[i] = (
                "dtype",
                draw(st.sampled_from(sorted(k for k, b in OFFICIAL_BITS.items() if b == bits))),
            )


def v_empty_tensor(draw: Draw, case: Case) -> None:
    """A tensor with no elements (some dims beyond what numpy can index) at a tensor boundary: valid."""
    bounds = {0}
    for e in entries(case):
        i = field_index(e, "data_offsets")
        assert i is not None
        bounds.update(e.pairs[i][1])
    at = draw(st.sampled_from(sorted(bounds)))
    shape = draw(st.sampled_from([[0], [2, 0, 3], [0, 2**40, 2**40], [0, 2**64 - 1], [2**63, 0]]))
    dtype = draw(st.sampled_from(["F32", "BF16", "F4", "I64"]))
    entry = Obj([("dtype", dtype), ("shape", shape), ("data_offsets", [at, at])])
    case.header.pairs.append((f"empty{len(case.header.pairs)}", entry))


def m_dtype(draw: Draw, case: Case) -> None:
    es = entries(case)
    if es:
        e = draw(st.sampled_from(es))
        i = field_index(e, "dtype")
        if i is not None:
            other = ["Q3", "f32", "F32 ", "", "bf16", "F8_E4M3FN", Raw('"F\\u0033\\u0032"')]
            forms = [Obj([("F32", None)]), Obj([("BF16", [])]), Obj([("F16", None), ("F32", None)]), 5, None]
            e.pairs[i] = ("dtype", draw(st.sampled_from(sorted(OFFICIAL_BITS) + other + forms)))


def m_alias(draw: Draw, case: Case) -> None:
    """Another tensor on an existing tensor's bytes (overlap, unless empty), maybe under the same name."""
    if isinstance(case.header, Obj):
        pairs = [(k, v) for k, v in case.header.pairs if k != "__metadata__"]
        if pairs:
            name, entry = draw(st.sampled_from(pairs))
            new = draw(st.sampled_from([name, "alias"] + ([name + "2"] if isinstance(name, str) else [])))
            case.header.pairs.insert(
                draw(st.integers(0, len(case.header.pairs))), (new, copy.deepcopy(entry))
            )


def m_empty_tensor(draw: Draw, case: Case) -> None:
    """A tensor with no elements at a tensor boundary: valid unless its dims overflow or are not integers."""
    if isinstance(case.header, Obj):
        bounds = {0}
        for e in entries(case):
            i = field_index(e, "data_offsets")
            if i is not None and isinstance(e.pairs[i][1], list):
                bounds.update(o for o in e.pairs[i][1] if type(o) is int)
        at = draw(st.sampled_from(sorted(bounds)))
        shape = draw(
            st.sampled_from(
                [[0], [2, 0, 3], [0, 2**40, 2**40], [2**40, 2**40, 0], [0, 2**64 - 1], [0, 2**64], [True, 0]]
            )
        )
        dtype = draw(st.sampled_from(["F32", "BF16", "F4", "I64"]))
        entry = Obj([("dtype", dtype), ("shape", shape), ("data_offsets", [at, at])])
        case.header.pairs.append((draw(names.map(lambda s: s + "~")), entry))


def m_shift(draw: Draw, case: Case) -> None:
    """Move the last tensor's bytes by k, growing or shrinking the data to match: a gap or an overlap."""
    last: tuple[int, list[int], Obj, int] | None = None
    for e in entries(case):
        i = field_index(e, "data_offsets")
        if i is not None and isinstance(e.pairs[i][1], list) and len(e.pairs[i][1]) == 2:
            offsets = e.pairs[i][1]
            if all(type(o) is int for o in offsets) and (last is None or offsets[1] > last[0]):
                last = (offsets[1], offsets, e, i)
    if last is not None:
        _, (begin, end), e, i = last
        k = draw(st.integers(1, 4))
        if k <= begin and draw(st.booleans()):
            k = -k
        e.pairs[i] = ("data_offsets", [begin + k, end + k])
        case.data = case.data + bytes(k) if k > 0 else case.data[:k]


def m_dup_field(draw: Draw, case: Case) -> None:
    es = entries(case)
    if es:
        e = draw(st.sampled_from(es))
        if e.pairs:
            key, value = draw(st.sampled_from(e.pairs))
            e.pairs.insert(draw(st.integers(0, len(e.pairs))), (key, value))


def m_extra_field(draw: Draw, case: Case) -> None:
    es = entries(case)
    if es:
        e = draw(st.sampled_from(es))
        key = draw(st.sampled_from(["x", "Dtype", "__metadata__", "dtype ", ""]))
        depth = draw(st.sampled_from([1, 2, 63, 64, 65, 100, 127, 128, 129, 200]))
        value = draw(st.sampled_from([1, "s", None, Obj([]), Obj([("a", 1), ("a", 2)]), nested(depth)]))
        e.pairs.insert(draw(st.integers(0, len(e.pairs))), (key, value))


def m_drop_field(draw: Draw, case: Case) -> None:
    es = entries(case)
    if es:
        e = draw(st.sampled_from(es))
        if e.pairs:
            e.pairs.pop(draw(st.integers(0, len(e.pairs) - 1)))


def m_entry_form(draw: Draw, case: Case) -> None:
    if isinstance(case.header, Obj):
        idx = [i for i, (k, _) in enumerate(case.header.pairs) if k != "__metadata__"]
        if idx:
            i = draw(st.sampled_from(idx))
            name, entry = case.header.pairs[i]
            values = [v for _, v in entry.pairs] if isinstance(entry, Obj) else []
            forms = [values, values[:2], [*values, 1], None, 1, "x", []]
            case.header.pairs[i] = (name, draw(st.sampled_from(forms)))


def m_metadata(draw: Draw, case: Case) -> None:
    if isinstance(case.header, Obj):
        value = draw(
            st.sampled_from(
                [
                    None,
                    [],
                    "text",
                    Obj([]),
                    Obj([("a", 1)]),
                    Obj([("a", None)]),
                    Obj([("a", "b"), ("a", "c")]),
                    Obj([("a", Obj([]))]),
                    Obj([("a", "\ud800")]),
                    Obj([(Raw('"k\\udc00"'), "v")]),
                    Obj([("k\n", "v\x00")]),
                ]
            )
        )
        key = draw(st.sampled_from(["__metadata__", Raw('"\\u005f_metadata__"')]))
        case.header.pairs.insert(draw(st.integers(0, len(case.header.pairs))), (key, value))


def m_rename(draw: Draw, case: Case) -> None:
    if isinstance(case.header, Obj) and case.header.pairs:
        i = draw(st.integers(0, len(case.header.pairs) - 1))
        others = [k for k, _ in case.header.pairs]
        new = draw(
            st.sampled_from(
                [*others, "__metadata__", "", "t\ud800", "\udc00t", "😀", "a\nb", Raw('"t\\ud83d\\ude00"')]
            )
        )
        case.header.pairs[i] = (new, case.header.pairs[i][1])


def m_top(draw: Draw, case: Case) -> None:
    case.header = draw(st.sampled_from([[], "x", 1, None, Obj([]), [case.header], nested(70)]))


def m_shuffle(draw: Draw, case: Case) -> None:
    if isinstance(case.header, Obj):
        case.header.pairs = draw(st.permutations(case.header.pairs))


def m_swap_offsets(draw: Draw, case: Case) -> None:
    es = [e for e in entries(case) if field_index(e, "data_offsets") is not None]
    if len(es) >= 2:
        a, b = draw(st.permutations(es))[:2]
        i, j = field_index(a, "data_offsets"), field_index(b, "data_offsets")
        assert i is not None and j is not None
        a.pairs[i], b.pairs[j] = b.pairs[j], a.pairs[i]


def m_number_spelling(draw: Draw, case: Case) -> None:
    es = entries(case)
    if es:
        e = draw(st.sampled_from(es))
        i = field_index(e, draw(st.sampled_from(["shape", "data_offsets"])))
        if i is not None and isinstance(e.pairs[i][1], list) and e.pairs[i][1]:
            values = list(e.pairs[i][1])
            j = draw(st.integers(0, len(values) - 1))
            if type(values[j]) is int:
                v = values[j]
                spelled = [f"{v}.0", f"{v}e0", f"0{v}", f"-{v}", f" {v} ", f"{v}E+0", f"0x{v}"]
                values[j] = Raw(draw(st.sampled_from(spelled)))
                e.pairs[i] = (e.pairs[i][0], values)


def m_whitespace(draw: Draw, case: Case) -> None:
    pads = ["", " ", "\t\n\r ", "\x0c", "\x00", "\x0b", "\u00a0", "\ufeff", " x", "}"]
    if draw(st.booleans()):
        case.lead = draw(st.sampled_from(pads))
    else:
        case.trail = draw(st.sampled_from(pads))
    case.ascii_only = draw(st.booleans())


JSON_MUTATIONS = [
    m_offset_delta, m_offset_value, m_offsets_form, m_shape, m_dtype, m_alias, m_empty_tensor, m_dup_field,
    m_extra_field, m_drop_field, m_entry_form, m_metadata, m_rename, m_top, m_shuffle, m_swap_offsets,
    m_number_spelling, m_whitespace, m_shift,
]  # fmt: skip


def m_size_field(draw: Draw, case: Case) -> None:
    if draw(st.booleans()):
        case.size_delta = draw(st.integers(-3, 3))
    else:
        case.size_field = draw(st.sampled_from([0, 1, 7, 100_000_000, 100_000_001, 2**63, 2**64 - 1]))


def m_data_length(draw: Draw, case: Case) -> None:
    if draw(st.booleans()):
        case.extra = draw(st.binary(min_size=1, max_size=9))
    else:
        case.data_cut = draw(st.integers(1, 9))


def m_flip(draw: Draw, case: Case) -> None:
    byte = draw(
        st.sampled_from([0x00, 0x20, 0x22, 0x5C, 0x7B, 0x7D, 0x80, 0xC0, 0xED, 0xFF]) | st.integers(0, 255)
    )
    case.flips.append((draw(st.integers(0, 10_000)), byte))


def m_file_cut(draw: Draw, case: Case) -> None:
    case.file_cut = draw(st.integers(0, 10_000))


BYTE_MUTATIONS = [m_size_field, m_data_length, m_flip, m_file_cut]


# ---- the oracle and the comparison -----------------------------------------------------------------


def official_read(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]] | None:
    """What the official library reads from `path`: name -> (dtype, shape, bytes); None if it refuses."""
    try:
        with safe_open(str(path), "np") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 - not a dict
            meta = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
    except Exception:  # the official library's verdict, whatever its exception
        return None
    data = {name: bytes(t["data"]) for name, t in deserialize(path.read_bytes())}
    assert set(data) == set(meta)
    return {n: (dtype, shape, data[n]) for n, (dtype, shape) in meta.items()}


class _Pairs(list[tuple[str, Any]]):
    pass


def documented_divergences(path: Path) -> list[str]:
    """Which of the documented ways we are stricter apply to a file the official library reads;
    each as a phrase our message must then hold."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = raw[8 : 8 + n].decode("utf-8")  # UTF-8 JSON, as the official library read it
    doc = json.loads(text, object_pairs_hook=_Pairs)
    found = []

    def walk(node: Any, depth: int) -> tuple[bool, int]:
        dup, deepest = False, depth
        if isinstance(node, _Pairs):
            keys = [k for k, _ in node]
            dup = len(set(keys)) != len(keys)
            children = [v for _, v in node]
        elif isinstance(node, list):
            children = node
        else:
            return False, depth - 1
        for child in children:
            d, deep = walk(child, depth + 1)
            dup, deepest = dup or d, max(deepest, deep)
        return dup, deepest

    dup, depth = walk(doc, 1)
    if dup:
        found.append("duplicate key")
    if depth > JSON_DEPTH_LIMIT:
        found.append("nested deeper")
    for name, entry in doc:
        if name == "__metadata__":
            continue
        if not isinstance(entry, _Pairs) or sorted(k for k, _ in entry) != sorted(TENSOR_KEYS):
            found.append("header entry")
        elif not isinstance(dict(entry)["dtype"], str):
            found.append("'dtype' is not a string")
    return found


def check(path: Path) -> str:
    """Assert our reader agrees with the official library on `path` as documented; the outcome."""
    official = official_read(path)
    try:
        infos = read_header(path)
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg and str(path) in msg, msg
        if official is None:
            return "both refuse"
        allowed = documented_divergences(path)
        assert allowed, f"the official library reads this file, we refuse it: {msg}"
        assert any(phrase in msg for phrase in allowed), (allowed, msg)
        return "documented divergence: " + allowed[0]
    assert official is not None, f"we read a file the official library refuses: {sorted(infos)}"
    assert not documented_divergences(path)
    assert set(infos) == set(official)
    for name, (dtype, shape, data) in official.items():
        info = infos[name]
        assert (info.dtype, info.shape, info.nbytes) == (dtype, shape, len(data))
        with open(info.path, "rb") as f:  # the header's offsets point at the official library's bytes
            f.seek(info.offset)
            assert f.read(info.nbytes) == data
        if dtype in READABLE:
            try:
                array = read_tensor(info, "raw")
            except UserError as e:  # only an empty tensor whose dims numpy cannot index
                assert info.nbytes == 0 and "numpy cannot hold" in str(e), str(e)
                continue
            assert array.shape == shape and array.tobytes() == data
        else:
            with pytest.raises(UserError, match="only BF16, F16, F32 can be read"):
                read_tensor(info)
    return "both read"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "model.safetensors"


def write(path: Path, case: Case) -> Path:
    path.write_bytes(case.to_bytes())
    return path


# ---- tests -------------------------------------------------------------------------------------------


VALID = [m_shuffle, v_reshape, v_same_size_dtype, v_empty_tensor]


@given(case=valid_cases(), data=st.data())
def test_valid_files_read_alike(work: Path, case: Case, data: st.DataObject) -> None:
    for mutate in data.draw(st.lists(st.sampled_from(VALID), max_size=3)):
        mutate(data.draw, case)
    assert check(write(work, case)) == "both read"


@given(case=valid_cases(), data=st.data())
def test_mutated_headers(work: Path, case: Case, data: st.DataObject) -> None:
    for mutate in data.draw(st.lists(st.sampled_from(JSON_MUTATIONS), min_size=1, max_size=3)):
        mutate(data.draw, case)
    event(check(write(work, case)))


@given(case=st.one_of(valid_cases(), official_cases()), data=st.data())
def test_mutated_bytes(work: Path, case: Case, data: st.DataObject) -> None:
    for mutate in data.draw(st.lists(st.sampled_from(BYTE_MUTATIONS), min_size=1, max_size=2)):
        mutate(data.draw, case)
    event(check(write(work, case)))


T = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


@pytest.mark.parametrize(
    "header, data",
    [
        ('{"t":' + T + "}", 4),
        ('{"t":' + T + ',"t":' + T + "}", 4),  # duplicate name: official keeps the last
        ('{"__metadata__":{"a":"b","a":"c"},"t":' + T + "}", 4),
        ('{"__metadata__":{"a":"b"},"__metadata__":{"a":"b"},"t":' + T + "}", 4),
        ('{"__metadata__":null,"t":' + T + "}", 4),
        ('{"t":' + T[:-1] + ',"x":' + "[" * 100 + "]" * 100 + "}}", 4),  # ignored by official, deep
        ('{"t":' + T[:-1] + ',"x":' + "[" * 130 + "]" * 130 + "}}", 4),  # past serde_json's limit
        ('{"t":["F32",[1],[0,4]]}', 4),
        ('{"t":{"dtype":{"F32":null},"shape":[1],"data_offsets":[0,4]}}', 4),
        ('{"a":' + T + ',"b":' + T + "}", 4),  # the same bytes twice
        ('{"t":{"dtype":"F32","shape":[1],"data_offsets":[-0,4]}}', 4),
        ('{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}}', 4),
        ('{"t\\ud800":' + T + "}", 4),
        ('{"t\\ud83d\\ude00":' + T + "}", 4),
        (' \t\n\r{"t":' + T + "} \t\n\r", 4),
        ('{"t":' + T + "}\x00", 4),
        ('{"t":' + T + "}", 5),
        ('{"t":' + T + "}", 3),
        ('{"t":{"dtype":"F32","shape":[1099511627776,1099511627776,0],"data_offsets":[0,0]}}', 0),
        ('{"t":{"dtype":"F32","shape":[0,1099511627776,1099511627776],"data_offsets":[0,0]}}', 0),
        ('{"t":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}}', 0),
        ('{"t":{"dtype":"U8","shape":[2305843009213693952],"data_offsets":[0,2305843009213693952]}}', 0),
        ('{"t":{"dtype":"F32","shape":[0,18446744073709551616],"data_offsets":[0,0]}}', 0),
        ('{"t":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', 0),
        ('{"t":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', 4),
        ('{"t":{"dtype":"U8","shape":[1],"data_offsets":[false,true]}}', 1),
        ('{"__metadata__":[]}', 0),
        ('{"__metadata__":"x"}', 0),
        ('{"__metadata__":{"a":1}}', 0),
        ('{"t":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}', 1),  # 12 bits
        ('{"t":{"dtype":"F6_E2M3","shape":[2],"data_offsets":[0,1]}}', 1),
        ('{"t":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}', 3),
        ('{"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8),  # a gap before the first tensor
        ('{"a":' + T + ',"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}', 12),
        (b'{"t\xff":' + T.encode() + b"}", 4),  # not UTF-8
        (b'{"t\xed\xa0\x80":' + T.encode() + b"}", 4),  # an encoded surrogate: not UTF-8 either
        ('{"t":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551615,4]}}', 4),
        ("{}", 0),
        ("[]", 0),
        ("", 0),
    ],
)
def test_corpus(tmp_path: Path, header: str | bytes, data: int) -> None:
    blob = header if isinstance(header, bytes) else header.encode()
    check(write(tmp_path / "model.safetensors", Case(None, bytes(range(data)), raw_header=blob)))
