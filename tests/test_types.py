"""THE type table (quantsweep.gguf.types): every consumer's idea of a type comes from its rows.

The planner (row-size fallbacks, interleaving, quantized or not), the imatrix check (types that
need data, types whose quantizer reads it), recipes (storage types) and the config (ftypes that
need an imatrix) keep no lists of their own; a new type is one row.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from quantsweep import imatrix as imx
from quantsweep.config import parse_quants
from quantsweep.errors import ConfigError, PlanError, RecipeError
from quantsweep.gguf import types
from quantsweep.gguf.reader import GGUFTable, TensorInfo
from quantsweep.planner import recipes as R
from quantsweep.planner import selection as S
from quantsweep.planner.plan import plan

PKG = ROOT / "src" / "quantsweep"
ROWS = list(types.TYPES.values())


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_planner_row_size_fallback_and_interleave_follow_the_row(row):
    assert S.interleaved(row.name) == ((row.interleave[0], row.interleave[1]) if row.interleave else (row.name, 1))
    ne0 = 128 if row.row_multiple == 256 else 96  # a row the check refuses (256: 128; 64: 96)
    if not row.row_multiple:
        assert S.change_type_if_necessary(row.name, ne0) == row.name
    elif row.fallback:
        assert S.change_type_if_necessary(row.name, ne0) == row.fallback
        assert S.change_type_if_necessary(row.name, row.row_multiple * 4) == row.name
    else:
        with pytest.raises(PlanError, match="no fallback"):
            S.change_type_if_necessary(row.name, ne0, "x.weight")


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_recipes_and_imatrix_rules_follow_the_row(row):
    if row.storage:
        assert R.check_type(row.name, "rules[0].type") == row.name
    else:
        with pytest.raises(RecipeError, match="not a weight storage type"):
            R.check_type(row.name, "rules[0].type")
    assert types.needs_imatrix(row.name, "IQ4_KS") == row.needs_imatrix
    assert types.quantized(row.name) == row.quantized


@pytest.mark.parametrize("zeros, flagged", [
    (slice(0, 256), lambda g: g is not None),  # the whole row: every type with a zero column
    (slice(32, 64), lambda g: g in (16, 32)),  # one aligned 32-group (two 16-groups)
    (slice(16, 32), lambda g: g == 16),
    (slice(0, 128), lambda g: g in (16, 32, 128)),
    (np.arange(0, 256, 2), lambda g: False),  # scattered zeros: no type fails on them
])
def test_imatrix_check_flags_exactly_the_zero_groups_of_the_type_table(zeros, flagged):
    t = TensorInfo("blk.0.ffn_down.weight", (256, 4), types.by_name("bf16").id, 0)
    table = GGUFTable(Path("m"), 3, {}, [t], 0)
    v = np.ones(256, np.float32)
    v[zeros] = 0
    im = imx.Imatrix({t.name: imx.Entry(1, v)})
    for row in ROWS:
        if row.quantized and row.storage:
            found = [p for p in imx.check(im, table, {t.name: row.name}) if "all-zero group" in p.problem]
            assert bool(found) == flagged(row.zero_group), (row.name, row.zero_group)


@pytest.mark.parametrize("name", types.ftype_names())
def test_config_and_planner_follow_the_ftype_rows(name):
    f = types.FTYPES[types.canonical_ftype(name)]
    assert f.default in types.BY_NAME
    assert parse_quants([name])[0].ftype == f.name
    if f.needs_imatrix:
        with pytest.raises(ConfigError, match="cannot be made without an imatrix"):
            parse_quants([{"ftype": name, "imatrix": False}])
    else:
        assert not parse_quants([{"ftype": name, "imatrix": False}])[0].imatrix
    assert S.EngineOptions(ftype=name).default_type == f.default


def _literals_of_type_names(path: Path) -> list[int]:
    """Lines of set/list/tuple/dict literals holding 3+ ggml type or ftype names."""
    names = set(types.BY_NAME) | set(types.ftype_names())
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        elts = node.elts if isinstance(node, (ast.Set, ast.List, ast.Tuple)) else (
            node.keys if isinstance(node, ast.Dict) else [])
        strs = [e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        if sum(s in names for s in strs) >= 3:
            out.append(node.lineno)
    return out


def test_no_module_keeps_its_own_list_of_types():
    """Only the table holds lists of types. The engine port (planner/selection.py) names types in
    its heuristics exactly as upstream's code does, which is the port, not a copy of a fact."""
    found = {p.relative_to(PKG).as_posix(): lines for p in PKG.rglob("*.py")
             if p.name != "types.py" and p.name != "selection.py" and (lines := _literals_of_type_names(p))}
    assert not found


def test_a_new_type_is_one_row(monkeypatch):
    """A made-up type added as one row of the table: the reader sizes it, recipes accept it, the
    planner plans and sizes it (with its row-size fallback), the check asks data for it."""
    (row,) = types._parse_types("900   iq9_zz       256  100    4   qsiw  256  iq4_nl    -   64").values()
    assert row.zero_group == 64
    monkeypatch.setitem(types.TYPES, row.id, row)
    monkeypatch.setitem(types.BY_NAME, row.name, row)
    assert R.check_type("iq9_zz", "rules[0].type") == "iq9_zz"
    assert types.needs_imatrix("iq9_zz", "Q8_0")
    recipe = R.recipe_from_dict({"name": "t", "base": "Q8_0", "rules": [{"match": "ffn_", "type": "iq9_zz"}]})
    bf16 = types.by_name("bf16").id
    table = GGUFTable(Path("m"), 3, {"general.architecture": "llama", "llama.block_count": 1},
                      [TensorInfo("blk.0.ffn_up.weight", (512, 8), bf16, 0),
                       TensorInfo("blk.0.ffn_down.weight", (384, 8), bf16, 0)], 0)
    p = plan(table, recipe, has_imatrix=True)
    by = {t.name: t for t in p.tensors}
    assert by["blk.0.ffn_up.weight"].type == "iq9_zz"
    assert by["blk.0.ffn_up.weight"].nbytes == 8 * (4 + 2 * 100)
    assert by["blk.0.ffn_down.weight"].type == "iq4_nl" and by["blk.0.ffn_down.weight"].fallback
    assert TensorInfo("x", (512, 8), 900, 0).nbytes == 8 * 204
    warnings = plan(table, recipe).warnings
    assert any("needs an imatrix (e.g. blk.0.ffn_up.weight: iq9_zz)" in w for w in warnings)


def test_a_new_ftype_is_one_row(monkeypatch):
    (f,) = types._parse_ftypes("IQ9_ZZ         900  iq4_ks        i   -     IQ9").values()
    monkeypatch.setitem(types.FTYPES, f.name, f)
    assert types.canonical_ftype("iq9") == "IQ9_ZZ"
    with pytest.raises(ConfigError, match="IQ9_ZZ cannot be made without an imatrix"):
        parse_quants([{"ftype": "IQ9_ZZ", "imatrix": False}])
    assert S.EngineOptions(ftype="IQ9_ZZ").default_type == "iq4_ks"
