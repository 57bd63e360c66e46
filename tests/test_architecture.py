"""The package's shape: declared layering (import-linter contracts in pyproject.toml), module
and function sizes, and one error base class for every expected failure."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys

import pytest

from conftest import ROOT
from quantsweep import errors

PKG = ROOT / "src" / "quantsweep"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# The port of llama-quantize's type selection keeps upstream's shape (one 370-line function),
# so it can be diffed against a new engine version; it is the only exception.
ENGINE_PORT_MODULE = PKG / "planner" / "selection.py"
ENGINE_PORT_FUNCTION = "llama_tensor_get_type"


def test_import_contracts_are_kept():
    """lint-imports checks every contract: the layers (cli on top; gguf, fileio and errors at the
    bottom), no cycles inside any package, the report never importing the engine, no snakemake."""
    r = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                        "sys.exit(lint_imports(no_cache=True))"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "BROKEN" not in r.stdout and "0 broken" in r.stdout


def test_contracts_cover_every_top_level_module():
    """A new module must be placed in the layers, or lint-imports would not constrain it."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layered = {m.strip() for layer in cfg["layers"] for m in layer.split("|")}
    present = {f"quantsweep.{p.stem}" for p in PKG.glob("*.py") if p.stem != "__init__"}
    present |= {f"quantsweep.{p.name}" for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert present == layered


def _python_files():
    return sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(PKG)))
def test_module_and_function_sizes(path):
    lines = path.read_text().count("\n")
    if path != ENGINE_PORT_MODULE:
        assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
            and not (path == ENGINE_PORT_MODULE and n.name == ENGINE_PORT_FUNCTION)]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_engine_port_is_still_one_function():
    tree = ast.parse(ENGINE_PORT_MODULE.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == ENGINE_PORT_FUNCTION)
    assert fn.end_lineno - fn.lineno > 300


def test_every_package_error_is_a_quantsweep_error():
    """No expected failure on ValueError/RuntimeError: every class raised by name in the package
    derives from QuantsweepError, or is a builtin that means a bug."""
    ours = {name for name, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.QuantsweepError)}
    raised = set()
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                raised.add((node.exc.func.id, path.relative_to(PKG).as_posix()))
    # builtins raised on purpose mean a programming error (a wrong argument from code, not from
    # input); OSError is an I/O failure, which the CLI reports in one line like the rest
    # fileio.read_yaml raises the QuantsweepError subclass its caller names (its argument `error`)
    passed_in = {("error", "fileio.py")}
    bugs = passed_in | {("ValueError", "gguf/deepseek2.py"), ("TypeError", "gguf/writer.py"), ("TypeError", "planner/plan.py"),
            ("ValueError", "fileio.py"), ("ValueError", "gguf/assemble.py"),
            ("TypeError", "settings/base.py"),  # a settings class declared a field type the loader lacks
            ("KeyError", "capacity/jobs.py")}  # a rule asked the capacity plan for a job it does not list
    odd = {(name, where) for name, where in raised
           if name not in ours and name != "OSError" and (name, where) not in bugs}
    assert not odd, odd
    for name in ours:
        assert issubclass(getattr(errors, name), errors.QuantsweepError)
        assert not issubclass(getattr(errors, name), (ValueError, RuntimeError, KeyError))


def test_no_error_classes_outside_errors_module():
    defined = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and path.name != "errors.py":
                defined.append(f"{path.relative_to(PKG)}:{node.name}")
    assert not defined


def test_cli_expected_failure_is_one_line_exit_1(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + b"\x07\x00\x00\x00")
    r = subprocess.run([sys.executable, "-m", "quantsweep.cli", "gguf", "info", str(bad)], capture_output=True,
                       text=True)
    assert r.returncode == 1
    assert r.stderr == f"quantsweep: error: {bad}: unsupported GGUF version 7\n"
    r = subprocess.run([sys.executable, "-m", "quantsweep.cli", "gguf", "info", str(tmp_path / "missing.gguf")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "missing.gguf" in r.stderr


def test_cli_bug_prints_its_traceback_exit_2(tmp_path, monkeypatch, capsys):
    """A programming error (here: a KeyError from inside a step) is not dressed up as an input
    problem: the traceback is printed and the exit code is 2."""
    from quantsweep import cli
    from quantsweep.gguf import reader

    def broken(*a, **k):
        return {}["no such key"]

    monkeypatch.setattr(reader, "read_model", broken)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    assert cli.main(["gguf", "info", str(model)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'no such key'" in err
