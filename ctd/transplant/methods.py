"""The transplant methods: each builds the rows of the new tokens from base rows.

Almost every method writes a new row as a weighted sum of base rows, so a method returns a
sparse weight matrix over base ids; the same weights then serve the input embedding and an
untied lm_head; only ZeTT's hypernetwork predicts the rows of each matrix themselves.
Donor-space methods (omp, knn, focus-donor, tokenadapt-hybrid) compare the new token with the
shared tokens through a donor model that already uses the new tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ctd.errors import CtdError
from ctd.numerics import fast_dtype
from ctd.tokens import byte_vocab
from ctd.transplant import zett
from ctd.transplant.omp import omp
from ctd.transplant.vocab import VocabMatch
from ctd.transplant.wechsel import TEMPERATURE, WechselResources, aligned_vectors, token_vectors

FAST = {"pool": 64, "refresh": 8}  # the fast OMP mode (quality measured by the benchmark)
# Exact OMP (the picks of plain fp32 OMP, certified at every step): `pool` atoms per step get
# fp32 correlations; 8 certify 98-99% of the steps of both benchmark pairs in a first pass.
EXACT = {"pool": 8, "refresh": 1}
# Ridge on OMP's least squares (fraction of the mean squared atom norm). Without it, SmolLM2
# moved onto Gemma-3's vocabulary got 1% of its new rows with 6-15x the largest shared row's norm
# (near-collinear atoms in Gemma's space, not in SmolLM2's): tied to the output, those rows
# dominated every prediction (82 bits per byte). 0.01 keeps every new row within the shared
# rows' norms and raises the donor-space residual by 0.5% (0.1% on pair A).
RIDGE = 0.01
# TokenAdapt's published hybrid: weight of the local (pieces) part, and the global part's
# neighbours and softmax temperature.
TOKENADAPT = {"local": 0.7, "global_k": 3, "global_temperature": 0.3}


@dataclass
class Approximation:
    """Rows of the new tokens as weights over base rows (or, from a hypernetwork, the rows of
    each matrix); fallback rows get `fill` instead."""

    weights: Tensor | None  # sparse [n, V_base]; None: rows given or every row is a fallback
    fallback: Tensor  # bool [n]
    fill: str = "mean"  # "mean" | "zero" | "random"
    stats: dict = field(default_factory=dict)
    rows: dict[str, Tensor] | None = None  # side ("input", "output") -> [n, D]

    def apply(self, base: Tensor, real: np.ndarray, side: str = "input", seed: int = 0) -> Tensor:
        """The new rows of one side, given its base matrix [V_base, D] and the real
        (non-special) base row ids."""
        n, fb = len(self.fallback), self.fallback
        if self.rows is not None:
            out = self.rows[side].float().clone()
        elif self.weights is None:
            out = torch.zeros(n, base.shape[1])
        else:
            out = torch.sparse.mm(self.weights, base.float())
        if not fb.any() or self.fill == "zero":
            out[fb] = 0.0
            return out
        rows = base[torch.as_tensor(real)].float()  # a copy of the matrix: only when needed
        out[fb] = rows.mean(0)
        if self.fill == "random":
            g = torch.Generator().manual_seed(seed)
            out[fb] += torch.randn(int(fb.sum()), base.shape[1], generator=g) * rows.std(0)
        return out


@dataclass
class Inputs:
    """What a method may use: the match, the tokenizers, the donor matrix of this side, the
    base matrices, and the method's local resources."""

    match: VocabMatch
    base_tok: object
    new_tok: object
    donor: Tensor | None  # [V_donor, D_donor], rows indexed by new ids
    k: int
    fast: bool = False
    on_batch: Callable[[int], None] | None = None
    resources: dict[str, Path] = field(default_factory=dict)  # the method's local files
    base: dict[str, Tensor] = field(default_factory=dict)  # side -> base matrix


def _sparse(rows: Tensor, cols: Tensor, vals: Tensor, n: int, vb: int) -> Tensor:
    # the indices are in range by construction: no invariant check (and no torch warning)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals.float(), (n, vb),
                                   check_invariants=False).coalesce()


def _dense_weights(idx: Tensor, w: Tensor, vb: int) -> Tensor:
    """[n, K] base ids and weights -> sparse [n, V_base] (duplicate ids add up)."""
    n, K = idx.shape
    rows = torch.arange(n).repeat_interleave(K)
    return _sparse(rows, idx.reshape(-1), w.reshape(-1), n, vb)


def _dictionary(inp: Inputs, ids: np.ndarray):
    """Shared tokens with a donor row (atoms), their base ids, and which targets have a row."""
    m, V = inp.match, len(inp.donor)
    shared = m.shared_ids[m.shared_ids < V]
    has_row = torch.as_tensor(ids < V)
    return shared, torch.as_tensor(m.to_base[shared]), has_row


def _top_similar(Y: Tensor, P: Tensor, m: int, batch: int = 1024) -> tuple[Tensor, Tensor]:
    """Cosine similarities of each target with its m most similar atoms (screened in the
    hardware's fast precision, `ctd.numerics.fast_dtype`; exact in fp32)."""
    Pn = torch.nn.functional.normalize(P.float(), dim=1)
    Pb = Pn.to(fast_dtype())
    Yn = torch.nn.functional.normalize(Y.float(), dim=1)
    sims, idx = [], []
    for s in range(0, len(Yn), batch):
        y = Yn[s : s + batch]
        cand = (y.to(Pb.dtype) @ Pb.T).topk(min(2 * m, len(P)), dim=1).indices
        exact = torch.einsum("nd,nmd->nm", y, Pn[cand])
        top = exact.topk(m, dim=1)
        sims.append(top.values)
        idx.append(cand.gather(1, top.indices))
    return torch.cat(sims), torch.cat(idx)


def _no_rows(n: int) -> Approximation:
    return Approximation(None, torch.ones(n, dtype=torch.bool))


def method_omp(inp: Inputs, ids: np.ndarray, vb: int) -> Approximation:
    shared, base_ids, has_row = _dictionary(inp, ids)
    targets = inp.donor[torch.as_tensor(ids[has_row.numpy()])]
    res = omp(inp.donor[torch.as_tensor(shared)], targets, inp.k,
              **(FAST if inp.fast else EXACT), ridge=RIDGE, on_batch=inp.on_batch)
    w = _dense_weights(base_ids[res.indices], res.coefs, vb)
    w = _expand(w, has_row, vb)
    r = res.residual.numpy()
    stats = {"mode": "fast" if inp.fast else "exact", **(FAST if inp.fast else EXACT),
             "ridge": RIDGE,
             "dictionary_atoms": len(shared), "stopped_early": res.stopped,
             "fp32_rescreens": res.fallbacks, "relative_residual": _describe(r)}
    return Approximation(w, ~has_row, stats=stats)


def _expand(w: Tensor, has_row: Tensor, vb: int) -> Tensor:
    """Weights computed for the targets with donor rows -> weights for all targets."""
    where = has_row.nonzero().squeeze(1)
    i = w.indices()
    return _sparse(where[i[0]], i[1], w.values(), len(has_row), vb)


def _describe(x: np.ndarray) -> dict[str, float]:
    if not len(x):
        return {}
    q = np.quantile(x, [0.5, 0.9])
    return {"mean": float(x.mean()), "median": float(q[0]), "p90": float(q[1]),
            "max": float(x.max())}


def _base_pieces(inp: Inputs, ids: np.ndarray) -> tuple[Tensor, Tensor]:
    """Each new token's bytes tokenized by the base tokenizer: flat (target, base id) pairs."""
    nv, bv = byte_vocab(inp.new_tok), byte_vocab(inp.base_tok)
    rows_ok = inp.match.base_rows
    single = {p: i for i, p in enumerate(bv.pieces[:rows_ok]) if len(p) == 1 and not bv.is_special[i]}
    texts, parts = [], []
    for n, i in enumerate(ids):
        if i >= len(nv) or inp.match.new_special[i] or not nv.pieces[i]:
            continue
        s = nv.pieces[i].decode("utf-8", errors="surrogateescape")
        # split into valid text and raw bytes (surrogates), kept in order
        for chunk in _runs(s):
            if chunk[0] >= "\udc80" and chunk[0] <= "\udcff":
                parts.append((n, len(texts), [single.get(bytes([ord(c) - 0xDC00]), -1) for c in chunk]))
            else:
                parts.append((n, len(texts), None))
                texts.append(chunk)
    enc = inp.base_tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    owner, base = [], []
    for n, t, raw in parts:
        got = raw if raw is not None else enc[t]
        for b in got:
            if 0 <= b < rows_ok:
                owner.append(n)
                base.append(b)
    return torch.tensor(owner, dtype=torch.long), torch.tensor(base, dtype=torch.long)


def _runs(s: str) -> list[str]:
    out, cur, cur_raw = [], "", None
    for c in s:
        raw = "\udc80" <= c <= "\udcff"
        if cur and raw != cur_raw:
            out.append(cur)
            cur = ""
        cur, cur_raw = cur + c, raw
    return out + ([cur] if cur else [])


def _segment_normalise(owner: Tensor, w: Tensor, n: int) -> Tensor:
    total = torch.zeros(n).index_add_(0, owner, w)
    return w / total[owner].clamp_min(1e-30)


def method_fvt(inp: Inputs, ids: np.ndarray, vb: int) -> Approximation:
    owner, base = _base_pieces(inp, ids)
    n = len(ids)
    w = _segment_normalise(owner, torch.ones(len(owner)), n)
    has = torch.zeros(n, dtype=torch.bool)
    has[owner] = True
    return Approximation(_sparse(owner, base, w, n, vb), ~has,
                         stats={"mean_pieces": float(len(owner) / max(1, int(has.sum())))})


def method_knn(inp: Inputs, ids: np.ndarray, vb: int) -> Approximation:
    shared, base_ids, has_row = _dictionary(inp, ids)
    sims, idx = _top_similar(inp.donor[torch.as_tensor(ids[has_row.numpy()])],
                             inp.donor[torch.as_tensor(shared)], inp.k)
    w = sims.clamp_min(0)
    good = w.sum(1) > 0
    w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
    wts = _expand(_dense_weights(base_ids[idx], w, vb), has_row, vb)
    fb = ~has_row
    fb[has_row.clone()] = ~good
    return Approximation(wts, fb, stats={"mean_top_similarity": float(sims[:, 0].mean())})


def _sparsemax(z: Tensor) -> Tensor:
    """Sparsemax along dim 1 of values sorted in descending order."""
    k = torch.arange(1, z.shape[1] + 1, dtype=z.dtype)
    cs = z.cumsum(1)
    support = (1 + k * z) > cs
    kz = support.sum(1, keepdim=True)
    tau = (cs.gather(1, kz - 1) - 1) / kz
    return (z - tau).clamp_min(0)


def method_focus(inp: Inputs, ids: np.ndarray, vb: int) -> Approximation:
    shared, base_ids, has_row = _dictionary(inp, ids)
    sims, idx = _top_similar(inp.donor[torch.as_tensor(ids[has_row.numpy()])],
                             inp.donor[torch.as_tensor(shared)], 256)
    w = _sparsemax(sims)
    wts = _expand(_dense_weights(base_ids[idx], w, vb), has_row, vb)
    return Approximation(wts, ~has_row, stats={"mean_support": float((w > 0).sum(1).float().mean())})


def method_tokenadapt(inp: Inputs, ids: np.ndarray, vb: int) -> Approximation:
    """TOKENADAPT["local"] x local (base pieces weighted by donor similarity and length) + the
    rest x global (the global_k most similar shared tokens, softmax(sim / global_temperature))."""
    shared, base_ids, has_row = _dictionary(inp, ids)
    n = len(ids)
    donor = torch.nn.functional.normalize(inp.donor.float(), dim=1)
    # local: pieces of the token in the base tokenizer, compared in donor space via shared ids
    owner, base = _base_pieces(inp, ids)
    base_to_new = torch.full((vb,), -1, dtype=torch.long)
    base_to_new[base_ids] = torch.as_tensor(shared)
    tgt = torch.as_tensor(ids)[owner]
    via = base_to_new[base]
    ok = (via >= 0) & (tgt < len(donor))
    sim = torch.zeros(len(owner))
    sim[ok] = (donor[tgt[ok]] * donor[via[ok]]).sum(1)
    nv = byte_vocab(inp.new_tok)
    blen = torch.as_tensor(byte_vocab(inp.base_tok).lengths)[base].float()
    tlen = torch.as_tensor(nv.lengths)[tgt.clamp_max(len(nv) - 1)].float().clamp_min(1)
    e = torch.exp(sim - 1.0) * (blen / tlen)
    local = _segment_normalise(owner, e, n)
    has_local = torch.zeros(n, dtype=torch.bool)
    has_local[owner] = True
    # global: the global_k most similar shared tokens
    k = TOKENADAPT["global_k"]
    sims, idx = _top_similar(inp.donor[torch.as_tensor(ids[has_row.numpy()])],
                             inp.donor[torch.as_tensor(shared)], k)
    g = torch.softmax(sims / TOKENADAPT["global_temperature"], dim=1)
    rows_g = has_row.nonzero().squeeze(1).repeat_interleave(k)
    scale_local = torch.where(has_row, TOKENADAPT["local"], 1.0)[owner]
    scale_global = torch.where(has_local, 1 - TOKENADAPT["local"], 1.0)[has_row].repeat_interleave(k)
    w = _sparse(torch.cat([owner, rows_g]), torch.cat([base, base_ids[idx].reshape(-1)]),
                torch.cat([local * scale_local, g.reshape(-1) * scale_global]), n, vb)
    return Approximation(w, ~(has_local | has_row))


def method_wechsel(inp: Inputs, ids: np.ndarray, vb: int) -> Approximation:
    """softmax(cos / 0.1) over the k base tokens nearest in word-vector space (ctd.transplant.wechsel)."""
    src_words, src, tgt_words, tgt = aligned_vectors(WechselResources(**inp.resources))
    base_vec, base_has = token_vectors(inp.base_tok, src_words, src, vb)
    new_vec, new_has = token_vectors(inp.new_tok, tgt_words, tgt, int(ids.max()) + 1)
    special = byte_vocab(inp.base_tok).is_special[:vb]
    base_has[: len(special)] &= ~torch.from_numpy(special)
    cand = base_has.nonzero().squeeze(1)
    if not len(cand):
        raise CtdError("no base token occurs in any word of --vectors; are they for the base "
                       "model's language?")
    has_row = new_has[torch.as_tensor(ids)]
    sims, idx = _top_similar(new_vec[torch.as_tensor(ids)[has_row]], base_vec[cand],
                             min(inp.k, len(cand)))
    w = torch.softmax(sims / TEMPERATURE, dim=1)
    wts = _expand(_dense_weights(cand[idx], w, vb), has_row, vb)
    return Approximation(wts, ~has_row, stats={
        "base_tokens_with_vectors": len(cand), "mean_top_similarity": float(sims[:, 0].mean())})


def method_zett(inp: Inputs, ids: np.ndarray, vb: int) -> Approximation:
    """Rows predicted by a ZeTT hypernetwork from the base rows of each token's pieces."""
    e_in, e_out = inp.base["input"], inp.base.get("output")
    net = zett.load(inp.resources["hypernet"], e_in.shape[1], e_out is None, len(e_in))
    owner, pieces = _base_pieces(inp, ids)
    n = len(ids)
    surface, truncated = zett.surface_forms(owner, pieces, n, net.maxlen, net.pad_id)
    has = torch.zeros(n, dtype=torch.bool)
    has[owner] = True
    source = e_in.float() if e_out is None else torch.cat([e_in, e_out], dim=1).float()
    p_in, p_out = zett.predict(net, surface[has], source, on_batch=inp.on_batch)
    rows = {"input": torch.zeros(n, e_in.shape[1])}
    rows["input"][has] = p_in
    if p_out is not None:
        rows["output"] = torch.zeros(n, e_in.shape[1])
        rows["output"][has] = p_out
    return Approximation(None, ~has, rows=rows, stats={
        "mean_pieces": float(len(owner) / max(1, int(has.sum()))),
        "truncated": truncated, "max_pieces": net.maxlen})


def method_const(fill: str) -> Callable[[Inputs, np.ndarray, int], Approximation]:
    def run(inp: Inputs, ids: np.ndarray, vb: int) -> Approximation:
        a = _no_rows(len(ids))
        a.fill = fill
        return a
    return run


@dataclass(frozen=True)
class Resource:
    """A local file or directory a method reads (nothing is ever downloaded)."""

    name: str  # the keyword and the command-line flag (--name)
    metavar: str
    help: str
    required: bool = True


@dataclass(frozen=True)
class Method:
    """A transplant method: the function that builds the new rows, and what it needs. Every
    list of methods, their validation, the CLI's choices and flags and the report's parameters
    derive from `METHODS`; adding a method is one entry here."""

    name: str
    run: Callable[[Inputs, np.ndarray, int], Approximation]
    about: str
    donor: bool = False  # compares tokens in a donor model that uses the new tokenizer
    k: int | None = None  # default k; None: the method takes no k
    fast: bool = False  # has a fast mode (--fast)
    resources: tuple[Resource, ...] = ()
    check: Callable[[dict[str, Path]], None] | None = None  # reads resources before any loading

    def validate(self, donor: object, k: int | None, fast: bool,
                 resources: dict[str, Path | None]) -> dict[str, Path]:
        """Refuse what this method cannot run with, before anything is loaded; returns its
        resources (the ones given)."""
        own = {r.name for r in self.resources}
        for name, value in resources.items():
            if value is not None and name not in own:
                users = [m.name for m in METHODS.values() if name in {r.name for r in m.resources}]
                raise CtdError(f"--{name} is not used by method '{self.name}' (it is for "
                               f"{', '.join(users)})")
        for r in self.resources:
            if r.required and resources.get(r.name) is None:
                raise CtdError(f"method '{self.name}' needs {r.help}: pass --{r.name} {r.metavar};"
                               " nothing is downloaded")
        if k is not None and self.k is None:
            raise CtdError(f"method '{self.name}' takes no --k")
        if k is not None and k < 1:
            raise CtdError(f"--k must be at least 1 (got {k})")
        if fast and not self.fast:
            raise CtdError(f"method '{self.name}' has no fast mode; drop --fast")
        if donor is not None and not self.donor:
            raise CtdError(f"method '{self.name}' uses no donor; drop --donor")
        if self.donor and donor is None:
            raise CtdError(f"method '{self.name}' needs a donor model that uses the target "
                           "tokenizer; pass --donor MODEL, or use --method fvt, which needs none")
        given = {name: Path(v) for name, v in resources.items() if v is not None}
        if self.check is not None:
            self.check(given)
        return given

    def params(self, k: int | None, fast: bool, resources: dict[str, Path]) -> dict[str, object]:
        """The parameters a report records."""
        return ({"k": k} if self.k is not None else {}) | ({"fast": fast} if self.fast else {}) \
            | {name: str(path) for name, path in resources.items()}


_WECHSEL = (
    Resource("vectors", "FILE.vec", "word vectors of the base model's language (fastText .vec "
             "text format)"),
    Resource("target_vectors", "FILE.vec", "word vectors of the new tokenizer's language, when "
             "it is another one", required=False),
    Resource("dictionary", "FILE.txt", "'source_word target_word' lines pairing the two "
             "languages (with --target_vectors)", required=False),
)

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("omp", method_omp, "Orthogonal Matching Pursuit over shared tokens in donor space",
           donor=True, k=64, fast=True),
    Method("fvt", method_fvt, "mean of the base rows of the token's pieces under the base "
           "tokenizer"),
    Method("mean", method_const("mean"), "the mean of the base rows"),
    Method("zero", method_const("zero"), "zeros"),
    Method("random", method_const("random"), "per-dimension normal samples of the base rows"),
    Method("knn", method_knn, "similarity-weighted k nearest shared tokens in donor space",
           donor=True, k=8),
    Method("focus-donor", method_focus, "sparsemax over donor-space similarities (FOCUS)",
           donor=True),
    Method("tokenadapt-hybrid", method_tokenadapt, "donor-weighted base pieces + nearest shared "
           "tokens (TokenAdapt)", donor=True),
    Method("wechsel", method_wechsel, "nearest base tokens in a word-vector space (WECHSEL)",
           k=10, resources=_WECHSEL, check=lambda r: WechselResources(**r).check()),
    Method("zett", method_zett, "a ZeTT hypernetwork trained for the base model",
           resources=(Resource("hypernet", "DIR", "a local ZeTT hypernetwork trained for the "
                               "base model (config.json + model.safetensors)"),),
           check=lambda r: zett.read_config(r["hypernet"])),
]}
RESOURCES: dict[str, Resource] = {r.name: r for m in METHODS.values() for r in m.resources}


def method(name: str) -> Method:
    """The registered method called `name`; an unknown name is one clear error."""
    if name not in METHODS:
        raise CtdError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
