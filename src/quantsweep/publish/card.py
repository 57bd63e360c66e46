"""The model card (README.md of the published repository): YAML front matter as ik_llama.cpp quant
publishers write it, the measured table, download and run commands per quant (the Hub's file-name
labels know only mainline types: IQ2_KS reads as "Q2_K", IQ3_K as nothing), each recipe and the
command that made it, the imatrix, how and where it was measured, and provenance.

`table_numbers` reads the quant table back, so a check can hold the card to summary.csv.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

import yaml

from ..errors import PublishError
from ..report.table import Row

# The quant table: column title, the Row field it shows, its format. `table_numbers` reads it back.
COLUMNS = (("size GiB", "size_gib", ".4g"), ("bpw", "bpw", ".3f"), ("PPL", "ppl", ".4f"), ("±", "ppl_err", ".4f"),
           ("ΔPPL %", "dppl_pct", ".2f"), ("mean KLD", "kld_mean", ".4g"), ("same top p %", "same_top_p", ".2f"),
           ("PP t/s", "pp_tps", ".1f"), ("TG t/s", "tg_tps", ".1f"))
NONE = "—"
TABLE_HEAD = "| quant | files | " + " | ".join(c[0] for c in COLUMNS) + " | gate |"


@dataclass
class QuantCard:
    """What the card says of one published quant."""

    row: Row
    files: list[str]          # shard paths in the repository (QUANT/NAME-QUANT-0000K-of-0000N.gguf)
    recipe_yaml: str = ""     # "" for an ftype quant
    custom_q: str = ""        # the recipe as llama-quantize's --custom-q (and other) arguments
    quantize_cmd: str = ""    # one llama-quantize command that makes these tensors
    made_by: str = ""         # how the sweep made it (pool assembly or llama-quantize)
    ran: list[str] = field(default_factory=list)  # the commands the sweep ran to make it (scrubbed)
    check: dict = field(default_factory=dict)  # the load check's numbers


@dataclass
class Card:
    name: str
    repo: str
    front: dict
    base: Row | None
    quants: list[QuantCard]
    reference: str            # what PPL/KLD are measured against, in words
    eval_words: str           # the evaluation text and how it was scored
    run_flags: list[str]      # the flags generation ran with in the sweep (bench: -mla, -fa, placement)
    imatrix: dict             # file, gguf file, calibration, chunks, ctx, sha256, passes
    engine: dict              # the engine build of the measurements
    host: dict                # the machine of the measurements
    plots: list[str]          # images/*.png
    upload_cmd: str
    license_words: str
    notes: list[str] = field(default_factory=list)


def front_matter(c: Card) -> str:
    return "---\n" + yaml.safe_dump(c.front, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def _cell(v, fmt: str) -> str:
    return NONE if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def quant_row(q: QuantCard) -> str:
    cells = [f"`{q.row.quant}`", str(len(q.files))] + [_cell(getattr(q.row, f), fmt) for _, f, fmt in COLUMNS]
    return "| " + " | ".join(cells + [q.row.gate or NONE]) + " |"


def render(c: Card) -> str:
    out = [front_matter(c), f"# {c.name} — ik_llama.cpp imatrix quants", ""]
    out += ["> [!IMPORTANT]",
            "> These GGUFs are for **[ik_llama.cpp](https://github.com/ikawrakow/ik_llama.cpp)**: several of their "
            "types (`IQ2_KS`, `IQ3_K`, `IQ4_KS`, the other `IQ*_K`/`IQ*_KS`) exist only there; mainline llama.cpp, LM Studio and Ollama cannot load them.",
            "> The Hub's quant labels read only mainline names from file names, so use the commands below, not "
            "its download buttons.", ""]
    base_link = f"[{c.front['base_model']}](https://huggingface.co/{c.front['base_model']})" \
        if c.front.get("base_model") else f"`{c.name}`"
    out += [f"Quantizations of {base_link}, each with an importance matrix, made and measured by a "
            "quantsweep sweep. One folder per quant; each quant is "
            "split into shards (`-0000K-of-0000N.gguf`): give the engine the first, it finds the others.", ""]
    out += ["## Quants", "", f"Measured against {c.reference}; {c.eval_words}.", "",
            TABLE_HEAD, "|" + "---|" * (len(COLUMNS) + 3)]
    out += [quant_row(q) for q in c.quants]
    if c.base is not None:
        out += ["", f"Reference `{c.base.quant}`: {c.base.size_gib:.4g} GiB, {_cell(c.base.bpw, '.3f')} bpw, "
                f"PPL {c.base.ppl:.4f} ± {c.base.ppl_err:.4f}."]
    out += [f"\n![{p.removeprefix('images/').removesuffix('.png').replace('_', ' ')}]({p})" for p in c.plots]
    out += ["", "## Download and run", ""]
    for q in c.quants:
        out += [f"### {q.row.quant}", "", "```bash",
                f"hf download {c.repo} --include {shlex.quote(q.row.quant + '/*')} --local-dir {c.name}-GGUF",
                shlex.join(["llama-server", "-m", f"{c.name}-GGUF/{q.files[0]}", *c.run_flags]),
                "```", ""]
        out += ["<details><summary>How it was made</summary>", "", q.made_by, ""]
        if q.recipe_yaml:
            out += ["Recipe (`recipe.yaml` in its folder):", "", "```yaml", q.recipe_yaml.rstrip(), "```", "",
                    "As llama-quantize arguments:", "", "```", q.custom_q, "```", ""]
        out += ["The same tensors from one llama-quantize command:", "", "```bash", q.quantize_cmd, "```", ""]
        if q.check:
            out += [f"Checked before publishing: the engine loads these shards and scores {q.check['chunks']} chunks "
                    f"of the evaluation text exactly as the unsplit file (PPL {q.check['ppl']:.4f} ± {q.check['ppl_err']:.4f}).", ""]
        out += ["</details>", ""]
    im = c.imatrix
    if im:
        out += ["## imatrix", "", f"`{im['file']}`" + (f" (and `{im['gguf']}`, the same data as a mainline "
                                                       "imatrix GGUF)" if im.get("gguf") else "")
                + f": {im['entries']} tensors, {im['chunks']} chunks of {im['ctx']} tokens of {im['calibration']} "
                f"(sha256 `{im['calibration_sha256']}`); {im['passes']}. sha256 `{im['sha256']}`.", ""]
    out += ["## How it was measured", "",
            f"- engine: ik_llama.cpp {c.engine.get('source', '?')} {c.engine.get('version', '')} "
            f"(build key `{c.engine.get('key', '?')}`, {'CUDA' if c.engine.get('cuda') else 'CPU'}, "
            f"cmake {' '.join(c.engine.get('cmake_flags', []))})",
            f"- machine: {c.host.get('cpus', '?')} CPUs, {c.host.get('machine', '?')}, {c.host.get('platform', '?')}",
            f"- generation flags of the speed runs: `{' '.join(c.run_flags)}`"]
    out += [f"- {n}" for n in c.notes]
    out += ["", "Every file's sha256 is in `SHA256SUMS` (`sha256sum -c SHA256SUMS`); `provenance.json` holds "
            "the input hashes, the engine build and the commands; each quant's folder holds its records.", "",
            "## Upload", "", "```bash", c.upload_cmd, "```", "", "## License", "", c.license_words, ""]
    return "\n".join(out)


def _number(cell: str) -> tuple[float, float] | None:
    """A cell's value and half its last digit (how far the shown number may be from the true one)."""
    if cell == NONE:
        return None
    try:
        d = Decimal(cell)
    except InvalidOperation:
        raise PublishError(f"{cell!r} is not a number") from None
    return float(d), 0.5 * 10.0 ** d.as_tuple().exponent


def table_numbers(text: str) -> dict[str, dict]:
    """The card's quant table read back: quant -> {field: (value, half ulp) or None, files, gate}."""
    lines = text.splitlines()
    if TABLE_HEAD not in lines:
        raise PublishError("no quant table (its header line is missing)")
    out = {}
    for line in lines[lines.index(TABLE_HEAD) + 2:]:
        if not line.startswith("| `"):
            break
        cells = [x.strip() for x in line.strip("|").split("|")]
        got = {f: _number(v) for (_, f, _), v in zip(COLUMNS, cells[2:])}
        out[cells[0].strip("`")] = {**got, "files": int(cells[1]), "gate": cells[-1]}
    return out


def check_numbers(text: str, rows: dict[str, Row]) -> list[str]:
    """Where the card's quant table differs from summary.csv's rows (one line each; [] = equal)."""
    bad = []
    table = table_numbers(text)
    if sorted(table) != sorted(rows):
        bad.append(f"the card lists {sorted(table)}, the publish selected {sorted(rows)}")
    for quant, got in table.items():
        row = rows.get(quant)
        if row is None:
            continue
        for _, f, _ in COLUMNS:
            want, shown = getattr(row, f), got[f]
            if (want is None) != (shown is None) or (shown and abs(shown[0] - want) > shown[1] * 1.0001):
                bad.append(f"{quant} {f}: card {shown[0] if shown else NONE}, summary.csv {want}")
        if got["gate"] != (row.gate or NONE):
            bad.append(f"{quant} gate: card {got['gate']}, summary.csv {row.gate!r}")
    return bad
