"""Tests of the tiny DeepSeek2 GGUF generator (numpy + gguf-py; the e2e-marked ones also run the
real engine: the layouts' PPL and the imatrix entries they give)."""

from __future__ import annotations

from importlib import resources

import gguf
import numpy as np
import pytest

from quantsweep import tinymodel as tm
from quantsweep.errors import QuantsweepError, TinyModelError
from quantsweep.settings import ImatrixSettings
from quantsweep.tinymodel import TinySpec, tokenize, write_tensors, write_tiny_model
from quantsweep.tinymodel.bigram import log_bigram
from quantsweep.tinymodel.forward import layer_attn, layer_ffn, moe_route, rmsnorm

SPEC = TinySpec(split_kv_b=True)


def _bundled(name: str) -> str:
    return resources.files("quantsweep").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def _weights(reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    out = {}
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(a, dtype=np.float64).reshape([int(x) for x in reversed(t.shape)])
    return out


@pytest.fixture(scope="module")
def model(tiny_gguf):
    path = tiny_gguf(SPEC)
    reader = gguf.GGUFReader(path)
    return path, reader, _weights(reader)


# ---------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------


def test_vocab_layout():
    v = tm.vocab()
    assert len(v) == tm.N_VOCAB == 354
    assert len(set(v)) == len(v)
    assert v[:3] == ["<unk>", "<s>", "</s>"]
    assert v[3] == "<0x00>" and v[3 + 0x0A] == "<0x0A>" and v[258] == "<0xFF>"
    assert v[259] == "\u2581"
    assert v[260:] == [chr(c) for c in range(0x21, 0x7F)]


def test_tokenize_expectations():
    v = tm.vocab()
    ids = {t: i for i, t in enumerate(v)}
    assert tokenize("") == []
    # space -> '▁', no prefix space, no BOS
    assert tokenize("a b") == [ids["a"], ids["\u2581"], ids["b"]]
    assert tokenize("  ") == [ids["\u2581"]] * 2
    # newline, tab, CR and DEL fall back to byte tokens
    assert tokenize("\n\t\r\x7f") == [3 + 0x0A, 3 + 0x09, 3 + 0x0D, 3 + 0x7F]
    # non-ASCII: one byte token per UTF-8 byte
    assert tokenize("é") == [3 + 0xC3, 3 + 0xA9]
    assert tokenize("中") == [3 + b for b in "中".encode()]
    # control-token text is not special, a literal '▁' is the space piece
    assert tokenize("<s>") == [ids["<"], ids["s"], ids[">"]]
    assert tokenize("\u2581") == tokenize(" ")


def test_tokenize_round_trip():
    text = 'def f(x):\n    return {"a": x}  # ünï 😀\r\n'
    v = tm.vocab()
    raw = bytearray()
    for i in tokenize(text):
        piece = v[i]
        if piece.startswith("<0x") and len(piece) == 6:
            raw.append(int(piece[3:5], 16))
        else:
            raw += piece.replace("\u2581", " ").encode()
    assert raw.decode("utf-8") == text
    assert len(tokenize(_bundled("evaluation"))) == len(_bundled("evaluation").encode())  # ASCII-only text


# ---------------------------------------------------------------------------
# file contents
# ---------------------------------------------------------------------------


def test_hparams(model):
    _, r, _ = model
    a = "deepseek2"
    expect = {
        "general.architecture": a,
        "general.name": "quantsweep-tiny-deepseek",
        "general.file_type": 32,
        f"{a}.block_count": SPEC.n_layer,
        f"{a}.context_length": 4096,
        f"{a}.embedding_length": SPEC.n_embd,
        f"{a}.feed_forward_length": SPEC.n_ff,
        f"{a}.attention.head_count": SPEC.n_head,
        f"{a}.attention.head_count_kv": SPEC.n_head,
        f"{a}.attention.key_length": 192,
        f"{a}.attention.value_length": 128,
        f"{a}.rope.dimension_count": 64,
        f"{a}.leading_dense_block_count": SPEC.n_dense,
        f"{a}.attention.q_lora_rank": SPEC.q_lora_rank,
        f"{a}.attention.kv_lora_rank": SPEC.kv_lora_rank,
        f"{a}.expert_feed_forward_length": SPEC.n_ff_exp,
        f"{a}.expert_count": SPEC.n_expert,
        f"{a}.expert_used_count": SPEC.n_expert_used,
        f"{a}.expert_shared_count": SPEC.n_shared,
        f"{a}.expert_weights_norm": True,
        f"{a}.expert_gating_func": 2,
        f"{a}.vocab_size": 354,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
    }
    for k, want in expect.items():
        assert _field(r, k) == want, k
    assert _field(r, f"{a}.rope.freq_base") == pytest.approx(10000.0)
    assert _field(r, f"{a}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert _field(r, f"{a}.expert_weights_scale") == pytest.approx(1.0)
    assert _field(r, "tokenizer.ggml.tokens") == tm.vocab()
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and set(types[259:]) == {1}
    assert len(_field(r, "tokenizer.ggml.scores")) == 354


def _expected_shapes(s: TinySpec) -> dict[str, tuple[int, ...]]:
    """ggml shapes (ne0, ne1, ne2) per ik_llama.md 5.2."""
    D, V, H = s.n_embd, 354, s.n_head
    sh = {"token_embd.weight": (D, V), "output_norm.weight": (D,), "output.weight": (D, V)}
    for i in range(s.n_layer):
        p = f"blk.{i}."
        sh |= {
            p + "attn_norm.weight": (D,),
            p + "attn_q_a.weight": (D, s.q_lora_rank),
            p + "attn_q_a_norm.weight": (s.q_lora_rank,),
            p + "attn_q_b.weight": (s.q_lora_rank, H * (s.qk_nope + s.qk_rope)),
            p + "attn_kv_a_mqa.weight": (D, s.kv_lora_rank + s.qk_rope),
            p + "attn_kv_a_norm.weight": (s.kv_lora_rank,),
            p + "attn_output.weight": (H * s.v_head, D),
            p + "ffn_norm.weight": (D,),
        }
        if s.layout != "mainline":
            sh[p + "attn_kv_b.weight"] = (s.kv_lora_rank, H * (s.qk_nope + s.v_head))
        if s.layout == "ik":
            sh[p + "attn_k_b.weight"] = (s.qk_nope, H * s.kv_lora_rank)
            sh[p + "attn_v_b.weight"] = (s.kv_lora_rank, H * s.v_head)
        if s.layout == "mainline":
            sh[p + "attn_k_b.weight"] = (s.qk_nope, s.kv_lora_rank, H)
            sh[p + "attn_v_b.weight"] = (s.kv_lora_rank, s.v_head, H)
        if i < s.n_dense:
            sh |= {
                p + "ffn_gate.weight": (D, s.n_ff),
                p + "ffn_up.weight": (D, s.n_ff),
                p + "ffn_down.weight": (s.n_ff, D),
            }
        else:
            E, F = s.n_expert, s.n_ff_exp
            sh |= {
                p + "ffn_gate_inp.weight": (D, E),
                p + "exp_probs_b.bias": (E,),
                p + "ffn_gate_exps.weight": (D, F, E),
                p + "ffn_up_exps.weight": (D, F, E),
                p + "ffn_down_exps.weight": (F, D, E),
                p + "ffn_gate_shexp.weight": (D, F * s.n_shared),
                p + "ffn_up_shexp.weight": (D, F * s.n_shared),
                p + "ffn_down_shexp.weight": (F * s.n_shared, D),
            }
    return sh


def test_tensor_shapes_and_types(model):
    _, r, _ = model
    want = _expected_shapes(SPEC)
    got = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert got == want
    for t in r.tensors:
        if t.name.endswith(("_norm.weight", ".bias")):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16, t.name


def test_split_kv_b_matches_convert_script(model):
    _, _, W = model
    s = SPEC
    per_head = s.qk_nope + s.v_head
    for i in range(s.n_layer):
        p = f"blk.{i}."
        kv_b, k_b, v_b = W[p + "attn_kv_b.weight"], W[p + "attn_k_b.weight"], W[p + "attn_v_b.weight"]
        assert kv_b.shape == (s.n_head * per_head, s.kv_lora_rank)
        assert k_b.shape == (s.n_head * s.kv_lora_rank, s.qk_nope)
        assert v_b.shape == (s.n_head * s.v_head, s.kv_lora_rank)
        for h in range(s.n_head):
            rows = kv_b[h * per_head : (h + 1) * per_head]  # per head: nope rows, then v rows
            np.testing.assert_array_equal(k_b[h * s.kv_lora_rank : (h + 1) * s.kv_lora_rank], rows[: s.qk_nope].T)
            np.testing.assert_array_equal(v_b[h * s.v_head : (h + 1) * s.v_head], rows[s.qk_nope :])
        # and the torch-style derivation of the brief
        t = kv_b.reshape(s.n_head, per_head, s.kv_lora_rank)
        k_ref = t[:, : s.qk_nope].transpose(0, 2, 1).reshape(-1, s.qk_nope)
        v_ref = t[:, s.qk_nope :].reshape(-1, s.kv_lora_rank)
        np.testing.assert_array_equal(k_b, k_ref)
        np.testing.assert_array_equal(v_b, v_ref)


def test_no_all_zero_input_channel(model):
    _, _, W = model
    for name, a in W.items():
        assert np.all(np.isfinite(a)), name
        if name.endswith(("_norm.weight", ".bias")):
            if name.endswith("_norm.weight"):
                assert np.all(a > 0), name
            continue
        # input channels are the last numpy axis (ggml ne0)
        col_max = np.abs(a.reshape(-1, a.shape[-1])).max(axis=0)
        assert np.all(col_max > 0), name
    emb = W["token_embd.weight"]
    assert np.all(np.abs(emb).max(axis=0) > 0)
    # every embedding row has the same norm (RMS 1)
    np.testing.assert_allclose(np.sqrt(np.mean(emb**2, axis=1)), 1.0, rtol=1e-2)


def test_norm_gains_heavy_tailed(model):
    _, _, W = model
    g = W["blk.1.ffn_norm.weight"]
    assert g.max() / np.median(g) > 5  # outlier channels exist


def test_deterministic_bytes(tmp_path):
    spec = TinySpec(fit_tokens=1024, seed=3)
    text = _bundled("train")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_tiny_model(a, text, spec)
    write_tiny_model(str(b), text, spec)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]  # no temp file left behind
    c = tmp_path / "c.gguf"
    write_tiny_model(c, text, TinySpec(fit_tokens=1024, seed=4))
    assert c.read_bytes() != a.read_bytes()


def test_rejects_bad_input(tmp_path):
    with pytest.raises(TinyModelError, match="train_text"):
        write_tiny_model(tmp_path / "x.gguf", "too short", TinySpec())
    with pytest.raises(TinyModelError, match=r"TinySpec\.n_dense: 4 "):
        write_tiny_model(tmp_path / "y.gguf", _bundled("train"), TinySpec(n_dense=4))
    with pytest.raises(TinyModelError, match=r"TinySpec\.bigram_rank: 1000 .*\[1, 354\]"):
        write_tiny_model(tmp_path / "z.gguf", _bundled("train"), TinySpec(bigram_rank=1000))
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(self):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises((OSError, QuantsweepError), match="disk full"):  # fileio names the file it could not write
        write_tiny_model(tmp_path / "x.gguf", _bundled("train"), TinySpec(fit_tokens=64))
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# behaviour (numpy reference forward pass on the weights read back from the file)
# ---------------------------------------------------------------------------


def _chunk(name: str, n: int = 512) -> np.ndarray:
    ids = np.asarray([1] + tokenize(_bundled(name))[: n - 1])
    return ids


def test_model_reproduces_bigram(model):
    _, _, W = model
    train_ids = tokenize(_bundled("train"))
    L = log_bigram(train_ids, SPEC.smoothing)
    ids = _chunk("evaluation")
    logits = tm.forward_logits(W, SPEC, ids)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    pos = np.arange(256, len(ids) - 1)  # the positions llama-perplexity scores
    cur, nxt = ids[pos], ids[pos + 1]
    # predictions follow the bigram
    agree = np.mean(np.argmax(logp[pos], 1) == np.argmax(L[cur], 1))
    assert agree > 0.9
    kl = np.mean(np.sum(np.exp(L[cur]) * (L[cur] - logp[pos]), axis=1))
    assert kl < 0.1
    # and the perplexity is far below the vocab size, close to the bigram's
    ppl_model = np.exp(-np.mean(logp[pos, nxt]))
    ppl_bigram = np.exp(-np.mean(L[cur, nxt]))
    assert ppl_model < 20
    assert ppl_model < 1.1 * ppl_bigram


def test_blocks_matter(model):
    """The knowledge lives in the layer-0 FFN memory: removing it destroys the predictions."""
    _, _, W = model
    ids = _chunk("evaluation", 256)
    base = tm.forward_logits(W, SPEC, ids)
    W2 = dict(W)
    W2["blk.0.ffn_down.weight"] = np.zeros_like(W["blk.0.ffn_down.weight"])
    broken = tm.forward_logits(W2, SPEC, ids)
    agree = np.mean(np.argmax(base, 1) == np.argmax(broken, 1))
    assert agree < 0.5


def test_all_experts_receive_tokens(model):
    _, _, W = model
    s = SPEC
    ids = _chunk("calibration")
    h = W["token_embd.weight"][ids]
    for il in range(s.n_layer):
        h = h + layer_attn(W, s, il, h)
        if il >= s.n_dense:
            x = rmsnorm(h, W[f"blk.{il}.ffn_norm.weight"], s.rms_eps)
            sel, w = moe_route(W, s, il, x)
            load = np.bincount(sel.ravel(), minlength=s.n_expert) / sel.size
            assert load.min() > 0.03, (il, load)
            np.testing.assert_allclose(w.sum(1), 1.0)
        h = h + layer_ffn(W, s, il, h)


# ---------------------------------------------------------------------------
# layouts of the kv_b projection, dead input channels
# ---------------------------------------------------------------------------

MAINLINE = TinySpec(layout="mainline")
DEAD = TinySpec(dead_channels=256)


def _read_model(path) -> tuple:
    reader = gguf.GGUFReader(path)
    return path, reader, _weights(reader)


@pytest.fixture(scope="module")
def mainline(tmp_path_factory):
    """The same weights as `model` (same seed and knobs), written as mainline's converter does."""
    path = tmp_path_factory.mktemp("tiny-mainline") / "tiny-mainline.gguf"
    write_tiny_model(path, _bundled("train"), MAINLINE)
    return _read_model(path)


@pytest.fixture(scope="module")
def dead(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-dead") / "tiny-dead.gguf"
    write_tiny_model(path, _bundled("train"), DEAD)
    return _read_model(path)


def _ppl(W: dict, spec: TinySpec, ids: np.ndarray) -> float:
    """Numpy PPL over the positions llama-perplexity scores (second half of the context)."""
    logits = tm.forward_logits(W, spec, ids)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    pos = np.arange(len(ids) // 2, len(ids) - 1)
    return float(np.exp(-np.mean(logp[pos, ids[pos + 1]])))


def test_layout_spec_values():
    assert TinySpec().layout == "kv_b"
    assert TinySpec(split_kv_b=True).layout == "ik"  # the older spelling
    assert TinySpec(split_kv_b=True) == TinySpec(layout="ik")
    assert TinySpec(layout="ik", split_kv_b=True).layout == "ik"
    with pytest.raises(TinyModelError, match=r"TinySpec\.layout: 'torch' is not one of kv_b, ik, mainline"):
        TinySpec(layout="torch")
    with pytest.raises(TinyModelError, match=r"TinySpec\.split_kv_b: .*'mainline'"):
        TinySpec(layout="mainline", split_kv_b=True)


def test_dead_channels_out_of_range_refused(tmp_path):
    for n in (-1, 512):
        with pytest.raises(TinyModelError, match=rf"TinySpec\.dead_channels: {n} must be in \[0, n_embd\)"):
            write_tiny_model(tmp_path / "x.gguf", _bundled("train"), TinySpec(dead_channels=n))
    assert not list(tmp_path.iterdir())


def test_cli_layout_options():
    from quantsweep.cli import build_parser
    from quantsweep.cli.commands import tiny_spec

    def spec(*args):
        return tiny_spec(build_parser().parse_args(["tiny-model", "-o", "x.gguf", *args]))

    assert spec("--layout", "mainline", "--dead-channels", "7") == TinySpec(layout="mainline", dead_channels=7)
    assert spec("--split-kv-b").layout == "ik"
    assert spec() == TinySpec()  # the workflow's {} for a model with every default
    # the workflow's settings (models.<name>), a hand option over them
    assert spec("--settings", '{"layout": "mainline", "seed": 3}', "--seed", "4") == TinySpec(layout="mainline", seed=4)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tiny-model", "-o", "x.gguf", "--layout", "torch"])
    with pytest.raises(QuantsweepError, match=r"tiny-model\.seed: -1 is not a whole number >= 0"):
        spec("--seed", "-1")


def test_mainline_layout_tensors(mainline):
    _, r, _ = mainline
    got = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert got == _expected_shapes(MAINLINE)
    assert not any("attn_kv_b" in n for n in got)
    assert got["blk.0.attn_k_b.weight"] == (128, 512, 4)  # {qk_nope, kv_lora, n_head}
    assert got["blk.0.attn_v_b.weight"] == (512, 128, 4)  # {kv_lora, v_head, n_head}
    for t in r.tensors:
        want = "F32" if t.name.endswith(("_norm.weight", ".bias")) else "BF16"
        assert t.tensor_type == gguf.GGMLQuantizationType[want], t.name


def test_mainline_is_kv_b_rearranged(model, mainline):
    """Mainline k_b[h][c][n] = kv_b row (h, n) column c and v_b[h][d][c] = kv_b row (h, nope+d) column c
    (llm_prepare_mla's views); ik's 2-D tensors hold the same elements in the same order."""
    _, _, Wi = model
    _, _, Wm = mainline
    s, per_head = MAINLINE, MAINLINE.qk_nope + MAINLINE.v_head
    for name in Wm:
        if "attn_k_b" not in name and "attn_v_b" not in name:
            np.testing.assert_array_equal(Wm[name], Wi[name], err_msg=name)
    for i in range(s.n_layer):
        p = f"blk.{i}."
        kv_b, k_b, v_b = Wi[p + "attn_kv_b.weight"], Wm[p + "attn_k_b.weight"], Wm[p + "attn_v_b.weight"]
        assert k_b.shape == (s.n_head, s.kv_lora_rank, s.qk_nope) and v_b.shape == (s.n_head, s.v_head, s.kv_lora_rank)
        for h in range(s.n_head):
            rows = kv_b[h * per_head : (h + 1) * per_head]
            np.testing.assert_array_equal(k_b[h], rows[: s.qk_nope].T)
            np.testing.assert_array_equal(v_b[h], rows[s.qk_nope :])
        np.testing.assert_array_equal(k_b.reshape(-1, s.qk_nope), Wi[p + "attn_k_b.weight"])
        np.testing.assert_array_equal(v_b.reshape(-1, s.kv_lora_rank), Wi[p + "attn_v_b.weight"])


def test_layouts_compute_the_same_function(model, mainline):
    """The numpy forward runs the mainline file through attn_k_b/attn_v_b (no attn_kv_b there)."""
    _, _, Wi = model
    _, _, Wm = mainline
    W_kv_b = {k: v for k, v in Wi.items() if "attn_k_b" not in k and "attn_v_b" not in k}
    ids = _chunk("evaluation", 256)
    a, b = tm.forward_logits(W_kv_b, SPEC, ids), tm.forward_logits(Wm, MAINLINE, ids)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-9 * np.abs(a).max())


def test_dead_channels_weights_and_ppl(model, dead):
    """Only layer 0's attn_norm has zero gains, exactly [0, N); the fitted model still behaves."""
    _, _, W = dead
    g = W["blk.0.attn_norm.weight"]
    assert np.all(g[:256] == 0) and np.all(g[256:] > 0)
    for name, a in W.items():
        if name.endswith("_norm.weight") and name != "blk.0.attn_norm.weight":
            assert np.all(a > 0), name
    ids = _chunk("evaluation")
    ppl_dead, ppl_base = _ppl(W, DEAD, ids), _ppl(model[2], SPEC, ids)
    assert ppl_dead < 1.03 * ppl_base, (ppl_dead, ppl_base)


# ---- the real engine ------------------------------------------------------------------------


def _engine_ppl(bin_dir, model_path, mla: int, d) -> float:
    from quantsweep.engine import run
    from quantsweep.settings import EvalSettings

    text = d / "eval.txt"
    if not text.exists():
        text.write_text(_bundled("evaluation"))
    ev = EvalSettings(ctx=512, chunks=4, mla=mla, fa="off")
    tag = f"{model_path.stem}-mla{mla}"
    return run.perplexity_base(bin_dir, model_path, text, d / f"{tag}.kld", d / f"{tag}.log", ev, 2)["ppl"]


def _imatrix_pass(bin_dir, model_path, mode: str, d):
    from quantsweep import imatrix
    from quantsweep.engine import run

    cal = d / "cal.txt"
    if not cal.exists():
        cal.write_text(_bundled("calibration"))
    out = d / f"{model_path.stem}-{mode}.dat"
    run.collect_imatrix(bin_dir, model_path, cal, out, d / f"{model_path.stem}-{mode}.log", mode, ImatrixSettings(ctx=512, chunks=4), 2)
    return imatrix.read_dat(out)


@pytest.mark.e2e
def test_engine_ppl_same_for_kv_b_and_mainline(bin_dir, model, mainline, tmp_path):
    """-mla 0 rebuilds attn_kv_b from the mainline tensors, -mla 1 uses them directly; the default
    layout (written from the same weights) must give the same PPL either way."""
    kv_b = tmp_path / "tiny-kv_b.gguf"
    write_tensors(kv_b, model[2], TinySpec())
    ppl = {(name, mla): _engine_ppl(bin_dir, path, mla, tmp_path)
           for name, path in (("kv_b", kv_b), ("mainline", mainline[0])) for mla in (0, 1)}
    for mla in (0, 1):
        assert ppl["mainline", mla] == pytest.approx(ppl["kv_b", mla], rel=1e-3), ppl
    assert ppl["kv_b", 1] == pytest.approx(ppl["kv_b", 0], rel=1e-3), ppl
    assert ppl["kv_b", 0] < 20, ppl


@pytest.mark.e2e
def test_engine_imatrix_entries_on_mainline_layout(bin_dir, mainline, tmp_path):
    """mla pass: per-head entries named as the file's 3-D tensors; std pass: an attn_kv_b entry
    for the tensor the engine rebuilt (the file has none)."""
    s = MAINLINE
    mla = {n: e.nval for n, e in _imatrix_pass(bin_dir, mainline[0], "mla", tmp_path).entries.items()}
    std = {n: e.nval for n, e in _imatrix_pass(bin_dir, mainline[0], "std", tmp_path).entries.items()}
    for i in range(s.n_layer):
        p = f"blk.{i}."
        assert mla[p + "attn_k_b.weight"] == s.qk_nope * s.n_head
        assert mla[p + "attn_v_b.weight"] == s.kv_lora_rank * s.n_head
        assert std[p + "attn_kv_b.weight"] == s.kv_lora_rank
    assert not [n for n in mla if "attn_kv_b" in n or "(reshaped)" in n]
    assert not [n for n in std if "attn_k_b" in n or "attn_v_b" in n]


@pytest.mark.e2e
def test_engine_imatrix_dead_channels_are_exact_zeros(bin_dir, dead, tmp_path):
    im = _imatrix_pass(bin_dir, dead[0], "mla", tmp_path)
    n = DEAD.dead_channels
    for name in ("blk.0.attn_q_a.weight", "blk.0.attn_kv_a_mqa.weight"):
        np.testing.assert_array_equal(np.flatnonzero(im.entries[name].values == 0), np.arange(n), err_msg=name)
    others = [name for name, e in im.entries.items() if not name.startswith("blk.0.attn_") and np.any(e.values == 0)]
    assert not others
