"""Publishing without the engine: the settings, which quants are chosen, the card (read back as the
Hub reads it and held to summary.csv), the keys a published file carries, the split limit at
DeepSeek-V3's real sizes, the folder checks, and the workflow's publish target planned (-n).
The real split, join and load checks on the demo are in test_e2e."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_workdir, smk
from quantsweep import capacity, config
from test_scale import dry_run_jobs, example_files
from quantsweep.errors import ConfigError, PublishError
from quantsweep.gguf.reader import GGUFTable, read_table
from quantsweep.publish import check_folder, scrub
from quantsweep.publish.card import Card, QuantCard, check_numbers, render, table_numbers
from quantsweep.publish.model_keys import ModelKeys, path_keys
from quantsweep.publish.select import selected
from quantsweep.publish.shards import HEADER_SLACK, engine_limit_mb
from quantsweep.report.table import Row
from quantsweep.settings import PublishSettings
from quantsweep.settings.publish import split_bytes


def row(quant, size, kld, ppl=12.5, gate="pass", pareto="", **kw) -> Row:
    return Row(model="tiny", quant=quant, ftype=quant, imatrix="yes", reference="base", size_bytes=size,
               size_gib=size / 2**30, bpw=size * 8 / 18e6, ppl=ppl, ppl_err=0.25, dppl_pct=100 * (ppl / 12 - 1),
               ln_ppl_ratio=None, ln_ppl_ratio_err=None, kld_mean=kld, kld_err=1e-4, kld_p99=None,
               same_top_p=95.125, tg_tps=1857.49, pp_tps=9121.03, gate=gate, pareto=pareto, **kw)


ROWS = [row("Q8_0", 19_000_000, 0.0007, pareto="ppl+kld"), row("IQ4_KS", 11_600_000, 0.009),
        row("IQ2_KS", 6_800_000, 0.27, ppl=15.7, gate="fail", pareto="kld"),
        row("IQ2_KS-noimatrix", 6_790_000, 0.71, ppl=23.3, gate="fail", pareto="speed"),
        row("auto-IQ2_KS", 6_810_000, 0.019, pareto="ppl+kld+speed")]


def test_settings_parse_sizes_and_refuse_bad_values_naming_the_key():
    assert split_bytes("50G") == 50 * 10**9 and split_bytes("4000M") == 4 * 10**9
    assert PublishSettings().quants == ("gate",) and PublishSettings().max_bytes == 50 * 10**9
    for bad, key in [({"split_max_size": "50GB"}, "publish.split_max_size"), ({"split_max_size": "0G"},
                     "publish.split_max_size"), ({"license": "other"}, "publish.license"),
                     ({"include": ["shards"]}, "publish.include"), ({"repo": "a/b/c"}, "publish.repo"),
                     ({"name": "my model"}, "publish.name"), ({"quants": []}, "publish.quants"),
                     ({"base_model": "DeepSeek-V3"}, "publish.base_model")]:
        with pytest.raises(ConfigError, match=f"^{key}"):
            PublishSettings.from_dict(bad)
    assert PublishSettings(quantized_by="me").repo_id("Tiny") == "me/Tiny-GGUF"
    assert PublishSettings().repo_id("Tiny") == "Tiny-GGUF"


def test_a_quant_name_the_sweep_lacks_is_refused_when_the_config_loads():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    with pytest.raises(ConfigError, match=r"publish\.quants: 'IQ1_S' is not a quant of the sweep"):
        config.load({**cfg, "publish": {"quants": ["IQ1_S"]}}, ROOT)
    assert config.load({**cfg, "publish": {"quants": ["IQ2_KS", "pareto"]}}, ROOT).publish.names() == ["IQ2_KS"]


def test_selection_by_name_front_and_gate_in_the_reports_order():
    s = PublishSettings
    assert [r.quant for r in selected(ROWS, s(quants=("gate",)), "s.csv")] == ["Q8_0", "auto-IQ2_KS"]
    assert [r.quant for r in selected(ROWS, s(quants=("pareto",)), "s.csv")] == [
        "Q8_0", "IQ2_KS", "IQ2_KS-noimatrix", "auto-IQ2_KS"]
    assert [r.quant for r in selected(ROWS, s(quants=("IQ4_KS", "gate")), "s.csv")] == ["Q8_0", "IQ4_KS",
                                                                                      "auto-IQ2_KS"]
    with pytest.raises(PublishError, match="'IQ3_K' is not a quant of s.csv"):
        selected(ROWS, s(quants=("IQ3_K",)), "s.csv")
    failing = [replace(r, gate="fail") for r in ROWS]
    with pytest.raises(PublishError, match="gate .* selects no quant of tiny"):
        selected(failing, s(quants=("gate",)), "s.csv")


def _card(rows=ROWS[:2]) -> Card:
    keys = ModelKeys("Tiny", "other", "deepseek", "https://example.org/LICENSE", "deepseek-ai/DeepSeek-V3",
                     "someone", "8x18M", "deepseek2")
    quants = [QuantCard(r, [f"{r.quant}/Tiny-{r.quant}-00001-of-00002.gguf", f"{r.quant}/Tiny-{r.quant}-00002-of-00002.gguf"],
                        quantize_cmd="llama-quantize x", made_by="made") for r in rows]
    return Card("Tiny", "someone/Tiny-GGUF", keys.front(("r1",), [(r.quant, r.ppl) for r in rows], "wiki.test"),
                None, quants, "the unquantized model", "PPL", ["-mla", "3", "-fa", "on"], {}, {}, {}, [],
                "hf upload-large-folder someone/Tiny-GGUF . --repo-type model", keys.license_words())


def test_card_front_matter_round_trips_through_the_hubs_model_card():
    hub = pytest.importorskip("huggingface_hub")  # the `publish` extra; the test extra installs it
    c = _card()
    text = render(c)
    card = hub.ModelCard(text)
    assert card.data.to_dict() == c.front
    assert hub.ModelCard(str(card)).data.to_dict() == c.front
    assert c.front["base_model_relation"] == "quantized" and c.front["license_name"] == "deepseek"
    assert {"gguf", "imatrix", "ik_llama.cpp", "r1"} <= set(c.front["tags"])
    assert [(e.metric_type, e.metric_value) for e in card.data.eval_results] == [("perplexity", 12.5)] * 2
    assert "hf download someone/Tiny-GGUF --include 'Q8_0/*'" in text
    assert "llama-server -m Tiny-GGUF/Q8_0/Tiny-Q8_0-00001-of-00002.gguf -mla 3 -fa on" in text


def test_card_numbers_are_held_to_the_summary():
    c = _card()
    text = render(c)
    by_name = {r.quant: r for r in ROWS[:2]}
    assert check_numbers(text, by_name) == []
    assert table_numbers(text)["Q8_0"]["files"] == 2
    wrong = text.replace("| 12.5000 | 0.2500 |", "| 12.5100 | 0.2500 |", 1)
    assert any(x.startswith("Q8_0 ppl: card 12.51") for x in check_numbers(wrong, by_name))
    assert any("IQ4_KS kld_mean" in x for x in check_numbers(text, {**by_name, "IQ4_KS": replace(ROWS[1], kld_mean=0.01)}))
    assert "the card lists" in check_numbers(text, {"Q8_0": ROWS[0]})[0]


def test_scrub_cuts_machine_paths_and_keys_only():
    rec = {"cwd": "/home/u/sweep", "python": "/usr/bin/python3", "host": {"hostname": "gpu7", "cpus": 64},
           "command": "quantsweep quantize --model /data/models/V3-BF16-00001-of-00030.gguf -o results/q/x.gguf",
           "url": "https://huggingface.co/deepseek-ai/DeepSeek-V3", "list": ["~/texts/calib.txt", "a/b"]}
    assert scrub(rec) == {"host": {"cpus": 64}, "url": "https://huggingface.co/deepseek-ai/DeepSeek-V3",
                          "command": "quantsweep quantize --model V3-BF16-00001-of-00030.gguf -o results/q/x.gguf",
                          "list": ["calib.txt", "a/b"]}


def test_split_limit_at_deepseek_v3_sizes(v3_gguf):
    t = read_table(v3_gguf)
    expert = max(t.tensors, key=lambda x: x.nbytes)  # one layer's routed experts at bf16: 7.5 GB
    assert engine_limit_mb(t, 50 * 10**9, "V3") == (50 * 10**9 - t.data_offset - HEADER_SLACK) // 10**6
    with pytest.raises(PublishError, match=f"its tensor {expert.name} is {expert.nbytes} bytes"):
        engine_limit_mb(t, 5 * 10**9, "V3")


def test_model_keys_from_settings_over_the_gguf(v3_gguf):
    t = read_table(v3_gguf)
    ps = PublishSettings(base_model="deepseek-ai/DeepSeek-V3", license="mit", quantized_by="me")
    k = ModelKeys.of(t, "dsv3", ps)
    assert k.kv()["general.base_model.0.repo_url"] == "https://huggingface.co/deepseek-ai/DeepSeek-V3"
    assert k.kv()["general.base_model.0.organization"] == "deepseek-ai" and k.kv()["general.quantized_by"] == "me"
    assert k.size_label.startswith("256x") and k.size_label.endswith("B")
    with pytest.raises(PublishError, match="publish.license: dsv3's GGUF has no general.license"):
        ModelKeys.of(t, "dsv3", PublishSettings())
    assert ModelKeys.of(t, "dsv3", PublishSettings(), model_license="mit").license == "mit"
    fake = GGUFTable(path=Path("x"), version=3, kv={"quantize.imatrix.file": "/home/u/imatrix.dat",
                                                     "quantize.imatrix.dataset": "resources/text/calibration.txt",
                                                     "general.source.url": "/data/hf/DeepSeek-V3",
                                                     "general.name": "DeepSeek V3"}, tensors=[], data_offset=0)
    assert path_keys(fake, "V3-imatrix.dat", "wiki.train") == {
        "quantize.imatrix.file": "V3-imatrix.dat", "quantize.imatrix.dataset": "wiki.train",
        "general.source.url": "DeepSeek-V3"}


def _sums(folder: Path) -> None:
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}\n"
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "SHA256SUMS"]
    (folder / "SHA256SUMS").write_text("".join(lines))


def test_check_folder_finds_changed_unlisted_and_machine_paths(tmp_path):
    f = tmp_path / "pub"
    (f / "Q8_0").mkdir(parents=True)
    (f / "README.md").write_text(render(_card()))
    (f / "Q8_0" / "commands.sh").write_text("llama-quantize in.gguf out.gguf Q8_0\n")
    _sums(f)
    rows = {r.quant: r for r in ROWS[:2]}
    assert check_folder(f, rows) == []
    (f / "Q8_0" / "commands.sh").write_text(f"llama-quantize {os.getcwd()}/in.gguf out.gguf Q8_0\n")
    (f / "extra.txt").write_text("x")
    bad = check_folder(f, rows)
    assert "Q8_0/commands.sh: sha256 differs from SHA256SUMS (changed or cut short)" in bad
    assert "extra.txt: not in SHA256SUMS" in bad and "Q8_0/commands.sh: names a path of this machine" in bad
    (f / "SHA256SUMS").unlink()
    assert check_folder(f, rows) == [f"{f / 'SHA256SUMS'}: missing"]


def test_publish_target_plans_one_job_per_model(workdir):
    r = smk(workdir, "-n", "publish")
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^publish_model +1$", r.stdout, re.M) and re.search(r"^publish +1$", r.stdout, re.M)


def test_publish_of_deepseek_v3_asks_for_what_its_quants_take(tmp_path, v3_gguf):
    """On the README's own-GGUF config: the publish job holds the largest quant it publishes for the
    load check, and its disk is the quants split plus one joined copy, all from the plan."""
    wd = make_workdir(tmp_path / "wd")
    cf = example_files(tmp_path, "own-gguf.yaml", v3_gguf)
    cfg = yaml.safe_load(cf.read_text())
    cfg["publish"] = {"quants": ["IQ2_KS", "IQ4_KS"], "license": "other", "license_name": "deepseek",
                      "license_link": "https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/LICENSE-MODEL"}
    cf.write_text(yaml.safe_dump(cfg))
    r = smk(wd, "publish", "-n", "--cores", "16", "--configfile", str(cf))
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = dry_run_jobs(r.stdout + r.stderr)
    (pub,) = [j for j in jobs if j["rule"] == "publish_model"]
    sweep = config.check_files([str(wd / "config" / "config.yaml"), str(cf)])
    plan = capacity.plan_sweep(sweep, {"dsv3": None})
    q = {n: plan.job("quantize", "dsv3", n).kept_bytes for n in ("IQ2_KS", "IQ4_KS")}
    assert int(pub["resources"]["mem_mb"]) == capacity.mem_mb(plan.job("eval_quant", "dsv3", "IQ4_KS"))
    assert int(pub["resources"]["disk_mb"]) == int((sum(q.values()) + q["IQ4_KS"]) * 1.05 / 2**20) + 1024
    assert 150 * 2**30 < q["IQ2_KS"] < q["IQ4_KS"] < 450 * 2**30  # 190-400 GB: what users publish


def test_publish_problems_are_refused_when_the_run_starts(tmp_path, tiny_gguf):
    no_token = {"HF_TOKEN": None, "HF_HOME": str(tmp_path / "hf")}  # and no token stored by `hf auth login`
    wd = make_workdir(tmp_path / "up", {"publish": {"upload": True}})
    r = smk(wd, "-n", "publish", env=no_token)
    assert r.returncode != 0 and "publish.upload: true needs a Hub token" in r.stdout + r.stderr
    assert smk(wd, "-n", env=no_token).returncode == 0  # the sweep itself is not held up by publish's settings
    own = make_workdir(tmp_path / "own", {"models": {"tiny": None, "own": {"source": "gguf",
                                                                         "path": str(tiny_gguf())}}})
    r = smk(own, "-n", "publish")
    assert r.returncode != 0 and f"publish.license: {tiny_gguf()} has no general.license" in r.stdout + r.stderr
    r = smk(own, "-n", "publish", "--config", "publish={'license': 'mit'}")
    assert r.returncode == 0, r.stderr[-3000:]
