"""Model cards: the README.md a Hugging Face model directory is published with.

Every directory ctd writes says, in the hub's card format, what it is (base, tokenizer, method,
settings, training data), how well it reads text (bits per byte and the command that measured
it) and the exact ctd command that makes it again. The YAML front matter carries the hub's
fields: base_model, library_name, license (inherited from the base where known), tags and
pipeline_tag, plus `tokenizer`: the hub id of the tokenizer the model reads text with.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ctd.errors import CtdError

KINDS = {
    "transplant": "moved onto a new tokenizer without training (`ctd transplant`)",
    "distill": "trained by distillation (`ctd distill`)",
    "heal": "moved onto a new tokenizer, then healed by self-distillation (`ctd heal`)",
}
# Licenses of the zoo models' originals (their GGUF packages repackage these weights).
LICENSES = {"smollm2-135m": "apache-2.0", "gemma3-270m": "gemma",
            "qwen2.5-coder-0.5b": "apache-2.0"}
MEASURE = "ctd eval --model {dir} --corpus wiki-en --split test"
HARNESS = ("lm_eval --model hf --model_args pretrained={dir} --include_path configs/lm_eval "
           "--tasks ctd_wiki_en")


def read_front_matter(directory: Path) -> dict:
    """The YAML front matter of a directory's README.md ({} when there is none)."""
    path = Path(directory) / "README.md"
    if not path.is_file():
        return {}
    text = path.read_text()
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return {}
    meta = yaml.safe_load(text[4 : text.index("\n---", 4)])
    return meta if isinstance(meta, dict) else {}


def lineage(spec: str) -> dict[str, str]:
    """base_model, license and tokenizer (the hub id of the tokenizer it reads text with) for a
    model named any way ctd accepts: a zoo name's original hub id and license, a local
    directory's own card's fields, a hub id as itself. A transplant's card names the base it
    was made from and the tokenizer it was moved onto, so a model made from it says both."""
    from ctd.zoo import ZOO

    if spec in ZOO:
        hub = ZOO[spec].hub_id
        return {"base_model": hub, "license": LICENSES[spec], "tokenizer": hub}
    path = Path(spec).expanduser()
    if path.is_dir():
        meta = read_front_matter(path)
        return {k: meta[k] for k in ("base_model", "license", "tokenizer")
                if isinstance(meta.get(k), str)}
    if path.suffix != ".gguf" and spec.count("/") == 1 and not path.exists():
        return {"base_model": spec, "tokenizer": spec}
    return {}


def _lines(details: dict, prefix: str = "") -> list[str]:
    """Nested settings as `- key: value` lines (nested keys joined with dots)."""
    out = []
    for key, value in details.items():
        if isinstance(value, dict):
            out += _lines(value, f"{prefix}{key}.")
        elif value is not None:
            shown = (", ".join(map(str, value)) if isinstance(value, list | tuple)
                     else f"{value:.4g}" if isinstance(value, float) else value)
            out.append(f"- {prefix}{key}: {shown}")
    return out


def write_card(directory: Path, *, kind: str, base: str, tokenizer: str, command: str,
               details: dict, bpb: dict | None = None, tags: tuple[str, ...] = (),
               name: str | None = None) -> Path:
    """Write `directory/README.md`: front matter, how the model was made, its bits per byte
    and the command that reproduces it.

    `details`: the settings that made it (method, k, residual, the distill/heal config and its
    steps, training data), nested dicts allowed. `bpb`: {label: {"bpb": value, "command":
    what measured it}}; without it the card gives the commands that measure it. `name`: the
    card's title (default: the directory's name).
    """
    if kind not in KINDS:
        raise CtdError(f"unknown model kind '{kind}'; use one of {', '.join(KINDS)}")
    if bpb and any(not isinstance(v, dict) or "bpb" not in v for v in bpb.values()):
        raise CtdError("bpb must map each label to {'bpb': value, 'command': ...}")
    directory = Path(directory)
    origin = lineage(base)
    tok = lineage(tokenizer)
    new_tok = tok.get("tokenizer") or tok.get("base_model") or tokenizer
    meta = {"base_model": origin.get("base_model"), "library_name": "transformers",
            "license": origin.get("license"), "pipeline_tag": "text-generation",
            "tokenizer": new_tok, "tags": ["ctd", kind, *tags]}
    meta = {k: v for k, v in meta.items() if v is not None}
    body = [
        f"# {name or directory.name}", "",
        f"{base} {KINDS[kind]}, reading text with the tokenizer of {new_tok}. Made with ctd "
        "(cross-tokenizer distillation).", "",
        "## How it was made", "",
        f"- base: {base}" + (f" ({origin['base_model']})" if "base_model" in origin
                             and origin["base_model"] != base else ""),
        f"- tokenizer: {tokenizer}" + (f" ({new_tok})" if new_tok != tokenizer else ""),
        *_lines(details), "",
        "## Bits per byte", "",
    ]
    if bpb:
        body += ["| text | bpb | measured with |", "|---|---|---|"]
        body += [f"| {label} | {v['bpb']:.4f} | `{v.get('command', '')}` |"
                 for label, v in bpb.items()]
    else:
        body += ["Not measured when this directory was written. Measure it (DIR: this "
                 "directory) with", "", f"    {MEASURE.format(dir='DIR')}", "",
                 "or with lm-evaluation-harness on the same text (ctd's configs/lm_eval/, "
                 "data from `ctd harness-data`):", "", f"    {HARNESS.format(dir='DIR')}"]
    body += ["", "## Reproduce", "", f"    {command}", ""]
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "README.md"
    path.write_text(text + "\n".join(body))
    return path


def transplant_card(directory: Path, report: dict, out: Path) -> Path:
    """The card of a `ctd transplant` output, from its report (transplant_report.json)."""
    params = dict(report["params"])
    flags = [f"--base {report['base']}", f"--tokenizer {report['tokenizer']}",
             f"--method {report['method']}"]
    if report.get("donor") and report["donor"] != report["tokenizer"]:
        flags.append(f"--donor {report['donor']}")
    if params.pop("fast", False):
        flags.append("--fast")
    flags += [f"--{key} {value}" for key, value in params.items()]
    vocab = report["vocab"]
    details = {
        "method": report["method"], "donor": report.get("donor"), **report["params"],
        "tokens": {"shared (copied)": vocab["shared"], "approximated": vocab["approximated"]},
        "special tokens": [f"{s['token']} -> base {s['base_token']} ({s['kind']})"
                           for s in vocab["specials"]],
        "mean relative residual": {side: s["relative_residual"]["mean"]
                                   for side, s in report["sides"].items()
                                   if "relative_residual" in s} or None,
        "ridge": next((s["ridge"] for s in report["sides"].values() if "ridge" in s), None),
        "training data": "none (training-free)",
        "warnings": vocab["warnings"] or None,
        "versions": report.get("versions"),
    }
    return write_card(directory, kind="transplant", base=report["base"],
                      tokenizer=report["tokenizer"],
                      command=f"ctd transplant {' '.join(flags)} --out {out}", details=details,
                      tags=("tokenizer-transplant", report["method"]), name=Path(out).name)


def distill_card(directory: Path, config: dict, steps: int, out: Path,
                 data: dict | None = None, kind: str = "distill", command: str | None = None,
                 bpb: dict | None = None) -> Path:
    """The card of a trained student (`ctd distill`'s export, a recipe's arm), from the run's
    config (config.json), its steps and data statistics."""
    m, d, t = config["models"], config["data"], config["train"]
    details = {
        "teacher": m["teacher"], "losses": [s["name"] for s in config["losses"]],
        "balance": config["balance"], "trainable": m["trainable"], "steps": steps,
        "batch": f"{d['batch_size']} x {t['accumulate']} x {d['max_length']} tokens",
        "optimizer": dict(config["optim"]),
        "training data": d["corpus"] + (f" ({data['train']['windows']:,} windows, "
                                        f"{data['train']['bytes']:,} bytes)" if data else ""),
    }
    return write_card(directory, kind=kind, base=m["student"],
                      tokenizer=m["student_tokenizer"] or m["student"],
                      command=command or f"ctd distill --config {Path(out) / 'config.json'} "
                                         f"--out {out}",
                      details=details, bpb=bpb, tags=("distillation",), name=Path(out).name)
