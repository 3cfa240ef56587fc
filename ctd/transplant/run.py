"""`ctd transplant`: put a base model onto a new tokenizer and write the result.

Read top to bottom: check the output, load tokenizers, donor and base, match vocabularies, build
each embedding matrix (shared rows copied, new rows from the method), write an HF directory with
the new tokenizer and `transplant_report.json`, atomically.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ctd.card import transplant_card
from ctd.errors import CtdError
from ctd.io import atomic_dir, write_json
from ctd.report import progress
from ctd.tokens import byte_vocab
from ctd.transplant.methods import Inputs
from ctd.transplant.methods import method as registered
from ctd.transplant.vocab import match_vocab, require_shared
from ctd.zoo import ZOO, load_model, load_tokenizer, resolve_tokenizer


def check_output(out: Path, overwrite: bool) -> Path:
    """Refuse an existing or unwritable output before any work is done."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise CtdError(f"output directory {out} already exists; pass --overwrite or choose another")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CtdError(f"cannot write under {parent}; choose a writable --out")
    return out


def default_donor(tokenizer: str) -> str | None:
    """A tokenizer that names a model (zoo name, or a directory with weights) is its donor."""
    if tokenizer in ZOO:
        return tokenizer
    path = Path(tokenizer).expanduser()
    if path.is_dir() and (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return str(path)
    return None


def _check_donor(donor: str, new_tok) -> None:
    """The donor's own tokenizer (where it has one) must be the target tokenizer."""
    try:
        donor_tok = load_tokenizer(donor)
    except CtdError:
        return
    if donor_tok.get_vocab() != new_tok.get_vocab():
        raise CtdError(
            f"donor {donor} uses a different vocabulary from the target tokenizer; the donor must "
            "be a model trained with the target tokenizer (or omit --donor)"
        )


def _matrices(model) -> tuple[Tensor, Tensor | None]:
    """(input embedding, lm_head or None when tied)."""
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight.data_ptr() == inp.data_ptr():
        return inp.detach(), None
    return inp.detach(), out.weight.detach()


def _build(base: Tensor, match, approx, real: np.ndarray, side: str) -> Tensor:
    """Shared rows copied bit for bit; the rest from the method."""
    new = torch.empty(match.new_rows, base.shape[1], dtype=base.dtype)
    shared = torch.as_tensor(match.shared_ids)
    new[shared] = base[torch.as_tensor(match.to_base[match.shared_ids])]
    new[torch.as_tensor(match.new_ids)] = approx.apply(base, real, side).to(base.dtype)
    return new


def _install(model, e_in: Tensor, e_out: Tensor | None, new_tok) -> None:
    """Swap the embedding matrices in place (keeps e.g. Gemma's scaled embedding module)."""
    V = len(e_in)
    emb = model.get_input_embeddings()
    emb.weight = torch.nn.Parameter(e_in, requires_grad=False)
    emb.num_embeddings = V
    pad = new_tok.pad_token_id
    emb.padding_idx = pad if pad is not None and pad < V else None
    head = model.get_output_embeddings()
    if head is not None:
        head.weight = emb.weight if e_out is None else torch.nn.Parameter(e_out, requires_grad=False)
        head.out_features = V
    cfg = model.config
    cfg.vocab_size = V
    for module in model.modules():  # models cache vocab_size at init (used e.g. by the loss)
        if isinstance(getattr(module, "vocab_size", None), int):
            module.vocab_size = V
    for role in ("bos", "eos", "pad"):
        tid = getattr(new_tok, f"{role}_token_id", None)
        setattr(cfg, f"{role}_token_id", tid)
        if model.generation_config is not None:
            setattr(model.generation_config, f"{role}_token_id", tid)


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    import ctd

    return {"ctd": ctd.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _embedding_rows(spec: str) -> int | None:
    """Rows of a model's input embedding from its config, without loading weights."""
    import json

    path = Path(resolve_tokenizer(spec)) / "config.json"
    if not path.exists():
        return None
    cfg = json.loads(path.read_text())
    cfg = cfg.get("text_config", cfg)
    return cfg.get("vocab_size")


def analyse(base: str, tokenizer: str, examples: int = 8) -> dict:
    """`ctd vocab`: the vocabulary match of two tokenizers (embedding rows from configs)."""
    base_tok, new_tok = load_tokenizer(base), load_tokenizer(tokenizer)
    return match_vocab(base_tok, new_tok, _embedding_rows(base), _embedding_rows(tokenizer),
                       examples).summary()


def transplant_model(
    model,
    base_tok,
    new_tok,
    method: str = "omp",
    k: int | None = None,
    donor=None,
    fast: bool = False,
    show_progress: bool = False,
    resources: dict[str, Path | None] | None = None,
) -> dict:
    """Put a loaded model onto `new_tok` in place; `donor` is a model using `new_tok`,
    `resources` the local files the method reads (ctd.transplant.methods.Resource).

    Returns the report (vocabulary match, per-matrix statistics, timings).
    """
    t0 = time.perf_counter()
    spec = registered(method)
    resources = spec.validate(donor, k, fast, resources or {})
    k = spec.k if k is None else k
    base_in, base_out = _matrices(model)
    match = match_vocab(base_tok, new_tok, base_rows=len(base_in), new_rows=len(new_tok))
    require_shared(match, k if spec.name == "omp" else None)
    donor_in = donor_out = None
    if spec.donor:
        donor_in, donor_head = _matrices(donor)
        donor_in = donor_in.float()
        # an untied lm_head is approximated against the donor's lm_head, else its embedding
        donor_out = donor_in if donor_head is None else donor_head.float()
    t_match = time.perf_counter() - t0

    ids = match.new_ids
    real = np.flatnonzero(~byte_vocab(base_tok).is_special[: len(base_in)])
    sides = {"input": (base_in, donor_in)}
    if base_out is not None:
        sides["output"] = (base_out, donor_out)
    by_donor: dict[int, object] = {}  # one approximation per donor matrix
    built, stats = {}, {}
    with progress(disable=not show_progress) as bar:
        for side, (matrix, dmat) in sides.items():
            if id(dmat) not in by_donor:
                task = bar.add_task(f"{method} {side}", total=len(ids), info="")
                inp = Inputs(match, base_tok, new_tok, dmat, k or 0, fast,
                             on_batch=lambda n, task=task: bar.advance(task, n),
                             resources=resources, base={s: m for s, (m, _) in sides.items()})
                by_donor[id(dmat)] = spec.run(inp, ids, len(matrix))
                bar.update(task, completed=len(ids))
            approx = by_donor[id(dmat)]
            built[side] = _build(matrix, match, approx, real, side)
            stats[side] = {"fallback": int(approx.fallback.sum()), **approx.stats}
    _install(model, built["input"], built.get("output"), new_tok)
    return {
        "method": method,
        "params": spec.params(k, fast, resources),
        "tied": base_out is None,
        "vocab": match.summary(),
        "sides": stats,
        "timings": {"match_s": t_match, "method_s": time.perf_counter() - t0 - t_match},
    }


def transplant(
    base: str,
    tokenizer: str,
    out: Path,
    method: str = "omp",
    k: int | None = None,
    donor: str | None = None,
    fast: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    resources: dict[str, Path | None] | None = None,
) -> dict:
    """Transplant `base` onto `tokenizer` and write an HF directory to `out`; returns the report."""
    t0 = time.perf_counter()
    out = check_output(out, overwrite)
    spec = registered(method)
    donor = donor or (default_donor(tokenizer) if spec.donor else None)
    if spec.donor and donor is None:
        resolve_tokenizer(tokenizer)  # a tokenizer that does not exist is the error, not the donor
    spec.validate(donor, k, fast, resources or {})
    new_tok = load_tokenizer(tokenizer)
    base_tok = load_tokenizer(base)
    byte_vocab(new_tok), byte_vocab(base_tok)  # refuse unsupported tokenizers before loading
    donor_model = None
    if spec.donor:
        if resolve_tokenizer(donor) != resolve_tokenizer(tokenizer):
            _check_donor(donor, new_tok)
        donor_model = load_model(donor)
    model = load_model(base)
    t_load = time.perf_counter() - t0
    report = {"base": base, "tokenizer": tokenizer, "donor": donor if donor_model else None}
    report |= transplant_model(model, base_tok, new_tok, method, k, donor_model, fast, show_progress,
                               resources)
    del donor_model
    t = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        new_tok.save_pretrained(tmp)
        report["timings"] |= {"load_s": t_load, "write_s": time.perf_counter() - t,
                              "total_s": time.perf_counter() - t0}
        report["versions"] = _versions()
        write_json(tmp / "transplant_report.json", report)
        transplant_card(tmp, report, out)
    report["out"] = str(out)
    return report
