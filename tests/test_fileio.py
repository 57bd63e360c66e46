"""PipeWriter: the threaded writer behind imatrix convert/merge/remap."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import FIXTURES

from quantsweep import imatrix
from quantsweep.errors import QuantsweepError
from quantsweep.fileio import PipeWriter, partial_path


def _write(path, parts, src=None):
    """parts: bytes (write), ("copy", offset, n) (kernel copy from src) or an array (buffer)."""
    with partial_path(path) as tmp, open(tmp, "wb", buffering=0) as f, PipeWriter(f) as w:
        fd = os.open(src, os.O_RDONLY) if src else -1
        try:
            for p in parts:
                if isinstance(p, bytes):
                    w.write(p)
                elif isinstance(p, tuple):
                    w.copy(fd, p[1], p[2])
                else:
                    buf = w.buffer(p.size)
                    buf[:] = p
                    w.commit(buf)
            w.close()
        finally:
            if fd >= 0:
                os.close(fd)


def test_parts_land_in_order_and_adjacent_copies_join(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 40000)  # ~10 MB: crosses the 2 MiB copy steps
    arrs = [np.arange(n, dtype=np.float32) for n in (3, 1 << 20, 7)]
    parts = [b"head", ("copy", 5, 4_000_000), ("copy", 4_000_005, 3_000_000), arrs[0], b"x",
             ("copy", 1, 2), arrs[1], ("copy", 10, 20), arrs[2]]
    _write(tmp_path / "out.bin", parts, src)
    data = src.read_bytes()
    want = (b"head" + data[5:7_000_005] + arrs[0].tobytes() + b"x" + data[1:3] + arrs[1].tobytes()
            + data[10:30] + arrs[2].tobytes())
    assert (tmp_path / "out.bin").read_bytes() == want


def test_copy_falls_back_to_read_write(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))
    _write(tmp_path / "out.bin", [("copy", 7, (3 << 20) - 7)], src)
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()[7:]


def test_error_in_writer_thread_reaches_caller_and_no_file_is_left(tmp_path):
    class Full:
        def write(self, data):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with PipeWriter(Full()) as w:
            w.write(b"a")
            w.close()
    # through write_dat: the temp file is removed and nothing is renamed into place
    out = tmp_path / "out.dat"
    im = imatrix.Imatrix({"blk.0.ffn_up.weight": imatrix.Entry(1, np.ones(4, np.float32))})
    real_open = open

    def failing_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode:
            f.write = Full().write
        return f

    import builtins

    builtins.open, saved = failing_open, builtins.open
    try:  # the error names the output it could not write
        with pytest.raises(QuantsweepError, match=r"out\.dat: writing failed: No space left on device"):
            imatrix.write_dat(im, out)
    finally:
        builtins.open = saved
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_write_dat_copy_and_buffer_paths_give_the_same_bytes(tmp_path):
    """Pass-through entries are kernel-copied (shifted against the source when an entry before
    them was dropped); the file must equal a plain serialisation."""
    src = FIXTURES / "tiny-mla.dat"
    im = imatrix.read_dat(src)
    # drop one entry so later entries shift against the source, keep the rest
    first = next(iter(im.entries))
    kept = imatrix.Imatrix({k: v for k, v in im.entries.items() if k != first}, im.chunks, im.dataset)
    imatrix.write_dat(kept, tmp_path / "a.dat")
    plain = imatrix.Imatrix({k: imatrix.Entry(v.ncall, np.array(v.values)) for k, v in kept.entries.items()},
                            im.chunks, im.dataset)
    imatrix.write_dat(plain, tmp_path / "b.dat")
    assert (tmp_path / "a.dat").read_bytes() == (tmp_path / "b.dat").read_bytes()
    imatrix.write_dat(im, tmp_path / "c.dat")  # all entries in place: one kernel copy
    assert (tmp_path / "c.dat").read_bytes() == src.read_bytes()


def test_commit_takes_only_the_lent_buffer(tmp_path):
    with open(tmp_path / "x", "wb", buffering=0) as f, PipeWriter(f) as w:
        w.buffer(4)
        with pytest.raises(ValueError, match="lent"):
            w.commit(np.zeros(4, np.float32))


def test_partial_dir_replaces_the_whole_directory_or_leaves_it(tmp_path):
    from quantsweep.fileio import partial_dir

    target = tmp_path / "d"
    target.mkdir()
    (target / "old").write_text("old")
    with partial_dir(target) as staged:
        (staged / "new").write_text("new")
        assert not (target / "new").exists()  # nothing visible before the block completes
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)
    with pytest.raises(RuntimeError):
        with partial_dir(target) as staged:
            (staged / "half").write_text("x")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no staging left behind
