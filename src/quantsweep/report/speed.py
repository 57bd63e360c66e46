"""Bench records: what llama-sweep-bench measured for one model file, how, and on which machine.

A bench record (the JSON the bench rule writes) gives, per KV depth in the configured order,
the PP and TG tokens/s of `repeats` runs with their median, min and max; its first depth is the
*headline* depth (the report's speed columns, plot and gate use it). Speeds mean nothing
without the machine and the run settings, so this module also says those in words, and says
when the records of one report come from different hosts or settings (not comparable).

`BenchRecord.load` checks a record and raises a `ReportError` naming the file and the key
(e.g. `speed[1].tg_tps.median`); keys it does not read are left alone.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, QuantsweepError, ReportError
from ..fileio import read_json_object
from ..settings import RunSettings

# Bench settings that must be the same for every record of a report: the speed columns (one
# per depth, the headline depth first) and the gate compare like with like.
SAME_BENCH_KEYS = ("depths", "pp", "tg", "ctx", "mla", "fa", "repeats")
SPEED_KEYS = ("pp_tps", "tg_tps")
_MISSING = object()


def load_record(path: str | Path, what: str) -> dict:
    """A record the report reads (evaluation or bench), as a ReportError when it is unreadable."""
    try:
        return read_json_object(path, what)
    except QuantsweepError as e:
        raise ReportError(str(e)) from None


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_rate(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class Speed:
    """Tokens/s at one depth over the runs: their median, min and max."""

    median: float
    min: float
    max: float

    @property
    def spread(self) -> float:
        return self.max - self.min


@dataclass(frozen=True)
class DepthSpeed:
    depth: int
    pp_tps: Speed
    tg_tps: Speed


@dataclass(frozen=True)
class BenchRecord:
    """One bench record, checked, with the file it came from and the row it belongs to."""

    source: str  # the record file, for messages
    model: str
    quant: str
    data: dict
    speed: tuple[DepthSpeed, ...]  # configured order; the first is the headline depth

    @classmethod
    def load(cls, path: str | Path, model: str, quant: str) -> "BenchRecord":
        return cls.from_data(str(path), model, quant, load_record(path, "bench record"))

    @classmethod
    def from_data(cls, source: str, model: str, quant: str, data) -> "BenchRecord":
        if not isinstance(data, dict):
            raise ReportError(f"bench record {source}: not a JSON object")
        rec = cls(source, model, quant, data, ())
        speed = rec._speeds()
        rec._check_settings(speed)
        rec._check_host()
        rec._check_run()
        rec._get(data, "size_bytes", "", _is_count, "a byte count", None)
        return cls(source, model, quant, data, speed)

    # -- checks ---------------------------------------------------------------------------------

    def _bad(self, key: str, what: str) -> ReportError:
        return ReportError(f"bench record {self.source}: key {key!r} {what}")

    def _get(self, obj: dict, key: str, path: str, ok: Callable, what: str, default=_MISSING):
        """obj[key] when `ok` accepts it; `default` when absent (no default: required)."""
        full = f"{path}.{key}" if path else key
        if key not in obj:
            if default is _MISSING:
                raise self._bad(full, "is missing")
            return default
        if not ok(obj[key]):
            raise self._bad(full, f"is {obj[key]!r}, not {what}")
        return obj[key]

    def _object(self, obj: dict, key: str, path: str = "", required: bool = True) -> dict:
        return self._get(obj, key, path, lambda v: isinstance(v, dict), "an object", _MISSING if required else {})

    def _speed(self, obj: dict, key: str, path: str) -> Speed:
        d = self._object(obj, key, path)
        where = f"{path}.{key}"
        v = {k: float(self._get(d, k, where, _is_rate, "a positive finite number")) for k in ("median", "min", "max")}
        if not v["min"] <= v["median"] <= v["max"]:
            raise self._bad(where, f"has min {v['min']!r}, median {v['median']!r}, max {v['max']!r}: "
                                   "not min ≤ median ≤ max")
        runs = self._get(d, "runs", where, lambda x: isinstance(x, list) and x and all(_is_rate(r) for r in x),
                         "a non-empty list of positive finite numbers")
        if (min(runs), max(runs)) != (v["min"], v["max"]) or not math.isclose(statistics.median(runs), v["median"],
                                                                              rel_tol=1e-9):
            raise self._bad(f"{where}.runs", f"is {runs!r}: its median, min and max are not "
                                             f"{v['median']!r}, {v['min']!r}, {v['max']!r}")
        return Speed(v["median"], v["min"], v["max"])

    def _speeds(self) -> tuple[DepthSpeed, ...]:
        items = self._get(self.data, "speed", "", lambda v: isinstance(v, list) and v, "a non-empty list")
        out: list[DepthSpeed] = []
        for i, d in enumerate(items):
            where = f"speed[{i}]"
            if not isinstance(d, dict):
                raise self._bad(where, f"is {d!r}, not an object")
            depth = self._get(d, "depth", where, _is_count, "a KV depth (a whole number >= 0)")
            if depth in [s.depth for s in out]:
                raise self._bad(f"{where}.depth", f"is {depth}, a depth listed twice")
            out.append(DepthSpeed(depth, *(self._speed(d, k, where) for k in SPEED_KEYS)))
        return tuple(out)

    def _check_settings(self, speed: tuple[DepthSpeed, ...]) -> None:
        b = self._object(self.data, "bench")
        for k in ("pp", "tg", "repeats"):
            self._get(b, k, "bench", lambda v: _is_count(v) and v > 0, "a whole number > 0")
        depths = [s.depth for s in speed]
        if b.get("depths") != depths:
            raise self._bad("bench.depths", f"is {b.get('depths')!r}, but key 'speed' lists depths {depths!r}")
        for i, s in enumerate(speed):
            for k in SPEED_KEYS:
                n = len(self.data["speed"][i][k]["runs"])
                if n != b["repeats"]:
                    raise self._bad(f"speed[{i}].{k}.runs", f"has {n} values, but bench.repeats is {b['repeats']}")

    def _check_host(self) -> None:
        h = self._object(self.data, "host")
        for k in ("hostname", "cpu"):
            self._get(h, k, "host", lambda v: isinstance(v, str) and v, "a non-empty string")
        self._get(h, "cpus", "host", lambda v: _is_count(v) and v > 0, "a whole number > 0")
        gpus = self._get(h, "gpus", "host", lambda v: isinstance(v, list), "a list")
        for i, g in enumerate(gpus):
            if not isinstance(g, dict):
                raise self._bad(f"host.gpus[{i}]", f"is {g!r}, not an object")
            for k in ("name", "driver"):
                self._get(g, k, f"host.gpus[{i}]", lambda v: isinstance(v, str) and v, "a non-empty string")
        engine = self._object(self.data, "engine", required=False)
        self._get(engine, "cuda", "engine", lambda v: isinstance(v, bool), "true or false", None)

    def _check_run(self) -> None:
        run_settings(self._object(self.data, "run"), f"bench record {self.source}")

    # -- what it says ---------------------------------------------------------------------------

    @property
    def settings(self) -> dict:
        return self.data["bench"]

    @property
    def run(self) -> RunSettings:
        return run_settings(self.data["run"], f"bench record {self.source}")

    @property
    def size_bytes(self) -> int | None:
        return self.data.get("size_bytes")

    @property
    def cuda(self) -> bool | None:
        return (self.data.get("engine") or {}).get("cuda")

    def threads(self) -> int | None:
        """The threads it ran with: run.threads, else the job's (bench.threads, or -t of its command)."""
        t = self.run.threads or self.settings.get("threads")
        cmd = self.data.get("cmd") if isinstance(self.data.get("cmd"), list) else []
        if not t and "-t" in cmd[:-1] and str(cmd[cmd.index("-t") + 1]).isdigit():
            t = int(cmd[cmd.index("-t") + 1])
        return t if _is_count(t) and t > 0 else None

    def describe_host(self) -> str:
        """e.g. 'box1: AMD EPYC 7763 64-Core Processor, 2 CPUs, no GPU; engine CUDA off'."""
        h = self.data["host"]
        groups: dict[tuple[str, str], int] = {}
        for g in h["gpus"]:
            groups[(g["name"], g["driver"])] = groups.get((g["name"], g["driver"]), 0) + 1
        gpus = " + ".join(f"{n}× {name} (driver {driver})" for (name, driver), n in groups.items()) or "no GPU"
        engine = "" if self.cuda is None else f"; engine CUDA {'on' if self.cuda else 'off'}"
        return f"{h['hostname']}: {h['cpu']}, {h['cpus']} CPUs, {gpus}{engine}"

    def describe_run(self) -> str:
        """The run settings in words, e.g. 'CPU only, 2 threads' or '-ngl 99 -ot exps=CPU -ub 2048, 8 threads'."""
        r = self.run
        flags = dataclasses.replace(r, gpu_layers=0).words()
        if r.gpu_layers or self.cuda:
            parts = [" ".join([f"-ngl {r.gpu_layers}", *flags])]
        else:
            parts = ["CPU only"] + ([" ".join(flags)] if flags else [])
        if self.threads():
            parts.append(threads_text(self.threads()))
        if r.threads_batch:
            parts.append(threads_text(r.threads_batch, "batch thread"))
        return ", ".join(parts)

    def describe_bench(self) -> str:
        """How it was measured, for the notes above the table."""
        b = self.settings
        attn = f", -mla {b['mla']} -fa {b['fa']}" if "mla" in b and "fa" in b else ""
        others = "; other depths in summary.csv" if len(self.speed) > 1 else ""
        return (f"llama-sweep-bench at depth {self.speed[0].depth} (PP {b['pp']} tokens, TG {b['tg']} tokens{attn}), "
                f"median of {b['repeats']} runs ± half their range{others}")


def threads_text(n, what: str = "thread") -> str:
    """'1 thread', '8 threads'."""
    return f"{n} {what}" + ("" if n == 1 else "s")


def run_settings(r, source: str) -> RunSettings:
    """A record's run settings (as the step wrote them: RunSettings.to_dict), read with the class
    that wrote them; ReportError naming the record and the key."""
    try:
        return RunSettings.from_dict(r, "run")
    except ConfigError as e:
        raise ReportError(f"{source}: {e}") from None


def run_words(r, source: str) -> list[str]:
    """A record's run settings as the engine flags they gave, threads aside: what the report's
    evaluation and speed lines show."""
    return run_settings(r, source).words()


def check_same_bench(benches: Sequence[BenchRecord]) -> None:
    """Refuse records measured with other bench settings than the first (names both files and the key)."""
    for b in benches[1:]:
        a = benches[0]
        diff = [k for k in SAME_BENCH_KEYS if a.settings.get(k) != b.settings.get(k)]
        if diff:
            raise ReportError(f"bench record {b.source} ({b.model}/{b.quant}) was benchmarked with other settings "
                              f"than {a.source}: " + ", ".join(f"bench.{k} {b.settings.get(k)!r} vs "
                                                               f"{a.settings.get(k)!r}" for k in diff))


def _which(benches: Sequence[BenchRecord]) -> str:
    """'tiny: baseline, Q8_0; big: IQ4_KS' (the rows these records belong to)."""
    by_model: dict[str, list[str]] = {}
    for b in benches:
        by_model.setdefault(b.model, []).append(b.quant)
    return "; ".join(f"{m}: {', '.join(qs)}" for m, qs in by_model.items())


def _distinct(benches: Sequence[BenchRecord], one: str, many: str, describe: Callable) -> tuple[str, list[str]]:
    """One note: the one value of `describe`, or every value with its rows and a warning."""
    groups: dict[str, list[BenchRecord]] = {}
    for b in benches:
        groups.setdefault(describe(b), []).append(b)
    if len(groups) == 1:
        return f"{one}: {next(iter(groups))}", []
    return (f"{len(groups)} different {many}: speeds are not comparable across them",
            [f"{text} ({_which(bs)})" for text, bs in groups.items()])


def speed_notes(benches: Sequence[BenchRecord]) -> tuple[str, list[tuple[str, list[str]]]]:
    """How the speeds were measured (one line) and the notes under it, (text, sub-items) each:
    the host(s) and the run settings. Empty without records."""
    if not benches:
        return "", []
    return (f"Speed: {benches[0].describe_bench()}.",
            [_distinct(benches, "host", "hosts", BenchRecord.describe_host),
             _distinct(benches, "run", "run settings", BenchRecord.describe_run)])


def brief_host(benches: Sequence[BenchRecord]) -> str:
    """The host in a few words for a plot title ('' without records)."""
    hosts = {b.describe_host() for b in benches}
    if len(hosts) > 1:
        return f"{len(hosts)} hosts, not comparable"
    return hosts.pop() if hosts else ""
