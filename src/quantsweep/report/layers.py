"""The auto recipes' heat map: which type each layer of each tensor class got (allocate.groups:
layers makes it per layer; with classes every row is one colour).

One panel per auto recipe (model, quant): layers across, classes down, each cell coloured by its
type's rung (fewest bits lightest), the tensors outside the blocks (token_embd, output) named
under the panel. The cells drawn are written into the PNG as a `quantsweep-layers` text chunk,
so tests compare the picture with the allocation records. matplotlib is imported only when a
figure is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ReportError
from .plots import png_chunk, save_png

PNG_LAYERS_KEY = "quantsweep-layers"
_COLOURS = ("#fde0c5", "#facba6", "#f59e72", "#eb7f54", "#cf597e", "#9c3f7f", "#5c2a6e", "#2a1a4a")


@dataclass(frozen=True)
class LayerMap:
    """An allocation record's `layers` (allocator.groups.layer_map) with whose it is."""

    model: str
    quant: str
    budget: str
    source: str  # measured | proxy | external: where the sensitivities came from
    n_layer: int
    classes: tuple[str, ...]
    types: dict  # class -> [type or None per layer]
    other: dict  # tensor outside the blocks -> type
    ladder: tuple[str, ...]  # fewest bits first

    @classmethod
    def from_record(cls, d: dict, path: str, model: str, quant: str, budget: str) -> LayerMap | None:
        """The record's map (None: a record from before the map was written); ReportError naming
        the file and key when it is malformed."""
        m = d.get("layers")
        if m is None:
            return None
        where = f"allocation record {path}: key 'layers'"
        if not isinstance(m, dict):
            raise ReportError(f"{where} is {type(m).__name__}, not an object")
        n, classes, types, ladder = m.get("n_layer"), m.get("classes"), m.get("types"), m.get("ladder")
        if not (isinstance(n, int) and n >= 0 and isinstance(classes, list) and isinstance(types, dict)
                and isinstance(ladder, list) and ladder):
            raise ReportError(f"{where} lacks n_layer, classes, types or ladder")
        for c in classes:
            row = types.get(c)
            if not (isinstance(row, list) and len(row) == n and all(t is None or t in ladder for t in row)):
                raise ReportError(f"{where} types[{c!r}] is not {n} ladder types (or null)")
        other = m.get("other") or {}
        return cls(model, quant, budget, str(d.get("source") or "measured"), n, tuple(classes),
                   {c: list(types[c]) for c in classes}, dict(other), tuple(ladder))

    def cells(self) -> list[dict]:
        return [{"model": self.model, "quant": self.quant, "class": c, "layer": i, "type": t}
                for c in self.classes for i, t in enumerate(self.types[c]) if t is not None]


def _no_layers_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.4), dpi=100)
    FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, "No layer map: no auto recipe of this report has one\n"
             "(allocate.enabled: false, or records written before the map was).", ha="center", va="center",
             fontsize=11)
    return fig


def plot_layers(maps: list[LayerMap]):
    """One panel per auto recipe: the type of each (class, layer) cell, one colour per rung."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not maps:
        return _no_layers_figure()
    ladder = sorted({t for m in maps for t in m.ladder}, key=lambda t: min(m.ladder.index(t) for m in maps
                                                                         if t in m.ladder))
    colours = [_COLOURS[round(i * (len(_COLOURS) - 1) / max(len(ladder) - 1, 1))] for i in range(len(ladder))]
    cmap = ListedColormap(colours).with_extremes(bad="white")
    norm = BoundaryNorm(np.arange(len(ladder) + 1) - 0.5, len(ladder))
    height = sum(1.1 + 0.22 * len(m.classes) for m in maps) + 0.8
    width = min(16.0, max(8.0, 4.0 + 0.18 * max(m.n_layer for m in maps)))
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(maps), 1, squeeze=False, height_ratios=[len(m.classes) + 2 for m in maps])
    for ax, m in zip((a[0] for a in axes), maps):
        grid = np.array([[np.nan if t is None else ladder.index(t) for t in m.types[c]] for c in m.classes],
                        dtype=float)
        img = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        img.set_gid(f"layers|{m.model}|{m.quant}")
        ax.set_yticks(range(len(m.classes)), m.classes, fontsize=8)
        step = max(1, m.n_layer // 20)
        ax.set_xticks(range(0, m.n_layer, step))
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("layer", fontsize=8)
        other = ", ".join(f"{k} {v}" for k, v in m.other.items())
        ax.set_title(f"{m.model} / {m.quant}: {m.budget} ({m.source} sensitivities)" + (f"\n{other}" if other else ""),
                     fontsize=9, loc="left")
    fig.legend(handles=[Patch(color=c, label=t) for c, t in zip(colours, ladder)], loc="outside lower center",
               ncols=len(ladder), fontsize=8, title="type (fewest bits lightest)", title_fontsize=8)
    fig.suptitle("Allocated types by layer and tensor class", fontsize=11)
    return fig


def drawn_cells(fig) -> list[dict]:
    """The cells as drawn, read back from the figure: each panel's image (its gid names the
    recipe), its class tick labels and the legend's types."""
    import numpy as np

    ladder = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    out = []
    for ax in fig.axes:
        for img in ax.get_images():
            gid = img.get_gid() or ""
            if not gid.startswith("layers|"):
                continue
            _, model, quant = gid.split("|")
            classes = [t.get_text() for t in ax.get_yticklabels()]
            data = img.get_array()
            empty = np.ma.getmaskarray(data)
            out += [{"model": model, "quant": quant, "class": c, "layer": layer, "type": ladder[int(data[r, layer])]}
                    for r, c in enumerate(classes) for layer in range(data.shape[1]) if not empty[r, layer]]
    return out


def save_layers(fig, path: str | Path) -> list[dict]:
    """Write the PNG with its drawn cells in a text chunk; returns those cells."""
    return save_png(fig, path, PNG_LAYERS_KEY, drawn_cells(fig))


def png_layers(path: str | Path) -> list[dict]:
    """The cells a PNG written by save_layers says it shows."""
    return png_chunk(path, PNG_LAYERS_KEY)


def layer_maps(entries) -> list[LayerMap]:
    """The layer map of every auto recipe of the report entries that has one, in row order."""
    from .entries import AllocationRecord, load_record, parse_entries

    out = []
    for e in parse_entries(entries):
        for q in [e.reference, *e.quants]:
            if q is not None and q.allocation:
                a = AllocationRecord.load(q.allocation, e.model, q.name)
                m = LayerMap.from_record(load_record(q.allocation, "allocation record"), q.allocation, e.model,
                                         q.name, a.budget)
                if m is not None:
                    out.append(m)
    return out
