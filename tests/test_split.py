"""Split models: the demo model split by the engine's own llama-gguf-split (metadata in shard 1
only, as real split DeepSeek GGUFs are) goes through the table reader, resources, the planner,
imatrix remap, the pre-flight check, quantize and the manifests exactly as the whole file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT, make_workdir, smk
from quantsweep import imatrix as imx
from quantsweep import steps
from quantsweep.capacity.files import of_table
from quantsweep.engine import run
from quantsweep.fileio import sha256_file
from quantsweep.gguf.reader import read_model, read_table
from quantsweep.planner.plan import plan
from quantsweep.planner.recipes import load_recipe

pytestmark = pytest.mark.e2e
RECIPE = str(ROOT / "config" / "recipes" / "tiny-mix-iq2.yaml")


@pytest.fixture(scope="module")
def model(bin_dir, tiny_gguf, tmp_path_factory) -> tuple[Path, list[Path]]:
    """(the whole demo model, its shards: 20 tensors each)."""
    d = tmp_path_factory.mktemp("split")
    whole = tiny_gguf()
    (d / "shards").mkdir()
    return whole, run.gguf_split(bin_dir, whole, d / "shards" / "tiny", 20, d / "split.log")


def _names_shapes_types(table):
    return [(t.name, t.shape, t.type) for t in table.tensors]


def test_engine_split_keeps_metadata_in_shard_one(model):
    whole, shards = model
    assert len(shards) >= 3 and shards[0].name == f"tiny-00001-of-{len(shards):05d}.gguf"
    first, second = read_table(shards[0]), read_table(shards[1])
    assert first.kv["general.architecture"] == "deepseek2" and first.kv["split.count"] == len(shards)
    assert "general.architecture" not in second.kv and "deepseek2.block_count" not in second.kv
    assert second.kv["split.no"] == 1
    # the joined table is the whole file's, in order, from any shard's path
    for path in (shards[0], shards[-1]):
        joined = read_model(path)
        assert _names_shapes_types(joined) == _names_shapes_types(read_table(whole))
        assert joined.files == shards and joined.total_bytes == read_table(whole).total_bytes
        assert joined.kv["deepseek2.block_count"] == 4


def test_resources_and_plan_of_any_shard_equal_the_whole(model):
    """The disk request of a quantize job used to fall back to the bf16 size for shard 2
    (its plan raised for lack of metadata); now every shard plans the whole model, and the
    capacity plan's files are the whole model's."""
    whole, shards = model
    source = of_table(read_table(whole))
    assert of_table(read_model(shards[0])) == source
    want = plan(read_table(whole), "IQ2_KS").total_bytes
    assert want < source.nbytes / 3
    recipe = load_recipe(RECIPE)
    for shard in shards:
        assert plan(read_model(shard), "IQ2_KS").total_bytes == want
        assert plan(read_model(shard), recipe).total_bytes == plan(read_table(whole), recipe).total_bytes
    a, b = plan(read_model(shards[0]), "IQ2_KS"), plan(read_table(whole), "IQ2_KS")
    assert a.types() == b.types() and a.total_bytes == b.total_bytes and a.n_fallback == b.n_fallback


def test_engine_dry_run_of_the_split_model_is_the_plan(bin_dir, model):
    whole, shards = model
    dry = run.dry_run(bin_dir, shards[0], "IQ2_KS")
    assert dry.types == run.dry_run(bin_dir, whole, "IQ2_KS").types
    p = plan(read_model(shards[0]), "IQ2_KS")
    assert dry.types == p.types() and dry.quant_mib == round(p.mib, 2)


def test_remap_check_quantize_and_manifests_on_the_split_model(bin_dir, model, tmp_path):
    whole, shards = model
    outs = {}
    for label, path in (("whole", whole), ("split", shards[0])):
        out, manifest = tmp_path / f"{label}.dat", tmp_path / f"{label}.manifest.json"
        r = subprocess.run([sys.executable, "-m", "quantsweep.cli", "imatrix", "remap", "--model", str(path),
                            "-o", str(out), "--manifest", str(manifest), str(FIXTURES / "tiny-mla.dat")],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        outs[label] = out
    assert sha256_file(outs["split"]) == sha256_file(outs["whole"])
    listed = json.loads((tmp_path / "split.manifest.json").read_text())["inputs"]["model"]
    assert [m["path"] for m in listed] == [str(s) for s in shards]
    assert [m["sha256"] for m in listed] == [sha256_file(s) for s in shards]

    report = steps.check_imatrix(bin_dir, shards[1], outs["split"], "IQ2_KS", None, tmp_path / "check.log")
    assert report.problems == [] and report.tensors_quantized == sum(
        1 for t in plan(read_table(whole), "IQ2_KS").tensors if t.quantized)

    for label, path in (("whole", whole), ("split", shards[0])):
        out = tmp_path / f"{label}-q.gguf"  # one imatrix file: its path is recorded in the output
        rec = steps.quantize(bin_dir, path, out, tmp_path / f"{label}-q.log", None, RECIPE, 2, outs["whole"])
        assert rec["predicted_bytes"] == rec["tensor_bytes"]
    assert sha256_file(tmp_path / "split-q.gguf") == sha256_file(tmp_path / "whole-q.gguf")
    assert imx.read_dat(outs["split"]).entries.keys() == imx.read_dat(outs["whole"]).entries.keys()


def test_workflow_takes_a_split_model_with_every_shard_as_input(model, tmp_path):
    whole, shards = model
    wd = make_workdir(tmp_path / "wd", {"models": {"big": {"source": "gguf", "path": str(shards[0])}},
                                        "quants": ["IQ4_KS"]})
    r = smk(wd, "-n", "--cores", "1", "results/imatrix/big/imatrix.dat")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = r.stdout.split("\nrule ")
    collect = [j for j in jobs if j.startswith("imatrix_collect")]
    assert collect and all(str(s) in j for j in collect for s in shards)
    wd2 = make_workdir(tmp_path / "wd2", {"models": {"big": {"source": "gguf", "path": str(shards[1])}}})
    r = smk(wd2, "-n", "--cores", "1")
    assert r.returncode != 0
    assert f"models.big.path: {shards[1]} is not the first shard of a split model; give {shards[0]}" in r.stdout
