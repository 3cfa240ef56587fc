"""Which tokens of a new tokenizer the base model already knows, by the bytes they stand for.

Strings lie across tokenizer families (`Ġhello`, `▁hello` and `hello` with a leading space are
one token), so ordinary tokens are matched through `ctd.tokens.byte_vocab`. Special tokens have
no meaningful bytes; they are matched by exact string, then as document starts, then by role
(eos/unk/pad), then as chat-template markers.

Document starts: tools disagree on the token a text begins with. ctd and packed pretraining put
the end-of-text separator first, lm-evaluation-harness the declared `bos_token`, chat templates
their turn marker (for SmolLM2-Instruct: `<|endoftext|>`, `<|im_start|>`, `<|im_start|>`). A base
whose tokenizer adds its own BOS (Gemma) builds its attention sink only on that row: Gemma-3-270M
on SmolLM2's tokenizer read wiki-en at 1.02 bpb after `<|endoftext|>` -> `<bos>` but at 1.72
after `<|im_start|>` -> `<start_of_turn>`. So the separator, the declared bos and the chat
template's first token all get the base's document-start row (the one base row new tokens
share): 1.02 after either. That also repairs chat use: assistant turns in SmolLM2's chat
template went from 1.34 to 1.00 bpb, the marker separating turns as `<bos>` separates documents.
The eos keeps the base's eos row (1.62 bpb as a first token): with tied embeddings one row
cannot both open a text like `<bos>` and be predicted where a turn ends; a sum of both rows
opens texts 2.3% worse than `<bos>` and costs chat 3% (`scripts/start_tokens.py` measures every
start token of a model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ctd.errors import CtdError
from ctd.tokens import ByteVocab, byte_vocab, doc_start_id

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_ROLES = ("bos", "eos", "unk", "pad")
# Chat-template markers of the common families, grouped by what they mean.
_CHAT = {
    "turn-start": ("<|im_start|>", "<start_of_turn>", "<|start_header_id|>", "<|user|>"),
    "turn-end": ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"),
}
_DIGIT_PROBE = "0 7 42 123 2024 31415926 3.14159 1,000,000 x=98765"


@dataclass
class VocabMatch:
    """The mapping new id -> base id (or -1) and what the user should know about it."""

    base_name: str
    new_name: str
    to_base: np.ndarray  # int64 [V_new]: base row copied for a new id, -1 if approximated
    how: dict[str, int]  # matched counts: bytes / special-exact / -start / -role / -chat
    new_special: np.ndarray  # bool [V_new]
    base_rows: int  # rows of the base embedding that can be used
    new_rows: int  # ids of the new tokenizer that get a row
    beyond_base_rows: int  # base tokenizer ids without an embedding row
    base_padding_rows: int  # base embedding rows no base token uses
    digits: dict[str, object]
    examples: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    specials: list[dict] = field(default_factory=list)  # matched special tokens and the rule

    @property
    def shared_ids(self) -> np.ndarray:
        """New ids whose row is copied from the base."""
        return np.flatnonzero(self.to_base >= 0)

    @property
    def new_ids(self) -> np.ndarray:
        """New ids that need an approximation."""
        return np.flatnonzero(self.to_base < 0)

    def summary(self) -> dict[str, object]:
        """The JSON-able report of the match."""
        return {
            "base": self.base_name,
            "tokenizer": self.new_name,
            "new_vocab": int(self.new_rows),
            "shared": int((self.to_base >= 0).sum()),
            "matched": self.how,
            "approximated": int((self.to_base < 0).sum()),
            "approximated_special": int(((self.to_base < 0) & self.new_special).sum()),
            "base_ids_beyond_embedding_rows": self.beyond_base_rows,
            "base_padding_rows": self.base_padding_rows,
            "digits": self.digits,
            "specials": self.specials,
            "examples": self.examples,
            "warnings": self.warnings,
        }


def _byte_index(bv: ByteVocab, rows: int) -> dict[bytes, int]:
    """bytes -> base id for ordinary tokens; a duplicate prefers the non-`<0xNN>` entry."""
    index: dict[bytes, int] = {}
    strings = bv.strings
    for i in range(min(len(bv), rows)):
        piece = bv.pieces[i]
        if bv.is_special[i] or not piece:
            continue
        j = index.get(piece)
        if j is None or (_BYTE_PIECE.match(strings[j] or "") and not _BYTE_PIECE.match(strings[i] or "")):
            index[piece] = i
    return index


def _role_ids(tok) -> dict[str, int]:
    out = {}
    for role in _ROLES:
        tid = getattr(tok, f"{role}_token_id", None)
        if tid is not None:
            out[role] = int(tid)
    return out


def _chat_start(tok) -> int | None:
    """The special token a conversation in the tokenizer's chat template opens with."""
    from jinja2 import TemplateError

    if not getattr(tok, "chat_template", None):
        return None
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    except (TemplateError, ValueError):  # a template that insists on other messages
        return None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids and byte_vocab(tok).is_special[ids[0]] else None


def start_tokens(tok) -> dict[int, list[str]]:
    """The tokens tools put before a text's first token, by id, with who puts them there:
    ctd's document start (the BOS the tokenizer adds, else the end-of-text separator), the
    declared bos (lm-eval's rolling windows), the chat template's first token, and the eos
    (lm-eval's prefix where there is no bos; pipelines that pack documents after an eos)."""
    out: dict[int, list[str]] = {doc_start_id(tok): ["document start"]}
    roles = _role_ids(tok)
    for who, tid in (("bos", roles.get("bos")), ("chat start", _chat_start(tok)),
                     ("eos", roles.get("eos"))):
        if tid is not None:
            out.setdefault(tid, []).append(who)
    return out


def digit_split(tok) -> dict[str, object]:
    """How a tokenizer cuts numbers: the longest run of digits inside one token of a probe."""
    ids = tok(_DIGIT_PROBE, add_special_tokens=False)["input_ids"]
    pieces = byte_vocab(tok).pieces
    longest = max((len(m) for i in ids for m in re.findall(rb"[0-9]+", pieces[i])), default=0)
    vocab_longest = max(
        (len(p.strip()) for p in pieces if p.strip().isdigit()), default=0
    )
    style = "single digits" if longest <= 1 else f"groups of up to {longest} digits"
    return {"style": style, "longest_in_probe": longest, "longest_digit_token": vocab_longest}


def match_vocab(
    base_tok, new_tok, base_rows: int | None = None, new_rows: int | None = None, examples: int = 8
) -> VocabMatch:
    """Match the new tokenizer's tokens to the base's; rows default to the tokenizer sizes.

    `base_rows` is the base embedding's row count (ids at or beyond it cannot be copied),
    `new_rows` the number of new ids that get a row (usually len(new_tok)).
    """
    bv, nv = byte_vocab(base_tok), byte_vocab(new_tok)
    base_rows = len(bv) if base_rows is None else base_rows
    new_rows = len(nv) if new_rows is None else new_rows
    index = _byte_index(bv, base_rows)
    to_base = np.full(new_rows, -1, dtype=np.int64)
    special = np.zeros(new_rows, dtype=bool)
    special[: min(new_rows, len(nv))] = nv.is_special[:new_rows]
    special[len(nv) :] = True
    for i in range(min(new_rows, len(nv))):
        if not special[i]:
            to_base[i] = index.get(nv.pieces[i], -1)
    how = {"bytes": int((to_base >= 0).sum())}

    # Specials: exact string, then document start, then role, then chat marker; each base
    # special used once, except the base's document start (see the module docstring).
    base_special = set(np.flatnonzero(bv.is_special[:base_rows]).tolist())
    base_vocab = {bv.strings[j]: j for j in base_special}  # only specials are matched by string
    used: set[int] = set()
    new_strings = nv.strings[: min(new_rows, len(nv))]
    base_start = doc_start_id(base_tok)
    specials: list[dict] = []

    def take(i: int, j: int | None, kind: str, why: str) -> None:
        shared_start = kind == "special-start" and j == base_start
        if (j is not None and j in base_special and (j not in used or shared_start)
                and i < new_rows and special[i] and to_base[i] < 0):
            to_base[i] = j
            used.add(j)
            how[kind] = how.get(kind, 0) + 1
            specials.append({"id": int(i), "token": nv.strings[i], "base_id": int(j),
                             "base_token": bv.strings[j], "kind": kind.removeprefix("special-"),
                             "rule": why})

    special_ids = [i for i in np.flatnonzero(special) if i < len(nv)]
    for i in special_ids:
        take(i, base_vocab.get(new_strings[i]), "special-exact", "the same string in the base")
    for i, who in start_tokens(new_tok).items():
        if who != ["eos"]:
            take(i, base_start, "special-start",
                 f"starts documents ({', '.join(w for w in who if w != 'eos')}): the base's "
                 "document start, so a text reads the same whichever start token a tool puts first")
    base_roles = _role_ids(base_tok)
    for role, i in _role_ids(new_tok).items():
        take(i, base_roles.get(role), "special-role", f"the base's {role} token")
    for name, group in _CHAT.items():
        base_marker = next((base_vocab[s] for s in group if s in base_vocab), None)
        for i in special_ids:
            if new_strings[i] in group:
                take(i, base_marker, "special-chat", f"chat {name} marker")

    beyond = max(0, len(bv) - base_rows)
    padding = max(0, base_rows - len(bv))
    match = VocabMatch(
        bv.name, nv.name, to_base, how, special, base_rows, new_rows, beyond, padding,
        {"base": digit_split(base_tok), "tokenizer": digit_split(new_tok)}, specials=specials,
    )
    _explain(match, nv, new_strings, examples)
    eos = _role_ids(new_tok).get("eos")
    starts = [new_strings[i] for i in np.flatnonzero(to_base == base_start) if i < len(nv)]
    if (base_tok("", add_special_tokens=True)["input_ids"] and starts and eos is not None
            and eos < new_rows and to_base[eos] != base_start):
        kept = f"the base's {bv.strings[to_base[eos]]} row" if to_base[eos] >= 0 else "its row"
        match.warnings.append(
            f"{bv.strings[base_start]} opens every text of the base, and texts that start with the "
            f"eos {nv.strings[eos]} instead (it keeps {kept} so that it is still predicted where "
            f"a text or turn ends) read worse; start texts with {' or '.join(starts)}")
    return match


def _explain(match: VocabMatch, nv: ByteVocab, strings: list[str], n: int) -> None:
    """Fill in examples and warnings."""
    rng = np.random.default_rng(0)
    shared, new = match.shared_ids, match.new_ids

    def show(ids: np.ndarray) -> list[str]:
        pick = rng.choice(ids, size=min(n, len(ids)), replace=False) if len(ids) else []
        return [f"{strings[i] if i < len(strings) else '<id ' + str(i) + '>'}"
                f" = {nv.pieces[i] if i < len(nv) else b''!r}" for i in sorted(pick)]

    match.examples = {"shared": show(shared), "approximated": show(new),
                      "special": [f"{m['token']} -> {m['base_token']} ({m['kind']})"
                                  for m in match.specials if m["kind"] != "exact"][:n]}
    d = match.digits
    if d["base"]["style"] != d["tokenizer"]["style"]:
        match.warnings.append(
            f"digit splitting differs (base: {d['base']['style']}; tokenizer: "
            f"{d['tokenizer']['style']}): arithmetic usually does not survive a transplant "
            "across this difference without training"
        )
    if match.beyond_base_rows:
        match.warnings.append(
            f"{match.beyond_base_rows} base token ids have no embedding row; they are not copied"
        )
    if match.new_rows > len(nv):
        match.warnings.append(
            f"{match.new_rows - len(nv)} rows beyond the new tokenizer's ids are padding"
        )


def require_shared(match: VocabMatch, k: int | None = None) -> None:
    """Refuse a transplant that has nothing (or too little) to build on."""
    n = len(match.shared_ids)
    if n == 0:
        raise CtdError(
            f"tokenizers {match.base_name} and {match.new_name} share no tokens; a training-free "
            "transplant needs a shared vocabulary (use --method mean/random and train instead)"
        )
    if k is not None and k > n:
        raise CtdError(f"k={k} exceeds the {n} shared tokens; choose --k {min(64, n)} or less")
