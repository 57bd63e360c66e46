"""Per-layer sensitivity at class-level cost: the within-class split of each class's measured damage.

The class-level runs measure D_c(t), the mean-KLD increase of lowering every tensor of class c to
type t. Which layers of the class that damage comes from is predicted, not measured:

* **within-class share** (`tensor_errors`): for every tensor and ladder type, the imatrix-weighted
  squared quantization error of sampled rows, dequantized by the engine itself from the pool file
  the sweep already wrote (quantsweep-dequant) and compared with the source rows:
  e_i(t) = n_rows_i * mean_r sum_j w_j (x_rj - q_rj)^2, w_j the imatrix's mean squared activation of
  input j (the expert's own for 3-D tensors). It is the expected squared perturbation of the
  tensor's output, the quantity the imatrix-weighted quantizer minimises, so within a class it
  ranks layers by how much their quantization disturbs the residual stream. Seconds, no inference.
* **depth correction** (`depth_multipliers`): a few full-model runs per class family, each lowering
  a contiguous band of layers, give measured / predicted per band; interpolated over the band
  centres it is a smooth per-layer multiplier m_f(l) (1 everywhere without band runs).
* **scale** (`predict_table`): predicted increase of a layer group g of class c at type t =
  D_c(t) * sum_{i in g} m(l_i) e_i(t) / sum_{i in c} m(l_i) e_i(t): the class's own measurement
  split, so the layer groups of a class add up to what its class run measured (damage adds up:
  Thireus' single-tensor sums match the all-tensors run), and the exact solver then chooses per
  layer as it chooses per class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import PlanError
from .groups import tensor_class

# Class families of the depth correction (a band run lowers every class of a family in its layers).
FAMILIES = {
    "experts_down": ("ffn_down_exps",),
    "experts_gate_up": ("ffn_gate_up_exps",),
    "attention": ("attn_q", "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b", "attn_k_b", "attn_v_b",
                  "attn_output"),
    "shared": ("ffn_gate_up_shexp", "ffn_down_shexp"),
    "dense": ("ffn_gate_up", "ffn_down"),
}
FAMILY_OF = {c: f for f, cs in FAMILIES.items() for c in cs}

# (file key, [(tensor, [(first row, rows)])]) -> {tensor: rows x ne0 float32}
RowReader = Callable[[str, Sequence[tuple[str, Sequence[tuple[int, int]]]]], dict[str, np.ndarray]]


def family(cls: str) -> str | None:
    return FAMILY_OF.get(cls)


def sample_rows(n_rows: int, k: int, runs: int = 8) -> list[tuple[int, int]]:
    """About k rows of a tensor, as `runs` evenly spaced runs of consecutive rows (a few reads per
    tensor, spread over its depth: every expert of a 3-D tensor is visited when k allows)."""
    if n_rows <= k:
        return [(0, n_rows)]
    runs = max(1, min(runs, k))
    per = max(1, k // runs)
    starts = sorted({(i * (n_rows - per)) // max(runs - 1, 1) for i in range(runs)})
    return [(s, per) for s in starts]


@dataclass(frozen=True)
class TensorShape:
    name: str
    ne0: int      # row length (the input dimension the imatrix weighs)
    ne1: int      # rows of each matrix
    n_mat: int    # matrices (experts of a 3-D tensor; 1 otherwise)

    @property
    def n_rows(self) -> int:
        return self.ne1 * self.n_mat


def weights_of(shape: TensorShape, means: np.ndarray | None, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """The imatrix weight of each sampled row's inputs (rows x ne0): the expert's own for 3-D
    tensors; ones without imatrix data."""
    n = sum(c for _, c in spans)
    if means is None:
        return np.ones((n, shape.ne0), dtype=np.float64)
    m = np.asarray(means, dtype=np.float64)
    if m.size not in (shape.ne0, shape.ne0 * shape.n_mat):
        raise PlanError(f"imatrix entry {shape.name}: {m.size} values, the tensor reads {shape.ne0} per row "
                        f"({shape.n_mat} matrices)")
    per_mat = m.reshape(-1, shape.ne0)
    rows = np.concatenate([np.arange(f, f + c) for f, c in spans])
    return per_mat[(rows // shape.ne1) % per_mat.shape[0]]


def weighted_error(x: np.ndarray, q: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(sum w (x-q)^2, sum w x^2) over the sampled rows."""
    d = (x.astype(np.float64) - q.astype(np.float64))
    return float(np.sum(w * d * d)), float(np.sum(w * x.astype(np.float64) ** 2))


def tensor_errors(shapes: Sequence[TensorShape], types: Sequence[str], read: RowReader,
                  means: Mapping[str, np.ndarray], rows: int = 64) -> dict[str, dict[str, dict[str, float]]]:
    """{tensor: {type: {"err", "rel"}}}: e_i(t) (module docstring) scaled from the sampled rows to the
    whole tensor, and the relative error err / sum w x^2. `read(key, [(tensor, spans)])` returns
    {tensor: rows} dequantized from the source (key "source") or the pool file of a type: one call
    per file, the same rows of each tensor in every file."""
    spans = {sh.name: sample_rows(sh.n_rows, rows) for sh in shapes}
    wanted = [(sh.name, spans[sh.name]) for sh in shapes]
    source = read("source", wanted)
    pools = {t: read(t, wanted) for t in types}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for sh in shapes:
        n = sum(c for _, c in spans[sh.name])
        x = source[sh.name].reshape(n, sh.ne0)
        w = weights_of(sh, means.get(sh.name), spans[sh.name])
        out[sh.name] = {}
        for t in types:
            err, norm = weighted_error(x, pools[t][sh.name].reshape(n, sh.ne0), w)
            out[sh.name][t] = {"err": err * sh.n_rows / n, "rel": err / norm if norm > 0 else 0.0}
    return out


def depth_multipliers(bands: Sequence[dict], n_layer: int) -> dict[str, list[float]]:
    """Per family, m(l) for each layer: measured / predicted of each band run (`bands`: {family,
    layers: [first, last], measured, predicted}), piecewise linear over the band centres, flat
    beyond the outer ones; 1 for a family without band runs."""
    out: dict[str, list[float]] = {}
    for fam in FAMILIES:
        pts = sorted(((b["layers"][0] + b["layers"][1]) / 2, b["measured"] / b["predicted"])
                     for b in bands if b["family"] == fam and b["predicted"] > 0)
        if not pts:
            out[fam] = [1.0] * n_layer
            continue
        xs, ys = [p[0] for p in pts], [max(p[1], 1e-3) for p in pts]  # a band measured at noise: not zero
        out[fam] = [float(np.interp(layer, xs, ys)) for layer in range(n_layer)]
    return out


def _weight(tensor: str, typ: str, errors: Mapping, depth: Mapping[str, list[float]]) -> float:
    layer, cls = tensor_class(tensor)
    fam = family(cls)
    m = depth[fam][layer] if fam in depth and layer is not None and layer < len(depth[fam]) else 1.0
    e = errors.get(tensor, {}).get(typ)
    if e is None:
        raise PlanError(f"quantization-error proxy: no error of {tensor} at {typ}")
    return m * e["err"]


def predict_table(class_table: dict, layer_groups: dict, errors: Mapping, depth: Mapping[str, list[float]]) -> dict:
    """The sensitivity table of the layer groups (`layer_groups`: their groups.json), predicted:
    each group's increase at each type is its class's measured increase times its share (module
    docstring). Pinned groups keep their one type; the top type's increase is 0."""
    top = class_table["settings"]["top"]
    by_tensor = {t: g for g in class_table["groups"] for t in g["tensors"]}
    out = []
    for g in layer_groups["groups"]:
        cg = by_tensor.get(g["tensors"][0])
        if cg is None or any(by_tensor.get(t) is not cg for t in g["tensors"]):
            raise PlanError(f"layer group {g['name']}: its tensors are not all of one class group of the class table")
        inc = {}
        if not g.get("pinned"):
            for t, d in cg["increase"].items():
                if t == top:
                    inc[t] = 0.0
                    continue
                whole = sum(_weight(x, t, errors, depth) for x in cg["tensors"])
                part = sum(_weight(x, t, errors, depth) for x in g["tensors"])
                inc[t] = d * part / whole if whole > 0 else d * len(g["tensors"]) / len(cg["tensors"])
        out.append({**g, "kld": {t: class_table["top_kld"] + v for t, v in inc.items()}, "increase": inc,
                    "class_group": cg["name"]})
    return {**{k: v for k, v in layer_groups.items() if k != "groups"}, "top_kld": class_table["top_kld"],
            "top_run": class_table["top_run"], "predicted_from": "class runs x quantization-error proxy x depth",
            "groups": out}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    if len(a) != len(b) or len(a) < 2:
        return math.nan

    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for val in np.unique(v):  # ties: their average rank
            idx = v == val
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def band_prediction(class_table: dict, errors: Mapping, tensors: Sequence[str], typ: str) -> float:
    """What the class runs and the proxy (no depth correction) predict for lowering `tensors` (a band
    of layers of one family) to `typ`: each class's measured increase times the band's share of it."""
    inside = set(tensors)
    flat: dict[str, list[float]] = {}  # no multipliers: m = 1
    total = 0.0
    for g in class_table["groups"]:
        hit = [x for x in g["tensors"] if x in inside]
        if not hit or typ not in g.get("increase", {}):
            continue
        whole = sum(_weight(x, typ, errors, flat) for x in g["tensors"])
        part = sum(_weight(x, typ, errors, flat) for x in hit)
        total += g["increase"][typ] * (part / whole if whole > 0 else len(hit) / len(g["tensors"]))
    return total


def band_members(tensors: Sequence[str], fam: str, first: int, last: int) -> list[str]:
    """The tensors of a family in layers first..last (a band run lowers exactly these)."""
    return [t for t in tensors if family(tensor_class(t)[1]) == fam and tensor_class(t)[0] is not None
            and first <= tensor_class(t)[0] <= last]


def predict(class_table: dict, layer_groups: dict, errors: Mapping, bands: Sequence[dict]) -> dict:
    """predict_table with the depth correction of band runs ({family, layers, type, measured}):
    each band's prediction (band_prediction) beside its measurement gives the multipliers; the
    table keeps both, and the bands with their predictions."""
    n_layer = 1 + max((tensor_class(t)[0] or 0) for t in errors)
    bands = [{**b, "predicted": band_prediction(class_table, errors, band_members(errors, b["family"], *b["layers"]),
                                                b["type"])} for b in bands]
    depth = depth_multipliers(bands, n_layer)
    return {**predict_table(class_table, layer_groups, errors, depth), "depth": depth, "bands": bands}


def bands_of(tensors: Sequence[str], k: int = 3) -> list[dict]:
    """The band runs of the depth correction: for each family with at least k layers among
    `tensors`, k contiguous bands of its layers, each {family, layers: [first, last], match,
    tensors}: one group (an anchored regex the engine reads alike) lowering every class of the
    family in those layers."""
    out = []
    for fam in FAMILIES:
        mine = [t for t in tensors if family(tensor_class(t)[1]) == fam and tensor_class(t)[0] is not None]
        layers = sorted({tensor_class(t)[0] for t in mine})
        if len(layers) < k:
            continue
        classes = sorted({tensor_class(t)[1] for t in mine})
        names = "|".join(c.replace("ffn_gate_up", "ffn_(gate|up)") for c in classes)
        for i in range(k):
            band = layers[i * len(layers) // k:(i + 1) * len(layers) // k]
            rx = rf"^blk\.({'|'.join(str(x) for x in band)})\.({names})\.weight$"
            out.append({"family": fam, "layers": [band[0], band[-1]], "match": rx,
                        "tensors": band_members(mine, fam, band[0], band[-1])})
    return out
