"""The Hugging Face -> GGUF converter: fetched from a pinned sdist into the cache, checked
against the checkpoint before hours are spent, run with a Python that has torch, and its
output verified before it is kept.

Which converter (engine.converter): "mainline" is llama.cpp's convert_hf_to_gguf.py as the
pinned llama-cpp-python sdist vendors it. It dequantizes FP8 checkpoints (fp8 x 128x128
weight_scale_inv) and writes the mainline MLA layout (3-D attn_k_b/attn_v_b, no attn_kv_b),
which the ik engine adjusts when it loads the file. "ik" is the engine's own converter from
the engine's source: bf16 checkpoints only, 2-D attn_k_b/attn_v_b plus attn_kv_b.
Each converter runs with its own gguf-py (the script puts it first on sys.path), never the
installed gguf package. torch, transformers, safetensors, sentencepiece and protobuf come
from the `convert` extra or envs/convert.yaml; nothing else in quantsweep needs them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..engine.run import note, run_logged
from ..engine.sources import Log, fetch_sdist
from ..settings import EngineSpec
from ..errors import ConvertError, GGUFFormatError
from ..fileio import partial_dir, sha256_file
from ..gguf.reader import read_model, shards
from .checkpoint import Checkpoint

# What the converter needs besides its own gguf-py; probed before a conversion starts.
NEEDS = ("torch", "transformers", "safetensors", "sentencepiece", "google.protobuf")
TREE_FILES = ("convert_hf_to_gguf.py",)
TREE_DIRS = ("conversion", "gguf-py")
# Bump when what is extracted from an sdist changes.
EXTRACT_PROCEDURE = 1


@dataclass(frozen=True)
class ConverterSource:
    """Where a converter comes from: a pinned sdist and the tree inside it, or a local tree."""

    kind: str            # "mainline" | "ik"
    package: str = ""
    version: str = ""
    sha256: str = ""
    subdir: str = ""     # the tree inside the sdist (vendor/llama.cpp, vendor/ik_llama.cpp)
    path: str = ""       # a local ik_llama.cpp checkout (engine.source: path)

    @classmethod
    def of(cls, spec: EngineSpec) -> ConverterSource:
        if spec.converter == "mainline":
            return cls("mainline", spec.converter_pypi_package, spec.converter_pypi_version,
                       spec.converter_pypi_sha256, "vendor/llama.cpp")
        if spec.source == "path":
            return cls("ik", path=str(Path(spec.path).resolve()))
        return cls("ik", spec.pypi_package, spec.pypi_version, spec.pypi_sha256, "vendor/ik_llama.cpp")

    @property
    def fp8(self) -> bool:
        """Whether it dequantizes FP8 checkpoints (ik's converter cannot map weight_scale_inv)."""
        return self.kind == "mainline"

    def identity(self) -> dict:
        return {"procedure": EXTRACT_PROCEDURE, "kind": self.kind, "package": self.package,
                "version": self.version, "sha256": self.sha256, "subdir": self.subdir, "path": self.path}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Converter:
    """An extracted converter tree and what it is."""

    source: ConverterSource
    root: Path

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    def identity(self) -> dict:
        """For the manifest: where it came from and the script's digest."""
        return {**self.source.identity(), "script_sha256": sha256_file(self.script)}

    def architectures(self) -> set[str]:
        """The Hugging Face architectures it registers a model class for, read from its source
        (no torch needed): every string in a @ModelBase.register(...) / @Model.register(...)."""
        found: set[str] = set()
        files = [self.script, *sorted((self.root / "conversion").glob("*.py"))]
        for f in files:
            if f.is_file():
                for args in _REGISTER.findall(f.read_text(encoding="utf-8", errors="replace")):
                    found.update(_STRING.findall(args))
        return found


_REGISTER = re.compile(r"@(?:ModelBase|Model)\.register\(([^)]*)\)", re.S)
_STRING = re.compile(r"""["']([A-Za-z0-9_]+)["']""")


def fetch(source: ConverterSource, cache: Path, log: Log = None) -> Converter:
    """The converter tree, extracted once into cache/converters/<key> (under a lock, renamed
    into place when complete, like an engine build)."""
    if source.path:
        root = Path(source.path)
        if not (root / "convert_hf_to_gguf.py").is_file():
            raise ConvertError(f"engine.path: {root} has no convert_hf_to_gguf.py")
        return Converter(source, root)
    base = cache / "converters"
    base.mkdir(parents=True, exist_ok=True)
    entry = base / source.key()
    with open(base / f"{source.key()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (entry / "converter.json").exists():
            key = "engine.converter_pypi_sha256" if source.kind == "mainline" else "engine.pypi_sha256"
            sdist = fetch_sdist(source.package, source.version, source.sha256, cache, log, key)
            with partial_dir(entry) as staged:
                _extract_tree(sdist, source.subdir, staged)
                (staged / "converter.json").write_text(json.dumps(source.identity(), indent=2, sort_keys=True) + "\n")
            note(log, f"converter extracted: {source.package}=={source.version} {source.subdir}")
    return Converter(source, entry)


def _extract_tree(sdist: Path, subdir: str, dest: Path) -> None:
    """convert_hf_to_gguf.py, conversion/ and gguf-py/ of `subdir` (tarfile's data filter)."""
    with tarfile.open(sdist) as tf:
        members = []
        for m in tf.getmembers():
            parts = m.name.split("/")
            depth = 1 + subdir.count("/") + 1
            if "/".join(parts[1:depth]) != subdir or len(parts) <= depth:
                continue
            rest = parts[depth:]
            if (len(rest) == 1 and rest[0] in TREE_FILES) or rest[0] in TREE_DIRS:
                m = m.replace(name="/".join(rest), deep=False)
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise ConvertError(f"{sdist.name}: no {subdir}/convert_hf_to_gguf.py inside")
        tf.extractall(dest, members=members, filter="data")


def find_python(explicit: str = "") -> tuple[str, dict]:
    """The interpreter that runs the converter and the versions of what it needs: `explicit`,
    else the first of this interpreter, python3 and python on PATH that imports them all (under
    --sdm conda the rule's env puts its python first on PATH; quantsweep's own may lack torch)."""
    tried = [explicit] if explicit else [sys.executable, shutil.which("python3") or "", shutil.which("python") or ""]
    seen: list[str] = []
    probe = ("import importlib, json, sys; from importlib import metadata as m\n"
             f"mods = {list(NEEDS)!r}\n"
             "[importlib.import_module(x) for x in mods]\n"
             "v = {}\n"
             "for d in ('torch', 'transformers', 'safetensors', 'sentencepiece', 'protobuf', 'numpy'):\n"
             "    try: v[d] = m.version(d)\n"
             "    except m.PackageNotFoundError: pass\n"
             "v['python'] = sys.version.split()[0]\n"
             "print('QS-VERSIONS ' + json.dumps(v))\n")
    for py in tried:
        if not py or py in seen:
            continue
        seen.append(py)
        try:
            res = run_logged([py, "-c", probe], timeout_s=600)
        except OSError:
            continue
        for line in res.text.splitlines():
            if res.rc == 0 and line.startswith("QS-VERSIONS "):
                return py, json.loads(line.split(" ", 1)[1])
    raise ConvertError(f"no Python with {', '.join(NEEDS)} (tried {', '.join(seen)}): pip install "
                       "'quantsweep[convert]', or run Snakemake with --sdm conda (envs/convert.yaml)")


def check(ck: Checkpoint, conv: Converter) -> None:
    """What can be refused before the converter runs: an architecture it does not register, an
    FP8 checkpoint for a converter that cannot dequantize it."""
    cfg = ck.path / "config.json"
    if ck.architecture not in conv.architectures():
        raise ConvertError(f"{cfg}: architecture {ck.architecture} is unknown to the {conv.source.kind} converter "
                           f"({conv.script})")
    if ck.fp8 and not conv.source.fp8:
        raise ConvertError(f"{cfg}: an FP8 checkpoint (quantization_config), but the {conv.source.kind} converter "
                           "handles bf16 only; use engine.converter: mainline")


_CHKHSH = re.compile(r"chkhsh:\s+([0-9a-f]{64})")


def failure(text: str, ck: Checkpoint) -> str:
    """One line for a failed converter run, from its output (its exit code alone says little)."""
    if "pre-tokenizer was not recognized" in text:
        h = _CHKHSH.search(text)
        tok = ck.path / ("tokenizer.json" if (ck.path / "tokenizer.json").exists() else "tokenizer.model")
        return (f"{tok}: the converter does not recognise this tokenizer (pre-tokenizer hash "
                f"{h.group(1) if h else '?'} is not in its list); is it the checkpoint's own tokenizer?")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln) or ln.startswith("ERROR:")]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"{ck.path}: the converter failed: {last}"


# ik's gguf-py (in the pinned 0.1.5) lacks Keys.Tokenizer.ADD_SEP, which its own writer calls when
# a tokenizer's post-processor has a pair template (DeepSeek-V3's has): the converter dies with an
# AttributeError after loading the vocabulary. Defined (as mainline names the key) before it runs.
_IK_SHIM = (
    "import runpy, sys\n"
    "from pathlib import Path\n"
    "script = sys.argv[1]\n"
    "sys.argv = sys.argv[1:]\n"
    "sys.path[:0] = [str(Path(script).parent), str(Path(script).parent / 'gguf-py')]\n"
    "import gguf\n"
    "if not hasattr(gguf.Keys.Tokenizer, 'ADD_SEP'):\n"
    "    gguf.Keys.Tokenizer.ADD_SEP = 'tokenizer.ggml.add_sep_token'\n"
    "runpy.run_path(script, run_name='__main__')\n"
)


def argv(conv: Converter, python: str, ck: Checkpoint, outfile: Path, outtype: str, split_max_size: str = "",
         vocab_only: bool = False) -> list[str]:
    """The converter's command line (an argument list: paths are never parsed by a shell)."""
    run = [python, "-c", _IK_SHIM, str(conv.script)] if conv.source.kind == "ik" else [python, str(conv.script)]
    cmd = [*run, str(ck.path), "--outfile", str(outfile), "--outtype", outtype]
    if split_max_size and not vocab_only:
        cmd += ["--split-max-size", split_max_size]
    if vocab_only:
        cmd.append("--vocab-only")
    return cmd


def convert(ck: Checkpoint, conv: Converter, out_dir: Path, name: str, outtype: str, split_max_size: str,
            python: str, log: Log) -> tuple[list[Path], list[list[str]]]:
    """Convert into out_dir/<name>.gguf (or <name>-0000i-of-0000N.gguf when split): first a
    vocab-only run (an unknown tokenizer fails in seconds, not after hours), then the whole
    model into a temp directory; the files are read back (every shard's header, the
    architecture) before they are moved into place. Returns the files and the commands run."""
    check(ck, conv)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmds: list[list[str]] = []
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".convert.") as tmp:
        vocab = Path(tmp) / "vocab.gguf"
        cmds.append(argv(conv, python, ck, vocab, outtype, vocab_only=True))
        res = run_logged(cmds[-1], log, env=env)
        if res.rc != 0 or not vocab.is_file():
            raise ConvertError(failure(res.text, ck))
        note(log, f"vocab-only pre-flight passed in {res.wall_s:.1f} s")
        staged = Path(tmp) / "model"
        staged.mkdir()
        cmds.append(argv(conv, python, ck, staged / f"{name}.gguf", outtype, split_max_size))
        res = run_logged(cmds[-1], log, env=env)
        written = sorted(staged.glob("*.gguf"))
        if res.rc != 0 or not written or "successfully exported" not in res.text:
            raise ConvertError(failure(res.text, ck))
        first = model_file(staged)
        _verify(first, written)
        note(log, f"converted in {res.wall_s:.1f} s: {', '.join(p.name for p in written)}")
        for old in out_dir.glob("*.gguf"):
            old.unlink()
        for p in written:
            os.replace(p, out_dir / p.name)
    return [out_dir / p.name for p in written], cmds


def _verify(first: Path, written: list[Path]) -> None:
    """Every shard's header reads, the shard set is what shard 1 says, the model is DeepSeek2."""
    try:
        table = read_model(first)
    except GGUFFormatError as e:
        raise ConvertError(f"the converter's output does not read back: {e}") from None
    expected = sorted(p.name for p in shards(first))
    if expected != sorted(p.name for p in written):
        raise ConvertError(f"the converter wrote {len(written)} file(s), {first.name} says {len(expected)}")
    arch = table.kv.get("general.architecture")
    if arch != "deepseek2":
        raise ConvertError(f"{first.name}: general.architecture is {arch!r}, not deepseek2")
    if not table.tensors:
        raise ConvertError(f"{first.name}: no tensors")


def model_file(out_dir: str | Path) -> Path:
    """The file the engine is given: <dir>/<name>.gguf, or shard 1 of a split model."""
    d = Path(out_dir)
    firsts = sorted(d.glob("*-00001-of-*.gguf"))
    if firsts:
        return firsts[0]
    singles = sorted(d.glob("*.gguf"))
    if len(singles) != 1:
        raise ConvertError(f"{d}: holds {len(singles)} GGUF files, not one model")
    return singles[0]
