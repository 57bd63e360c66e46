"""Build (or adopt) the three ik_llama.cpp tools the sweep needs, cached by source + flags.

A CPU build takes ~10 min on two cores and a CUDA build much longer, so a build is keyed by
everything that changes the binaries (source identity, cmake flags, compilers, and the host
CPU when ``-march=native``) and kept under a cache directory outside any work tree. An
unchanged configuration never rebuilds, also from a fresh clone. Builds happen in a temporary
directory and are renamed into place only when complete, under a lock, so two workflows that
ask for the same engine at once build it once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .fileio import sha256_file

TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity")
SOURCE_KINDS = ("pypi", "git", "path", "bin_dir")
DEFAULT_PYPI_PACKAGE = "ik-llama-cpp-python"
DEFAULT_PYPI_VERSION = "0.1.5"
DEFAULT_PYPI_SHA256 = "33c67eb99e4dcab5e611050433243815709b8b3067753f9ce18375013cf002ad"
DEFAULT_GIT_URL = "https://github.com/ikawrakow/ik_llama.cpp"
# Bump when the build procedure changes in a way that changes the binaries.
RECIPE_VERSION = 2  # 2: -ffile-prefix-map, so builds of one key are byte-identical


class EngineError(RuntimeError):
    """A build or source problem, phrased for the user in one line."""


@dataclass(frozen=True)
class EngineSpec:
    """What to build: mirrors the `engine:` section of the workflow config."""

    source: str = "pypi"
    pypi_package: str = DEFAULT_PYPI_PACKAGE
    pypi_version: str = DEFAULT_PYPI_VERSION
    pypi_sha256: str = DEFAULT_PYPI_SHA256
    git_url: str = DEFAULT_GIT_URL
    git_commit: str = ""
    path: str = ""
    bin_dir: str = ""
    cuda: bool = False
    cuda_architectures: str = "native"
    # ik build options quant cookers set (0 / False = the engine's default, no flag):
    cuda_force_bf16: bool = False  # GGML_CUDA_IQK_FORCE_BF16: needed by some *_R4 quants on CUDA
    sched_max_copies: int = 0      # GGML_SCHED_MAX_COPIES (1 saves VRAM with partial offload)
    max_contexts: int = 0          # GGML_MAX_CONTEXTS: >64 for models split into many shards
    native: bool = True
    cmake_flags: tuple[str, ...] = field(default_factory=tuple)
    jobs: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "EngineSpec":
        """Build from the config mapping; unknown keys are a config error, caught by the schema."""
        d = dict(d)
        d.pop("cache_dir", None)
        for key in ("cmake_flags",):
            if key in d:
                d[key] = tuple(d[key])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EngineError(f"engine: unknown key(s) {', '.join(unknown)}")
        spec = cls(**d)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.source not in SOURCE_KINDS:
            raise EngineError(f"engine.source: {self.source!r} is not one of {SOURCE_KINDS}")
        if self.source == "git" and not self.git_commit:
            raise EngineError("engine.git_commit: required when engine.source is 'git'")
        if self.source == "path" and not self.path:
            raise EngineError("engine.path: required when engine.source is 'path'")
        if self.source == "bin_dir" and not self.bin_dir:
            raise EngineError("engine.bin_dir: required when engine.source is 'bin_dir'")
        if self.cuda_force_bf16 and not self.cuda:
            raise EngineError("engine.cuda_force_bf16: only applies to a CUDA build (engine.cuda: true)")
        for key in ("sched_max_copies", "max_contexts"):
            if getattr(self, key) < 0:
                raise EngineError(f"engine.{key}: must be >= 0 (0 = the engine's default)")

    def cmake_args(self) -> list[str]:
        """The cmake configure flags: static tools so the bin dir is self-contained."""
        args = [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_CURL=OFF",
            f"-DGGML_NATIVE={'ON' if self.native else 'OFF'}",
        ]
        if self.cuda:
            args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_architectures}"]
            if self.cuda_force_bf16:
                args.append("-DGGML_CUDA_IQK_FORCE_BF16=ON")
        if self.sched_max_copies:
            args.append(f"-DGGML_SCHED_MAX_COPIES={self.sched_max_copies}")
        if self.max_contexts:
            args.append(f"-DGGML_MAX_CONTEXTS={self.max_contexts}")
        return args + list(self.cmake_flags)


def _reproducible_flags(work: Path, spec: EngineSpec) -> list[str]:
    """__FILE__ (GGML_ASSERT, log lines) embeds the build's random temp dir in the binaries, so two
    builds of one key differed in those bytes; mapping it to "." makes them identical. Not part
    of the cache key (it changes no behaviour); flags in engine.cmake_flags come later and win."""
    remap = f"-ffile-prefix-map={work}=."
    flags = [f"-DCMAKE_C_FLAGS={remap}", f"-DCMAKE_CXX_FLAGS={remap}"]
    if spec.cuda:
        flags.append(f"-DCMAKE_CUDA_FLAGS=-Xcompiler={remap}")
    return flags


def _usable_cpus() -> int:
    """The CPUs this process may run on (a SLURM job's allocation), not all of the node's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def default_cache_dir() -> Path:
    """$QUANTSWEEP_CACHE, else $XDG_CACHE_HOME/quantsweep, else ~/.cache/quantsweep."""
    if os.environ.get("QUANTSWEEP_CACHE"):
        return Path(os.environ["QUANTSWEEP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quantsweep"


def _run(cmd: list[str], log, cwd: Path | None = None, env: dict | None = None) -> None:
    log.write("+ " + " ".join(cmd) + "\n")
    log.flush()
    r = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        raise EngineError(f"command failed with exit code {r.returncode}: {' '.join(cmd)}")


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return ""
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else ""


def toolchain_identity(spec: EngineSpec) -> dict:
    """Compilers (and the CPU when building for it): part of the cache key and of engine.json."""
    ident = {
        "cc": _first_line([os.environ.get("CC", "cc"), "--version"]),
        "cxx": _first_line([os.environ.get("CXX", "c++"), "--version"]),
        "cmake": _first_line(["cmake", "--version"]),
        "machine": platform.machine(),
    }
    if spec.cuda:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=False) if shutil.which("nvcc") else None
        ident["nvcc"] = nvcc.stdout.strip().splitlines()[-1] if nvcc and nvcc.stdout.strip() else ""
    if spec.native:
        ident["cpu_flags"] = _cpu_flags_digest()
    return ident


def _cpu_flags_digest() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                return hashlib.sha256(flags.encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor() or "unknown"


def source_identity(spec: EngineSpec) -> dict:
    """The part of the key that names the source tree exactly."""
    if spec.source == "pypi":
        return {"kind": "pypi", "package": spec.pypi_package, "version": spec.pypi_version, "sha256": spec.pypi_sha256}
    if spec.source == "git":
        return {"kind": "git", "url": spec.git_url, "commit": spec.git_commit}
    if spec.source == "path":
        return {"kind": "path", "path": str(Path(spec.path).resolve()), "content": _tree_digest(Path(spec.path))}
    return {"kind": "bin_dir", "path": str(Path(spec.bin_dir).resolve())}


def _tree_digest(root: Path) -> str:
    """Content hash of a local checkout: git HEAD + diff when it is a git tree, else all files."""
    if not root.is_dir():
        raise EngineError(f"engine.path: {root} is not a directory")
    if (root / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        diff = subprocess.run(["git", "-C", str(root), "diff", "HEAD"], capture_output=True)
        if head.returncode == 0:
            return "git:" + head.stdout.strip() + ":" + hashlib.sha256(diff.stdout).hexdigest()[:16]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(("build", ".git/")):
            h.update(rel.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return "files:" + h.hexdigest()


def cache_key(spec: EngineSpec, toolchain: dict) -> str:
    blob = json.dumps(
        {"recipe": RECIPE_VERSION, "source": source_identity(spec), "cmake": spec.cmake_args(), "toolchain": toolchain},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _fetch_pypi_sdist(spec: EngineSpec, cache: Path, log) -> Path:
    """Download the sdist once into the cache and verify its sha256 every time it is used."""
    sdir = cache / "sources"
    sdir.mkdir(parents=True, exist_ok=True)
    name = f"{spec.pypi_package.replace('-', '_')}-{spec.pypi_version}.tar.gz"
    target = sdir / name
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=sdir) as tmp:
            _run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"{spec.pypi_package}=={spec.pypi_version}", "-d", tmp],
                log,
            )
            found = list(Path(tmp).glob("*.tar.gz"))
            if len(found) != 1:
                raise EngineError(f"pip download of {spec.pypi_package}=={spec.pypi_version} gave no single sdist")
            os.replace(found[0], target)
    digest = sha256_file(target)
    if digest != spec.pypi_sha256:
        raise EngineError(
            f"engine.pypi_sha256: {target.name} has sha256 {digest}, config pins {spec.pypi_sha256}"
        )
    return target


def _extract_vendored(sdist: Path, dest: Path) -> Path:
    """Unpack only vendor/ik_llama.cpp of the sdist (tarfile's 'data' filter refuses escapes)."""
    with tarfile.open(sdist) as tf:
        prefix = None
        members = []
        for m in tf.getmembers():
            parts = m.name.split("/")
            if len(parts) > 3 and parts[1:3] == ["vendor", "ik_llama.cpp"]:
                prefix = "/".join(parts[:3])
                members.append(m)
        if not members:
            raise EngineError(f"{sdist.name}: no vendor/ik_llama.cpp tree inside")
        tf.extractall(dest, members=members, filter="data")
    return dest / prefix


def write_build_info(src: Path, commit: str, toolchain: dict) -> None:
    """The sdist lacks common/cmake/build-info-gen-cpp.cmake; fill build-info.cpp.in ourselves.

    The generated file is newer than its template, so cmake's custom command never fires.
    """
    tmpl = src / "common" / "build-info.cpp.in"
    out = src / "common" / "build-info.cpp"
    if not tmpl.exists():
        return
    target = _first_line([os.environ.get("CC", "cc"), "-dumpmachine"]) or platform.machine()
    text = (
        tmpl.read_text()
        .replace("@BUILD_NUMBER@", "0")
        .replace("@BUILD_COMMIT@", commit.replace('"', "'"))
        .replace("@BUILD_COMPILER@", toolchain.get("cc", "").replace('"', "'"))
        .replace("@BUILD_TARGET@", target)
    )
    out.write_text(text)
    st = tmpl.stat()
    os.utime(out, (st.st_atime + 1, st.st_mtime + 1))


def _prepare_source(spec: EngineSpec, cache: Path, work: Path, toolchain: dict, log) -> tuple[Path, dict]:
    if spec.source == "pypi":
        sdist = _fetch_pypi_sdist(spec, cache, log)
        src = _extract_vendored(sdist, work / "src")
        ident = f"pypi:{spec.pypi_package}=={spec.pypi_version}:sha256:{spec.pypi_sha256[:16]}"
        write_build_info(src, ident, toolchain)
        return src, {"version": spec.pypi_version, "sdist_sha256": spec.pypi_sha256}
    if spec.source == "git":
        src = work / "src"
        _run(["git", "clone", "--quiet", spec.git_url, str(src)], log)
        _run(["git", "-C", str(src), "checkout", "--quiet", spec.git_commit], log)
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        if not (src / "common" / "cmake" / "build-info-gen-cpp.cmake").exists():
            write_build_info(src, f"git:{head}", toolchain)
        return src, {"commit": head, "url": spec.git_url}
    src = Path(spec.path).resolve()
    if not (src / "CMakeLists.txt").exists():
        raise EngineError(f"engine.path: {src} has no CMakeLists.txt (not an ik_llama.cpp checkout)")
    copy = work / "src"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("build", "build-*"), symlinks=True)
    if not (copy / "common" / "cmake" / "build-info-gen-cpp.cmake").exists():
        write_build_info(copy, f"path:{source_identity(spec)['content']}", toolchain)
    return copy, {"path": str(src), "content": source_identity(spec)["content"]}


def build_into_cache(spec: EngineSpec, cache: Path, log) -> Path:
    """Return the cache entry holding bin/ and engine.json for this spec, building it if needed."""
    toolchain = toolchain_identity(spec)
    key = cache_key(spec, toolchain)
    entry = cache / "engines" / key
    (cache / "engines").mkdir(parents=True, exist_ok=True)
    with open(cache / "engines" / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (entry / "engine.json").exists():
            log.write(f"engine cache hit: {key}\n")
            return entry
        log.write(f"engine cache miss: {key}; building\n")
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(dir=cache / "engines", prefix=f".{key}.") as tmp:
            work = Path(tmp)
            src, src_meta = _prepare_source(spec, cache, work, toolchain, log)
            build = work / "build"
            _run(["cmake", "-S", str(src), "-B", str(build), "-G", "Unix Makefiles", *_reproducible_flags(work, spec),
                  *spec.cmake_args()], log)
            jobs = spec.jobs or _usable_cpus()
            _run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TOOLS], log)
            staged = work / "entry"
            (staged / "bin").mkdir(parents=True)
            for tool in TOOLS:
                shutil.copy2(build / "bin" / tool, staged / "bin" / tool)
            meta = {
                "key": key,
                "source": spec.source,
                **src_meta,
                "cmake_flags": spec.cmake_args(),
                "cuda": spec.cuda,
                "toolchain": toolchain,
                "build_time_s": round(time.monotonic() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "tools": {t: sha256_file(staged / "bin" / t) for t in TOOLS},
            }
            (staged / "engine.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            os.chmod(staged, 0o755)
            os.replace(staged, entry)
        log.write(f"engine built in {time.monotonic() - t0:.1f} s\n")
        return entry


def adopt_bin_dir(spec: EngineSpec) -> tuple[Path, dict]:
    """A prebuilt bin dir: check the tools are there and record what they are."""
    bdir = Path(spec.bin_dir).resolve()
    missing = [t for t in TOOLS if not os.access(bdir / t, os.X_OK)]
    if missing:
        raise EngineError(f"engine.bin_dir: {bdir} lacks executable {', '.join(missing)}")
    meta = {
        "source": "bin_dir",
        "path": str(bdir),
        "tools": {t: sha256_file(bdir / t) for t in TOOLS},
        "toolchain": {},
        "cmake_flags": [],
        "build_time_s": 0.0,
    }
    return bdir, meta


def install_engine(spec: EngineSpec, out_dir: Path, cache: Path | None = None, log=None) -> dict:
    """Build or find the engine and place bin/<tools> + engine.json in out_dir (atomically)."""
    log = log or sys.stderr
    cache = cache or default_cache_dir()
    if spec.source == "bin_dir":
        bin_src, meta = adopt_bin_dir(spec)
    else:
        entry = build_into_cache(spec, cache, log)
        bin_src = entry / "bin"
        meta = json.loads((entry / "engine.json").read_text())
        meta["cache_entry"] = str(entry)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    os.chmod(staged, 0o755)
    try:
        (staged / "bin").mkdir()
        for tool in TOOLS:
            # A copy, not a hard link: Snakemake touches outputs, and a shared inode would make
            # every other work dir using the same cache entry look out of date.
            shutil.copy2(bin_src / tool, staged / "bin" / tool)
        (staged / "engine.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return meta

