"""imatrix .dat I/O and the remap, on a file the real engine wrote (tests/fixtures)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from conftest import FIXTURES
from quantsweep import imatrix
from quantsweep.gguf.reader import read_table

RAW = FIXTURES / "tiny-mla.dat"


@pytest.fixture(scope="module")
def tiny_table(tiny_gguf):
    return read_table(tiny_gguf())


def test_read_engine_file():
    im = imatrix.read_dat(RAW)
    e = im.entries["blk.1.ffn_up_exps.weight"]
    assert e.values.size == 512 * 8 and e.ncall == 8
    assert im.entries["blk.0.attn_v_b.weight"].values.size == 512 * 4  # per head
    assert im.entries["blk.0.attn_k_b.weight"].values.size == 128 * 4
    assert im.chunks == 8 and im.dataset


def test_write_read_round_trip(tmp_path):
    im = imatrix.read_dat(RAW)
    imatrix.write_dat(im, tmp_path / "a.dat")
    back = imatrix.read_dat(tmp_path / "a.dat")
    assert back.entries.keys() == im.entries.keys() and (back.chunks, back.dataset) == (im.chunks, im.dataset)
    for k, e in im.entries.items():
        assert back.entries[k].ncall == e.ncall and np.array_equal(back.entries[k].values, e.values)
    imatrix.write_dat(back, tmp_path / "b.dat")
    assert (tmp_path / "a.dat").read_bytes() == (tmp_path / "b.dat").read_bytes() == RAW.read_bytes()


def test_merge_is_ncall_weighted():
    im = imatrix.read_dat(RAW)
    m = imatrix.merge([im, im])
    e, e2 = im.entries["blk.0.ffn_up.weight"], m.entries["blk.0.ffn_up.weight"]
    assert e2.ncall == 2 * e.ncall and np.allclose(e2.means, e.means)


def test_remap_fits_every_entry_to_the_model(tiny_table):
    fitted, actions = imatrix.remap(imatrix.read_dat(RAW), tiny_table)
    shapes = {t.name: t.shape for t in tiny_table.tensors}
    for name, e in fitted.entries.items():
        shape = shapes[name]
        assert e.values.size == shape[0] * (shape[2] if len(shape) > 2 else 1), name
    # kv_b gets the head-mean of v_b's per-head data (same activations, PR 250)
    vb = imatrix.read_dat(RAW).entries["blk.0.attn_v_b.weight"]
    assert np.allclose(fitted.entries["blk.0.attn_kv_b.weight"].values, vb.values.reshape(4, 512).mean(0))
    assert "drop blk.0.attn_k_b.weight: no such tensor in the model" in actions


def test_remap_repairs_reshaped_names_and_copies_gate(tiny_table):
    im = imatrix.read_dat(RAW)
    im.entries["blk.0.attn_q_b.weight (reshaped)"] = im.entries.pop("blk.0.attn_q_b.weight")
    del im.entries["blk.0.ffn_gate.weight"]
    fitted, actions = imatrix.remap(im, tiny_table)
    assert "rename 'blk.0.attn_q_b.weight (reshaped)' -> blk.0.attn_q_b.weight" in actions
    assert "copy blk.0.ffn_up.weight -> blk.0.ffn_gate.weight" in actions
    assert "blk.0.attn_q_b.weight" in fitted.entries and "blk.0.ffn_gate.weight" in fitted.entries


@pytest.mark.parametrize("keep", [0.00001, 0.5, 0.99, 0.99999])
def test_truncated_file_names_offset(tmp_path, keep):
    data = RAW.read_bytes()
    p = tmp_path / "t.dat"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(imatrix.ImatrixFormatError, match=r"t\.dat: truncated at offset \d+"):
        imatrix.read_dat(p)


def test_lying_entry_count_and_nan(tmp_path):
    data = bytearray(RAW.read_bytes())
    p = tmp_path / "x.dat"
    p.write_bytes(struct.pack("<i", 10**6) + data[4:])
    with pytest.raises(imatrix.ImatrixFormatError, match="entry count 1000000"):
        imatrix.read_dat(p)
    (nlen,) = struct.unpack_from("<i", data, 4)
    first_value = 4 + 4 + nlen + 8
    struct.pack_into("<f", data, first_value, float("nan"))
    p.write_bytes(bytes(data))
    out = tmp_path / "out.dat"
    with pytest.raises(imatrix.ImatrixFormatError, match=r"x\.dat: entry 0 \(.+\) has value nan at index 0"):
        imatrix.write_dat(imatrix.read_dat(p), out)  # values are checked when streamed
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    p.write_bytes(b"GGUF" + bytes(data[4:]))
    with pytest.raises(imatrix.ImatrixFormatError, match="GGUF imatrix"):
        imatrix.read_dat(p)


def test_dat_gguf_dat_round_trip(tmp_path, tiny_table):
    import gguf

    n_mat = {t.name: t.shape[2] for t in tiny_table.tensors if len(t.shape) > 2}
    im = imatrix.read_dat(RAW)
    g = tmp_path / "x.gguf"
    imatrix.write_gguf(im, g, n_mat)
    # an independent reader (gguf-py) sees the mainline layout
    r = gguf.GGUFReader(g)
    t = {x.name: x for x in r.tensors}
    up = t["blk.1.ffn_up_exps.weight.in_sum2"]
    assert list(up.shape) == [512, 8] and list(t["blk.1.ffn_up_exps.weight.counts"].shape) == [8]
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_count"].contents() == im.chunks
    back = imatrix.read_gguf(g)
    assert back.entries.keys() == im.entries.keys() and back.chunks == im.chunks and back.dataset == im.dataset
    for k, e in im.entries.items():
        assert back.entries[k].ncall == e.ncall
        np.testing.assert_allclose(back.entries[k].values, e.values, rtol=1e-6)
    imatrix.write_dat(imatrix.read_any(g), tmp_path / "y.dat")
    assert (tmp_path / "y.dat").stat().st_size == RAW.stat().st_size


def test_gguf_zero_count_expert_reads_as_one(tmp_path):
    im = imatrix.Imatrix({"blk.1.ffn_up_exps.weight": imatrix.Entry(2, np.full(8, 6.0, np.float32))}, 2, "d")
    g = tmp_path / "z.gguf"
    imatrix.write_gguf(im, g, {"blk.1.ffn_up_exps.weight": 2})
    data = bytearray(g.read_bytes())
    table = read_table(g)
    c = table.by_name()["blk.1.ffn_up_exps.weight.counts"]
    struct.pack_into("<f", data, table.data_offset + c.offset + 4, 0.0)  # expert 1: no tokens
    g.write_bytes(bytes(data))
    v = imatrix.read_gguf(g).entries["blk.1.ffn_up_exps.weight"].values
    assert np.allclose(v[:4], 6.0) and np.allclose(v[4:], 2.0)  # mean 1.0 * ncall 2


def test_merge_conflict_names_both_files(tmp_path):
    a = imatrix.Imatrix({"blk.0.ffn_up.weight": imatrix.Entry(1, np.ones(4, np.float32))})
    b = imatrix.Imatrix({"blk.0.ffn_up.weight": imatrix.Entry(1, np.ones(8, np.float32))})
    with pytest.raises(imatrix.ImatrixError, match="a.dat has 4 values, b.dat has 8"):
        imatrix.merge([a, b], ["a.dat", "b.dat"])


def _value_offset(data: bytes, wanted: str) -> int:
    """Byte offset of the first value of entry `wanted` in a .dat file."""
    pos = 4
    for _ in range(struct.unpack_from("<i", data, 0)[0]):
        (n,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4:pos + 4 + n].decode()
        _, nval = struct.unpack_from("<ii", data, pos + 4 + n)
        if name == wanted:
            return pos + 12 + n
        pos += 12 + n + 4 * nval
    raise KeyError(wanted)


@pytest.mark.parametrize("cmd", ["convert", "remap"])
def test_cli_corrupt_input_one_line_error_no_output(tmp_path, tiny_table, cmd):
    import subprocess
    import sys

    bad = tmp_path / "bad.dat"
    data = bytearray(RAW.read_bytes())
    struct.pack_into("<f", data, _value_offset(data, "blk.1.ffn_up_exps.weight") + 40, float("inf"))
    bad.write_bytes(bytes(data))
    out = tmp_path / ("out.gguf" if cmd == "convert" else "out.dat")
    args = ["convert", str(bad), "-o", str(out)] if cmd == "convert" else \
        ["remap", "--model", str(tiny_table.path), "-o", str(out), str(bad)]
    r = subprocess.run([sys.executable, "-m", "quantsweep.cli", "imatrix", *args], capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"quantsweep: error: {bad}: entry ")
    assert "(blk.1.ffn_up_exps.weight) has value inf at index 10" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_info_json_reports_stats_and_experts_without_data(tmp_path, tiny_table):
    import json
    import subprocess
    import sys

    im = imatrix.read_dat(RAW)
    up = im.entries["blk.1.ffn_up_exps.weight"]
    vals = up.values.copy().reshape(8, 512)
    vals[5] = up.ncall  # what ik stores for an expert that got no tokens: mean 1.0
    im.entries["blk.1.ffn_up_exps.weight"] = imatrix.Entry(up.ncall, vals.reshape(-1))
    p = tmp_path / "e.dat"
    imatrix.write_dat(im, p)
    r = subprocess.run([sys.executable, "-m", "quantsweep.cli", "imatrix", "info", str(p), "--json",
                        "--model", str(tiny_table.path)], capture_output=True, text=True, check=True)
    info = json.loads(r.stdout)
    assert info["entries"] == len(im.entries) and info["chunks"] == 8
    rows = {t["name"]: t for t in info["tensors"]}
    assert rows["blk.1.ffn_up_exps.weight"]["empty_mats"] == [5] and rows["blk.1.ffn_up_exps.weight"]["n_mat"] == 8
    assert rows["blk.2.ffn_up_exps.weight"]["empty_mats"] == []
    q = imatrix.read_dat(RAW).entries["blk.0.attn_q_a.weight"]
    assert rows["blk.0.attn_q_a.weight"]["mean"] == pytest.approx(float(q.values.mean() / q.ncall), rel=1e-6)
    assert rows["blk.0.attn_q_a.weight"]["nonfinite"] == 0


def _entry(ncall: int, values) -> imatrix.Entry:
    return imatrix.Entry(ncall, np.asarray(values, np.float32))


def test_remap_lays_kv_b_data_out_per_head_for_a_mainline_layout():
    """Mainline layout (3-D attn_k_b/attn_v_b, no attn_kv_b): a -mla 0 pass's attn_kv_b row data
    is what every head of attn_v_b reads (PR 250), so it is repeated per head and merged
    (ncall-weighted) with the -mla 1 pass's per-head attn_v_b data, not dropped."""
    from quantsweep.gguf.deepseek2 import deepseek2_table

    table = deepseek2_table("mainline", n_layer=4, n_head=4)
    shapes = {t.name: t.shape for t in table.tensors}
    assert shapes["blk.0.attn_v_b.weight"] == (512, 128, 4) and "blk.0.attn_kv_b.weight" not in shapes
    rng = np.random.default_rng(0)
    kv_b, v_b = rng.random(512, dtype=np.float32) * 2, rng.random(4 * 512, dtype=np.float32) * 3
    std_only = imatrix.Imatrix({"blk.0.attn_kv_b.weight": _entry(2, kv_b)})
    fitted, actions = imatrix.remap(std_only, table)
    assert "copy blk.0.attn_kv_b.weight -> blk.0.attn_v_b.weight" in actions
    assert "repeat blk.0.attn_v_b.weight: 512 -> 2048 values (the same row data for every head)" in actions
    e = fitted.entries["blk.0.attn_v_b.weight"]
    assert e.ncall == 2 and np.array_equal(e.values, np.tile(kv_b, 4))
    both = imatrix.Imatrix({"blk.0.attn_kv_b.weight": _entry(2, kv_b), "blk.0.attn_v_b.weight": _entry(3, v_b)})
    fitted, actions = imatrix.remap(both, table)
    assert "add blk.0.attn_kv_b.weight -> blk.0.attn_v_b.weight" in actions
    assert not any(a.startswith("drop") for a in actions)
    e = fitted.entries["blk.0.attn_v_b.weight"]
    assert e.ncall == 5 and np.allclose(e.values, v_b + np.tile(kv_b, 4))


def test_remap_refuses_an_imatrix_of_another_model(tiny_table):
    """Only per-head MLA data changes layout; any other size mismatch names both sides."""
    im = imatrix.read_dat(RAW)
    ffn = im.entries["blk.0.ffn_down.weight"]
    im.entries["blk.0.ffn_down.weight"] = _entry(ffn.ncall, np.tile(ffn.values, 2))  # 2 x ne0: not per-head
    with pytest.raises(imatrix.ImatrixError, match=r"imatrix entry blk\.0\.ffn_down\.weight has 1536 values but "
                                                    r"tensor blk\.0\.ffn_down\.weight \[768, 512\] needs 768"):
        imatrix.remap(im, tiny_table)
    foreign = imatrix.Imatrix({"model.layers.0.mlp.down_proj": _entry(1, np.ones(768))})
    with pytest.raises(imatrix.ImatrixError, match="no entry of the imatrix matches a tensor"):
        imatrix.remap(foreign, tiny_table)
