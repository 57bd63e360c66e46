"""results/publish/<model>/: the ready-to-upload repository of a model's chosen quants, written
in a temp folder and renamed into place only once every check passed (nothing is left at the
output path otherwise), and `check_folder`, the checks a folder must pass to be publishable.

    <Name>-imatrix.dat (+ .gguf)   the imatrix, its dataset named as the calibration text
    <QUANT>/<Name>-<QUANT>-0000K-of-0000N.gguf, recipe.yaml, custom-q.txt, commands.sh, records/
    images/*.png, summary.csv, README.md (the card), provenance.json, SHA256SUMS
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import __version__ as QUANTSWEEP_VERSION
from ..engine import run
from ..errors import GGUFFormatError, PublishError
from ..fileio import partial_dir, read_json_object, sha256_file, write_json, write_text
from ..gguf.reader import read_model, shards as shards_of
from ..imatrix import formats as imx
from ..planner.recipes import engine_args, load_recipe
from ..report.table import Row, read_rows, to_csv
from ..settings import BASE_REFERENCE, BASELINE, BenchSettings, EvalSettings, ImatrixSettings
from ..settings.publish import PublishSettings
from . import card, model_keys
from .select import Chosen, choose
from .shards import check_loads, check_shards, machine_paths, split

SUMS = "SHA256SUMS"
_TEXT = (".md", ".json", ".yaml", ".txt", ".sh", ".csv")
# An absolute path inside a string (not a URL's //host/, not a relative path's inner '/').
_ABS = re.compile(r"(?<![\w.:/~-])(?:~/|/)(?:[\w.+@-]+/)*(?=[\w.+@-])")
_HOST_KEYS = ("cwd", "python", "hostname")  # what a record says of the machine that is no one else's


@dataclass
class Sweep:
    """What a model's publish reads from the sweep (the rule's inputs and settings)."""

    model: str
    summary: Path
    bin_dir: Path
    source: Path               # the unquantized model (shard 1)
    text: Path                 # the evaluation text (the load check)
    eval: EvalSettings
    bench: BenchSettings
    imatrix: Path | None = None
    imatrix_settings: ImatrixSettings = field(default_factory=ImatrixSettings)
    calibration: Path | None = None
    calibration_name: str = ""  # how the card names the calibration text (not the sweep's path)
    evaluation_name: str = "the evaluation text"
    model_license: str = ""     # what the sweep knows of the model's license (the demo's: mit)
    plots: list[Path] = field(default_factory=list)
    threads: int = 1
    log: Path = Path("publish.log")


def scrub(obj):
    """A record as it may be published: no key of the machine's (cwd, interpreter, host name) and
    every absolute path cut to its file name."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if k not in _HOST_KEYS}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return _ABS.sub("", obj) if isinstance(obj, str) else obj


def upload_command(repo: str, folder: str | Path) -> list[str]:
    return ["hf", "upload-large-folder", repo, str(folder), "--repo-type", "model"]


def hub_token() -> str | None:
    """The Hub token `hf` would use (HF_TOKEN, or the one `hf auth login` stored)."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return os.environ.get("HF_TOKEN")
    return get_token()


def _run_flags(b: BenchSettings) -> list[str]:
    """The flags generation ran with in the sweep's speed runs, threads aside (the machine's)."""
    return ["-mla", str(b.mla), "-fa", b.fa] + [w for word in b.run.words() for w in word.split(" ", 1)]


def _quant_files(c: Chosen, meta: model_keys.ModelKeys, ps: PublishSettings, s: Sweep, stage: Path,
                 imatrix_name: str) -> card.QuantCard:
    """One quant's folder: shards (checked: sizes, joined bytes, the engine's load and PPL),
    recipe, commands and records."""
    folder, name = stage / c.name, meta.name
    rec = c.quantize_record()
    set_kv = {**meta.kv(), **model_keys.path_keys(read_model(c.gguf), imatrix_name, s.calibration_name)}
    work = stage.parent / f".{stage.name}.work"
    try:
        files = split(s.bin_dir, c.gguf, work, folder, name, c.name, ps.max_bytes, set_kv, s.log)
        run.note(s.log, "publish: " + check_shards(files, ps.max_bytes, c.gguf, work, s.bin_dir, s.log))
        checked = check_loads(s.bin_dir, files[0], c.gguf, s.text, s.eval.updated({"chunks": ps.check_chunks}),
                              s.threads, s.log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    qc = card.QuantCard(c.row, [f"{c.name}/{f.name}" for f in files], check=checked)
    ftype, extra = c.row.ftype, []
    if rec.get("recipe"):
        args = engine_args(load_recipe(rec["recipe"]))
        extra, ftype = args[:-1], args[-1]
        qc.recipe_yaml = Path(rec["recipe"]).read_text(encoding="utf-8")
        qc.custom_q = shlex.join(extra)
        if "recipes" in ps.include:
            write_text(folder / "recipe.yaml", qc.recipe_yaml)
            write_text(folder / "custom-q.txt", qc.custom_q + "\n")
    im = ["--imatrix", imatrix_name] if c.row.imatrix == "yes" and imatrix_name else []
    qc.quantize_cmd = shlex.join(["llama-quantize", *im, *extra, s.source.name, f"{name}-{c.name}.gguf", ftype])
    qc.made_by = ("Assembled by quantsweep from per-type pool files (every tensor quantized once per type by "
                  "llama-quantize): byte for byte the tensors the command below writes."
                  if rec.get("built") == "pool" else "Made by llama-quantize, as below.")
    qm = read_json_object(c.quant_manifest, "quantize manifest")
    qc.ran = [scrub(x) for x in [qm.get("command", ""), *qm.get("engine_commands", [])] if x]
    write_text(folder / "commands.sh", "# what the sweep ran to make this quant (its paths are the sweep's)\n"
               + "".join(x + "\n" for x in qc.ran)
               + "# the same tensors from one command:\n" + qc.quantize_cmd + "\n")
    if "records" in ps.include:
        for src, dst in ((c.record, "quantize.json"), (c.quant_manifest, "quantize.manifest.json"),
                         (c.eval_record, "eval.json"), (c.eval_manifest, "eval.manifest.json")):
            write_json(folder / "records" / dst, scrub(read_json_object(src, "record")))
    return qc


def _imatrix(s: Sweep, stage: Path, name: str, want_gguf: bool) -> dict:
    """The imatrix as published: its dataset named as the calibration text (not the sweep's path)."""
    if s.imatrix is None:
        return {}
    im = imx.read_dat(s.imatrix)
    im.dataset = s.calibration_name
    dat = stage / f"{name}-imatrix.dat"
    imx.write_dat(im, dat)
    info = {"file": dat.name, "entries": len(im.entries), "chunks": im.chunks, "ctx": s.imatrix_settings.ctx,
            "calibration": s.calibration_name, "sha256": sha256_file(dat),
            "calibration_sha256": sha256_file(s.calibration) if s.calibration else "",
            "sweep_imatrix_sha256": sha256_file(s.imatrix),
            "passes": "passes " + ", ".join(s.imatrix_settings.passes) + " merged and fitted to the model by "
                      "quantsweep imatrix remap" if s.imatrix_settings.passes else "an external imatrix"}
    if want_gguf:
        gg = stage / f"{name}-imatrix.gguf"
        imx.write_gguf(imx.read_dat(dat), gg)
        info["gguf"] = gg.name
    return info


def _reference_words(reference: str) -> str:
    if reference == BASE_REFERENCE:
        return "the unquantized model"
    return f"`{reference}` (eval.reference: the quant the KLD base logits come from)"


def write_sums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS)
    write_text(folder / SUMS, "".join(f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in files))


def publish(s: Sweep, ps: PublishSettings, out: Path) -> dict:
    """Write `out` (module docstring); returns what the manifest and log say."""
    if ps.upload and not hub_token():
        raise PublishError("publish.upload: true needs a Hub token (HF_TOKEN, or `hf auth login` first)")
    base, chosen = choose(s.summary, s.model, ps)
    meta = model_keys.ModelKeys.of(read_model(s.source), s.model, ps, s.model_license)
    repo = ps.repo_id(meta.name)
    if out.exists():  # an earlier publish must not pass for this one if this one fails
        shutil.rmtree(out)
    with partial_dir(out) as stage:
        want = set(ps.include)
        im = _imatrix(s, stage, meta.name, "imatrix_gguf" in want) if want & {"imatrix", "imatrix_gguf"} else {}
        quants = [_quant_files(c, meta, ps, s, stage, im.get("file", "")) for c in chosen]
        plots = []
        if "plots" in want and s.plots:
            (stage / "images").mkdir()
            for p in s.plots:
                shutil.copyfile(p, stage / "images" / p.name)
                plots.append(f"images/{p.name}")
        rows = ([base] if base else []) + [c.row for c in chosen]
        write_text(stage / "summary.csv", to_csv([replace(r, quant_manifest="", eval_manifest="") for r in rows]))
        qm = read_json_object(chosen[0].quant_manifest, "quantize manifest")
        eval_words = (f"PPL and KLD over {s.eval.chunks} chunks of {s.eval.ctx} tokens of {s.evaluation_name} "
                      f"(-mla {s.eval.mla} -fa {s.eval.fa})")
        if s.bench.enabled:
            eval_words += (f"; speeds: llama-sweep-bench at depth {s.bench.depths[0]}, median of "
                           f"{s.bench.repeats} runs")
        c = card.Card(meta.name, repo, meta.front(ps.tags, [(q.row.quant, q.row.ppl) for q in quants],
                                                  s.evaluation_name),
                      base, quants, reference=_reference_words(chosen[0].row.reference),
                      eval_words=eval_words, run_flags=_run_flags(s.bench), imatrix=im,
                      engine=qm.get("engine") or {}, host=scrub(qm.get("host") or {}), plots=plots,
                      upload_cmd=shlex.join(upload_command(repo, ".")), license_words=meta.license_words())
        write_text(stage / "README.md", card.render(c))
        write_json(stage / "provenance.json", {
            "quantsweep": QUANTSWEEP_VERSION, "model": s.model, "name": meta.name, "repo": repo,
            "source": {"file": s.source.name, **_sweep_hash(qm, "model")}, "imatrix": im,
            "engine": c.engine, "host": c.host, "publish": ps.to_dict(),
            "quants": {q.row.quant: {"files": q.files, "check": q.check, "quantize_command": q.quantize_cmd,
                                     "sweep_commands": q.ran,
                                     "unsplit": _sweep_hash(read_json_object(ch.quant_manifest, "manifest"),
                                                            None, ch.gguf)}
                       for q, ch in zip(quants, chosen)}})
        write_sums(stage)
        if problems := check_folder(stage, {r.quant: r for r in rows if r is not base}, ps.max_bytes):
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise PublishError(f"{out}: {problems[0]}{more}")
    cmd = upload_command(repo, out)
    run.note(s.log, f"publish: {out} is ready; upload it with: {shlex.join(cmd)}")
    if ps.upload:
        res = run.run_logged(cmd, s.log)
        if res.rc != 0:
            raise PublishError(f"{shlex.join(cmd)} failed (exit code {res.rc}); see {s.log}")
    return {"quants": [q.row.quant for q in quants], "shards": {q.row.quant: len(q.files) for q in quants},
            "repo": repo, "upload": shlex.join(cmd)}


def _sweep_hash(manifest: dict, role: str | None, path: Path | None = None) -> dict:
    """bytes and sha256 of a file as the sweep's manifest recorded it (no second read of 1 TB)."""
    items = manifest.get("inputs", {}).get(role, []) if role else [
        o for o in manifest.get("outputs", []) if path is not None and o["path"] == str(path)]
    return {"bytes": sum(i["bytes"] for i in items), "sha256": [i["sha256"] for i in items]} if items else {}


def check_folder(folder: str | Path, rows: dict[str, Row] | None = None, max_bytes: int | None = None) -> list[str]:
    """What keeps a published folder from being publishable, one line each ([] = none): a file
    not as SHA256SUMS says (or not in it), a shard over the limit, a card whose numbers are not
    summary.csv's (`rows`; default: the folder's own), a machine path in a text file or a key."""
    folder = Path(folder)
    bad = []
    sums = folder / SUMS
    if not sums.is_file():
        return [f"{sums}: missing"]
    listed = {}
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, _, rel = line.partition("  ")
        listed[rel] = digest
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() and p.name != SUMS}
    bad += [f"{rel}: not in {SUMS}" for rel in sorted(set(files) - set(listed))]
    bad += [f"{rel}: in {SUMS}, missing" for rel in sorted(set(listed) - set(files))]
    bad += [f"{rel}: sha256 differs from {SUMS} (changed or cut short)" for rel in sorted(set(files) & set(listed))
            if sha256_file(files[rel]) != listed[rel]]
    shards = [p for rel, p in files.items() if rel.endswith(".gguf") and "-of-" in p.name]
    if max_bytes is not None:
        bad += [f"{p.relative_to(folder)}: {p.stat().st_size} bytes > {max_bytes}" for p in shards
                if p.stat().st_size > max_bytes]
    for p in shards:
        missing = [f.name for f in shards_of(p) if not f.exists()]
        if missing:
            bad.append(f"{p.relative_to(folder)}: shard {missing[0]} missing")
        elif "-00001-of-" in p.name:
            try:
                if names := machine_paths(read_model(p)):
                    bad.append(f"{p.relative_to(folder)}: metadata names a machine path: {names[0]}")
            except GGUFFormatError as e:  # a shard cut short, a header that does not read
                bad.append(str(e).replace(f"{folder}/", ""))
    home, cwd = str(Path.home()), os.getcwd()
    for rel, p in files.items():
        if p.suffix in _TEXT:
            text = p.read_text(encoding="utf-8", errors="replace")
            if (cwd != "/" and cwd in text) or (home != "/" and home + "/" in text):
                bad.append(f"{rel}: names a path of this machine")
    readme = folder / "README.md"
    if rows is None and (folder / "summary.csv").is_file():
        rows = {r.quant: r for r in read_rows(folder / "summary.csv") if r.quant != BASELINE}
    if readme.is_file() and rows is not None:
        try:
            bad += [f"README.md: {x}" for x in card.check_numbers(readme.read_text(encoding="utf-8"), rows)]
        except PublishError as e:
            bad.append(f"README.md: {e}")
    return bad
