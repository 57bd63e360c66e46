# Inputs and params of the rules in allocate.smk.

# The auto quants the allocate rule writes, and their refined forms (rule refine, allocate.refine).
AUTO_QUANTS = one_of(q.name for q in QUANTS.values() if q.auto and not q.refines)
REFINED_QUANTS = one_of(q.name for q in QUANTS.values() if q.refines)


def get_fitted_imatrix(wildcards):
    """The fitted imatrix a pool file is made with (pool_imatrix: imatrix), or that a sensitivity
    run's pool files were made with (when the sweep has one)."""
    wants = (
        getattr(wildcards, "pool_imatrix", "imatrix") == "imatrix" and SWEEP.imatrix.any
    )
    if not wants:
        return {}
    return {"imatrix": path_of(rules.imatrix_remap.output.dat, model=wildcards.model)}


def get_sensitivity_pools(wildcards):
    return {
        **get_fitted_imatrix(wildcards),
        "pools": list(get_job_pools(wildcards).values()),
    }


def get_sensitivity_group_flags(wildcards):
    return [] if SWEEP.imatrix.any else ["--no-imatrix"]


def get_sensitivity_run_args(wildcards, input):
    """--group/--type of a run (none: the all-top run) and the pools' imatrix."""
    args = get_imatrix_arg(wildcards, input)
    if hasattr(wildcards, "group"):
        args += ["--group", wildcards.group, "--type", wildcards.stype]
    return args


def get_sensitivity_run_recipe(wildcards):
    """What a run measures (its recipe): a change reruns it (the params trigger). The top run's
    needs no groups.json (a checkpoint), so it is scheduled with the groups step."""
    if not hasattr(wildcards, "group"):
        return qsensitivity.top_key(ALLOC)
    return qsensitivity.run_key(
        _groups_doc(wildcards.model), wildcards.group, wildcards.stype
    )


def _groups_doc(model):
    """A model's groups.json (known once the groups step ran: a checkpoint)."""
    groups = checkpoints.sensitivity_groups.get(model=model).output[0]
    with open(groups, encoding="utf-8") as f:
        return json.load(f)


def get_sensitivity_runs(wildcards):
    """Every run groups.json lists."""
    runs = _groups_doc(wildcards.model)["runs"]
    return [
        path_of(
            rules.sensitivity_run.output.result, model=wildcards.model, group=g, stype=t
        )
        for g, t in runs
    ]


def get_dequant_tool(wildcards):
    """quantsweep-dequant (an engine build output only when sensitivity: proxy runs it)."""
    return rules.engine_build.output.quantsweep_dequant


def get_sensitivity_top(wildcards):
    """The all-top run (measured, proxy: every increase is measured from it; external: none).
    Known before the groups step, so it runs beside it."""
    if ALLOC.sensitivity == "external":
        return []
    return path_of(rules.sensitivity_top.output.result, model=wildcards.model)


def get_sensitivity_errors(wildcards):
    """The proxy's per-tensor errors (sensitivity: proxy only)."""
    if ALLOC.sensitivity != "proxy":
        return []
    return path_of(rules.sensitivity_proxy.output.errors, model=wildcards.model)


def get_sensitivity_external(wildcards):
    """The publisher's CSV (sensitivity: external only)."""
    return [ALLOC.external] if ALLOC.sensitivity == "external" else []


def get_sensitivity_source_args(wildcards, input):
    """The table's sources as flags, the runs last (what groups.json lists)."""
    files = {
        k: [input[k]] if isinstance(input[k], str) else list(input[k])
        for k in ("top", "errors", "external")
    }
    return [a for k, fs in files.items() for f in fs for a in (f"--{k}", f)] + list(
        input.runs
    )


def _size_of(wildcards):
    """The quant a size_of budget takes its size from (None: another kind of budget)."""
    b = QUANTS[wildcards.quant].budget
    return QUANTS[b.size_of] if b.size_of else None


def get_allocate_input(wildcards):
    """A size_of budget naming a recipe quant reads that recipe."""
    ref = _size_of(wildcards)
    return {"size_of": ref.recipe} if ref is not None and ref.recipe else {}


def get_allocate_settings(wildcards):
    """The quant's budget, named after the quant (a refined quant shares its budget), and the
    solver's resolution (allocate.budget_json)."""
    budget = QUANTS[wildcards.quant].budget.updated({"name": wildcards.quant})
    return ALLOC.budget_json(budget)


def get_size_of_args(wildcards):
    """A size_of budget's quant as the planner sizes it: its ftype or recipe, with or without imatrix."""
    ref = _size_of(wildcards)
    if ref is None:
        return []
    return ["--size-of", ref.spec] + ([] if ref.imatrix else ["--size-of-no-imatrix"])


def get_refined_allocation(wildcards):
    """The allocation a refined quant corrects (its unrefined auto quant's)."""
    base = QUANTS[wildcards.quant].refines
    return path_of(rules.allocate.output.json, model=wildcards.model, quant=base)


def get_refined_measurement(wildcards):
    base = QUANTS[wildcards.quant].refines
    return path_of(rules.eval_quant.output.result, model=wildcards.model, quant=base)


def get_context_runs(wildcards):
    """One context run per group of the model."""
    names = [g["name"] for g in _groups_doc(wildcards.model)["groups"]]
    base = QUANTS[wildcards.quant].refines
    return [
        path_of(
            rules.sensitivity_context.output.result,
            model=wildcards.model,
            quant=base,
            group=g,
        )
        for g in names
    ]


def get_refine_args(wildcards, input):
    """A refined quant's allocate flags: the allocation it corrects and its measurements."""
    if not QUANTS[wildcards.quant].refines:
        return []
    flags = ["--refine", input.allocation, "--measured", input.measured]
    return flags + ["--context"] + list(input.context)
