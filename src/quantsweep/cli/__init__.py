"""`quantsweep` command line: thin wrappers over the package, called by the workflow's rules
and usable by hand. An expected failure (bad input, an engine run that did not finish) is
one line on stderr and exit code 1; anything else is a bug: its traceback and exit code 2
(2 is also argparse's code for usage errors)."""

from __future__ import annotations

import sys
import time
import traceback

from ..errors import QuantsweepError
from .commands import bundled_text
from .parsers import build_parser

__all__ = ["bundled_text", "build_parser", "main"]


# ---- manifests -------------------------------------------------------------------------------


def _files(a, names: tuple[str, ...]) -> dict[str, list[str]]:
    """The files behind each argument; a split model's every shard."""
    from ..gguf.reader import shards

    out = {}
    for name in names:
        v = getattr(a, name, None)
        files = [f for f in ([v] if isinstance(v, str) else list(v or [])) if f]
        if name == "pool":  # TYPE=FILE
            files = [f.partition("=")[2] for f in files]
        out[name] = [str(s) for f in files for s in shards(f)] if name == "model" else files
    return out


def _write_manifest(a, result, argv: list[str], started: float, wall: float) -> None:
    from .. import manifest
    from ..fileio import write_json
    from ..settings.tools import record_run

    result = result if isinstance(result, dict) else {}
    inputs = {**_files(a, a.manifest_inputs), **result.get("inputs", {})}
    outputs = [f for files in _files(a, a.manifest_outputs).values() for f in files] + result.get("outputs", [])
    cmds = result.get("cmds") or ([result["cmd"]] if result.get("cmd") else [])
    m = manifest.build(argv=["quantsweep", *argv], inputs=inputs, outputs=outputs, started=started, wall_s=wall,
                       bin_dir=getattr(a, "bin_dir", None), engine_cmds=cmds)
    run = record_run(result)
    if run is not None:  # how the engine ran (PPL depends on -b/-ub) and what it reports it ran
        m.update(run_settings=run, ran=result.get("ran", {}))
    m.update(result.get("provenance", {}))  # what only the step knows (a conversion's checkpoint)
    write_json(a.manifest, m)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        started, t0 = time.time(), time.monotonic()
        result = args.func(args)
        if getattr(args, "manifest", ""):
            _write_manifest(args, result, argv, started, time.monotonic() - t0)
    except (QuantsweepError, OSError) as e:
        print(f"quantsweep: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception:  # a bug: show where it is
        traceback.print_exc()
        return 2
    return 0
