"""A sweep through a real single-node SLURM with the site profile profiles/slurm.

tests/slurm/up.sh brings up SLURM on localhost (installing slurm-wlm + munge with apt when
missing, one fake GPU), the sweep runs with `--workflow-profile profiles/slurm` through
snakemake-executor-plugin-slurm, and tests/slurm/down.sh stops the daemons afterwards. The test
checks that every job except the local rules ran as a COMPLETED SLURM job, that the GPU-declared
jobs got the (fake) GPU and saw CUDA_VISIBLE_DEVICES, and that the report was written.

The sweep is the default one made small (SWEEP): it runs every rule the default sweep runs (an
ftype and a recipe quant, both imatrix passes, the pool, the baseline, sensitivity with its top
run, an allocated recipe, speed), so every kind of job crosses SLURM, but ~30 jobs instead of
~125: what this test checks is the scheduling of each rule, and the default sweep's own results
are checked by test_e2e.py.

Needs root. Outside CI (CI != "true") it is skipped when root, the SLURM plugin or SLURM itself
(apt) is unavailable; under CI=true those are failures. The engine comes from the user cache
(~/.cache/quantsweep or $QUANTSWEEP_CACHE) like in test_e2e.py; a cold cache builds it inside a
SLURM job.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml

from conftest import DEFAULT_RULES, ROOT, make_workdir
from quantsweep.config import load
from quantsweep.report import read_csv
from quantsweep.status import parse_run_log, read_plan, sweep_status

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

IN_CI = os.environ.get("CI") == "true"
UP = ROOT / "tests" / "slurm" / "up.sh"
DOWN = ROOT / "tests" / "slurm" / "down.sh"
# localrule: True, run by the main Snakemake process
LOCAL_RULES = {"all", "report", "run_settings", "sensitivity_table", "allocate"}
RUN_TIMEOUT = 2400  # s, hard limit (SIGKILL) on the Snakemake run
REPORT_FILES = ("summary.csv", "summary.md", "summary.html", "size_vs_lnppl.png", "size_vs_kld.png",
                "kld_vs_speed.png")
BENCH_RULES = {"bench_quant", "bench_base"}
# the default sweep made small: two quants, a two-rung ladder over two groups, one budget
SWEEP = {
    "resources": {"gpus": 1},  # every imatrix/perplexity job asks for gpu=1: the node's one fake GPU
    "quants": ["Q8_0", {"recipe": "config/recipes/tiny-mix-iq2.yaml"}],
    "allocate": {"enabled": True, "ladder": ["iq4_ks", "q8_0"], "groups": [{"match": "exps", "per": "all"},
                 {"match": ".", "per": "all"}], "budgets": [{"bpw": 6.5}]},
    "bench": {"depths": [0], "tg": 16, "repeats": 1},
}


def _unavailable(reason: str) -> None:
    """Skip outside CI; under CI a missing prerequisite is a failure."""
    if IN_CI:
        pytest.fail(f"SLURM test cannot run under CI=true: {reason}")
    pytest.skip(reason)


def _nproc() -> int:
    return len(os.sched_getaffinity(0))


def _ids_in_queue() -> list[str]:
    r = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    return r.stdout.split() if r.returncode == 0 else []


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node SLURM for this module; its daemons are stopped afterwards."""
    if os.geteuid() != 0:
        _unavailable("needs root (tests/slurm/up.sh installs packages and starts SLURM daemons)")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        _unavailable("snakemake-executor-plugin-slurm is not installed (pip install '.[test]')")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        _unavailable("SLURM is not installed and apt-get is not available to install it")
    run_dir = tmp_path_factory.mktemp("slurm-run")
    env = {**os.environ, "SLURM_CI_RUN": str(run_dir)}
    try:
        t0 = time.monotonic()
        up = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
        print(f"\ntests/slurm/up.sh: {time.monotonic() - t0:.1f} s, rc {up.returncode}: {up.stdout.strip()}")
        if up.returncode != 0:
            _unavailable(f"tests/slurm/up.sh failed (rc {up.returncode}):\n{(up.stdout + up.stderr)[-3000:]}")
        yield run_dir
    finally:
        # jobs left by a killed run (this throwaway cluster holds only this test's jobs)
        ids = _ids_in_queue() if shutil.which("squeue") else []
        if ids:
            subprocess.run(["scancel", *ids], timeout=30, stdin=subprocess.DEVNULL)
            for _ in range(30):
                if not _ids_in_queue():
                    break
                time.sleep(1)
        t0 = time.monotonic()
        down = subprocess.run(["bash", str(DOWN)], env=env, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        print(f"\ntests/slurm/down.sh: {time.monotonic() - t0:.1f} s, rc {down.returncode} {down.stderr.strip()}")


def _slurm_jobs() -> list[dict]:
    """Every job slurmctld still knows (MinJobAge=3600 in up.sh), as `scontrol show job -d -o` fields."""
    r = subprocess.run(["scontrol", "show", "job", "-d", "-o"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    jobs = []
    for line in r.stdout.splitlines():
        # key=value pairs; values may contain spaces only in keys we do not read
        fields = dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", line))
        if fields.get("JobId"):
            jobs.append(fields)
    return jobs


def _job_stats(log: str) -> Counter:
    """Rule -> count of the jobs Snakemake reports finished ('Finished jobid: N (Rule: R)'): the
    'Job stats:' table printed before running cannot list the jobs a checkpoint adds (the
    sensitivity runs); the total must be Snakemake's own final 'N of N steps (100%) done'."""
    stats = Counter(re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", log, re.M))
    done = re.findall(r"^(\d+) of (\d+) steps \(100%\) done$", log, re.M)
    assert done and done[-1][0] == done[-1][1], log[-3000:]
    assert sum(stats.values()) == int(done[-1][0])
    return stats


def test_sweep_runs_through_slurm(slurm, tmp_path):
    cpus = _nproc()
    wd = make_workdir(tmp_path / "wd", SWEEP)
    gpu_rules = {"imatrix_collect", "eval_baseline", "eval_reference", "eval_quant", "sensitivity_run",
                 "sensitivity_top", *BENCH_RULES}

    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    cmd = [
        "timeout", "-s", "KILL", str(RUN_TIMEOUT),
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(wd),
        "--workflow-profile", str(ROOT / "profiles" / "slurm"),  # replaces profiles/default
        # fit the throwaway cluster: one node with few CPUs, fast status polls
        "--max-threads", str(cpus),  # the profile's set-threads ask for 8 (sbatch rejects > node CPUs)
        "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-keep-successful-logs",  # evidence below
    ]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT + 60,
                       stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    log = r.stdout + r.stderr
    (tmp_path / "snakemake.log").write_text(log)
    assert r.returncode == 0, f"rc {r.returncode} after {wall:.0f} s\n{log[-8000:]}"

    # the report: one row per quant plus the baseline
    out = wd / "results" / "report"
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    quants = load(yaml.safe_load((wd / "config" / "config.yaml").read_text()), ROOT).quants
    assert [row["quant"] for row in read_csv(out / "summary.csv")] == ["baseline"] + [q.name for q in quants]

    # every non-local job was a SLURM job of this run and COMPLETED
    stats = _job_stats(log)
    assert set(stats) == DEFAULT_RULES  # every kind of job the default sweep has went through SLURM
    remote = Counter({rule: n for rule, n in stats.items() if rule not in LOCAL_RULES})
    jobs = [j for j in _slurm_jobs() if j.get("Comment", "").startswith("rule_")]
    for j in jobs:  # the plugin's job comment: rule_<rule>[_wildcards_<values>]
        j["rule"] = j["Comment"].removeprefix("rule_").split("_wildcards_")[0]
    assert Counter(j["rule"] for j in jobs) == remote
    assert {j["JobState"] for j in jobs} == {"COMPLETED"}, [(j["JobId"], j["JobState"]) for j in jobs]
    assert len({j["JobName"] for j in jobs}) == 1  # the plugin names every job of a run by its run id
    logs = {p.stem: p for p in (wd / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert set(logs) >= {j["JobId"] for j in jobs}

    # GPU-declared jobs were allocated the fake GPU and saw it as CUDA_VISIBLE_DEVICES=0 (printed by
    # up.sh's TaskProlog into the job log); the others got none
    gpu_jobs = [j for j in jobs if j["rule"] in gpu_rules]
    assert gpu_jobs
    for j in jobs:
        text = logs[j["JobId"]].read_text()
        step = re.search(rf"slurm-task-prolog: job={j['JobId']} step=0 CUDA_VISIBLE_DEVICES=(\S+)", text)
        assert step, text[-2000:]
        if j in gpu_jobs:
            assert "gres:gpu:1" in j.get("TresPerJob", ""), j
            assert step.group(1) == "0", text[-2000:]
        else:
            assert "gpu" not in j.get("TresPerJob", "") + j.get("TresPerNode", ""), j
            assert step.group(1) == "<unset>", text[-2000:]

    # benchmarks had the node to themselves (profiles/slurm: sbatch --exclusive), the rest shared it
    bench_jobs = [j for j in jobs if j["rule"] in BENCH_RULES]
    assert len(bench_jobs) == len(quants) + 1
    assert {j.get("OverSubscribe") for j in bench_jobs} == {"NO"}, [j.get("OverSubscribe") for j in bench_jobs]
    assert "NO" not in {j.get("OverSubscribe") for j in jobs if j not in bench_jobs}

    # `quantsweep status` of the SLURM work dir (Snakemake's records on the shared filesystem):
    # every job the plugin submitted is found with its SLURM id, and the sweep is done
    run_log = sorted((wd / ".snakemake" / "log").glob("*.snakemake.log"))[-1].read_text()
    assert {j.external_id for j in parse_run_log(run_log) if j.external_id} == {j["JobId"] for j in jobs}
    st = sweep_status(wd)
    assert not st.running and not st.failed and st.left == 0
    assert st.done == sum(j.count for j in read_plan(wd)[0])

    n_gpu = len(gpu_jobs)
    print(f"\nSLURM sweep: {wall:.0f} s wall, {len(jobs)} SLURM jobs ({n_gpu} with the fake GPU), "
          f"{sum(stats.values()) - len(jobs)} local; per rule: {dict(sorted(remote.items()))}")
