"""Provenance manifests: hashing (with its cache), engine identity, the CLI's --manifest."""

from __future__ import annotations

import hashlib
import json
import os

from quantsweep import manifest
from quantsweep.cli import main


def test_sha256_cache_is_used_and_invalidated(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"a" * 1000)
    cache = tmp_path / "cache"
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert manifest.sha256(f, cache) == want
    (entry,) = cache.iterdir()
    # a cached digest is trusted while size/mtime/inode are unchanged: prove it is read from the cache
    data = json.loads(entry.read_text())
    entry.write_text(json.dumps({**data, "sha256": "cached"}))
    assert manifest.sha256(f, cache) == "cached"
    # a changed file (new mtime) is hashed again
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(data["mtime_ns"] + 10**9, data["mtime_ns"] + 10**9))
    assert manifest.sha256(f, cache) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_cli_manifest_of_remap(tmp_path, monkeypatch, tiny_gguf):
    """remap's manifest hashes its inputs (model + imatrices) and output, and records the command."""
    from conftest import FIXTURES

    monkeypatch.chdir(tmp_path)
    model = tiny_gguf()
    out, man = tmp_path / "fit.dat", tmp_path / "fit.manifest.json"
    argv = ["imatrix", "remap", "--model", str(model), "-o", str(out), "--manifest", str(man),
            str(FIXTURES / "tiny-mla.dat")]
    assert main(argv) == 0
    m = json.loads(man.read_text())
    assert m["command"] == "quantsweep " + " ".join(argv)
    assert [f["path"] for f in m["inputs"]["inputs"]] == [str(FIXTURES / "tiny-mla.dat")]
    assert m["inputs"]["model"][0]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert m["outputs"] == [{"path": str(out), "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
                             "bytes": out.stat().st_size}]
    assert m["engine"] is None and m["engine_commands"] == []
    assert (tmp_path / ".quantsweep" / "sha256").is_dir()


def test_engine_identity_reads_engine_json(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "engine.json").write_text(json.dumps({"source": "git", "commit": "abc", "cmake_flags": ["-DX=1"],
                                                      "tools": {"llama-quantize": "00"}, "build_time_s": 3}))
    ident = manifest.engine_identity(tmp_path / "bin")
    assert ident == {"source": "git", "commit": "abc", "cmake_flags": ["-DX=1"], "tools": {"llama-quantize": "00"}}
