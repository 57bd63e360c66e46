"""Vocabulary and tokenizer of the tiny model: special tokens, 256 byte tokens, the space
piece and printable ASCII, so every text tokenizes and the engine's SPM tokenizer agrees
with `tokenize` without any merges."""

from __future__ import annotations

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE0_ID = 3  # <0x00> .. <0xFF> are ids 3..258
SPACE_PIECE = "\u2581"  # '▁', the SentencePiece whitespace escape

# gguf / llama.cpp token types
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_BYTE = 1, 2, 3, 6


def _build_vocab() -> tuple[tuple[str, ...], tuple[int, ...]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TT_UNKNOWN, TT_CONTROL, TT_CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(TT_BYTE)
    tokens.append(SPACE_PIECE)
    types.append(TT_NORMAL)
    for c in range(0x21, 0x7F):
        tokens.append(chr(c))
        types.append(TT_NORMAL)
    return tuple(tokens), tuple(types)


TOKENS, TOKEN_TYPES = _build_vocab()  # immutable: the writer and `vocab` hand out copies
_PIECE_TO_ID = {t: i for i, t in enumerate(TOKENS) if TOKEN_TYPES[i] == TT_NORMAL}
N_VOCAB = len(TOKENS)  # 354


def vocab() -> list[str]:
    """The token strings, in id order (a copy)."""
    return list(TOKENS)


def tokenize(text: str) -> list[int]:
    """Tokenize ``text`` exactly as ik_llama.cpp's SPM tokenizer does with our vocab.

    The GGUF sets ``tokenizer.ggml.add_space_prefix = false``.  The engine then
    escapes every ' ' as '▁', splits the text into UTF-8 characters and, since
    the vocab has no multi-character pieces, never merges: each character that
    is a piece ('▁' and printable ASCII 0x21..0x7E) becomes its token, every
    other character falls back to one ``<0xXX>`` token per UTF-8 byte
    (newline -> ``<0x0A>``).  Control-token text such as ``<s>`` is not parsed
    (the tools tokenize with parse_special = false).  BOS is not included.

    The engine reads files as bytes: to mirror it on a file, read it without
    newline translation (``open(path, encoding="utf-8", newline="")``).
    """
    out: list[int] = []
    for ch in text.replace(" ", SPACE_PIECE):
        tid = _PIECE_TO_ID.get(ch)
        if tid is not None:
            out.append(tid)
        else:
            out.extend(BYTE0_ID + b for b in ch.encode("utf-8"))
    return out
