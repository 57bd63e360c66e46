"""`quantsweep status` and the partial report on work dirs whose records are Snakemake's own (a
real run's log, cut mid-run: tests/fixtures/snakemake/demo-run.log) and whose running job's log is
the real engine's (tests/fixtures/logs), at several points: running, stalled, stopped, on SLURM;
the learned estimates; the status of a finished real sweep is in test_e2e."""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import FIXTURES, ROOT
from quantsweep import capacity, config
from quantsweep.cli import main
from quantsweep.status import parse_run_log, sweep_status, text
from quantsweep.status.records import record_path

RUN_LOG = (FIXTURES / "snakemake" / "demo-run.log").read_text()
NOW = 1_800_000_000.0
RUNNING = "logs/imatrix_collect/tiny.mla.log"
MEASURED_S = 5.0  # each finished job's wall time in the metadata written below


def _cut(name: str, marker: str) -> str:
    text = (FIXTURES / "logs" / name).read_text()
    return text[:text.index(marker) + len(marker)]


def demo_plan():
    return capacity.plan_sweep(config.load(config.load_yaml(ROOT / "config" / "config.yaml"), ROOT))


def make_workdir(tmp_path, *, log_age: float = 1.0, locked: bool = True, slurm: bool = False):
    """The demo's work dir as Snakemake leaves it mid-run (the first imatrix pass running for 20 s,
    its log last written `log_age` s ago, at chunk 4 of 8)."""
    wd = tmp_path / "wd"
    plan = demo_plan()
    sweep = config.load(config.load_yaml(ROOT / "config" / "config.yaml"), ROOT)
    (wd / "results" / "plan").mkdir(parents=True)
    (wd / "results" / "plan" / "plan.json").write_text(capacity.to_json(plan, sweep))
    run = RUN_LOG
    if slurm:  # what snakemake-executor-plugin-slurm logs for each job it submits
        run = run.replace("Shell command: quantsweep imatrix collect", "Job 10 has been submitted with SLURM jobid "
                          "4242 (log: .snakemake/slurm_logs/rule_imatrix_collect/tiny_mla/4242.log).\n"
                          "Shell command: quantsweep imatrix collect")
    smk = wd / ".snakemake"
    (smk / "log").mkdir(parents=True)
    (smk / "log" / "2026-12-07T010846.782401.snakemake.log").write_text(run)
    (smk / "locks").mkdir()
    if locked:
        (smk / "locks" / "0.input.lock").write_text("x")
    for j in parse_run_log(RUN_LOG):
        for out in j.outputs:
            if j.state == "finished":
                f = record_path(smk / "metadata", out)
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(json.dumps({"rule": j.rule, "log": j.logs, "starttime": NOW - 100,
                                         "endtime": NOW - 100 + MEASURED_S, "incomplete": False}))
            elif j.rule == "imatrix_collect":
                f = record_path(smk / "incomplete", out)
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(json.dumps({"external_jobid": "4242" if slurm else None}))
                os.utime(f, (NOW - 20, NOW - 20))
    log = wd / RUNNING
    log.parent.mkdir(parents=True)
    log.write_text(_cut("imatrix_mla.log", "[4]11.3403,"))
    os.utime(log, (NOW - log_age, NOW - log_age))
    return wd, plan


def test_snakemakes_log_read_as_jobs():
    jobs = {j.jobid: j for j in parse_run_log(RUN_LOG)}
    mla = jobs[10]
    assert (mla.rule, mla.wildcards, mla.logs, mla.state) == (
        "imatrix_collect", {"model": "tiny", "imatrix_pass": "mla"}, [RUNNING], "started")
    assert mla.outputs == ["results/imatrix/tiny/mla.dat", "results/imatrix/tiny/mla.json",
                           "results/imatrix/tiny/mla.manifest.json"]
    assert jobs[12].state == "finished" and jobs[12].wildcards["imatrix_pass"] == "std"
    finished = sorted(j.rule for j in jobs.values() if j.state == "finished")
    assert finished == sorted(re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)", RUN_LOG, re.M))


def test_status_mid_run(tmp_path):
    wd, plan = make_workdir(tmp_path)
    st = sweep_status(wd, now=NOW)
    assert st.snakemake_running and not st.failed
    (r,) = st.running
    assert r.name == "imatrix_collect tiny/mla" and r.log == RUNNING and not r.stalled
    assert (r.progress["done"], r.progress["total"], r.progress["unit"]) == (4, 8, "chunks")
    assert r.elapsed_s == pytest.approx(20) and r.eta_s == pytest.approx(20)  # 4 chunks in 20 s, 4 to go
    assert r.rate == "0.20 chunks/s"
    # done: the plan's jobs the log shows finished (engine, demo model, the std pass, a quant and its bench)
    finished = {"engine_build", "tiny_model", "imatrix_collect", "quantize", "bench_quant"}
    assert st.done == 5
    assert st.left == sum(j.count for j in plan.jobs) - st.done - 1
    # learned: each rule's measured / planned; the engine rules with nothing finished borrow the
    # median of the engine jobs, the others (engine build, conversion) keep their estimate
    assert {f.rule for f in st.finished} == finished
    assert {f.rule for f in st.finished if f.engine} == finished - {"engine_build", "tiny_model"}
    std = plan.job("imatrix_collect", "tiny", "std")
    assert st.factors["imatrix_collect"] == pytest.approx(MEASURED_S / std.seconds)
    engine = sorted(MEASURED_S / j.seconds for j in plan.jobs if (j.rule, j.model, j.item) in {
        ("imatrix_collect", "tiny", "std"), ("quantize", "tiny", "IQ2_KS-noimatrix"),
        ("bench_quant", "tiny", "IQ2_KS-noimatrix")})
    assert st.factors["*"] == pytest.approx(engine[1])  # their median
    # what is left: each job's first estimate x its rule's factor (or "*"), plus the running job's ETA
    gone = {("engine_build", "", ""), ("tiny_model", "tiny", ""), ("imatrix_collect", "tiny", "std"),
            ("imatrix_collect", "tiny", "mla"), ("quantize", "tiny", "IQ2_KS-noimatrix"),
            ("bench_quant", "tiny", "IQ2_KS-noimatrix")}
    left = sum(j.seconds * j.count * st.factors.get(j.rule, st.factors["*"] if j.engine else 1.0) for j in plan.jobs
               if (j.rule, j.model, j.item) not in gone)
    assert st.engine_hours_left * 3600 == pytest.approx(left + r.eta_s)
    assert st.eta_s == pytest.approx(left + r.eta_s)  # one job at a time (machine.jobs: 1)
    out = text(st)
    assert "imatrix_collect tiny/mla" in out and "4/8 chunks" in out and "ETA" in out
    assert f"jobs: 5 done, 1 running, 0 failed, {st.left} left" in out


def test_stalled_stopped_and_slurm(tmp_path):
    st = sweep_status(make_workdir(tmp_path / "a", log_age=3600)[0], now=NOW)
    assert st.running[0].stalled and "STALLED: log silent for 60 min" in text(st)
    # no Snakemake holds the work dir (killed, or the machine went down): nothing runs
    st = sweep_status(make_workdir(tmp_path / "b", locked=False)[0], now=NOW)
    assert not st.running and not st.snakemake_running and "not running" in text(st)
    st = sweep_status(make_workdir(tmp_path / "c", slurm=True)[0], now=NOW)
    assert st.running[0].external_id == "4242" and "[SLURM 4242]" in text(st)


def test_status_cli_and_a_plan_that_learned(tmp_path, capsys):
    wd, plan = make_workdir(tmp_path)
    assert main(["status", str(wd), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["done"] == 5 and [r["name"] for r in doc["running"]] == ["imatrix_collect tiny/mla"]
    # the next plan of that work dir: the plan's estimates x what the sweep measured
    learned = tmp_path / "learned.json"
    assert main(["plan", str(ROOT / "config" / "config.yaml"), "--learned", str(wd), "--json", str(learned)]) == 0
    assert f"x measured/planned of 5 finished job(s) in {wd}" in capsys.readouterr().out
    factors = sweep_status(wd).factors
    for j in json.loads(learned.read_text())["jobs"]:
        first = plan.job(j["rule"], j["model"], j["item"]).seconds
        factor = factors.get(j["rule"], factors["*"] if j["engine"] else 1.0)
        assert j["seconds"] == pytest.approx(first * factor), j["name"]
    # the std pass measured 5 s: its rule's estimate is now what it took
    std = next(j for j in json.loads(learned.read_text())["jobs"] if j["name"] == "tiny/std")
    assert std["seconds"] == pytest.approx(MEASURED_S)


def test_status_needs_the_plan(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "results/plan/plan.json: no capacity plan" in err and "\n" not in err.strip()
