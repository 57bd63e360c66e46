"""`quantsweep sensitivity proxy | predict | external`: per-layer sensitivity at class-level cost
(allocator.proxy, allocator.external): the quantization-error proxy of every tensor, the layer
groups' table predicted from the class runs, or read from a publisher's single-tensor CSV."""

from __future__ import annotations

from pathlib import Path

from . import commands


def add_parsers(sv, manifested, add_pool) -> None:
    p = sv.add_parser("proxy", help="every quantized tensor's imatrix-weighted quantization error at each pool "
                      "file's type (sampled rows dequantized by the engine: quantsweep-dequant)")
    for flag in ("--bin-dir", "--model"):
        p.add_argument(flag, required=True)
    p.add_argument("-o", "--output", required=True, help="the errors (JSON)")
    p.add_argument("--imatrix", default="", help="the imatrix the pool files were made with (weights the error)")
    p.add_argument("--settings", required=True, metavar="JSON", help="JSON (or a .json file) of the config's allocate "
                   "section: ladder (its last type, the top, decides which tensors are allocated), proxy_rows (rows "
                   "sampled per tensor, default 64)")
    p.add_argument("--log", default="")
    add_pool(p, "the pool files of the ladder's types")
    manifested(p, inputs=("model", "imatrix", "pool"), outputs=("output",))
    p.set_defaults(func=proxy)
    p = sv.add_parser("predict", help="the sensitivity table of layer groups, predicted: each class run's increase "
                      "split over its layers by the proxy (and the band runs' depth correction)")
    for flag in ("--class-table", "--groups", "--errors"):
        p.add_argument(flag, required=True)
    p.add_argument("-o", "--output", required=True, help="the predicted table (JSON)")
    p.add_argument("--bands", default="", help="JSON list of band runs {family, layers: [first, last], type, "
                   "measured} (measured: the run's KLD increase over the top run)")
    manifested(p, inputs=("class_table", "groups", "errors", "bands"), outputs=("output",))
    p.set_defaults(func=predict)
    p = sv.add_parser("external", help="the sensitivity table of the groups from a single-tensor KLD CSV "
                      "(QTYPE,<tensor>,...; allocator.external)")
    for flag in ("--groups", "--csv"):
        p.add_argument(flag, required=True)
    p.add_argument("-o", "--output", required=True, help="the table (JSON)")
    p.add_argument("--floor", type=float, default=None, help="the per-run floor subtracted per tensor (default: "
                   "the smallest cell)")
    manifested(p, inputs=("groups", "csv"), outputs=("output",))
    p.set_defaults(func=external)


def proxy(a) -> dict:
    from ..fileio import write_json
    from ..settings import AllocateSettings
    from ..steps import quant_errors

    s = AllocateSettings.from_json(a.settings, "allocate")
    doc = quant_errors(Path(a.bin_dir), Path(a.model), commands._pools(a.pool), Path(a.imatrix) if a.imatrix else None,
                       s.top, s.proxy_rows, Path(a.log) if a.log else None)
    write_json(a.output, doc)
    print(f"{len(doc['tensors'])} tensors x {len(doc['types'])} types, {s.proxy_rows} rows each")
    return {}


def predict(a) -> dict:
    from ..allocator.proxy import predict
    from ..fileio import read_json_object, write_json
    from ..settings import read_json_arg

    cls = read_json_object(a.class_table, "class-level sensitivity table")
    table = predict(cls, read_json_object(a.groups, "layer groups"),
                    read_json_object(a.errors, "proxy errors")["tensors"],
                    read_json_arg(a.bands, "--bands") if a.bands else [])
    write_json(a.output, table)
    print(f"{len(table['groups'])} groups predicted from {len(cls['groups'])} class runs and "
          f"{len(table['bands'])} band runs")
    return {}


def external(a) -> dict:
    from ..allocator.external import external_table
    from ..fileio import read_json_object, write_json

    table = external_table(a.csv, read_json_object(a.groups, "groups"), a.floor)
    write_json(a.output, table)
    print(f"{len(table['groups'])} groups from {a.csv}")
    return {}
