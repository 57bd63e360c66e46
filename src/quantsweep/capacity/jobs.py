"""Every job of a sweep with what it reads, the RAM and GPU memory it holds, the disk it writes
and keeps, and how long it should take: the capacity plan, and the numbers each rule asks the
scheduler for (workflow/rules/resources.smk reads them from here, so the plan and the requests
cannot disagree).

Resident jobs (imatrix, perplexity, sweep-bench, sensitivity runs) hold the file they read:
its CPU-side tensors in RAM, its GPU-side tensors in VRAM (Placement), plus the KV cache at
their context and compute buffers. quantize and pool jobs stream their source (page cache, not
resident): the largest tensor as f32 a few times over. Runtimes are the throughput model's
(settings.machine.Throughput).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..allocator.groups import quantized_tensors
from ..allocator.sensitivity import planned_runs
from ..engine.argv import IMATRIX_PASSES
from ..gguf.reader import GGUFTable
from ..imatrix.fit import expected_size
from ..planner.plan import plan
from ..planner.pool import named_types, pool_recipe
from ..planner.recipes import load_recipe, recipe_or_ftype
from ..settings import BASE_REFERENCE, Quant, RunSettings, Sweep
from ..settings.measure import SOURCE
from ..settings.machine import MachineSettings, Throughput
from .files import ModelFile, Placement, kv_bytes_per_token, of_plan, of_table

GiB, MiB = 2**30, 2**20
PERPLEXITY_BATCH = 2048  # llama-perplexity's default -b: ctx 512 evaluates 4 sequences at once
OVERHEAD = 2 * GiB       # process, tokenizer, scheduler buffers
GPU_OVERHEAD = GiB // 2  # CUDA context
# The order jobs can run in (a stage waits for the ones before it): the wall-time estimate.
STAGES = ("engine", "convert", "imatrix-model", "imatrix", "quantize", "reference", "measure", "allocate", "auto")


@dataclass(frozen=True)
class Job:
    """One job of the sweep, sized."""

    rule: str
    model: str
    item: str                 # the quant, pass, pool type, ... ("" for one per model)
    reads: str                # what it reads, for people
    read_bytes: int
    ram_bytes: int
    vram_bytes: int           # per GPU
    gpus: int
    written_bytes: int
    kept_bytes: int           # of written_bytes, what stays to the end of the sweep
    seconds: float
    stage: str
    count: int = 1            # identical jobs (the sensitivity runs)
    engine: bool = True       # an engine job (its hours count as engine-hours)

    @property
    def name(self) -> str:
        return "/".join(p for p in (self.model, self.item) if p)

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


@dataclass
class CapacityPlan:
    """The jobs of a sweep, and the machine and rates they were sized for."""

    jobs: list[Job]
    machine: MachineSettings
    inputs: dict[str, int] = field(default_factory=dict)  # files already on disk: label -> bytes
    parallel: int = 1
    notes: list[str] = field(default_factory=list)
    tables: dict = field(default_factory=dict, repr=False)       # model -> source GGUFTable
    checkpoints: dict = field(default_factory=dict, repr=False)  # model -> hf Checkpoint

    def replanned(self, sweep: Sweep, machine: MachineSettings | None = None) -> CapacityPlan:
        """The same models (and machine) with other settings: how a suggested fix is tried."""
        return capacity_plan(sweep, self.tables, self.checkpoints, machine or self.machine)

    def scaled(self, factors: dict[str, float]) -> CapacityPlan:
        """The plan with each job's time x its rule's factor, as a status learns them from the
        jobs a sweep has finished (status.sweep.factor_of: "*" stands in for engine rules only)."""
        jobs = [replace(j, seconds=j.seconds * factor_of(factors, j.rule, j.engine)) for j in self.jobs]
        return replace(self, jobs=jobs)

    def job(self, rule: str, model: str, item: str = "") -> Job:
        """The job a rule's resource function sizes (sensitivity runs: any of them, all alike)."""
        for j in self.jobs:
            if j.rule == rule and j.model == model and (j.item == item or j.count > 1):
                return j
        raise KeyError(f"the capacity plan has no {rule} job for {model}/{item}")

    @property
    def written_bytes(self) -> int:
        return sum(j.written_bytes * j.count for j in self.jobs)

    @property
    def peak_disk_bytes(self) -> int:
        """What the sweep adds to the disk at its fullest: every kept file, plus the temporary
        files of the jobs running at once (sensitivity runs' assembled models)."""
        kept = sum(j.kept_bytes * j.count for j in self.jobs)
        temp = max(((j.written_bytes - j.kept_bytes) * min(j.count, self.parallel) for j in self.jobs), default=0)
        return kept + temp

    @property
    def engine_hours(self) -> float:
        return sum(j.seconds * j.count for j in self.jobs if j.engine) / 3600

    @property
    def wall_hours(self) -> float:
        """Stage by stage (a stage waits for the one before): the longer of its longest job and
        its total over the jobs that run at once."""
        total = 0.0
        for st in STAGES:
            js = [j for j in self.jobs if j.stage == st]
            if js:
                total += max(max(j.seconds for j in js), sum(j.seconds * j.count for j in js) / self.parallel)
        return total / 3600


def factor_of(factors: dict[str, float], rule: str, engine: bool) -> float:
    """measured / planned of a rule's jobs (quantsweep status learns them from the finished
    ones); an engine rule with none finished yet takes "*", the median of all engine jobs (the
    machine is that much faster or slower than the throughput model); other jobs (the engine
    build, the conversion) keep their estimate until measured."""
    return factors.get(rule, factors.get("*", 1.0) if engine else 1.0)


def item_of(wildcards: dict) -> str:
    """The plan's item of a job from its rule's wildcards (a quant, an imatrix pass, a pool
    file): how a scheduler request (resources.smk) and the status find their plan job."""
    if "pool_imatrix" in wildcards:
        return f"{wildcards['pool_imatrix']}/{wildcards['ptype']}"
    return wildcards.get("quant") or wildcards.get("imatrix_pass") or ""


def growth(attempt: int) -> float:
    """1x, 1.5x, 2x ... on retries: enough to clear an OOM or timeout without asking a 1.3 TB
    job for 2.6 TB on its second try."""
    return 1.0 + 0.5 * (max(attempt, 1) - 1)


def mem_mb(j: Job, attempt: int = 1) -> int:
    return int(j.ram_bytes / MiB * growth(attempt))


def disk_mb(j: Job, attempt: int = 1) -> int:
    return int((j.written_bytes * 1.05 / MiB + 1024) * growth(attempt))


def runtime_min(j: Job, rates: Throughput, attempt: int = 1) -> int:
    """The request: the estimate times the rates' slack, plus 30 min, growing on retries."""
    return int((30 + j.seconds * rates.slack / 60) * growth(attempt))


def pool_types(sweep: Sweep, q: Quant) -> list[str]:
    """The pool files a quant is assembled from (none: llama-quantize makes it). Recipe quants
    are assembled from the per-type pool (allocate.pool): the types their recipes name."""
    a = sweep.allocate
    if not a.pool:
        return []
    if q.auto:
        return a.types()
    return named_types(load_recipe(q.recipe)) if q.recipe else []


def all_pool_types(sweep: Sweep) -> list[str]:
    a = sweep.allocate
    return sorted({t for q in sweep.quants for t in pool_types(sweep, q)} | set(a.types() if a.active else []))


def convert_job(model: str, ck, outtype: str, rates: Throughput) -> Job:
    """Converting a Hugging Face checkpoint (hf.checkpoint.Checkpoint): the converter is lazy, so
    the most it holds is one layer's merged routed-expert stack in float32 (FP8 dequantized) with
    its converted copy and the stacking's temporaries (~3x); it reads the checkpoint and writes
    the GGUF (predicted from the headers and the outtype) once, at machine.throughput.convert_mb_s."""
    out = ck.output_bytes(outtype)
    seconds = (ck.total_bytes() + out) / (rates.convert_mb_s * 1e6)
    return Job("convert", model, "", "checkpoint", ck.total_bytes(), int(3 * 4 * ck.largest_output_elements()
               + 2 * OVERHEAD), 0, 0, out, out, seconds, "convert", engine=False)


class _Sizer:
    """The jobs of one model of a sweep."""

    def __init__(self, sweep: Sweep, model: str, table: GGUFTable, checkpoint=None):
        self.s, self.model, self.table, self.ck = sweep, model, table, checkpoint
        self.rates = sweep.machine.throughput
        self.source = of_table(table)
        self.files: dict[str, ModelFile] = {}
        self.jobs: list[Job] = []

    # files ---------------------------------------------------------------------------------
    def planned(self, label: str, spec, has_imatrix: bool) -> ModelFile:
        if label not in self.files:
            self.files[label] = of_plan(self.source, plan(self.table, spec, has_imatrix=has_imatrix, strict=False),
                                        label)
        return self.files[label]

    def pool(self, typ: str) -> ModelFile:
        return self.planned(f"pool {typ}", pool_recipe(typ), True)

    def quant(self, q: Quant) -> ModelFile:
        if q.auto:
            top = self.pool(self.s.allocate.top)
            return top.scaled(q.name, min(top.nbytes, self.budget_bytes(q)))
        return self.planned(q.name, recipe_or_ftype(q.spec), q.imatrix)

    def budget_bytes(self, q: Quant) -> int:
        b = q.budget
        if b.split:
            return int((b.gpu_gib + b.ram_gib) * GiB)
        if b.size_of:
            return self.quant(self.s.quant(b.size_of)).nbytes
        if b.gib is not None:
            return int(b.gib * GiB)
        return int(b.bpw * sum(t.n_elements for t in self.source.tensors) / 8)

    def file_of(self, name: str) -> ModelFile:
        return self.source if name == BASE_REFERENCE else self.quant(self.s.quant(name))

    # sizing --------------------------------------------------------------------------------
    def resident(self, rule: str, item: str, f: ModelFile, run: RunSettings, *, tokens: int, ctx: int, mla: int,
                 stage: str, written: int = 0, kept: int = 0, extra_read: int = 0, count: int = 1,
                 bench=None) -> Job:
        """A job that holds `f` while it pushes `tokens` through it (or benchmarks it)."""
        d = f.dims
        place = Placement(run, d["n_layer"])
        sp = place.split(f)
        batch = run.batch or PERPLEXITY_BATCH
        ubatch = run.ubatch or 512
        n_kv = ctx * max(1, batch // ctx) if bench is None else ctx
        kv = kv_bytes_per_token(d, mla) * n_kv
        logits = 4 * d["n_vocab"] * (batch if bench is None else ubatch)
        # attention scores without flash attention: heads x context x ubatch, f32
        scores = 4 * d["n_head"] * ctx * min(ubatch, ctx)
        gpus = self.s.resources.gpus_per_job(self.s.engine.cuda) if run.gpu_layers or self.s.engine.cuda else 0
        per_gpu = max(gpus, 1)
        ram = sp["cpu_bytes"] * 1.05 + logits + OVERHEAD + (0 if place.kv_on_gpu else kv + scores)
        vram = 0
        if place.kv_on_gpu:
            vram = int(sp["gpu_bytes"] / per_gpu + (kv + scores) / per_gpu + 4 * ubatch * d["n_embd"] * 32
                       + GPU_OVERHEAD)
        if bench is not None:
            seconds = self.bench_seconds(sp, bench)
        else:
            seconds = tokens * self.token_seconds(sp)
        seconds += f.nbytes / (self.rates.disk_mb_s * 1e6)  # loading the file
        return Job(rule, self.model, item, f.label, f.nbytes + extra_read, int(ram), vram, gpus if place.kv_on_gpu
                   else 0, written, kept, seconds, stage, count)

    def token_seconds(self, sp: dict) -> float:
        """Batched (prompt) work: 2 FLOP per active weight per token on the device it sits on."""
        r = self.rates
        return 2 * sp["cpu_active"] / (r.cpu_gflops * 1e9) + 2 * sp["gpu_active"] / (r.gpu_gflops * 1e9)

    def bench_seconds(self, sp: dict, b) -> float:
        """sweep-bench: at each ubatch step of its context, one prompt batch and `tg` generated
        tokens (each reads every active weight once), `repeats` times."""
        r = self.rates
        tg = sp["cpu_active_bytes"] / (r.cpu_mem_gb_s * 1e9) + sp["gpu_active_bytes"] / (r.gpu_mem_gb_s * 1e9)
        steps = b.ctx // b.pp
        return b.repeats * steps * (b.pp * self.token_seconds(sp) + b.tg * tg)

    def streamed(self, rule: str, item: str, src: ModelFile, out: ModelFile, stage: str, *,
                 assembled: bool = False) -> Job:
        """llama-quantize from the source (streamed), or a recipe assembled from pool files."""
        r = self.rates
        if assembled:
            ram, seconds, reads = OVERHEAD + 64 * MiB, 2 * out.nbytes / (r.disk_mb_s * 1e6), "pool files"
            read = out.nbytes
        else:
            ram = 3 * 4 * src.largest_elements + 2 * OVERHEAD
            seconds = src.nbytes / (r.quantize_mb_s * 1e6) + out.nbytes / (r.disk_mb_s * 1e6)
            reads, read = src.label, src.nbytes
        return Job(rule, self.model, item, reads, read, int(ram), 0, 0, out.nbytes, out.nbytes, seconds, stage,
                   engine=not assembled)

    # the jobs ------------------------------------------------------------------------------
    def build(self) -> list[Job]:
        s, m = self.s, self.s.models[self.model]
        if self.ck is not None:
            self.jobs.append(convert_job(self.model, self.ck, m.outtype, self.rates))
        imx_model = s.imatrix.model
        if s.imatrix.enabled:
            f = self.source if imx_model == SOURCE else self.quant(s.quant(imx_model))
            values = sum(expected_size(t.shape) for t in self.table.tensors if len(t.shape) >= 2)
            for p in s.imatrix.passes:
                mla = int(IMATRIX_PASSES[p][1])
                self.jobs.append(self.resident("imatrix_collect", p, f, s.imatrix.run,
                                               tokens=s.imatrix.ctx * s.imatrix.chunks, ctx=s.imatrix.ctx, mla=mla,
                                               stage="imatrix", written=4 * values, kept=4 * values))
        for kind, typ in self.pools():
            self.jobs.append(self.streamed("pool", f"{kind}/{typ}", self.source, self.pool(typ), "quantize"))
        for q in s.quants:
            stage = "auto" if q.auto else ("imatrix-model" if q.name == imx_model else "quantize")
            self.jobs.append(self.streamed("quantize", q.name, self.source, self.quant(q), stage,
                                           assembled=bool(pool_types(s, q))))
        self.evals()
        if s.allocate.active:
            self.sensitivity()
        return self.jobs

    def pools(self) -> list[tuple[str, str]]:
        out = set()
        for q in self.s.quants:
            for t in pool_types(self.s, q):
                out.add(("imatrix" if q.imatrix else "noimatrix", t))
        if self.s.allocate.active:
            kind = "imatrix" if self.s.imatrix.any else "noimatrix"
            out |= {(kind, t) for t in self.s.allocate.types()}
        return sorted(out)

    def evals(self) -> None:
        s = self.s
        ev, b = s.eval, s.bench
        ref = s.reference_of(self.model)
        d = self.source.dims
        chunks = ev.chunks
        records = ev.ctx - 1 - ev.ctx // 2
        kld = chunks * records * (d["n_vocab"] + 4) * 2
        tokens = ev.ctx * ev.chunks
        rule = "eval_baseline" if ref == BASE_REFERENCE else "eval_reference"
        self.jobs.append(self.resident(rule, "", self.file_of(ref), ev.run, tokens=tokens, ctx=ev.ctx, mla=ev.mla,
                                       stage="reference", written=kld, kept=kld))
        for q in s.quants:
            if q.name == ref:
                continue
            stage = "auto" if q.auto else "measure"
            self.jobs.append(self.resident("eval_quant", q.name, self.quant(q), ev.run, tokens=tokens, ctx=ev.ctx,
                                           mla=ev.mla, stage=stage, extra_read=kld))
        if b.enabled:
            if ref == BASE_REFERENCE:
                self.jobs.append(self.resident("bench_base", "", self.source, b.run, tokens=0, ctx=b.ctx, mla=b.mla,
                                               stage="measure", bench=b))
            for q in s.quants:
                self.jobs.append(self.resident("bench_quant", q.name, self.quant(q), b.run, tokens=0, ctx=b.ctx,
                                               mla=b.mla, stage="auto" if q.auto else "measure", bench=b))

    def sensitivity(self) -> None:
        s, a = self.s, self.s.allocate
        top = self.pool(a.top)
        n = len(planned_runs(self.table, a, s.imatrix.any)[1]["runs"])
        if a.sensitivity == "proxy":
            self.jobs.append(self.proxy_job())
        tokens = s.eval.ctx * s.eval.chunks
        common = dict(tokens=tokens, ctx=s.eval.ctx, mla=s.eval.mla, stage="measure", written=top.nbytes)
        if a.sensitivity == "external":
            return  # the table is the CSV's: no run
        self.jobs.append(self.resident("sensitivity_top", "", top, s.eval.run, **common))
        if n:
            self.jobs.append(self.resident("sensitivity_run", "", top, s.eval.run, count=n, **common))
        if a.refine:
            for q in s.quants:
                if q.auto and not q.refines:
                    self.jobs.append(self.resident("sensitivity_context", q.name, self.quant(q), s.eval.run,
                                                   **{**common, "stage": "auto"}))

    def proxy_job(self) -> Job:
        """quantsweep sensitivity proxy: `proxy_rows` rows of every quantized tensor read from the
        source and each ladder type's pool file (the engine dequantizes them): a few reads per
        tensor and file, no inference."""
        a = self.s.allocate
        files = [self.source] + [self.pool(t) for t in a.ladder]
        sizes = [{t.name: t.nbytes for t in f.tensors} for f in files]
        quantized = set(quantized_tensors(self.table, a.top))
        read = 0
        for t in self.table.tensors:
            if t.name in quantized:
                rows = max(1, t.n_elements // max(t.shape[0], 1))
                read += int(min(a.proxy_rows, rows) / rows * sum(f.get(t.name, 0) for f in sizes))
        seconds = 10 + 0.02 * len(quantized) * len(files) + read / (self.rates.disk_mb_s * 1e6)
        return Job("sensitivity_proxy", self.model, "", "sampled rows of the source and pool files", read, OVERHEAD,
                   0, 0, 64 * MiB, 64 * MiB, seconds, "measure", engine=False)


def capacity_plan(sweep: Sweep, tables: dict[str, GGUFTable], checkpoints: dict | None = None,
                  machine: MachineSettings | None = None) -> CapacityPlan:
    """The sweep's jobs for its models' tables (capacity.files.source_table); `checkpoints`: a
    Hugging Face model's Checkpoint (its conversion is a job too)."""
    machine = machine or sweep.machine
    jobs: list[Job] = [Job("engine_build", "", "", "engine source", 0, 4 * GiB, 0, 0, 2 * GiB, 0,
                           (1800 if sweep.engine.cuda else 600) if sweep.engine.source != "bin_dir" else 0,
                           "engine", engine=False)]
    inputs = {}
    for name in sorted(sweep.models):
        ck = (checkpoints or {}).get(name)
        sizer = _Sizer(sweep, name, tables[name], ck)
        jobs += sizer.build()
        m = sweep.models[name]
        if ck is not None:
            inputs[f"{name} checkpoint"] = ck.total_bytes()
        elif m.source == "gguf":
            inputs[f"{name} source"] = sizer.source.nbytes
        elif m.source == "tiny":
            jobs.append(Job("tiny_model", name, "", "generator", 0, OVERHEAD, 0, 0, sizer.source.nbytes,
                            sizer.source.nbytes, 60, "convert", engine=False))
    return CapacityPlan(jobs, machine, inputs, parallel=machine.jobs, tables=dict(tables),
                        checkpoints=dict(checkpoints or {}))


def plan_paths(workdir: str | Path) -> tuple[Path, Path]:
    """Where the workflow writes the plan at the start of a sweep."""
    d = Path(workdir) / "results" / "plan"
    return d / "plan.txt", d / "plan.json"


def plan_sweep(sweep: Sweep, written: dict[str, str | Path] | None = None,
               machine: MachineSettings | None = None, workdir: str | Path = ".") -> CapacityPlan:
    """The plan of a sweep from its models' files: `written` names the GGUF the workflow writes
    for a model (converted or generated), read once it exists (capacity.files.source_table).
    The machine: `machine`, else the sweep's (detected on this host when it says detect)."""
    from ..hf.checkpoint import Checkpoint
    from .files import detected, source_table

    written = written or {}
    tables, cks = {}, {}
    for name, m in sweep.models.items():
        tables[name] = source_table(m, written.get(name))
        if m.source == "hf":
            cks[name] = Checkpoint.read(m.path)
    p = capacity_plan(sweep, tables, cks, detected(machine or sweep.machine, workdir))
    p.notes = list(sweep.notes)
    return p
