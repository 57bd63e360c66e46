"""A misbehaving stand-in for llama-imatrix / llama-quantize / llama-perplexity (tests/test_faults.py).

Installed under a tool's name (the test writes small launchers); QS_FAKE picks the fault:
  silent    print nothing, exit 0               garbage  print noise, exit 0
  exit1     a complete log and output, exit 1   segv     die of SIGSEGV after some output
  empty     a complete log, a 0-byte output     cut      a complete log, an output cut short
  hang      sleep (the watchdog must kill it)   ok       a complete log and output
  short_text  the engine's "too few tokens" lines   fewer  a complete log of fewer chunks
  nan       statistics of nan (imatrix: its abort)  foreign  a complete log, another model's imatrix
  liar      a log whose chunk count the file contradicts  abort  the engine's size-mismatch abort (SIGABRT)
  forced_mla3  a complete log reporting mla_attn = 3 (asked 1)
llama-sweep-bench prints the first run of the real engine's tests/fixtures/logs/sweep_bench.log
(-c 256 -ub 128, two depths); `cut` prints its first result line only, `nan` a NaN speed.
Complete logs and outputs are the real engine's (tests/fixtures, see its README).
"""

from __future__ import annotations

import os
import random
import signal
import struct
import sys
import time
from pathlib import Path

FIX = Path(__file__).resolve().parents[1] / "fixtures"
LOGS = FIX / "logs"


def opt(argv: list[str], *names: str) -> str | None:
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            return argv[i + 1]
    return None


def kld_base_bytes(n_ctx: int, n_vocab: int, n_chunk: int) -> bytes:
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rows = n_ctx - 1 - n_ctx // 2
    return (b"_logits_" + struct.pack("<iii", n_ctx, n_vocab, n_chunk) + bytes(4 * n_chunk * n_ctx)
            + bytes(2 * n_chunk * rows * nv))


def main() -> int:
    tool, argv = sys.argv[1], sys.argv[2:]
    mode = os.environ.get("QS_FAKE", "ok")
    out, log, data = None, "", b""
    if tool == "llama-imatrix":
        out, log, data = opt(argv, "-o"), (LOGS / "imatrix_mla.log").read_text(), (FIX / "tiny-mla.dat").read_bytes()
        if mode == "foreign":
            data = struct.pack("<i", 1) + struct.pack("<i", 15) + b"blk.0.attn_q.wt" + struct.pack("<ii", 8, 4) + \
                bytes(16) + struct.pack("<ii", 8, 0)
        if mode == "fewer":
            log = log.replace("computing over 8 chunks", "computing over 5 chunks")
        if mode == "liar":
            log = log.replace("stored collected data after 8 chunks", "stored collected data after 7 chunks")
        if mode == "nan":
            print("nan detected in blk.1.ffn_up_exps.weight", flush=True)
            return 1
    elif tool == "llama-quantize":
        model, out = argv[-4], argv[-3]  # ... MODEL OUT FTYPE THREADS
        log, data = (LOGS / "quantize_ok.log").read_text(), Path(model).read_bytes()
    elif tool == "llama-perplexity":
        out = opt(argv, "--kl-divergence-base")
        if "--kl-divergence" in argv:
            log, out = (LOGS / "ppl_kld.log").read_text(), None
            if mode == "nan":
                log = log.replace("Mean    KLD:   ", "Mean    KLD:        nan ± 0.0 #")
        else:
            log = (LOGS / "ppl_base.log").read_text()
            data = kld_base_bytes(int(opt(argv, "-c") or 512), 354, int(opt(argv, "--chunks") or 16))
            if mode == "fewer":
                log = log.replace("over 16 chunks", "over 5 chunks")
    elif tool == "llama-sweep-bench":
        # the first run: from its "+ argv" line to the step's note before the second
        text = (LOGS / "sweep_bench.log").read_text()
        first = text[text.index("+ "):]
        log = first[:first.index("\nquantsweep: sweep-bench run 2 of 2")]
        if opt(argv, "-ot") != "exps=CPU":  # the real log's override lines are for that pattern
            log = "\n".join(ln for ln in log.splitlines() if "buffer type overriden" not in ln)
        if mode == "cut":
            log = "\n".join(ln for ln in log.splitlines() if '"n_kv": 128' not in ln)
        if mode == "nan":
            log = log.replace('"speed_tg": ', '"speed_tg": NaN, "was": ', 1)
    if mode == "forced_mla3":  # what ik_llama.cpp #1870 does on a partial GPU offload
        log = log.replace("mla_attn      = 1", "mla_attn      = 3")
    if mode == "silent":
        return 0
    if mode == "garbage":
        rnd = random.Random(0)
        sys.stdout.write("".join(rnd.choice("abc xyz=[]:.\n0123456789") for _ in range(5000)))
        return 0
    if mode == "hang":
        print("loading model ...", flush=True)
        time.sleep(3600)
        return 0
    if mode == "short_text":
        print("main: you need at least 1024 tokens to evaluate perplexity with a context of 512", file=sys.stderr)
        print("main: the data file you provided tokenizes to only 37 tokens", file=sys.stderr)
        return 0
    if mode in ("segv", "abort"):
        if mode == "abort":
            log = (LOGS / "quantize_size_mismatch.log").read_text()
        print(log[: len(log) // 2] if mode == "segv" else log, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV if mode == "segv" else signal.SIGABRT)
    if out:
        if mode == "empty":
            data = b""
        elif mode == "cut":
            data = data[: min(20000, len(data) // 2)]
        with open(out, "wb") as f:  # as the engine does: a full disk cuts the file, the log goes on
            try:
                f.write(data)
                f.flush()
            except OSError:
                pass
    sys.stdout.write(log)
    return 1 if mode == "exit1" else 0


if __name__ == "__main__":
    sys.exit(main())


def install(bin_dir: Path) -> Path:
    """Launchers named like the engine's tools, running this script, and an engine.json whose
    flags are the real engine's (its --help, tests/fixtures/help) as `quantsweep engine build`
    writes them."""
    import json

    from quantsweep.engine.argv import help_flags

    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in ("llama-imatrix", "llama-quantize", "llama-perplexity", "llama-sweep-bench"):
        p = bin_dir / tool
        p.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" {tool} "$@"\n')
        p.chmod(0o755)
    flags = {t: help_flags((FIX / "help" / f"{t}.txt").read_text()) for t in ("llama-imatrix", "llama-perplexity")}
    flags["llama-sweep-bench"] = flags["llama-perplexity"]
    (bin_dir.parent / "engine.json").write_text(json.dumps({"source": "fake", "flags": flags}))
    return bin_dir
