"""Bad input and engine faults, one class per row: each must end with exit code 1 and one line
on stderr that names the input (file, key, entry or tensor), and leave nothing at any output
path (no half-written file, no temp file).

Engine faults use a fake engine (tests/fake_engine/fake.py: prints nothing, noise, a complete
log then exit 1, SIGSEGV, a 0-byte or cut output, hangs, ...), whose complete logs and outputs
are the real engine's (tests/fixtures). The full-disk rows mount a small tmpfs (root only:
skipped elsewhere, but never in CI).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES
from fake_engine.fake import install, kld_base_bytes

from quantsweep.cli import bundled_text
from quantsweep.gguf.writer import header

OUTPUTS = ("out.dat", "out.gguf", "rec.json", "man.json", "base.kld", "res.json", "report.csv", "report.md",
           "report.html", "lnppl.png", "kld.png", "check.txt", "bench.json", "run.json")


@dataclass
class Ctx:
    dir: Path  # where outputs go (a tmpfs for the full-disk rows)
    logs: Path  # engine logs (never on the tmpfs: a real log disk is not the one that fills)
    model: Path  # the default tiny model
    bin: Path  # the fake engine
    text: Path

    def p(self, name: str) -> str:
        return str(self.dir / name)

    def log(self, name: str) -> str:
        return str(self.logs / name)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_gguf) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("faults")
    model = tiny_gguf()
    text = d / "text.txt"
    text.write_text(bundled_text("calibration"))
    return model, install(d / "fake-bin"), text


# ---- what each row runs -------------------------------------------------------------------------

FAST = ["--timeout-min", "0.03"]  # the watchdog: 1.8 s


def collect(c: Ctx) -> list[str]:
    return ["imatrix", "collect", "--bin-dir", str(c.bin), "--model", str(c.model), "--text", str(c.text),
            "-o", c.p("out.dat"), "--log", c.log("collect.log"), "--mode", "mla", "--chunks", "8",
            "--record", c.p("rec.json"), "--manifest", c.p("man.json"), *FAST]


def quantize(c: Ctx, *extra: str) -> list[str]:
    return ["quantize", "--bin-dir", str(c.bin), "--model", str(c.model), *(extra or ("--ftype", "Q8_0")),
            "-o", c.p("out.gguf"), "--log", c.log("quantize.log"), "--record", c.p("rec.json"),
            "--manifest", c.p("man.json"), *FAST]


def base(c: Ctx) -> list[str]:
    return ["eval", "base", "--bin-dir", str(c.bin), "--model", str(c.model), "--text", str(c.text),
            "--kld-base", c.p("base.kld"), "--result", c.p("res.json"), "--log", c.log("base.log"),
            "--chunks", "16", "--manifest", c.p("man.json"), *FAST]


def kld(c: Ctx, base_bytes: bytes | None = None) -> list[str]:
    good = c.dir / "in.kld"
    good.write_bytes(kld_base_bytes(512, 354, 16) if base_bytes is None else base_bytes)
    return ["eval", "kld", "--bin-dir", str(c.bin), "--model", str(c.model), "--kld-base", str(good),
            "--result", c.p("res.json"), "--log", c.log("kld.log"), "--chunks", "16", *FAST]


def bench(c: Ctx, *extra: str, depths: str = "0,128",
          run: str = '{"ubatch": 128, "override_tensors": ["exps=CPU"]}') -> list[str]:
    """Two sweep-bench runs at the depths of the fake's (the real engine's) log: -c 256 -ub 128."""
    return ["bench", "--bin-dir", str(c.bin), "--model", str(c.model), "--result", c.p("bench.json"),
            "--log", c.log("bench.log"), "--depths", depths, "--repeats", "2", "--run", run,
            "--manifest", c.p("man.json"), *extra, *FAST]


def check_run(c: Ctx, run: dict, steps: str = "imatrix,eval,bench") -> list[str]:
    return ["engine", "check-run", "--engine", str(c.bin.parent / "engine.json"), "--run", json.dumps(run),
            "--steps", steps, "-o", c.p("run.json")]


def remap(c: Ctx, imatrix: Path) -> list[str]:
    return ["imatrix", "remap", "--model", str(c.model), "-o", c.p("out.dat"), "--manifest", c.p("man.json"),
            str(imatrix)]


def dat(c: Ctx, entries: list[tuple[str, int, list[float]]], name: str = "in.dat") -> Path:
    """A legacy imatrix with these (name, ncall, values) entries, written byte by byte."""
    b = struct.pack("<i", len(entries))
    for n, ncall, vals in entries:
        b += struct.pack("<i", len(n)) + n.encode() + struct.pack("<ii", ncall, len(vals))
        b += np.asarray(vals, "<f4").tobytes()
    p = c.dir / name
    p.write_bytes(b + struct.pack("<ii", 1, 0))
    return p


def gguf(c: Ctx, kvs: list, tensors: list, data: bytes = b"", name: str = "in.gguf") -> Path:
    p = c.dir / name
    p.write_bytes(header(kvs, tensors) + data)
    return p


def cut_model(c: Ctx) -> Path:
    p = c.dir / "cut.gguf"
    p.write_bytes(c.model.read_bytes()[:20000])
    return p


def report(c: Ctx, **bad) -> list[str]:
    """The report over a baseline and one quant whose record has `bad` keys."""
    good = {"ppl": 12.0, "ppl_err": 0.1, "size_bytes": 1000, "eval": {"ctx": 512, "chunks": 16, "mla": 1,
                                                                           "fa": "off"}, "cmd": [], "model_file": "m"}
    (c.dir / "base.json").write_text(json.dumps(good))
    (c.dir / "q.json").write_text(json.dumps({**good, "kld_mean": 0.1, "kld_err": 0.01, "size_bytes": 500,
                                              "ln_ratio": 0.01, **bad}))
    entries = [{"model": "m", "reference": "base", "base": c.p("base.json"),
                "quants": [{"name": "Q", "ftype": "IQ4_KS", "imatrix": "yes", "result": c.p("q.json")}]}]
    return ["report", "--entries", json.dumps(entries), "--csv", c.p("report.csv"), "--md", c.p("report.md"),
            "--html", c.p("report.html"), "--plot-lnppl", c.p("lnppl.png"), "--plot-kld", c.p("kld.png"),
            "--manifest", c.p("man.json")]


def config(c: Ctx, text: str) -> list[str]:
    (c.dir / "user.yaml").write_text(text)
    root = Path(__file__).resolve().parents[1]
    return ["config", "check", str(root / "config" / "config.yaml"), c.p("user.yaml")]


def recipe_matching_nothing(c: Ctx) -> list[str]:
    (c.dir / "r.yaml").write_text("name: r\nbase: Q8_0\nrules:\n  - {match: 'blk\\.99\\.ffn_up', type: q4_K}\n")
    return quantize(c, "--recipe", c.p("r.yaml"))


def check(c: Ctx, imatrix: Path) -> list[str]:
    return ["imatrix", "check", "--bin-dir", str(c.bin), "--model", str(c.model), "--ftype", "IQ4_KS",
            "--log", c.log("check.log"), "-o", c.p("check.txt"), str(imatrix)]


# ---- the table ---------------------------------------------------------------------------------


@dataclass
class Fault:
    id: str
    args: Callable[[Ctx], list[str]]
    expect: str  # regex the one error line must match
    fake: str = "hang"  # the fake engine's fault (hang: a row that must not reach the engine would time out)
    tmpfs: bool = False  # the outputs go to a full-sized-64 KiB tmpfs


LOG = r"; see \S+\.log$"
FAULTS = [
    # llama-imatrix
    Fault("imatrix-prints-nothing", collect, r"imatrix \(mla pass\) failed \(exit code 0\): imatrix did not finish"
          + ".*" + LOG, "silent"),
    Fault("imatrix-garbage", collect, r"imatrix \(mla pass\) failed \(exit code 0\): imatrix did not finish",
          "garbage"),
    Fault("imatrix-exit1-after-complete-log", collect, r"ended with exit code 1 although its output looks complete"
          + LOG, "exit1"),
    Fault("imatrix-sigsegv", collect, r"imatrix \(mla pass\) failed \(killed by SIGSEGV\)", "segv"),
    Fault("imatrix-writes-0-bytes", collect, r"wrote a bad file: \S+out\.dat: truncated at offset 0", "empty"),
    Fault("imatrix-cut-file", collect, r"wrote a bad file: \S+out\.dat: truncated at offset \d+", "cut"),
    Fault("imatrix-hangs", collect, r"imatrix \(mla pass\) did not finish within 0\.03 min .*killed" + LOG, "hang"),
    Fault("imatrix-fewer-chunks", collect, r"ran 5 of the 8 chunks asked for: \S+text\.txt is too short", "fewer"),
    Fault("imatrix-text-too-short", collect, r"the text tokenizes to only 37 tokens; a context of 512 needs at least "
          r"1024", "short_text"),
    Fault("imatrix-chunk-count-contradicts-log", collect, r"out\.dat: says 8 chunks, the engine's log says 7", "liar"),
    Fault("imatrix-nan-abort", collect, r"imatrix aborted: nan detected in blk\.1\.ffn_up_exps\.weight", "nan"),
    Fault("imatrix-foreign-entries", collect, r"out\.dat: entry blk\.0\.attn_q\.wt names no matrix of \S+tiny\.gguf",
          "foreign"),
    Fault("imatrix-attention-mode-forced", collect, r"imatrix \(mla pass\) ran with mla_attn = 3 \(asked 1\): "
          r"the engine changed the attention mode", "forced_mla3"),
    Fault("kld-attention-mode-forced", kld, r"perplexity/KLD of tiny\.gguf ran with mla_attn = 3 \(asked 1\)",
          "forced_mla3"),
    Fault("imatrix-disk-full", collect, r"wrote a bad file \(the disk is full\): \S+out\.dat: truncated", "ok",
          tmpfs=True),
    # llama-quantize
    Fault("quantize-prints-nothing", quantize, r"quantize Q8_0 failed \(exit code 0\): quantize did not finish"
          + ".*" + LOG, "silent"),
    Fault("quantize-exit1-after-complete-log", quantize, r"quantize Q8_0 ended with exit code 1", "exit1"),
    Fault("quantize-sigsegv", quantize, r"quantize Q8_0 failed \(killed by SIGSEGV\)", "segv"),
    Fault("quantize-size-mismatch-abort", quantize, r"killed by SIGABRT\): .*imatrix size 2048 is different from "
          r"tensor size 512 for blk\.0\.attn_kv_b\.weight", "abort"),
    Fault("quantize-writes-0-bytes", quantize, r"wrote a bad file: \S+out\.gguf: truncated at offset 0", "empty"),
    Fault("quantize-cut-after-header", quantize, r"wrote a bad file: \S+out\.gguf: truncated", "cut"),
    Fault("quantize-hangs", quantize, r"quantize Q8_0 did not finish within 0\.03 min", "hang"),
    Fault("quantize-disk-full", quantize, r"wrote a bad file \(the disk is full\): \S+out\.gguf: truncated", "ok",
          tmpfs=True),
    Fault("recipe-rule-matches-nothing", recipe_matching_nothing, r"r\.yaml: rules\[0\]\.match 'blk\\\\\.99\\\\\."
          r"ffn_up' matches no tensor"),
    # llama-perplexity, baseline
    Fault("base-prints-nothing", base, r"baseline perplexity failed \(exit code 0\): no 'Final estimate: PPL' line",
          "silent"),
    Fault("base-text-too-short", base, r"the text tokenizes to only 37 tokens", "short_text"),
    Fault("base-fewer-chunks", base, r"baseline perplexity ran 5 of the 16 chunks asked for", "fewer"),
    Fault("base-kld-file-0-bytes", base, r"wrote a bad file: \S+base\.kld: not a KLD base logits file", "empty"),
    Fault("base-kld-file-cut", base, r"wrote a bad file: \S+base\.kld: 20000 bytes, its header \(16 chunks of 512 "
          r"tokens, vocabulary 354\) says \d+", "cut"),
    Fault("base-sigsegv", base, r"baseline perplexity failed \(killed by SIGSEGV\)", "segv"),
    Fault("base-hangs", base, r"baseline perplexity did not finish within", "hang"),
    # llama-perplexity, KLD
    Fault("kld-nan", kld, r"perplexity/KLD of tiny\.gguf failed \(exit code 0\): mean KLD is not a number", "nan"),
    Fault("kld-prints-nothing", kld, r"no KL divergence statistics in the perplexity output", "silent"),
    Fault("kld-base-cut", lambda c: kld(c, kld_base_bytes(512, 354, 16)[:20000]),
          r"in\.kld: 20000 bytes, its header .* says \d+"),
    Fault("kld-base-other-context", lambda c: kld(c, kld_base_bytes(256, 354, 16)),
          r"in\.kld: n_ctx is 256, the evaluation has 512"),
    Fault("kld-base-other-vocabulary", lambda c: kld(c, kld_base_bytes(512, 1000, 16)),
          r"in\.kld: n_vocab is 1000, the evaluation has 354"),
    Fault("kld-base-is-a-model", lambda c: kld(c, c.model.read_bytes()[:4096]), r"in\.kld: not a KLD base logits file"),
    # llama-sweep-bench and run settings
    Fault("bench-prints-nothing", bench, r"sweep-bench of tiny\.gguf \(run 1 of 2\) failed \(exit code 0\): no "
          r"sweep-bench result lines in the output" + LOG, "silent"),
    Fault("bench-garbage", bench, r"no sweep-bench result lines in the output", "garbage"),
    Fault("bench-exit1-after-complete-log", bench, r"\(run 1 of 2\) ended with exit code 1 although its output looks "
          r"complete", "exit1"),
    Fault("bench-sigsegv", bench, r"sweep-bench of tiny\.gguf \(run 1 of 2\) failed \(killed by SIGSEGV\)", "segv"),
    Fault("bench-hangs", bench, r"sweep-bench of tiny\.gguf \(run 1 of 2\) did not finish within 0\.03 min", "hang"),
    Fault("bench-stops-early", bench, r"sweep-bench measured depths \[0\], not \[0, 128\]: it stopped early", "cut"),
    Fault("bench-nan-speed", bench, r"sweep-bench speed at depth 0 is PP [\d.]+, TG nan t/s", "nan"),
    Fault("bench-depth-not-measured", lambda c: bench(c, depths="0,256"),
          r"\(run 1 of 2\) measured no depth 256 \(it measured \[0, 128\]\)", "ok"),
    Fault("bench-depth-not-a-multiple", lambda c: bench(c, depths="0,100"),
          r"bench\.depths: \[0, 100\]: each must be a different multiple of the prompt batch 128"),
    Fault("bench-attention-mode-forced", lambda c: bench(c, "--mla", "1"),
          r"sweep-bench of tiny\.gguf \(run 1 of 2\) ran with mla_attn = 3 \(asked 1\)", "forced_mla3"),
    Fault("bench-override-moves-nothing",
          lambda c: bench(c, run='{"ubatch": 128, "override_tensors": ["ffn_upp=CPU"]}'),
          r"\(run 1 of 2\): the tensor override\(s\) ffn_upp=CPU matched no tensor of the model", "ok"),
    Fault("run-unknown-engine-flag", lambda c: check_run(c, {"eval": {"extra_args": ["--no-such-flag"]}}),
          r"run\.eval\.extra_args: llama-perplexity does not know --no-such-flag \(not in its --help\)"),
    Fault("run-flag-quantsweep-sets", lambda c: check_run(c, {"defaults": {"extra_args": ["-c", "4096"]}}),
          r"run\.defaults\.extra_args: -c is set by quantsweep itself"),
    Fault("run-gpu-layers-on-a-cpu-engine", lambda c: base(c) + ["--run", '{"gpu_layers": 99}'],
          r"run\.eval\.gpu_layers: 99 but this engine has no GPU offload \(llama-perplexity --help lists no -ngl\)"),
    Fault("run-not-a-mapping", lambda c: collect(c) + ["--run", "[1]"], r"run\.imatrix: \[1\] is not a mapping"),
    Fault("run-bad-override", lambda c: config(c, "run:\n  bench: {override_tensors: [exps]}\n"),
          r"config run\.bench\.override_tensors: 'exps' is not PATTERN=BUFFER"),
    Fault("gate-speed-without-bench", lambda c: config(c, "bench: {enabled: false}\ngate: {min_tg_tps: 5}\n"),
          r"config gate\.min_tg_tps: a speed limit needs bench\.enabled: true"),
    # GGUF inputs
    Fault("gguf-cut-model", lambda c: ["gguf", "info", str(cut_model(c))], r"cut\.gguf: truncated"),
    Fault("gguf-2^62-dimension", lambda c: ["gguf", "info", str(gguf(c, [], [("t", (1 << 62, 1), 0, 0)]))],
          r"in\.gguf: tensor t declares shape \[4611686018427387904, 1\]"),
    Fault("gguf-data-cut-short", lambda c: ["gguf", "info", str(gguf(c, [], [("t", (64, 4), 0, 0)], bytes(100)))],
          r"in\.gguf: truncated: tensor t ends at byte \d+, the file has \d+"),
    Fault("gguf-alignment-0", lambda c: ["gguf", "info", str(gguf(c, [("general.alignment", 0)], [("t", (8,), 0, 0)],
                                                                  bytes(32)))],
          r"in\.gguf: general\.alignment is 0 \(must be a power of 2\)"),
    Fault("gguf-unknown-type-id", lambda c: ["gguf", "info", str(gguf(c, [], [("blk.0.x.weight", (32,), 99, 0)],
                                                                      bytes(64)))],
          r"in\.gguf: tensor blk\.0\.x\.weight has ggml type id 99"),
    Fault("plan-on-cut-model", lambda c: ["recipe", "plan", "--model", str(cut_model(c)), "IQ4_KS"],
          r"cut\.gguf: truncated"),
    # imatrix inputs
    Fault("imatrix-gguf-ne0-0", lambda c: remap(c, gguf(c, [("general.type", "imatrix")],
                                                        [("x.in_sum2", (0, 1), 0, 0), ("x.counts", (1,), 0, 0)],
                                                        bytes(64), "im.gguf")),
          r"im\.gguf: tensor x\.in_sum2 declares shape \[0, 1\]"),
    Fault("imatrix-is-a-model", lambda c: remap(c, c.model),
          r"tiny\.gguf: a GGUF with no imatrix entries \(general\.type/architecture: deepseek2\)"),
    Fault("imatrix-negative-value", lambda c: remap(c, dat(c, [("blk.0.attn_q_a.weight", 1, [1.0] * 3 + [-1.0]
                                                                 + [1.0] * 508)])),
          r"in\.dat: entry 0 \(blk\.0\.attn_q_a\.weight\) has value -1\.0 at index 3"),
    Fault("imatrix-ncall-0", lambda c: remap(c, dat(c, [("blk.0.attn_q_a.weight", 0, [1.0] * 512)])),
          r"in\.dat: entry 0 \(blk\.0\.attn_q_a\.weight\) at offset \d+ has ncall 0"),
    Fault("imatrix-duplicate-name", lambda c: remap(c, dat(c, [("blk.0.attn_q_a.weight", 1, [1.0] * 512)] * 2)),
          r"in\.dat: entry 1 \(blk\.0\.attn_q_a\.weight\) appears twice"),
    Fault("imatrix-no-entries", lambda c: remap(c, dat(c, [])), r"in\.dat: has no imatrix entries"),
    Fault("imatrix-truncated", lambda c: remap(c, _cut(c, FIXTURES / "tiny-mla.dat", 0.5)),
          r"cut\.dat: truncated at offset \d+"),
    Fault("imatrix-size-from-another-model", lambda c: remap(c, dat(c, [("blk.0.attn_q_a.weight", 1, [1.0] * 7168)])),
          r"imatrix entry blk\.0\.attn_q_a\.weight has 7168 values but tensor blk\.0\.attn_q_a\.weight \[512, 256\] "
          r"needs 512: the imatrix is not for this model"),
    Fault("imatrix-of-another-architecture", lambda c: remap(c, dat(c, [("model.layers.0.q_proj", 1, [1.0] * 64)])),
          r"no entry of the imatrix matches a tensor of \S+tiny\.gguf \(first entry: model\.layers\.0\.q_proj\)"),
    Fault("check-with-a-model-as-imatrix", lambda c: check(c, c.model), r"tiny\.gguf: a GGUF with no imatrix entries"),
    Fault("imatrix-convert-disk-full", lambda c: ["imatrix", "convert", str(FIXTURES / "tiny-mla.dat"), "-o",
                                                  c.p("out.gguf")],
          r"out\.gguf: writing failed: No space left on device", tmpfs=True),
    # evaluation records and the report
    Fault("report-nan-kld", lambda c: report(c, kld_mean=float("nan")),
          r"evaluation record \S+q\.json: key 'kld_mean' is nan, not a finite number"),
    Fault("report-negative-kld", lambda c: report(c, kld_mean=-0.5),
          r"evaluation record \S+q\.json: key 'kld_mean' is -0\.5; it cannot be negative"),
    Fault("report-infinite-ppl", lambda c: report(c, ppl=float("inf")),
          r"evaluation record \S+q\.json: key 'ppl' is inf, not a finite number"),
    # config files
    Fault("config-yaml-syntax", lambda c: config(c, "engine:\n  source: pypi\n bad: [\n"),
          r"user\.yaml: line 3, column 2: "),
    Fault("config-quant-not-a-name", lambda c: config(c, "quants: [8]\n"), r"config quants\[0\]: 8 is not a name or "
          r"a mapping"),
    Fault("config-quant-named-baseline", lambda c: config(c, "quants:\n  - {name: baseline, ftype: Q8_0}\n"),
          r"config quants\[0\]\.name: 'baseline' is reserved"),
    Fault("config-section-not-a-mapping", lambda c: config(c, "eval: 16\n"), r"config eval: is 16, not a mapping"),
    Fault("config-layout-contradicts-split-kv-b",
          lambda c: config(c, "models:\n  tiny: {split_kv_b: true, layout: mainline}\n"),
          r"config models\.tiny\.split_kv_b: means layout ik, but layout is 'mainline'"),
]


def _cut(c: Ctx, src: Path, keep: float) -> Path:
    p = c.dir / "cut.dat"
    data = src.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    return p


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 KiB tmpfs (a disk that fills up), root only."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the full-disk rows need root (a tmpfs mount) and CI runs as root")
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "full"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_at_least_forty_classes():
    assert len({f.id for f in FAULTS}) == len(FAULTS) >= 40


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault(fault: Fault, shared, tmp_path, request):
    model, fake_bin, text = shared
    out_dir = request.getfixturevalue("tmpfs") if fault.tmpfs else tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    c = Ctx(out_dir, tmp_path / "logs", model, fake_bin, text)
    args = fault.args(c)
    r = subprocess.run([sys.executable, "-m", "quantsweep.cli", *args], capture_output=True, text=True,
                       env={**os.environ, "QS_FAKE": fault.fake}, timeout=60, stdin=subprocess.DEVNULL)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("quantsweep: error: "), r.stderr[-3000:]
    assert re.search(fault.expect, lines[0]), lines[0]
    left = [n for n in OUTPUTS if (out_dir / n).exists()]
    partial = [p.name for p in out_dir.rglob(".*partial*")]
    assert not left and not partial, (left, partial)
