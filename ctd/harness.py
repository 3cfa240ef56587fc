"""lm-evaluation-harness, offline: the data of ctd's local tasks, and lm_eval with ctd's models.

People judge transplanted and distilled models with `lm_eval`, so ctd meets them there:

- `ctd harness-data` writes the texts and problems that ctd scores (wiki-en test, gsm-symbolic,
  any .txt) as JSON lines for the tasks in `configs/lm_eval/` (no hub needed), so that
  `ctd eval`'s bits per byte and `ctd.evaluate.gsm_accuracy` can be checked against the harness.
- `python -m ctd.harness ARGS` is `lm_eval ARGS` with the `ctd-ensemble` model type registered
  (`ctd.harness_model`): lm-eval 0.4.13 loads no plug-ins by itself (no entry points; task
  directories are indexed without importing their code), so the registration has to run first.

lm-eval is an optional extra: `pip install 'ctd[eval]'`.

Where `--model hf` and ctd differ on the same text, and how to line them up (SmolLM2-135M and
Gemma-3-270M, 50 kB of wiki-en test):
- the first token: hf opens a rolling window with the declared bos (SmolLM2: `<|im_start|>`,
  0.9318 bpb), ctd with its document start (`<|endoftext|>`, 0.8899); `prefix_token_id=0`
  makes hf's 0.8899. A tokenizer that adds its own BOS (Gemma) gets two `<bos>` from hf and is
  charged for the second (0.9038 against ctd's 0.8406); `add_bos_token=False` gives 0.8406.
- the windows: the same for texts shorter than the window (every wiki-en test document is
  under 300 tokens). hf's window is the model's whole context (8192 tokens for SmolLM2), ctd's
  1024: on a 6,637-token text hf reads 3.6% lower (more context); with `max_length=1023` both
  predict the same tokens per window and differ only in the one token opening each later
  window (ctd: the start token, hf: the text's previous token), 0.75% here.
- lined up, the two agree to 5e-5 (float32 rounding in other batch shapes).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np

from ctd.config import SampleBy
from ctd.errors import CtdError
from ctd.evaluate import extract_answer, window_nll, windows
from ctd.tokens import doc_start_id
from ctd.zoo import model_context

PIP = "pip install 'ctd[eval]'"  # lm-eval==0.4.13
DATA = Path("configs/lm_eval/data")  # where the task YAMLs read their data (repository root)


def require_lm_eval() -> None:
    """Refuse, in one line, a harness command when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise CtdError(f"lm-evaluation-harness is not installed; run: {PIP}")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp.replace(path)
    return path


def write_data(out: Path = DATA, max_bytes: int | None = None, text: Path | None = None,
               sample_by: SampleBy = "paragraph") -> tuple[dict[str, Path], dict[str, str]]:
    """Write the data of the tasks in configs/lm_eval/ under `out`; returns (task -> file,
    task -> why it was not written). A task whose corpus is not installed is skipped with the
    reason (its install command) so the others are still written; none written is an error.

    The texts are exactly those `ctd eval --corpus wiki-en --split test [--max-bytes N]` scores
    (and, for `text`, `ctd eval --corpus FILE --split all`), the gsm problems those of
    `ctd ensemble --gsm N` (test split in order; 1-shot from the first train problem).
    """
    from ctd.corpora import load_corpus, load_texts

    out = Path(out)
    keep = ["question", "solution", "answer", "prompt"]

    def texts(spec: str, split: str, **kw) -> list[dict]:
        return [{"text": t} for t in load_texts(spec, split, max_bytes, **kw)]

    def gsm(split: str) -> list[dict]:
        return load_corpus("gsm-symbolic", split).select_columns(keep).to_list()

    # (task, label in the listing, file name, its rows)
    files = [("ctd_wiki_en", "ctd_wiki_en", "wiki-en-test", lambda: texts("wiki-en", "test")),
             *(("ctd_gsm_symbolic", f"ctd_gsm_symbolic ({split})", f"gsm-symbolic-{split}",
                lambda split=split: gsm(split)) for split in ("train", "test"))]
    if text is not None:
        files.append(("ctd_text", "ctd_text", "text",
                      lambda: texts(str(text), "all", sample_by=sample_by)))
    written, skipped = {}, {}
    for task, label, name, rows in files:
        if task in skipped:
            continue
        try:
            written[label] = _write_jsonl(out / f"{name}.jsonl", rows())
        except CtdError as e:
            skipped[task] = str(e)
    if not written:
        raise CtdError("no task data written: " + "; ".join(skipped.values()))
    return written, skipped


def gsm_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The ctd_gsm_symbolic task's metric: ctd.evaluate.gsm_accuracy's exact match."""
    return {"exact_match": float(extract_answer(results[0]) == str(doc["answer"]))}


def rolling_nll(model, tokenizer, texts: list[str], start: int | None = None,
                window: int | None = None, batch_size: int = 8) -> list[float]:
    """NLL (nats) of each whole text in the windows of `ctd.evaluate.bits_per_byte`, each
    window opened by `start` (default: the tokenizer's document start, as bits_per_byte).

    This is what lm-eval's loglikelihood_rolling asks for; summed over texts and divided by
    their bytes and ln 2 it is bits_per_byte's bpb for the same start token and window.
    """
    window = window or min(1024, model_context(model))
    start = doc_start_id(tokenizer) if start is None else start
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    work = [(doc, w) for doc, t in enumerate(ids) for w in windows(np.asarray(t, np.int64),
                                                                   start, window)]
    work.sort(key=lambda x: -len(x[1]))  # similar lengths together
    totals = [0.0] * len(texts)
    model.eval()
    for i in range(0, len(work), batch_size):
        batch = work[i : i + batch_size]
        for (doc, _), nll in zip(batch, window_nll(model, [w for _, w in batch], pad).tolist()):
            totals[doc] += nll
    return totals


def bpb(nll: list[float], texts: list[str]) -> float:
    """Bits per byte of texts from their NLL in nats (as ctd and lm-eval count bytes)."""
    return sum(nll) / math.log(2) / sum(len(t.encode()) for t in texts)


def register() -> None:
    """Register ctd's model types with lm-eval (importing the module registers them)."""
    require_lm_eval()
    import ctd.harness_model  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """`python -m ctd.harness ARGS`: lm_eval's command line with `ctd-ensemble` registered."""
    try:
        register()
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
        cli_evaluate()
    except CtdError as e:
        print(f"ctd: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
