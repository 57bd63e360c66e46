"""Crash recovery: kill -9 the whole `snakemake` process tree mid-sweep, rerun, and get the
uninterrupted run's results without recomputing anything that had finished.

A small sweep runs once uninterrupted (the reference). Each test starts the same sweep in a fresh
work dir, waits until the chosen engine tool (llama-imatrix of the second imatrix pass, or
llama-quantize of IQ4_KS) is running and its log shows progress, freezes the process group
(SIGSTOP, so the job cannot finish between the check and the kill) and SIGKILLs it, as a crashed
node would. Then it reruns and compares.

What a user types after such a crash (Snakemake 9 leaves its lock in .snakemake/locks/, and a
plain rerun stops with "Directory cannot be locked"):

    snakemake --unlock
    snakemake                # profiles/default sets rerun-incomplete: true

The killed job's outputs are marked incomplete in .snakemake/incomplete/; while none of them
exists (our steps write to a hidden `.name.partial.ext` and rename), no flag is needed, but a
crash between the renames of a job's outputs leaves one in place, and without
--rerun-incomplete (the default profile sets it) Snakemake stops with IncompleteFilesException.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from conftest import ROOT, SMK_ENV, make_workdir, smk
from quantsweep.gguf.reader import read_model, read_table
from quantsweep.status import sweep_status

pytestmark = pytest.mark.e2e

# Small enough for 2 cores: two imatrix passes of 8 chunks, two quants, 4 evaluation chunks; no
# benchmarks (speeds are measurements: two runs never give the same numbers).
OVERRIDES = {"quants": ["Q8_0", "IQ4_KS"], "imatrix": {"chunks": 8}, "eval": {"chunks": 4}, "bench": {"enabled": False}}
CORES = "2"
# Where the sweep writes; the hidden `.name.partial.ext` temp files are not final outputs.
TREES = ("results", "resources")
# Fields that differ between two uninterrupted runs: timings (and the rates measured from them),
# start times, the work dir.
VOLATILE = {"wall_s", "started_utc", "started_at", "ended_at", "cwd", "rate"}



class KillPoint(NamedTuple):
    tool: str       # the engine program that must be running
    log: str        # glob of the job's log
    progress: str   # a progress line of that tool (regex, multiline) ...
    min_hits: int   # ... seen this often after the run's `+ argv` line
    kept: tuple     # artifacts of which one must be finished first (its manifest, written last, exists)


KILL_POINTS = {
    # the second imatrix pass (about 0.7 s of engine time), after its first chunk
    "imatrix": KillPoint("llama-imatrix", "logs/imatrix_collect/*.log", r"^\[1\]\d", 1,
                         ("results/imatrix/tiny/mla.dat", "results/imatrix/tiny/std.dat")),
    # IQ4_KS (about 1.5 s of engine time; Q8_0 takes 0.1 s), once a few tensors are written
    "quantize": KillPoint("llama-quantize", "logs/quantize/tiny-IQ4_KS.log", r"^\[\s*\d+/\s*\d+\]", 3,
                          ("results/imatrix/tiny/imatrix.dat",)),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    wd = make_workdir(tmp_path_factory.mktemp("resume-ref"), OVERRIDES)
    r = smk(wd, "--cores", CORES)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return wd


# ---- helpers -----------------------------------------------------------------------------------

def _group(pgid: int) -> dict[int, tuple[str, int, list[str]]]:
    """Live (non-zombie) processes of a process group: pid -> (state, ppid, argv)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state not in "ZX":
            out[int(d)] = (state, int(ppid), argv)
    return out


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X"
    return stat[stat.rindex(")") + 2:].split()[0]


def _descendants(root: int) -> set[int]:
    children: dict[int, set[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), set()).add(int(d))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _engine_runs(wd: Path, log_glob: str, progress: str, min_hits: int) -> list[tuple[tuple[str, ...], Path]]:
    """(engine command line, log) of the last run in each log matching `log_glob` whose output
    shows `min_hits` progress lines (quantsweep writes `+ argv` before the tool's output)."""
    out = []
    for log in sorted(wd.glob(log_glob)):
        text = log.read_text(errors="replace")
        heads = list(re.finditer(r"^\+ (.*)\n", text, re.M))
        if heads and len(re.findall(progress, text[heads[-1].end():], re.M)) >= min_hits:
            out.append((tuple(shlex.split(heads[-1].group(1))), log))
    return out


def _final_of(argv: list[str]) -> Path:
    """The final path of the engine's output (it writes the hidden `.name.partial.ext`)."""
    tmps = [Path(a) for a in argv if ".partial." in Path(a).name]
    assert len(tmps) == 1, f"the engine does not write a `.name.partial.ext` temp file: {argv}"
    (tmp,) = tmps
    return tmp.with_name(tmp.name[1:].split(".partial.")[0])


def kill_during(wd: Path, point: str, timeout: float = 900) -> dict:
    """Run the sweep and SIGKILL its whole process group while `point`'s engine tool is working."""
    kp = KILL_POINTS[point]
    with open(wd / "killed-run.txt", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(wd),
             "--cores", CORES], cwd=wd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=SMK_ENV)
        pgid = proc.pid
        deadline = time.monotonic() + timeout
        gone: set[tuple] = set()  # engine runs seen in a log whose process has exited
        try:
            while True:
                assert proc.poll() is None, f"the sweep ended before {point} was caught:\n" + \
                    (wd / "killed-run.txt").read_text()[-4000:]
                assert time.monotonic() < deadline, f"no {point} run caught in {timeout} s"
                found = None
                if any((wd / f).with_suffix(".manifest.json").exists() for f in kp.kept):
                    for argv, log in _engine_runs(wd, kp.log, kp.progress, kp.min_hits):
                        if (argv, log) in gone:
                            continue
                        assert os.path.basename(argv[0]) == kp.tool, argv
                        pids = [pid for pid, (_, _, a) in _group(pgid).items() if tuple(a) == argv]
                        if pids:
                            found = pids[0]
                            break
                        gone.add((argv, log))  # it showed progress, so it ran and has exited since
                if not found:
                    time.sleep(0.01)
                    continue
                os.killpg(pgid, signal.SIGSTOP)
                t = time.monotonic()
                while _state(found) not in "TtZX" and time.monotonic() - t < 5:
                    time.sleep(0.001)
                if _state(found) in "Tt":  # stopped while still running: the job cannot have finished
                    break
                os.killpg(pgid, signal.SIGCONT)  # it exited just before the stop: catch a later one
                gone.add((argv, log))
            status = sweep_status(wd)  # what `quantsweep status` shows of the frozen sweep
            escaped = {p for p in _descendants(pgid) if p not in _group(pgid) and _state(p) not in "ZX"}
            assert not escaped, f"processes outside the sweep's process group: {escaped}"
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=60)
            t = time.monotonic()
            while _group(pgid) and time.monotonic() - t < 30:  # children are reaped by init
                time.sleep(0.05)
            assert not _group(pgid), _group(pgid)
        finally:
            if proc.poll() is None or _group(pgid):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return {"engine_argv": list(argv), "log": log, "status": status}


def marked_incomplete(wd: Path) -> set[str]:
    """Paths Snakemake marked as being written (.snakemake/incomplete/<urlsafe base64 of path>,
    long names split into '@'-prefixed directory levels)."""
    base = wd / ".snakemake" / "incomplete"
    out = set()
    for f in base.rglob("*"):
        if f.is_file() and f.name != "migration_underway":
            b64 = "".join(p.lstrip("@") for p in f.relative_to(base).parts)
            out.add(base64.urlsafe_b64decode(b64).decode())
    return out


def hidden_entries(wd: Path) -> list[str]:
    """Temp files and staging dirs under results/ and resources/ (`.name.partial.ext`, `.engine.*`)."""
    return sorted(str(f.relative_to(wd)) for tree in TREES for f in (wd / tree).rglob(".*"))


def final_files(wd: Path) -> dict[str, int]:
    """Every file at a final output path under results/ and resources/ (none inside a hidden
    temp or staging dir): path -> mtime_ns."""
    out = {}
    for tree in TREES:
        for f in (wd / tree).rglob("*"):
            rel = f.relative_to(wd)
            if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                out[str(rel)] = f.stat().st_mtime_ns
    return out


def normalized(obj):
    """A JSON record or manifest without what differs between two identical runs: timings, start
    times, the work dir, and the hash/size of JSON records (they hold wall_s; the records
    themselves are compared normalized)."""
    if isinstance(obj, dict):
        drop = set(VOLATILE)
        if "path" in obj and "sha256" in obj and str(obj["path"]).endswith(".json"):
            drop |= {"sha256", "bytes"}
        return {k: normalized(v) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [normalized(v) for v in obj]
    return obj


def assert_same_as_reference(wd: Path, ref: Path, rel: str) -> None:
    a, b = (wd / rel).read_bytes(), (ref / rel).read_bytes()
    if rel.endswith(".json"):
        assert normalized(json.loads(a)) == normalized(json.loads(b)), rel
    elif a != b:  # (no byte-by-byte diff of a binary file in the report)
        pytest.fail(f"{rel} differs from the uninterrupted run ({len(a)} vs {len(b)} bytes)")


def assert_ggufs_whole(wd: Path) -> None:
    """Every GGUF at a final path parses and its tensor data ends where the file ends."""
    for rel in final_files(wd):
        if rel.endswith(".gguf"):
            f = wd / rel
            read_model(f)
            t = read_table(f)
            assert f.stat().st_size == t.data_offset + max(x.offset + x.nbytes for x in t.tensors), rel


# ---- the tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_kill_9_then_rerun_resumes_and_matches_uninterrupted_run(reference, tmp_path, point):
    wd = make_workdir(tmp_path / "wd", OVERRIDES)
    t0 = time.monotonic()
    killed = kill_during(wd, point)
    t_kill = time.monotonic() - t0

    # -- the state a crash leaves -----------------------------------------------------------------
    # No file at a final path is half-written (each is renamed into place when whole): every one
    # is what the uninterrupted run wrote; a leftover hidden `.name.partial.ext` is allowed.
    for rel in final_files(wd):
        assert_same_as_reference(wd, reference, rel)
    assert_ggufs_whole(wd)
    final = _final_of(killed["engine_argv"])
    assert not (wd / final).exists(), f"{final} exists although its engine was running"
    incomplete = marked_incomplete(wd)
    assert str(final) in incomplete, incomplete
    # finished: at its final path and not marked incomplete (a job Snakemake saw end)
    finished = {p: m for p, m in final_files(wd).items() if p not in incomplete}
    assert any(f in finished for f in KILL_POINTS[point].kept), sorted(finished)  # the kill came mid-sweep
    assert list((wd / ".snakemake" / "locks").iterdir()), "no stale lock left by kill -9?"
    # the status of the sweep as it stood: that job running, at the progress its log showed
    st = killed["status"]
    (running,) = [r for r in st.running if r.log == str(killed["log"].relative_to(wd))]
    assert st.snakemake_running
    p = running.progress
    assert p["tool"] == KILL_POINTS[point].tool and KILL_POINTS[point].min_hits <= p["done"] <= p["total"]
    assert p["total"] == {"imatrix": OVERRIDES["imatrix"]["chunks"], "quantize": len(read_table(
        wd / "resources" / "models" / "tiny.gguf").tensors)}[point]
    assert st.done >= 1 and st.left >= 1 and st.eta_s > 0 and not running.stalled

    # -- the rerun ----------------------------------------------------------------------------------
    if point == "imatrix":  # what the user sees first (checked once: each snakemake start costs)
        r = smk(wd, "--cores", CORES)
        assert r.returncode != 0 and "--unlock" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    r = smk(wd, "--unlock")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    t0 = time.monotonic()
    r = smk(wd, "--cores", CORES)
    t_rerun = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    rerun_log = r.stdout + r.stderr
    stats = re.search(r"Job stats:\n(.*?)\n\n", rerun_log, re.S)
    print(f"{point}: killed after {t_kill:.1f} s during {killed['log'].relative_to(wd)}; "
          f"{len(finished)} finished files kept; rerun {t_rerun:.1f} s\n" + (stats.group(1) if stats else ""))

    after = final_files(wd)
    touched = sorted(p for p, m in finished.items() if after.get(p) != m)
    assert not touched, f"finished outputs recomputed: {touched}\n{rerun_log[-4000:]}"
    assert set(after) == set(final_files(reference))
    for rel in after:
        assert_same_as_reference(wd, reference, rel)
    assert not hidden_entries(wd), hidden_entries(wd)  # the rerun renamed or removed every temp file
    assert not marked_incomplete(wd)


def test_default_profile_reruns_incomplete_jobs():
    """The recovery above relies on it when a crash lands between the renames of one job's
    outputs (Snakemake then stops with IncompleteFilesException without the flag)."""
    profile = yaml.safe_load((ROOT / "profiles" / "default" / "profile.yaml").read_text())
    assert profile.get("rerun-incomplete") is True
