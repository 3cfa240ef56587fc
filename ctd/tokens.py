"""THE byte view of a tokenizer: every other part of ctd goes through this module.

Tokenizers disagree on how they spell bytes: byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM) maps
each byte to a printable character (`Ġ` = space); SentencePiece (Llama-2, Gemma) writes `▁` for a
space and `<0xNN>` for raw bytes. Comparing vocabularies, aligning two tokenizations and counting
bytes for bits-per-byte all need the same answer to "which bytes does token i stand for?". This
module gives it once, checks that a tokenizer can reproduce text byte-exactly, and refuses the
ones that cannot (lowercasing, NFKC, WordPiece ...).
"""

from __future__ import annotations

import json
import re
import unicodedata
import weakref
from dataclasses import dataclass
from functools import lru_cache
from operator import methodcaller

import numpy as np

from ctd.errors import CtdError

_SPACE_MARK = "\u2581"  # SentencePiece's "▁"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_WORD_START = (b" ", b"\t", b"\n", b"\r")
# Normalizers that keep text as it is, or only mark spaces SentencePiece-style.
_HARMLESS_NORMALIZERS = {"Prepend", "Replace", "Sequence"}
_SUPPORTED_MODELS = {"BPE", "Unigram"}


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (printable char -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=False)}


def _types(node: dict | None) -> list[dict]:
    """Flatten a tokenizers component (possibly a Sequence) into its parts."""
    if not node:
        return []
    parts = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders")
    if node.get("type") == "Sequence" and parts is not None:
        return [p for sub in parts for p in _types(sub)]
    return [node]


@dataclass(frozen=True)
class ByteVocab:
    """Per token id: the bytes it stands for, whether it starts a word, whether it is special.

    `pieces[i]` of a special token is its literal text (what it covers when it occurs in text);
    alignment treats specials that are inserted rather than read (BOS, EOS) as covering nothing.
    """

    name: str
    kind: str  # "byte-level" or "sentencepiece"
    pieces: tuple[bytes, ...]
    strings: tuple[str, ...]  # the vocabulary entries as the tokenizer writes them ("Ġthe")
    lengths: np.ndarray  # int64 [V]
    flat: np.ndarray  # uint8: every piece's bytes back to back
    starts: np.ndarray  # int64 [V]: where each piece starts in `flat`
    is_special: np.ndarray  # bool [V]
    starts_word: np.ndarray  # bool [V]: piece starts with whitespace, or is special
    adds_prefix_space: bool  # SentencePiece's dummy prefix "▁" before the first word
    nfc: bool  # the tokenizer applies NFC; texts are NFC-normalised before tokenizing

    def __len__(self) -> int:
        return len(self.pieces)

    def normalise(self, text: str) -> str:
        """The text this tokenizer can reproduce byte-exactly (NFC where it applies NFC)."""
        return unicodedata.normalize("NFC", text) if self.nfc else text


_CACHE: weakref.WeakKeyDictionary[object, ByteVocab] = weakref.WeakKeyDictionary()


def byte_vocab(tokenizer) -> ByteVocab:
    """The byte view of an HF (fast) tokenizer; computed once per tokenizer object."""
    cached = _CACHE.get(tokenizer)
    if cached is None:
        cached = _build(tokenizer)
        _CACHE[tokenizer] = cached
    return cached


def _component(part) -> dict | None:
    """The JSON spec of one backend component (normalizer, pre-tokenizer, decoder).

    Read per component: serialising the whole backend would also write and re-parse the
    vocabulary and merges (1.9 s of Gemma-3's 2.2 s here)."""
    return None if part is None else json.loads(part.__getstate__())


def _build(tokenizer) -> ByteVocab:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CtdError(f"tokenizer {name} has no fast (tokenizers) backend; ctd needs one")
    model_type = type(backend.model).__name__
    if model_type not in _SUPPORTED_MODELS:
        raise CtdError(
            f"tokenizer {name} is a {model_type} tokenizer; ctd supports byte-level BPE and "
            "SentencePiece (BPE/Unigram) tokenizers that reproduce text byte-exactly"
        )
    nfc = False
    for norm in _types(_component(backend.normalizer)):
        if norm["type"] == "NFC":
            nfc = True
        elif norm["type"] not in _HARMLESS_NORMALIZERS or (
            norm["type"] == "Replace" and norm["content"] != _SPACE_MARK
        ):
            raise CtdError(
                f"tokenizer {name} normalises text ({norm['type']}), so its tokens cannot "
                "reproduce the original bytes; use a tokenizer without that normalizer"
            )
    pre = _types(_component(backend.pre_tokenizer)) + _types(_component(backend.decoder))
    byte_level = any(p["type"] == "ByteLevel" for p in pre)
    kind = "byte-level" if byte_level else "sentencepiece"

    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(len(tokenizer), max(vocab.values()) + 1)
    added = dict(backend.get_added_tokens_decoder().items())
    decoder = byte_decoder()
    pieces: list[bytes] = [b""] * size
    strings: list[str] = [""] * size
    special = np.zeros(size, dtype=bool)
    special_strings = set(getattr(tokenizer, "all_special_tokens", []))
    for piece, i in vocab.items():
        strings[i] = piece
        tok = added.get(i)
        if tok is not None:
            pieces[i] = tok.content.encode()
            special[i] = tok.special or tok.content in special_strings
        elif byte_level:
            try:
                pieces[i] = bytes(decoder[c] for c in piece)
            except KeyError:  # a char outside the byte alphabet: the entry is literal text
                pieces[i] = piece.encode()
        else:
            m = _BYTE_PIECE.match(piece) if piece.startswith("<0x") else None
            pieces[i] = bytes([int(m.group(1), 16)]) if m else piece.replace(_SPACE_MARK, " ").encode()
        if piece in special_strings:
            special[i] = True
    present = np.zeros(size, dtype=bool)
    present[list(vocab.values())] = True
    special[~present] = True  # ids without an entry: never produced by encoding
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=size)
    flat = np.frombuffer(b"".join(pieces), np.uint8)
    starts = np.cumsum(lengths) - lengths
    word = np.fromiter(map(methodcaller("startswith", _WORD_START), pieces), dtype=bool,
                       count=size)
    adds_prefix = kind == "sentencepiece" and _adds_prefix_space(tokenizer, pieces)
    return ByteVocab(name, kind, tuple(pieces), tuple(strings), lengths, flat, starts, special,
                     word | special, adds_prefix, nfc)


def _adds_prefix_space(tokenizer, pieces: list[bytes]) -> bool:
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    return b"".join(pieces[i] for i in ids) == b" a"


@dataclass(frozen=True)
class Encoded:
    """Token ids of a text and the number of text bytes each token covers."""

    ids: np.ndarray  # int64 [T]
    lengths: np.ndarray  # int64 [T], sums to the UTF-8 length of the (normalised) text


@dataclass(frozen=True)
class Unencodable:
    """A text a tokenizer cannot reproduce byte-exactly (e.g. a byte its vocabulary lacks)."""

    tokenizer: str
    offset: int  # the first byte where the tokens and the text differ
    char: str  # the text's character at that byte
    bytes: int  # the text's length in bytes

    def message(self, text: str) -> str:
        return (f"tokenizer {self.tokenizer} cannot reproduce this text byte-exactly (first "
                f"difference at byte {self.offset}, character {self.char!r}, of {text[:60]!r}...)")


def encode(tokenizer, texts: list[str]) -> list[Encoded]:
    """Tokenize texts (no special tokens added) and give each token's byte span length.

    Raises CtdError when the tokens do not join to exactly the text's bytes, so that no caller
    ever aligns or scores a text the tokenizer silently changed.
    """
    out = encode_or_explain(tokenizer, texts)
    for text, enc in zip(texts, out, strict=True):
        if isinstance(enc, Unencodable):
            raise CtdError(enc.message(text) + "; clean the text or use a byte-exact tokenizer")
    return out


def encode_or_explain(tokenizer, texts: list[str]) -> list[Encoded | Unencodable]:
    """`encode`, with an `Unencodable` in place of each text the tokenizer cannot reproduce.

    One batched call into the Rust tokenizer; the byte check gathers every token's bytes from
    one flat buffer with numpy (no Python work per token)."""
    vocab = byte_vocab(tokenizer)
    texts = [vocab.normalise(t) for t in texts]
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True  # a literal "<bos>" in a corpus is text, not a control
    batch = [np.asarray(e.ids, dtype=np.int64)
             for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    counts = np.fromiter(map(len, batch), np.int64, len(batch))
    flat_ids = np.concatenate(batch) if batch else np.zeros(0, np.int64)
    lengths = vocab.lengths[flat_ids]
    ends = np.cumsum(lengths)
    # bytes of every token, back to back: flat[start_of_token + 0 .. length - 1]
    gather = np.repeat(vocab.starts[flat_ids] - (ends - lengths), lengths) + np.arange(
        int(ends[-1]) if len(ends) else 0)
    joined = vocab.flat[gather]
    token_end = np.concatenate([[0], ends])[np.cumsum(counts)]
    token_start = np.concatenate([[0], token_end[:-1]])
    out: list[Encoded | Unencodable] = []
    first = 0
    for text, ids, a, b in zip(texts, batch, token_start, token_end, strict=True):
        raw = np.frombuffer(text.encode(), np.uint8)
        got = joined[a:b]
        lens = lengths[first : first + len(ids)].copy()
        first += len(ids)
        if len(got) == len(raw) + 1 and vocab.adds_prefix_space and got[0] == 0x20:
            got, lens[0] = got[1:], lens[0] - 1  # SentencePiece's dummy prefix space
        if len(got) == len(raw) and np.array_equal(got, raw):
            out.append(Encoded(ids, lens))
        else:
            at = _first_diff(got, raw)
            char = text.encode()[:at].decode("utf-8", errors="ignore")
            out.append(Unencodable(vocab.name, at, text[len(char) : len(char) + 1], len(raw)))
    return out


def _first_diff(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def doc_start_id(tokenizer) -> int:
    """The token a document starts after: the BOS the tokenizer itself adds, else the
    end-of-text separator the model saw between documents, else BOS/EOS."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    if ids:
        return int(ids[0])
    vocab = tokenizer.get_vocab()
    for candidate in ("<|endoftext|>", "<|end_of_text|>", "</s>"):
        if candidate in vocab:
            return int(vocab[candidate])
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise CtdError(f"tokenizer {byte_vocab(tokenizer).name} has no BOS/EOS token to start documents")
