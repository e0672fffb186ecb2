from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from exporter.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    iter_row_chunks,
    open_checkpoint,
    read_header,
    read_rows,
    read_tensor,
)
from exporter.safetensors_writer import SafetensorsWriter
from ple_export.errors import UserError

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(37, 11, generator=g).to(dtype),
        "b.norm": torch.randn(29, generator=g).to(dtype),
        "c.cube": torch.randn(5, 3, 4, generator=g).to(dtype),
        "d.scalar": torch.randn(1, generator=g).to(dtype),
    }


def _bits(t: torch.Tensor) -> np.ndarray:
    """Raw bytes of a torch tensor as a uint8 numpy array."""
    return t.contiguous().view(torch.uint8).numpy()


def _raw_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _write_raw(path: Path, header: dict, data: bytes, header_size: int | None = None) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    n = len(blob) if header_size is None else header_size
    path.write_bytes(n.to_bytes(8, "little") + blob + data)


# ---- interop with the official library -----------------------------------------------------------


@pytest.mark.parametrize("code", ["BF16", "F16", "F32"])
def test_reads_official_single_file(tmp_path: Path, code: str) -> None:
    tensors = _tensors(TORCH[code])
    save_file(tensors, str(tmp_path / SINGLE_FILE), metadata={"format": "pt"})
    infos = open_checkpoint(tmp_path)
    assert set(infos) == set(tensors)
    for name, t in tensors.items():
        info = infos[name]
        assert info.dtype == code and info.shape == tuple(t.shape)
        got = read_tensor(info)
        assert got.dtype == np.float32 and got.shape == tuple(t.shape)
        np.testing.assert_array_equal(got, t.float().numpy())
        raw = read_tensor(info, out_dtype="raw")
        if code == "BF16":
            assert raw.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(_raw_bytes(raw), _bits(t).reshape(-1))


def test_reads_official_sharded_with_index(tmp_path: Path) -> None:
    tensors = _tensors(torch.bfloat16)
    names = list(tensors)
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({n: tensors[n] for n in names[:2]}, str(tmp_path / s1))
    save_file({n: tensors[n] for n in names[2:]}, str(tmp_path / s2))
    wmap = {n: (s1 if i < 2 else s2) for i, n in enumerate(names)}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": wmap}))
    infos = open_checkpoint(tmp_path)
    assert set(infos) == set(tensors)
    for name, t in tensors.items():
        assert infos[name].path.name == wmap[name]
        np.testing.assert_array_equal(read_tensor(infos[name]), t.float().numpy())


@pytest.mark.parametrize("code", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 600])
def test_written_files_load_with_official(tmp_path: Path, code: str, max_shard_bytes: int) -> None:
    tensors = _tensors(torch.float32)
    decl = [(n, code, tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsWriter(tmp_path, decl, max_shard_bytes=max_shard_bytes, metadata={"k": "v"}) as w:
        for n, t in tensors.items():
            w.write(n, t.numpy())  # float32, converted by the writer
    files = sorted(tmp_path.glob("*.safetensors"))
    if max_shard_bytes > 1000:
        assert [f.name for f in files] == [SINGLE_FILE]
        assert not (tmp_path / INDEX_FILE).exists()
    else:
        assert len(files) > 1 and files[0].name.endswith(f"-of-{len(files):05d}.safetensors")
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert set(index["weight_map"]) == set(tensors)
        total = sum(t.numel() * TORCH[code].itemsize for t in tensors.values())
        assert index["metadata"]["total_size"] == total
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f))
        assert not set(part) & set(loaded)
        loaded.update(part)
    assert set(loaded) == set(tensors)
    for n, t in tensors.items():
        assert loaded[n].dtype == TORCH[code]
        # torch's float32 -> bf16/f16 casts round to nearest even, like the writer's
        assert torch.equal(loaded[n], t.to(TORCH[code]))
    # and our reader agrees
    infos = open_checkpoint(tmp_path)
    for n, t in tensors.items():
        np.testing.assert_array_equal(read_tensor(infos[n]), t.to(TORCH[code]).float().numpy())


def test_writer_header_padded_and_deterministic(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    blobs = []
    for sub in ("x", "y"):
        with SafetensorsWriter(tmp_path / sub, [("t", "BF16", (3, 4)), ("u", "F32", (3,))]) as w:
            w.write("t", arr)
            w.write("u", arr[0, :3])
        blobs.append((tmp_path / sub / SINGLE_FILE).read_bytes())
    assert blobs[0] == blobs[1]
    n = int.from_bytes(blobs[0][:8], "little")
    assert n % 8 == 0
    assert blobs[0][8 : 8 + n].decode().startswith("{")
    assert len(blobs[0]) == 8 + n + 12 * 2 + 3 * 4


def test_writer_accepts_native_dtype_and_row_chunks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    full = rng.standard_normal((10, 6)).astype(np.float32)
    with SafetensorsWriter(tmp_path / "a", [("t", "BF16", (10, 6))]) as w:
        w.write("t", full.astype(ml_dtypes.bfloat16))
    with SafetensorsWriter(tmp_path / "b", [("t", "BF16", (10, 6))]) as w:
        for start, stop in [(0, 3), (3, 4), (4, 10)]:
            w.write("t", full[start:stop])
    assert (tmp_path / "a" / SINGLE_FILE).read_bytes() == (tmp_path / "b" / SINGLE_FILE).read_bytes()


def test_writer_replaces_stale_checkpoint_files(tmp_path: Path) -> None:
    decl = [("a", "F32", (100,)), ("b", "F32", (100,))]
    with SafetensorsWriter(tmp_path, decl, max_shard_bytes=400) as w:
        w.write("a", np.zeros(100, np.float32))
        w.write("b", np.zeros(100, np.float32))
    assert (tmp_path / INDEX_FILE).exists()
    with SafetensorsWriter(tmp_path, decl) as w:
        w.write("a", np.ones(100, np.float32))
        w.write("b", np.ones(100, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    assert read_tensor(open_checkpoint(tmp_path)["b"])[0] == 1.0


# ---- reading helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["BF16", "F16", "F32"])
def test_read_rows_sub_ranges_and_chunks(tmp_path: Path, code: str) -> None:
    tensors = _tensors(TORCH[code])
    save_file(tensors, str(tmp_path / SINGLE_FILE))
    infos = open_checkpoint(tmp_path)
    for name in tensors:
        info = infos[name]
        full = read_tensor(info)
        rows = info.shape[0]
        for start, stop in [(0, 1), (2, 5), (rows - 1, rows), (3, 3), (1, rows)]:
            if not 0 <= start <= stop <= rows:
                continue
            np.testing.assert_array_equal(read_rows(info, start, stop), full[start:stop])
        raw = read_rows(info, 0, rows, out_dtype="raw")
        np.testing.assert_array_equal(raw.astype(np.float32), full)
        for max_bytes in (1, info.row_bytes * 2 + 1, 1 << 20):
            chunks = list(iter_row_chunks(info, max_bytes))
            assert chunks[0][0] == 0 and chunks[-1][1] == info.shape[0]
            assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
            limit = max(max_bytes, info.row_bytes)
            assert all((stop - start) * info.row_bytes <= limit for start, stop in chunks)
            np.testing.assert_array_equal(np.concatenate([read_rows(info, a, b) for a, b in chunks]), full)
        with pytest.raises(ValueError):
            read_rows(info, 0, info.shape[0] + 1)


def test_offsets_point_at_each_tensors_bytes(tmp_path: Path) -> None:
    tensors = _tensors(torch.bfloat16)
    save_file(tensors, str(tmp_path / SINGLE_FILE))
    infos = open_checkpoint(tmp_path)
    data = (tmp_path / SINGLE_FILE).read_bytes()
    for name in ("a.weight", "b.norm"):
        info = infos[name]
        assert data[info.offset : info.offset + info.nbytes] == _bits(tensors[name]).tobytes()
        assert read_tensor(info, "raw").tobytes() == _bits(tensors[name]).tobytes()


# ---- validation errors ---------------------------------------------------------------------------


def _sharded(tmp_path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    tensors = _tensors(torch.float32)
    decl = [(n, "F32", tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsWriter(tmp_path, decl, max_shard_bytes=800) as w:
        for n, t in tensors.items():
            w.write(n, t.numpy())
    wmap = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert len(set(wmap.values())) > 1
    return wmap, tensors


def _raises(folder: Path, *needles: str) -> str:
    with pytest.raises(UserError) as ei:
        open_checkpoint(folder)
    msg = str(ei.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_error_no_safetensors(tmp_path: Path) -> None:
    _raises(tmp_path, str(tmp_path), SINGLE_FILE)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    _raises(tmp_path, "weights.safetensors")
    _raises(tmp_path / "nope", "not a directory")


def test_error_index_malformed(tmp_path: Path) -> None:
    (tmp_path / INDEX_FILE).write_text("{not json")
    _raises(tmp_path, str(tmp_path / INDEX_FILE), "not valid JSON")
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    _raises(tmp_path, str(tmp_path / INDEX_FILE), "weight_map")
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    _raises(tmp_path, "../x.safetensors")


def test_error_missing_shard(tmp_path: Path) -> None:
    wmap, _ = _sharded(tmp_path)
    victim = sorted(set(wmap.values()))[-1]
    (tmp_path / victim).unlink()
    tensor = next(n for n, s in wmap.items() if s == victim)
    _raises(tmp_path, victim, tensor, "missing")


def test_error_tensor_absent_from_shard(tmp_path: Path) -> None:
    wmap, _ = _sharded(tmp_path)
    wmap["ghost.weight"] = sorted(set(wmap.values()))[0]
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": wmap}))
    _raises(tmp_path, "ghost.weight", wmap["ghost.weight"])


def test_unindexed_tensor_in_shard_is_included(tmp_path: Path) -> None:
    wmap, tensors = _sharded(tmp_path)
    dropped = "b.norm"
    del wmap[dropped]
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": wmap}))
    infos = open_checkpoint(tmp_path)
    np.testing.assert_array_equal(read_tensor(infos[dropped]), tensors[dropped].numpy())


def test_error_duplicate_across_shards(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"x": torch.ones(2), "y": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    wmap = {"x": "s1.safetensors", "y": "s2.safetensors"}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": wmap}))
    _raises(tmp_path, "tensor x", "s1.safetensors", "s2.safetensors")


def test_error_header_not_json(tmp_path: Path) -> None:
    save_file(_tensors(torch.float32), str(tmp_path / SINGLE_FILE))
    data = bytearray((tmp_path / SINGLE_FILE).read_bytes())
    data[8] = ord("[")
    data[9:12] = b"\xff\xfe!"
    (tmp_path / SINGLE_FILE).write_bytes(bytes(data))
    _raises(tmp_path, str(tmp_path / SINGLE_FILE), "not valid JSON")


def test_error_header_size_larger_than_file(tmp_path: Path) -> None:
    _write_raw(
        tmp_path / SINGLE_FILE,
        {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
        b"\0" * 4,
        header_size=10_000,
    )
    _raises(tmp_path, str(tmp_path / SINGLE_FILE), "header size 10000")
    (tmp_path / SINGLE_FILE).write_bytes(b"\1\0")
    _raises(tmp_path, str(tmp_path / SINGLE_FILE), "truncated")


def test_error_truncated(tmp_path: Path) -> None:
    save_file(_tensors(torch.bfloat16), str(tmp_path / SINGLE_FILE))
    path = tmp_path / SINGLE_FILE
    path.write_bytes(path.read_bytes()[:-3])
    _raises(tmp_path, str(path), "truncated")


def test_error_truncated_shard(tmp_path: Path) -> None:
    wmap, _ = _sharded(tmp_path)
    shard = tmp_path / sorted(set(wmap.values()))[0]
    shard.write_bytes(shard.read_bytes()[:-5])
    _raises(tmp_path, str(shard), "truncated")


@pytest.mark.parametrize(
    "offsets, shape",
    [([0, 12], [2, 2]), ([4, 24], [2, 2]), ([8, 4], [1]), ([0, 16], [2, -2])],
)
def test_error_bad_offsets(tmp_path: Path, offsets: list[int], shape: list[int]) -> None:
    _write_raw(
        tmp_path / SINGLE_FILE,
        {"w.bad": {"dtype": "F32", "shape": shape, "data_offsets": offsets}},
        b"\0" * 32,
    )
    _raises(tmp_path, str(tmp_path / SINGLE_FILE), "w.bad")


def test_error_malformed_entry_and_duplicate_key(tmp_path: Path) -> None:
    _write_raw(tmp_path / SINGLE_FILE, {"w.odd": {"dtype": "F32", "shape": [1]}}, b"\0" * 4)
    _raises(tmp_path, "w.odd", "data_offsets")
    blob = (
        b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],'
        b'"data_offsets":[0,4]}}'
    )
    (tmp_path / SINGLE_FILE).write_bytes(len(blob).to_bytes(8, "little") + blob + b"\0" * 4)
    _raises(tmp_path, "duplicate key 't'")


def test_unreadable_dtype_opens_but_reading_it_is_user_error(tmp_path: Path) -> None:
    # headers with any safetensors dtype open (multimodal checkpoints hold tensors we never read)
    tensors = {"ok": torch.zeros(2), "steps.count": torch.zeros(3, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / SINGLE_FILE))
    infos = open_checkpoint(tmp_path)
    assert infos["steps.count"].dtype == "I64" and infos["steps.count"].nbytes == 24
    np.testing.assert_array_equal(read_tensor(infos["ok"]), np.zeros(2, np.float32))
    with pytest.raises(UserError, match=r"steps\.count has dtype I64"):
        read_tensor(infos["steps.count"])


def test_error_unknown_dtype(tmp_path: Path) -> None:
    blob = b'{"t":{"dtype":"Q3","shape":[1],"data_offsets":[0,1]}}'
    (tmp_path / SINGLE_FILE).write_bytes(len(blob).to_bytes(8, "little") + blob + b"\0")
    _raises(tmp_path, "unknown dtype Q3")


def test_read_after_truncation_is_user_error(tmp_path: Path) -> None:
    save_file(_tensors(torch.float32), str(tmp_path / SINGLE_FILE))
    infos = read_header(tmp_path / SINGLE_FILE)
    path = tmp_path / SINGLE_FILE
    path.write_bytes(path.read_bytes()[:-10])
    last = max(infos.values(), key=lambda i: i.offset)
    with pytest.raises(UserError, match="truncated"):
        read_tensor(last)


# ---- writer misuse -------------------------------------------------------------------------------


def _decl() -> list[tuple[str, str, tuple[int, ...]]]:
    return [("a", "BF16", (4, 3)), ("b", "F32", (5,))]


def test_writer_out_of_order_and_unknown(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path, _decl())
    with pytest.raises(ValueError, match="out of order"):
        w.write("b", np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="not declared"):
        w.write("zzz", np.zeros(5, np.float32))
    w.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="only 12 of 24 bytes"):
        w.write("b", np.zeros(5, np.float32))
    w.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="already fully written"):
        w.write("a", np.zeros((1, 3), np.float32))
    w.write("b", np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="every declared tensor"):
        w.write("b", np.zeros(1, np.float32))
    w.close()
    with pytest.raises(ValueError, match="after close"):
        w.write("a", np.zeros((1, 3), np.float32))


def test_writer_too_much_too_little(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path, _decl())
    with pytest.raises(ValueError, match="exceed"):
        w.write("a", np.zeros((5, 3), np.float32))
    w.write("a", np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="tensor a has 18 of 24 bytes written and 1 more"):
        w.close()


def test_writer_bad_data(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path, _decl())
    with pytest.raises(ValueError, match="float64"):
        w.write("a", np.zeros((4, 3), np.float64))
    with pytest.raises(ValueError, match="does not fit"):
        w.write("a", np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        w.write("a", np.zeros(12, np.float32))
    w.abort()


def test_writer_bad_declarations(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="twice"):
        SafetensorsWriter(tmp_path, [("a", "F32", (1,)), ("a", "F32", (1,))])
    with pytest.raises(ValueError, match="unsupported dtype"):
        SafetensorsWriter(tmp_path, [("a", "I64", (1,))])
    with pytest.raises(ValueError, match="str to str"):
        SafetensorsWriter(tmp_path, [("a", "F32", (1,))], metadata={"n": 1})  # type: ignore[dict-item]


def test_writer_context_manager_error_writes_no_index(tmp_path: Path) -> None:
    decl = [("a", "F32", (100,)), ("b", "F32", (100,))]
    with pytest.raises(RuntimeError), SafetensorsWriter(tmp_path, decl, max_shard_bytes=400) as w:
        w.write("a", np.zeros(100, np.float32))
        raise RuntimeError("boom")
    assert not (tmp_path / INDEX_FILE).exists()
    # An incomplete shard is reported as truncated on reading.
    with pytest.raises(UserError, match="truncated"):
        read_header(w.paths[1])


# ---- header rules, as the official library's read_metadata / Metadata::validate --------------------
# Each test builds a file by hand, checks the official library's verdict on it (so the rule is the
# format's, not ours) and ours; each fails if our check for that rule is removed.


def _f32(begin: int, end: int, shape: list[int] | None = None, dtype: str = "F32") -> str:
    shape = [(end - begin) // 4] if shape is None else shape
    return json.dumps({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]})


def _file(tmp_path: Path, header: str | bytes, data: bytes = b"", size_field: int | None = None) -> Path:
    blob = header.encode() if isinstance(header, str) else header
    path = tmp_path / SINGLE_FILE
    n = len(blob) if size_field is None else size_field
    path.write_bytes(n.to_bytes(8, "little") + blob + data)
    return path


def _official_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), "np") as f:
            list(f.keys())
        return True
    except Exception:
        return False


def _refused(path: Path, *needles: str) -> str:
    """Both the official library and ours refuse `path`; our one-line message holds `needles`."""
    assert not _official_accepts(path)
    with pytest.raises(UserError) as ei:
        read_header(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def _accepted(path: Path) -> dict:
    assert _official_accepts(path)
    return read_header(path)


def test_header_size_limit_is_the_official_100_000_000(tmp_path: Path) -> None:
    _refused(_file(tmp_path, "{}", size_field=100_000_001), "header size 100000001", "limit of 100000000")
    msg = _refused(_file(tmp_path, "{}", size_field=100_000_000), "header size 100000000")
    assert "larger than the file" in msg


def test_header_may_be_padded_with_json_whitespace(tmp_path: Path) -> None:
    infos = _accepted(_file(tmp_path, ' \t\r\n{"t": ' + _f32(0, 4) + "} \n\t\r  ", b"\1\2\3\4"))
    assert infos["t"].nbytes == 4 and infos["t"].offset == (tmp_path / SINGLE_FILE).stat().st_size - 4
    for pad in ("\0", "\x0c", "\u00a0"):  # not JSON whitespace
        _refused(_file(tmp_path, '{"t": ' + _f32(0, 4) + "}" + pad, b"\0" * 4), "not valid JSON")


def test_header_must_be_utf8(tmp_path: Path) -> None:
    header = b'{"t\xff": ' + _f32(0, 4).encode() + b"}"
    _refused(_file(tmp_path, header, b"\0" * 4), "not valid JSON", "invalid UTF-8 at byte 11")


def test_header_must_be_an_object(tmp_path: Path) -> None:
    _refused(_file(tmp_path, "[]"), "header is an array, not a JSON object")


def test_header_json_constants_nan_and_infinity_are_refused(tmp_path: Path) -> None:
    _refused(
        _file(tmp_path, '{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'), "not valid JSON"
    )


def test_header_minus_zero_is_not_an_integer(tmp_path: Path) -> None:
    # serde_json reads -0 as the float -0.0, which no integer field accepts
    _refused(
        _file(tmp_path, '{"t": {"dtype": "F32", "shape": [1], "data_offsets": [-0, 4]}}', b"\0" * 4), "-0.0"
    )


def test_header_integers_stop_below_2_64(tmp_path: Path) -> None:
    big = 1 << 64
    header = '{"t": {"dtype": "U8", "shape": [%d], "data_offsets": [0, 0]}}'
    _refused(_file(tmp_path, header % big), "'shape' is not a list of integers")
    header = '{"t": {"dtype": "U8", "shape": [0, %d], "data_offsets": [0, 0]}}'
    assert _accepted(_file(tmp_path, header % (big - 1)))["t"].shape == (0, big - 1)
    _refused(_file(tmp_path, header % big), "'shape' is not a list of integers")


def test_header_booleans_are_not_integers(tmp_path: Path) -> None:
    _refused(
        _file(tmp_path, '{"t": {"dtype": "U8", "shape": [true], "data_offsets": [0, 1]}}', b"\0"), "shape"
    )


def test_header_lone_surrogate_escapes_are_refused(tmp_path: Path) -> None:
    _refused(_file(tmp_path, '{"t\\ud800": ' + _f32(0, 4) + "}", b"\0" * 4), "lone UTF-16 surrogate")
    meta = '{"__metadata__": {"k": "\\udc00"}, "t": ' + _f32(0, 4) + "}"
    _refused(_file(tmp_path, meta, b"\0" * 4), "__metadata__", "lone UTF-16 surrogate")
    # a surrogate pair is one character, fine
    assert list(_accepted(_file(tmp_path, '{"t\\ud83d\\ude00": ' + _f32(0, 4) + "}", b"\0" * 4))) == [
        "t\U0001f600"
    ]


def test_header_metadata_is_null_or_str_to_str(tmp_path: Path) -> None:
    t = '"t": ' + _f32(0, 4)
    assert list(_accepted(_file(tmp_path, '{"__metadata__": null, ' + t + "}", b"\0" * 4))) == ["t"]
    _refused(_file(tmp_path, '{"__metadata__": ["a"], ' + t + "}", b"\0" * 4), "__metadata__ is an array")
    _refused(
        _file(tmp_path, '{"__metadata__": {"a": 1}, ' + t + "}", b"\0" * 4), "__metadata__ value for 'a'"
    )


def test_header_entry_must_be_an_object(tmp_path: Path) -> None:
    _refused(_file(tmp_path, '{"w.x": null}'), "tensor 'w.x'", "header entry is null")


def test_header_entry_needs_every_key(tmp_path: Path) -> None:
    _refused(_file(tmp_path, '{"w.x": {"dtype": "F32", "data_offsets": [0, 0]}}'), "tensor 'w.x'", "no shape")


def test_header_dtype_must_be_a_string(tmp_path: Path) -> None:
    _refused(
        _file(tmp_path, '{"w.x": {"dtype": 5, "shape": [], "data_offsets": [0, 4]}}', b"\0" * 4), "'dtype'"
    )


def test_header_data_offsets_are_exactly_two(tmp_path: Path) -> None:
    header = '{"w.x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}'
    _refused(_file(tmp_path, header, b"\0" * 4), "tensor 'w.x'", "'data_offsets' is not a pair")


def test_header_element_count_overflow_as_the_official_running_product(tmp_path: Path) -> None:
    big = 1 << 40
    _refused(_file(tmp_path, '{"t": ' + _f32(0, 0, [big, big, 0]) + "}"), "2**64 or more elements")
    infos = _accepted(_file(tmp_path, '{"t": ' + _f32(0, 0, [0, big, big]) + "}"))
    assert infos["t"].shape == (0, big, big) and infos["t"].nbytes == 0
    with pytest.raises(UserError, match="numpy cannot hold"):
        read_tensor(infos["t"])


def test_header_bit_count_overflow(tmp_path: Path) -> None:
    _refused(_file(tmp_path, '{"t": ' + _f32(0, 0, [1 << 61]) + "}"), "2**64 or more bits")


def test_header_sub_byte_dtypes_fill_whole_bytes(tmp_path: Path) -> None:
    _refused(_file(tmp_path, '{"t": ' + _f32(0, 2, [3], "F4") + "}", b"\0\0"), "whole number of bytes")
    infos = _accepted(_file(tmp_path, '{"t": ' + _f32(0, 2, [4], "F4") + "}", b"\0\0"))
    assert infos["t"].nbytes == 2
    with pytest.raises(UserError, match="has dtype F4"):
        read_tensor(infos["t"])


def test_header_offsets_end_before_begin(tmp_path: Path) -> None:
    header = '{"a": ' + _f32(0, 4) + ', "b": ' + _f32(4, 0, [0]) + "}"
    _refused(_file(tmp_path, header, b"\0" * 4), "tensor 'b'", "end before they begin")


def test_header_offsets_leave_no_gap(tmp_path: Path) -> None:
    header = '{"a": ' + _f32(0, 4) + ', "b": ' + _f32(8, 12) + "}"
    _refused(_file(tmp_path, header, b"\0" * 12), "tensor 'b'", "gap")
    _refused(_file(tmp_path, '{"a": ' + _f32(4, 8) + "}", b"\0" * 8), "tensor 'a'", "gap")


def test_header_offsets_do_not_overlap(tmp_path: Path) -> None:
    # the case: two tensors on the same bytes
    header = '{"a": ' + _f32(0, 4) + ', "b": ' + _f32(0, 4) + "}"
    _refused(_file(tmp_path, header, b"\0" * 4), "overlap tensor")
    header = '{"a": ' + _f32(0, 8) + ', "b": ' + _f32(4, 12) + "}"
    _refused(_file(tmp_path, header, b"\0" * 12), "tensor 'b'", "overlap tensor 'a'")


def test_header_tensors_in_any_key_order_and_empty_ones_anywhere(tmp_path: Path) -> None:
    header = '{"c": ' + _f32(4, 12) + ', "z": ' + _f32(4, 4, [0, 3]) + ', "a": ' + _f32(0, 4) + "}"
    data = np.arange(3, dtype="<f4").tobytes()
    infos = _accepted(_file(tmp_path, header, data))
    assert list(infos) == ["a", "z", "c"]  # data-offset order
    np.testing.assert_array_equal(read_tensor(infos["c"]), [1.0, 2.0])
    assert read_tensor(infos["z"]).shape == (0, 3)


def test_header_data_must_end_the_file(tmp_path: Path) -> None:
    _refused(
        _file(tmp_path, '{"t": ' + _f32(0, 4) + "}", b"\0" * 5), "1 stray bytes after the end of tensor 't'"
    )
    _refused(_file(tmp_path, "{}", b"\0"), "1 stray bytes")


def test_header_duplicate_keys_are_refused_everywhere(tmp_path: Path) -> None:
    # The format forbids duplicate keys; the official library keeps the last tensor or metadata value
    # (and refuses a repeated field within an entry), we refuse them all.
    t = _f32(0, 4)
    path = _file(tmp_path, '{"__metadata__": {"k": "1", "k": "2"}, "t": ' + t + "}", b"\0" * 4)
    assert _official_accepts(path)
    with pytest.raises(UserError, match="__metadata__ has duplicate key 'k'"):
        read_header(path)
    path = _file(tmp_path, '{"t": ' + t[:-1] + ', "dtype": "F32"}}', b"\0" * 4)
    _refused(path, "tensor 't' has duplicate key 'dtype'")


def test_header_entries_with_other_keys_or_forms_are_refused(tmp_path: Path) -> None:
    # Stricter than the official library, which ignores other keys and reads [dtype, shape, offsets]
    # and {"F32": null} as a dtype: no writer produces these.
    for entry, needle in [
        (_f32(0, 4)[:-1] + ', "extra": 1}', "unexpected key 'extra'"),
        ('["F32", [1], [0, 4]]', "header entry is an array"),
        ('{"dtype": {"F32": null}, "shape": [1], "data_offsets": [0, 4]}', "'dtype' is not a string"),
    ]:
        path = _file(tmp_path, '{"t": ' + entry + "}", b"\0" * 4)
        assert _official_accepts(path)
        with pytest.raises(UserError, match=re.escape(needle)):
            read_header(path)


def test_header_nesting_is_a_user_error(tmp_path: Path) -> None:
    deep = "[" * 5000 + "]" * 5000
    _refused(_file(tmp_path, '{"t": ' + _f32(0, 0)[:-1] + ', "x": ' + deep + "}}"), "nested deeper")


def test_header_names_with_control_characters_keep_messages_one_line(tmp_path: Path) -> None:
    header = json.dumps({"a\nb\x00": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})
    msg = _refused(_file(tmp_path, header, b"\0" * 4), "inconsistent")
    assert repr("a\nb\x00") in msg
