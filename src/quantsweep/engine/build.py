"""Build (or adopt) the ik_llama.cpp tools the sweep needs, cached by source + flags.

A CPU build takes ~10 min on two cores and a CUDA build much longer, so a build is keyed by
everything that changes the binaries (source identity, cmake flags, compilers, and the host
CPU when ``-march=native``) and kept under a cache directory outside any work tree. An
unchanged configuration never rebuilds, also from a fresh clone. Builds happen in a temporary
directory and are renamed into place only when complete, under a lock, so two workflows that
ask for the same engine at once build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import EngineError
from ..fileio import partial_dir, sha256_file
from ..settings import TOOLS as TOOL_TABLE
from ..settings import EngineSpec
from .argv import help_flags
from .hardware import usable_cpus
from .run import note, run_logged
from .sources import Log, own_tools_identity, prepare_source, run_checked, source_identity, toolchain_identity
from .spec import cmake_args, installed_meta

# Every tool of the table is built, in its order; a prebuilt bin dir (engine.source: bin_dir)
# must have the required ones (the sweep's config check asks for the rest it runs).
TOOLS = tuple(t.name for t in TOOL_TABLE)
REQUIRED_TOOLS = tuple(t.name for t in TOOL_TABLE if t.required)
# Bump when the build procedure changes in a way that changes the binaries (the tool list is
# part of the key by itself). 2: -ffile-prefix-map, builds of one key are byte-identical;
# 3: llama-gguf-split and the tool list joined the key (then llama-sweep-bench joined the list).
BUILD_PROCEDURE = 3


def _reproducible_flags(work: Path, spec: EngineSpec) -> list[str]:
    """__FILE__ (GGML_ASSERT, log lines) embeds the build's random temp dir in the binaries, so two
    builds of one key differed in those bytes; mapping it to "." makes them identical. Not part
    of the cache key (it changes no behaviour); flags in engine.cmake_flags come later and win."""
    remap = f"-ffile-prefix-map={work}=."
    flags = [f"-DCMAKE_C_FLAGS={remap}", f"-DCMAKE_CXX_FLAGS={remap}"]
    if spec.cuda:
        flags.append(f"-DCMAKE_CUDA_FLAGS=-Xcompiler={remap}")
    return flags


def default_cache_dir() -> Path:
    """$QUANTSWEEP_CACHE, else $XDG_CACHE_HOME/quantsweep, else ~/.cache/quantsweep."""
    if os.environ.get("QUANTSWEEP_CACHE"):
        return Path(os.environ["QUANTSWEEP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quantsweep"


def cache_key(spec: EngineSpec, toolchain: dict) -> str:
    blob = json.dumps({"procedure": BUILD_PROCEDURE, "tools": list(TOOLS), "source": source_identity(spec),
                       "own_tools": own_tools_identity(), "cmake": cmake_args(spec), "toolchain": toolchain},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def build_into_cache(spec: EngineSpec, cache: Path, log: Log, jobs: int = 0) -> Path:
    """Return the cache entry holding bin/ and engine.json for this spec, building it if needed."""
    toolchain = toolchain_identity(spec)
    key = cache_key(spec, toolchain)
    entry = cache / "engines" / key
    (cache / "engines").mkdir(parents=True, exist_ok=True)
    with open(cache / "engines" / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (entry / "engine.json").exists():
            note(log, f"engine cache hit: {key}")
            return entry
        note(log, f"engine cache miss: {key}; building")
        _remove_stale(cache / "engines", f".{key}.")  # a killed build's tree; we hold the key's lock
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(dir=cache / "engines", prefix=f".{key}.") as tmp:
            work = Path(tmp)
            src, src_meta = prepare_source(spec, cache, work, toolchain, log)
            build = work / "build"
            run_checked(["cmake", "-S", str(src), "-B", str(build), "-G", "Unix Makefiles", *_reproducible_flags(work, spec),
                  *cmake_args(spec)], log)
            run_checked(["cmake", "--build", str(build), "-j", str(jobs or usable_cpus()), "--target", *TOOLS], log)
            staged = work / "entry"
            (staged / "bin").mkdir(parents=True)
            for tool in TOOLS:
                shutil.copy2(build / "bin" / tool, staged / "bin" / tool)
            meta = {
                "key": key,
                "source": spec.source,
                **src_meta,
                "cmake_flags": cmake_args(spec),
                "cuda": spec.cuda,
                "toolchain": toolchain,
                "build_time_s": round(time.monotonic() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "tools": {t: sha256_file(staged / "bin" / t) for t in TOOLS},
            }
            (staged / "engine.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            os.chmod(staged, 0o755)
            os.replace(staged, entry)
        note(log, f"engine built in {time.monotonic() - t0:.1f} s")
        return entry


def adopt_bin_dir(spec: EngineSpec) -> tuple[Path, dict]:
    """A prebuilt bin dir: check the tools are there and record what they are."""
    bdir = Path(spec.bin_dir).resolve()
    missing = [t for t in REQUIRED_TOOLS if not os.access(bdir / t, os.X_OK)]
    if missing:
        raise EngineError(f"engine.bin_dir: {bdir} lacks executable {', '.join(missing)}")
    meta = {
        "source": "bin_dir",
        "path": str(bdir),
        "tools": {t: sha256_file(bdir / t) for t in TOOLS if os.access(bdir / t, os.X_OK)},
        "toolchain": {},
        "cmake_flags": [],
        "build_time_s": 0.0,
    }
    return bdir, meta


def tool_flags(bin_dir: Path) -> dict[str, list[str]]:
    """The flags each step's tool lists in its --help, asked once per install: run settings'
    extra arguments are checked against them before a sweep starts (settings.check_engine)."""
    out = {}
    for step_tool in (t for t in TOOL_TABLE if t.step):
        tool, helper = step_tool.name, (bin_dir / step_tool.help_tool).resolve()
        if os.access(bin_dir / tool, os.X_OK) and os.access(helper, os.X_OK):
            with tempfile.TemporaryDirectory(prefix="quantsweep-help-") as scratch:  # --help writes ./llama.log
                flags = help_flags(run_logged([str(helper), "--help"], cwd=Path(scratch), timeout_s=120).text)
            if "-m" not in flags:
                raise EngineError(f"{helper} --help lists no -m option: not an ik_llama.cpp tool?")
            out[tool] = flags
    return out


def installed_flags(bin_dir: Path) -> dict[str, list[str]]:
    """The step tools' flags of an installed engine (engine.json beside bin/, asked when an older
    install lacks them)."""
    return (installed_meta(bin_dir) or {}).get("flags") or tool_flags(Path(bin_dir))


def _remove_stale(parent: Path, prefix: str) -> None:
    """Temp trees a killed run left (kill -9 skips their cleanup); only called where no other
    run can be using them."""
    for d in parent.glob(prefix + "*"):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def install_engine(spec: EngineSpec, out_dir: Path, cache: Path | None = None, log: Log = None,
                   jobs: int = 0) -> dict:
    """Build or find the engine and place bin/<tools> + engine.json in out_dir (atomically);
    jobs: parallel build jobs (0: every usable CPU). The cache is `cache`, else the spec's
    cache_dir, else default_cache_dir()."""
    cache = cache or (Path(spec.cache_dir) if spec.cache_dir else default_cache_dir())
    if spec.source == "bin_dir":
        bin_src, meta = adopt_bin_dir(spec)
    else:
        entry = build_into_cache(spec, cache, log, jobs)
        bin_src = entry / "bin"
        meta = json.loads((entry / "engine.json").read_text())
        meta["cache_entry"] = str(entry)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir.parent, f".{out_dir.name}.")  # a killed install's staging (one job per work dir)
    with partial_dir(out_dir) as staged:
        (staged / "bin").mkdir()
        for tool in meta["tools"]:
            # A copy, not a hard link: Snakemake touches outputs, and a shared inode would make
            # every other work dir using the same cache entry look out of date.
            shutil.copy2(bin_src / tool, staged / "bin" / tool)
        meta["flags"] = tool_flags(staged / "bin")
        (staged / "engine.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta

