"""What Snakemake itself records about a work dir, read without Snakemake (and without its lock,
so it works while a sweep runs, on the submit host of a SLURM sweep too):

- `.snakemake/log/*.snakemake.log`: each run's log, one block per job it started (rule,
  wildcards, outputs, log, jobid), then `Finished jobid: N` or `Error in rule`;
- `.snakemake/metadata/`: a record per finished output (rule, start and end time);
- `.snakemake/incomplete/`: a marker per output of a job that started and has not finished
  (its mtime is the start; a SLURM job's marker holds its external job id);
- `.snakemake/locks/`: present while a Snakemake process holds the work dir.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

_BLOCK = re.compile(r"^\[(?P<when>[A-Z][a-z]{2} [A-Z][a-z]{2} +\d+ [\d:]{8} \d{4})\]\n"
                    r"(?:local)?(?:rule|checkpoint) (?P<rule>\w+):\n(?P<body>(?:    .*(?:\n|$))*)", re.M)
_FIELD = re.compile(r"^    (\w+): (.*)$", re.M)
_FINISHED = re.compile(r"^Finished jobid: (\d+)", re.M)
_ERROR = re.compile(r"^Error in rule \w+:\n(?:    .*\n)*?    jobid: (\d+)", re.M)
_SLURM = re.compile(r"^Job (\d+) has been submitted with SLURM jobid (\S+)", re.M)


@dataclass
class SmkJob:
    """One job as a Snakemake run's log shows it."""

    rule: str
    jobid: int
    wildcards: dict[str, str]
    outputs: list[str]
    logs: list[str]
    started: float                 # epoch seconds (the block's time stamp, local time)
    run: str                       # the log file of the run that started it
    state: str = "started"         # started, finished, failed
    external_id: str = ""          # SLURM job id

    @property
    def key(self) -> tuple:
        return (self.rule, tuple(sorted(self.wildcards.items())))


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(", ") if v.strip()]


def parse_run_log(text: str, run: str = "") -> list[SmkJob]:
    """The jobs one Snakemake run's log shows, with what became of each."""
    jobs: dict[int, SmkJob] = {}
    for m in _BLOCK.finditer(text):
        f = dict(_FIELD.findall(m.group("body")))
        if "jobid" not in f:
            continue
        wc = dict(kv.split("=", 1) for kv in _csv(f.get("wildcards", "")) if "=" in kv)
        started = time.mktime(time.strptime(m.group("when"), "%a %b %d %H:%M:%S %Y"))
        job = SmkJob(m.group("rule"), int(f["jobid"]), wc, _csv(f.get("output", "")), _csv(f.get("log", "")),
                     started, run)
        jobs[job.jobid] = job
    for jobid, ext in _SLURM.findall(text):
        if int(jobid) in jobs:
            jobs[int(jobid)].external_id = ext
    for jobid in _FINISHED.findall(text):
        if int(jobid) in jobs:
            jobs[int(jobid)].state = "finished"
    for jobid in _ERROR.findall(text):
        if int(jobid) in jobs:
            jobs[int(jobid)].state = "failed"
    return list(jobs.values())


def record_path(base: Path, path: str, max_len: int = 255) -> Path:
    """Where Snakemake keeps a record of `path` under `base`: its urlsafe base64, cut into
    '@'-prefixed directory levels when longer than a file name may be."""
    b64 = base64.urlsafe_b64encode(path.encode()).decode()
    parts = [b64[i:i + max_len - 1] for i in range(0, len(b64), max_len - 1)]
    return base.joinpath(*["@" + s for s in parts[:-1]], parts[-1])


@dataclass
class WorkDir:
    """A work dir's Snakemake records."""

    root: Path
    jobs: dict[tuple, SmkJob] = field(default_factory=dict)  # the latest start of each job
    locked: bool = False
    latest_run: str = ""

    @classmethod
    def read(cls, root: str | Path) -> WorkDir:
        root = Path(root)
        smk = root / ".snakemake"
        wd = cls(root, locked=any((smk / "locks").glob("*.lock")))
        runs = sorted((smk / "log").glob("*.snakemake.log"))  # named by start time: oldest first
        for run in runs:
            found = parse_run_log(run.read_text(encoding="utf-8", errors="replace"), run.name)
            if found:
                wd.latest_run = run.name
            for j in found:
                wd.jobs[j.key] = j
        return wd

    def marker(self, output: str) -> Path:
        return record_path(self.root / ".snakemake" / "incomplete", output)

    def record(self, output: str) -> dict:
        """Snakemake's metadata record of a finished output ({} when there is none)."""
        try:
            return json.loads(record_path(self.root / ".snakemake" / "metadata", output).read_text())
        except (OSError, ValueError):
            return {}

    def state(self, j: SmkJob) -> str:
        """finished, failed, running, or interrupted (started by an earlier or a dead run)."""
        if j.state != "started":
            return j.state
        if self.locked and j.run == self.latest_run and any(self.marker(o).exists() for o in j.outputs):
            return "running"
        if all(self.record(o).get("incomplete") is False for o in j.outputs) and j.outputs:
            return "finished"  # a run whose log ended before it said so (killed after the job)
        return "interrupted"

    def started_at(self, j: SmkJob) -> float:
        """When the job started: its incomplete marker's time, else its block's."""
        for o in j.outputs:
            try:
                return self.marker(o).stat().st_mtime
            except OSError:
                continue
        return j.started

    def times(self, j: SmkJob) -> tuple[float, float] | None:
        """A finished job's start and end (epoch seconds) from Snakemake's metadata record."""
        rec = self.record(j.outputs[0]) if j.outputs else {}
        if rec.get("starttime") and rec.get("endtime"):
            return rec["starttime"], max(rec["starttime"], rec["endtime"])
        return None
