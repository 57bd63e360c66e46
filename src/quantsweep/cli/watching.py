"""The subcommands that watch a running sweep: `quantsweep status` and `report --partial`
(above `commands`, whose `_report` writes the workflow's report)."""

from __future__ import annotations

import sys
import time

from . import commands


def status(a) -> None:
    from ..status import sweep_status, text

    while True:
        st = sweep_status(a.dir)
        out = st.to_json() if a.json else text(st)
        if not a.watch:
            sys.stdout.write(out)
            return
        sys.stdout.write("\033[H\033[2J" + time.strftime("%H:%M:%S ") + out)  # redraw from the top
        sys.stdout.flush()
        time.sleep(a.watch)


def report(a) -> dict:
    """`quantsweep report`: the workflow's (commands._report), or with --partial the report of
    what a running sweep has measured so far."""
    return partial_report(a) if a.partial else commands._report(a)


def partial_report(a) -> dict:
    from ..status.partial import partial_report

    rows, pending, inputs, out = partial_report(a.partial)
    print(f"wrote {out}/summary.csv, .md, .html: {len(rows)} rows measured, {len(pending)} pending")
    return {"inputs": {"evaluations": inputs}}
