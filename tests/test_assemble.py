"""The GGUF assembler: a file built from tensors of other GGUFs is byte for byte the file the
engine's layout gives (KVs copied raw, each tensor's bytes from its source, every tensor padded
to the alignment), and tensor_data_diff tells such files apart."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import gguf
import pytest

from quantsweep.errors import GGUFFormatError
from quantsweep.gguf.assemble import Piece, assemble, pieces, tensor_data_diff
from quantsweep.gguf.reader import GGUFTable, read_model, read_table, verify_complete
from quantsweep.gguf.types import tensor_nbytes
from quantsweep.gguf.writer import encode_kv, gguf_string, padded, tensor_info

F32, F16, Q8_0, BF16 = 0, 1, 8, 30
# name -> shape; the order is the model's
SHAPES = {"token_embd.weight": (64, 3), "blk.0.attn_norm.weight": (64,),
          "output.weight": (96, 2), "blk.0.ffn_down.weight": (32, 5)}
TYPES_A = {"token_embd.weight": F16, "blk.0.attn_norm.weight": F32, "output.weight": F16,
           "blk.0.ffn_down.weight": BF16}
TYPES_B = {"token_embd.weight": Q8_0, "blk.0.attn_norm.weight": F32, "output.weight": Q8_0,
           "blk.0.ffn_down.weight": Q8_0}  # q8_0 sizes (204, 204, 170 bytes) need padding


def int32_kv(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<Ii", 5, value)


def int32_array_kv(key: str, values: list[int]) -> bytes:
    return gguf_string(key) + struct.pack(f"<IIQ{len(values)}i", 9, 5, len(values), *values)


def template_kvs(alignment: int | None = None) -> list[bytes]:
    kvs = [encode_kv("general.architecture", "llama"), encode_kv("general.name", "tiny")]
    if alignment:
        kvs.append(encode_kv("general.alignment", alignment))  # uint32, as the engine writes it
    return kvs + [encode_kv("general.file_type", 32), int32_kv("test.int32", -3),
                  encode_kv("tokenizer.ggml.tokens", ["<s>", "a", "bé"]),
                  int32_array_kv("tokenizer.ggml.token_type", [3, 1, 1]),
                  encode_kv("test.f32", 0.5), encode_kv("test.drop", "x")]


def data(name: str, type_id: int, seed: int) -> bytes:
    n = tensor_nbytes(type_id, SHAPES[name])
    return bytes((seed * 131 + i * 7 + len(name)) % 251 for i in range(n))


def write_gguf(path: Path, kvs: list[bytes], tensors: list[tuple[str, tuple[int, ...], int, bytes]],
               alignment: int = 32) -> Path:
    """A GGUF as llama-quantize lays it out: header padded to the alignment, then every tensor's
    data padded to the alignment, the last one included."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    offset, body = 0, b""
    for name, shape, type_id, raw in tensors:
        head += tensor_info(name, shape, type_id, offset)
        body += raw + b"\0" * (padded(len(raw), alignment) - len(raw))
        offset += padded(len(raw), alignment)
    path.write_bytes(head + b"\0" * (-len(head) % alignment) + body)
    return path


def pool_file(path: Path, types: dict[str, int], seed: int, alignment: int | None = None,
              order: list[str] | None = None) -> Path:
    tensors = [(n, SHAPES[n], types[n], data(n, types[n], seed)) for n in order or SHAPES]
    return write_gguf(path, template_kvs(alignment), tensors, alignment or 32)


RECIPE = {"token_embd.weight": "b", "blk.0.attn_norm.weight": "a", "output.weight": "a",
          "blk.0.ffn_down.weight": "b"}
SET_KV = {"general.file_type": 7, "test.int32": 5, "general.name": "mix", "quantsweep.recipe": "r1"}


def expected_file(path: Path, alignment: int | None = None) -> Path:
    """What the engine would write for RECIPE, with SET_KV and test.drop dropped."""
    kvs = [encode_kv("general.architecture", "llama"), encode_kv("general.name", "mix")]
    if alignment:
        kvs.append(encode_kv("general.alignment", alignment))
    kvs += [encode_kv("general.file_type", 7), int32_kv("test.int32", 5),
            encode_kv("tokenizer.ggml.tokens", ["<s>", "a", "bé"]),
            int32_array_kv("tokenizer.ggml.token_type", [3, 1, 1]),
            encode_kv("test.f32", 0.5), encode_kv("quantsweep.recipe", "r1")]
    tensors = []
    for n, src in RECIPE.items():
        types, seed = (TYPES_A, 1) if src == "a" else (TYPES_B, 2)
        tensors.append((n, SHAPES[n], types[n], data(n, types[n], seed)))
    return write_gguf(path, kvs, tensors, alignment or 32)


def recipe_sources(a: Path, b: Path) -> dict[str, Piece]:
    pa, pb = pieces(read_table(a)), pieces(read_table(b))
    return {n: (pa if src == "a" else pb)[n] for n, src in RECIPE.items()}


@pytest.fixture
def pool(tmp_path) -> tuple[Path, Path]:
    return pool_file(tmp_path / "a.gguf", TYPES_A, 1), pool_file(tmp_path / "b.gguf", TYPES_B, 2)


def test_read_table_records_raw_kv_spans(pool):
    a, _ = pool
    table = read_table(a)
    raw = a.read_bytes()
    assert list(table.kv_spans) == list(table.kv)
    assert [raw[s:e] for s, e in table.kv_spans.values()] == template_kvs()
    assert GGUFTable(Path("m"), 3, {}, [], 0).kv_spans == {}


def test_assembled_file_is_the_engine_layout_byte_for_byte(pool, tmp_path):
    a, b = pool
    out = tmp_path / "out" / "mix.gguf"
    n = assemble(read_table(a), recipe_sources(a, b), out, set_kv=SET_KV, drop_kv=["test.drop"])
    assert n == out.stat().st_size
    assert out.read_bytes() == expected_file(tmp_path / "expected.gguf").read_bytes()
    # each tensor's bytes from the file the recipe names
    table = read_table(out, keep_arrays=True)
    got = pieces(table)
    for name, src in RECIPE.items():
        source = recipe_sources(a, b)[name]
        assert got[name].info.type_id == source.info.type_id
        with open(out, "rb") as f, open(source.path, "rb") as g:
            f.seek(got[name].start)
            g.seek(source.start)
            assert f.read(source.nbytes) == g.read(source.nbytes)
    assert [t.name for t in table.tensors] == list(SHAPES)
    # KVs: template order, set in place, dropped gone, new ones appended
    assert list(table.kv) == ["general.architecture", "general.name", "general.file_type", "test.int32",
                              "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "test.f32", "quantsweep.recipe"]
    assert table.kv["general.name"] == "mix" and table.kv["general.file_type"] == 7 and table.kv["test.int32"] == 5
    assert table.kv["tokenizer.ggml.tokens"] == ["<s>", "a", "bé"]
    assert table.kv["tokenizer.ggml.token_type"] == [3, 1, 1]
    # the arrays are the template's bytes, verbatim
    raw_t, raw_o, spans_t = a.read_bytes(), out.read_bytes(), read_table(a).kv_spans
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "test.f32"):
        assert raw_o[slice(*table.kv_spans[key])] == raw_t[slice(*spans_t[key])]
    assert tensor_data_diff(out, expected_file(tmp_path / "expected.gguf")) == []


def test_pypi_gguf_reads_the_assembled_file(pool, tmp_path):
    a, b = pool
    out = tmp_path / "mix.gguf"
    assemble(read_table(a), recipe_sources(a, b), out, set_kv=SET_KV, drop_kv=["test.drop"])
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].types == [gguf.GGUFValueType.UINT32]  # the template's type kept
    assert reader.fields["test.int32"].types == [gguf.GGUFValueType.INT32]
    assert reader.fields["general.file_type"].parts[-1][0] == 7
    assert "test.drop" not in reader.fields
    sources = recipe_sources(a, b)
    assert [t.name for t in reader.tensors] == list(SHAPES)
    for t in reader.tensors:
        src = sources[t.name]
        assert int(t.tensor_type) == src.info.type_id
        with open(src.path, "rb") as g:
            g.seek(src.start)
            assert t.data.tobytes() == g.read(src.nbytes)


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_offset_and_the_data_section_aligned(tmp_path, alignment):
    a = pool_file(tmp_path / "a.gguf", TYPES_A, 1, alignment)
    b = pool_file(tmp_path / "b.gguf", TYPES_B, 2, alignment)
    out = tmp_path / "mix.gguf"
    size = assemble(read_table(a), recipe_sources(a, b), out, set_kv=SET_KV, drop_kv=["test.drop"])
    align = alignment or 32
    table = verify_complete(out)
    assert table.data_offset % align == 0 and all(t.offset % align == 0 for t in table.tensors)
    assert size == table.data_offset + sum(padded(t.nbytes, align) for t in table.tensors)  # last one padded too
    assert out.read_bytes() == expected_file(tmp_path / "expected.gguf", alignment).read_bytes()
    assert len(gguf.GGUFReader(out).tensors) == len(SHAPES)


def test_assembling_from_a_split_model(pool, tmp_path):
    a, _ = pool
    names = list(SHAPES)
    split_kv = [encode_kv("split.no", 0), encode_kv("split.count", 2)]
    first = write_gguf(tmp_path / "m-00001-of-00002.gguf", template_kvs() + split_kv,
                       [(n, SHAPES[n], TYPES_A[n], data(n, TYPES_A[n], 1)) for n in names[:2]])
    write_gguf(tmp_path / "m-00002-of-00002.gguf", [encode_kv("split.no", 1), encode_kv("split.count", 2)],
               [(n, SHAPES[n], TYPES_A[n], data(n, TYPES_A[n], 1)) for n in names[2:]])
    split = read_model(first)
    ps = pieces(split)
    assert ps[names[2]].path.name == "m-00002-of-00002.gguf"
    assert ps[names[2]].data_offset == read_table(ps[names[2]].path).data_offset != split.data_offset
    out = tmp_path / "joined.gguf"
    assemble(split, ps, out, drop_kv=["split.no", "split.count"])
    assert out.read_bytes() == a.read_bytes()
    assert tensor_data_diff(first, a) == []


def _dir(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_shape_mismatch_names_the_tensor_and_both_files(pool, tmp_path):
    a, b = pool
    shapes = dict(SHAPES, **{"output.weight": (96, 3)})
    odd = write_gguf(tmp_path / "odd.gguf", template_kvs(),
                     [(n, shapes[n], F32, bytes(tensor_nbytes(F32, shapes[n]))) for n in SHAPES])
    sources = dict(recipe_sources(a, b), **{"output.weight": pieces(read_table(odd))["output.weight"]})
    before = _dir(tmp_path)
    with pytest.raises(GGUFFormatError) as e:
        assemble(read_table(a), sources, tmp_path / "mix.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "output.weight" in msg and str(odd) in msg and str(a) in msg
    assert "[96, 3]" in msg and "[96, 2]" in msg
    assert _dir(tmp_path) == before


def test_missing_tensor_names_it(pool, tmp_path):
    a, b = pool
    sources = recipe_sources(a, b)
    del sources["blk.0.ffn_down.weight"]
    before = _dir(tmp_path)
    with pytest.raises(GGUFFormatError, match=r"blk\.0\.ffn_down\.weight") as e:
        assemble(read_table(a), sources, tmp_path / "mix.gguf")
    assert "\n" not in str(e.value) and _dir(tmp_path) == before


def test_source_cut_short_while_copying_leaves_nothing(pool, tmp_path):
    a, b = pool
    sources = recipe_sources(a, b)
    os.truncate(b, sources["blk.0.ffn_down.weight"].start + 10)  # after pieces() was read
    before = _dir(tmp_path)
    with pytest.raises(GGUFFormatError, match=r"b\.gguf: truncated: tensor blk\.0\.ffn_down\.weight"):
        assemble(read_table(a), sources, tmp_path / "mix.gguf")
    assert _dir(tmp_path) == before


def test_set_kv_keeps_the_template_type_and_refuses_what_does_not_fit(pool, tmp_path):
    a, b = pool
    with pytest.raises(TypeError, match="general.file_type"):
        assemble(read_table(a), recipe_sources(a, b), tmp_path / "mix.gguf", set_kv={"general.file_type": -1})
    with pytest.raises(ValueError, match="test.drop"):
        assemble(read_table(a), recipe_sources(a, b), tmp_path / "mix.gguf", set_kv={"test.drop": "y"},
                 drop_kv=["test.drop"])
    assert not (tmp_path / "mix.gguf").exists()


def test_tensor_data_diff(pool, tmp_path):
    a, _ = pool
    same = tmp_path / "same.gguf"
    shutil.copyfile(a, same)
    assert tensor_data_diff(a, same) == []

    flipped = tmp_path / "flipped.gguf"
    shutil.copyfile(a, flipped)
    p = pieces(read_table(flipped))["output.weight"]
    raw = bytearray(flipped.read_bytes())
    raw[p.start + 100] ^= 1
    flipped.write_bytes(raw)
    diff = tensor_data_diff(a, flipped)
    assert len(diff) == 1 and "output.weight" in diff[0] and "byte 100 " in diff[0]

    retyped = pool_file(tmp_path / "retyped.gguf", dict(TYPES_A, **{"blk.0.ffn_down.weight": F16}), 1)
    diff = tensor_data_diff(a, retyped)  # same bytes, bf16 -> f16
    assert len(diff) == 1 and "blk.0.ffn_down.weight" in diff[0] and "bf16 (30)" in diff[0] and "f16 (1)" in diff[0]

    order = ["blk.0.attn_norm.weight", "token_embd.weight", "output.weight", "blk.0.ffn_down.weight"]
    reordered = pool_file(tmp_path / "reordered.gguf", TYPES_A, 1, order=order)
    diff = tensor_data_diff(a, reordered)
    assert diff == [f"tensor order differs from position 0: token_embd.weight in {a}, "
                    f"blk.0.attn_norm.weight in {reordered}"]


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copies_in_bounded_steps_with_or_without_the_kernel(pool, tmp_path, monkeypatch, kernel_copy):
    """Tensors are copied a few bytes at a time here (GBs in real steps), by copy_file_range or,
    where the filesystem refuses it, by reads: the same file either way."""
    from quantsweep.gguf import assemble as mod

    a, b = pool
    monkeypatch.setattr(mod, "_COPY_STEP", 7)
    monkeypatch.setattr(mod, "_READ_STEP", 5)
    if not kernel_copy:
        def refuse(*args):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(mod.os, "copy_file_range", refuse)
    out = tmp_path / "mix.gguf"
    assemble(read_table(a), recipe_sources(a, b), out, set_kv=SET_KV, drop_kv=["test.drop"])
    expected = expected_file(tmp_path / "expected.gguf")
    assert out.read_bytes() == expected.read_bytes()
    assert tensor_data_diff(out, expected) == []
