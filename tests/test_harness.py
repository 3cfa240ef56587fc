"""lm-evaluation-harness on ctd's models and tasks, offline: the same numbers as ctd's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctd.corpora import load_corpus, load_texts
from ctd.ensemble import Ensemble
from ctd.errors import CtdError
from ctd.evaluate import bits_per_byte, choice_nll, gsm_accuracy
from ctd.harness import bpb, require_lm_eval, rolling_nll, write_data
from tests.tiny import tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lm_eval"
# lm-eval puts its target_delimiter " " between question and choice
MC = [{"question": "The capital of France is", "choices": ["Paris", "a city", "42"], "label": 0},
      {"question": "Two plus two equals", "choices": ["four", "five"], "label": 0},
      {"question": "Water boils at", "choices": ["100 degrees", "noon", "home"], "label": 0}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("harness-data")
    txt = out / "notes.txt"
    txt.write_text("First paragraph of my notes.\n\nA second one, longer: " + "words " * 300)
    files, skipped = write_data(out / "data", max_bytes=2500, text=txt)
    assert not skipped
    (out / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    return out, files


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, smol_tok, gemma_tok):
    """Tiny models saved as HF directories: two on SmolLM2's tokenizer (no BOS added), one on
    Gemma's (adds <bos>, which is also ctd's document start)."""
    root = tmp_path_factory.mktemp("models")
    made = {"smol-a": tiny_model(smol_tok, seed=3), "smol-b": tiny_model(smol_tok, "qwen2", tied=False, seed=4),
            "gemma": tiny_model(gemma_tok, "gemma3", seed=1)}
    for name, model in made.items():
        model.save_pretrained(root / name)
        (smol_tok if name.startswith("smol") else gemma_tok).save_pretrained(root / name)
    return {name: (str(root / name), model) for name, model in made.items()}


def test_data_files_hold_what_ctd_scores(data):
    out, files = data
    rows = [json.loads(line) for line in files["ctd_wiki_en"].read_text().splitlines()]
    assert [r["text"] for r in rows] == load_texts("wiki-en", "test", 2500)
    rows = [json.loads(line) for line in files["ctd_gsm_symbolic (test)"].read_text().splitlines()]
    assert rows[:3] == load_corpus("gsm-symbolic", "test").select_columns(
        ["question", "solution", "answer", "prompt"]).select(range(3)).to_list()
    rows = [json.loads(line) for line in files["ctd_text"].read_text().splitlines()]
    assert [r["text"] for r in rows] == load_texts(str(out / "notes.txt"), "all", 2500)


@pytest.mark.parametrize("window", [None, 16])
def test_rolling_nll_is_ctd_eval_per_document(window, smol_tok):
    model = tiny_model(smol_tok, seed=5)
    texts = load_texts("wiki-en", "validation", 1500)
    ours = bits_per_byte(model, smol_tok, texts, window=window, progress=False).bpb
    assert bpb(rolling_nll(model, smol_tok, texts, window=window), texts) == pytest.approx(ours,
                                                                                          rel=1e-9)


def test_without_lm_eval_the_commands_say_what_to_install(monkeypatch, capsys, tmp_path):
    import importlib.util

    from ctd.cli import main
    from ctd.harness import main as harness_main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(CtdError, match=r"run: pip install 'ctd\[eval\]'"):
        require_lm_eval()
    for run in (lambda: main(["harness-data", "--out", str(tmp_path)]), lambda: harness_main([])):
        with pytest.raises(SystemExit) as e:
            run()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "pip install 'ctd[eval]'" in err
    assert not list(tmp_path.iterdir())


# ---- through lm-eval itself -------------------------------------------------------------

def _task(name: str, data_dir: Path, **override) -> dict:
    """A shipped task's config with its data files moved to `data_dir`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(str(CONFIGS / f"{name}.yaml"), resolve_func=True)
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"] = {"data_files": {k: str(data_dir / Path(v).name)
                                            for k, v in files.items()}}
    return cfg | override


def _mc_task(path: Path) -> dict:
    return {"task": "ctd_test_mc", "dataset_path": "json", "output_type": "multiple_choice",
            "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test",
            "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}


@pytest.fixture(scope="module")
def tasks():
    """One task index for the module (building it reads all of lm-eval's task YAMLs: 4 s)."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import ctd.harness_model  # noqa: F401  (registers ctd-ensemble)

    return TaskManager()


def _run(tasks, model: str, args: str, task: dict, **kw) -> tuple[dict, list[dict]]:
    """Results and samples (in document order) of one task."""
    from lm_eval import simple_evaluate

    res = simple_evaluate(model=model, model_args=args, tasks=[task], device="cpu",
                          batch_size=4, log_samples=True, task_manager=tasks, **kw)
    name = task["task"]
    return res["results"][name], sorted(res["samples"][name], key=lambda s: s["doc_id"])


def test_bpb_agrees_with_ctd_where_the_start_token_agrees(tasks, data, dirs, smol_tok,
                                                         gemma_tok):
    out, files = data
    task = _task("ctd_wiki_en", files["ctd_wiki_en"].parent)
    texts = load_texts("wiki-en", "test", 2500)
    (smol, smol_model), (gemma, gemma_model) = dirs["smol-a"], dirs["gemma"]
    ctd_smol = bits_per_byte(smol_model, smol_tok, texts, progress=False).bpb

    def harness(model, args):
        return _run(tasks, model, args, task)[0]["bits_per_byte,none"]

    # hf opens rolling windows with the declared bos (SmolLM2: <|im_start|>), ctd with the
    # document start (<|endoftext|>): the same windows, scored from that other token
    bos = bpb(rolling_nll(smol_model, smol_tok, texts, start=smol_tok.bos_token_id), texts)
    assert harness("hf", f"pretrained={smol}") == pytest.approx(bos, rel=1e-6)
    assert harness("hf", f"pretrained={smol},prefix_token_id=0") == pytest.approx(ctd_smol,
                                                                                   rel=1e-6)
    assert harness("ctd-ensemble", f"models={smol}") == pytest.approx(ctd_smol, rel=1e-6)
    # Gemma's tokenizer adds <bos> itself and hf prefixes another one: add_bos_token=False
    # leaves the one prefix, which is ctd's document start
    ctd_gemma = bits_per_byte(gemma_model, gemma_tok, texts, progress=False).bpb
    assert harness("hf", f"pretrained={gemma}") != pytest.approx(ctd_gemma, rel=1e-3)
    assert harness("hf", f"pretrained={gemma},add_bos_token=False") == pytest.approx(ctd_gemma,
                                                                                      rel=1e-6)


def test_any_text_file_task(tasks, data, dirs, smol_tok):
    out, files = data
    smol, model = dirs["smol-a"]
    texts = load_texts(str(out / "notes.txt"), "all", 2500)
    got = _run(tasks, "ctd-ensemble", f"models={smol},window=32",
               _task("ctd_text", files["ctd_text"].parent))
    assert got[0]["bits_per_byte,none"] == pytest.approx(
        bits_per_byte(model, smol_tok, texts, window=32, progress=False).bpb, rel=1e-6)


@pytest.mark.parametrize("model,name", [("hf", "gemma"), ("ctd-ensemble", "smol-b")])
def test_gsm_exact_match_is_ctds(model, name, tasks, data, dirs, real_tokenizers):
    """hf starts a prompt with the BOS its tokenizer adds (Gemma's <bos>, ctd's document start
    too); ctd-ensemble always with the document start."""
    out, files = data
    path, lm = dirs[name]
    tok = real_tokenizers["gemma3-270m" if name == "gemma" else "smollm2-135m"]
    task = _task("ctd_gsm_symbolic", files["ctd_gsm_symbolic (test)"].parent)
    args = f"pretrained={path}" if model == "hf" else f"models={path}"
    result, samples = _run(tasks, model, args, task, limit=3, gen_kwargs="max_gen_toks=8")
    rows = load_corpus("gsm-symbolic", "test").select(range(3)).to_list()
    shots = load_corpus("gsm-symbolic", "train").select(range(1)).to_list()
    ours = gsm_accuracy(lm, tok, rows, shots, max_new_tokens=8, progress=False)
    assert result["exact_match,none"] == ours["accuracy"]
    assert [s["resps"][0][0][-300:] for s in samples] == [e["generated"] for e in ours["examples"]]
    assert len({s["resps"][0][0] for s in samples}) == 3  # the tiny model says different things


def test_ensemble_of_one_is_the_model(tasks, data, dirs):
    out, _ = data
    path, _ = dirs["gemma"]
    task = _mc_task(out / "mc.jsonl")
    hf = [s["resps"] for s in _run(tasks, "hf", f"pretrained={path}", task)[1]]
    ens = [s["resps"] for s in _run(tasks, "ctd-ensemble", f"models={path}", task)[1]]
    flat = [float(r[0][0]) for doc in hf for r in doc]
    assert [float(r[0][0]) for doc in ens for r in doc] == pytest.approx(flat, rel=1e-5)


def test_ensemble_of_two_scores_as_choice_nll(tasks, data, dirs, smol_tok):
    out, _ = data
    (a, model_a), (b, model_b) = dirs["smol-a"], dirs["smol-b"]
    result, samples = _run(tasks, "ctd-ensemble", f"models={a}|{b},weights=3|1",
                           _mc_task(out / "mc.jsonl"))
    ensemble = Ensemble([model_a, model_b], weights=[3, 1])
    for row, sample in zip(MC, samples, strict=True):
        choices = [" " + c for c in row["choices"]]
        expected = [-n for n in choice_nll(ensemble, smol_tok, row["question"], choices)]
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(expected, rel=1e-5)
    assert 0 <= result["acc,none"] <= 1


def test_ensemble_from_the_lm_eval_command_line(data, dirs):
    """`python -m ctd.harness` is lm_eval's own command line with ctd-ensemble registered."""
    pytest.importorskip("lm_eval")
    out, files = data
    (a, _), (b, _) = dirs["smol-a"], dirs["smol-b"]
    include = out / "tasks"
    include.mkdir(exist_ok=True)
    task = (CONFIGS / "ctd_wiki_en.yaml").read_text().replace(
        "configs/lm_eval/data", str(files["ctd_wiki_en"].parent))
    (include / "ctd_wiki_en.yaml").write_text(task)
    run = subprocess.run(
        [sys.executable, "-m", "ctd.harness", "--model", "ctd-ensemble", "--model_args",
         f"models={a}|{b},mode=logits", "--include_path", str(include), "--tasks", "ctd_wiki_en",
         "--limit", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "bits_per_byte" in run.stdout and "ctd-ensemble" in run.stdout


def test_ensemble_model_args_are_checked(dirs):
    pytest.importorskip("lm_eval")
    from ctd.harness_model import EnsembleLM

    (a, _), (gemma, _) = dirs["smol-a"], dirs["gemma"]
    with pytest.raises(CtdError, match="does not use the tokenizer"):
        EnsembleLM(models=f"{a}|{gemma}")
    with pytest.raises(CtdError, match="needs models="):
        EnsembleLM(models="")
    lm = EnsembleLM(models=a)
    with pytest.raises(CtdError, match="greedily"):
        from lm_eval.api.instance import Instance

        lm.generate_until([Instance("generate_until", {}, ("Hi", {"do_sample": True}), 0)])
    assert torch.is_grad_enabled()


@pytest.mark.real
def test_packaged_model_bpb_in_the_harness(tasks, data, smol_tok):
    """SmolLM2-135M: hf's bits_per_byte is ctd's windows opened by SmolLM2's declared bos
    <|im_start|> (to float32 rounding over 30 layers in other batch shapes: 4e-5 here), and
    ctd eval (opened by <|endoftext|>) differs by what that start token costs."""
    from ctd.zoo import load_model, resolve_model

    out, files = data
    task = _task("ctd_wiki_en", files["ctd_wiki_en"].parent)
    texts = load_texts("wiki-en", "test", 2500)
    path = resolve_model("smollm2-135m")
    model = load_model(path)
    hf = _run(tasks, "hf", f"pretrained={path},dtype=float32", task)[0]["bits_per_byte,none"]
    assert hf == pytest.approx(bpb(rolling_nll(model, smol_tok, texts, start=1), texts), rel=2e-4)
    assert hf != pytest.approx(bits_per_byte(model, smol_tok, texts, progress=False).bpb,
                               rel=2e-4)


@pytest.mark.real
def test_packaged_model_gsm_in_the_harness(tasks, data, gemma_tok):
    """Gemma-3-270M answers the harness's gsm prompts word for word as ctd's gsm_accuracy does
    (hf opens them with the <bos> Gemma's tokenizer adds, ctd's document start)."""
    from ctd.zoo import load_model, resolve_model

    out, files = data
    path = resolve_model("gemma3-270m")
    task = _task("ctd_gsm_symbolic", files["ctd_gsm_symbolic (test)"].parent)
    result, samples = _run(tasks, "hf", f"pretrained={path},dtype=float32", task, limit=2,
                           gen_kwargs="max_gen_toks=24")
    rows = load_corpus("gsm-symbolic", "test").select(range(2)).to_list()
    shots = load_corpus("gsm-symbolic", "train").select(range(1)).to_list()
    ours = gsm_accuracy(load_model(path), gemma_tok, rows, shots, max_new_tokens=24,
                        progress=False)
    assert [s["resps"][0][0][-300:] for s in samples] == [e["generated"] for e in ours["examples"]]
    assert result["exact_match,none"] == ours["accuracy"]


def test_harness_data_writes_the_tasks_whose_corpus_is_installed(tmp_path, monkeypatch):
    """A missing corpus skips its task with the install command; the others are written."""
    import ctd.corpora

    real = ctd.corpora.load_corpus

    def without_gsm(spec, *args, **kwargs):
        if spec == "gsm-symbolic":
            raise CtdError("corpus 'gsm-symbolic' is not installed; run: pip install reasoning-gym")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(ctd.corpora, "load_corpus", without_gsm)
    files, skipped = write_data(tmp_path, max_bytes=500)
    assert list(files) == ["ctd_wiki_en"] and files["ctd_wiki_en"].is_file()
    assert list(skipped) == ["ctd_gsm_symbolic"] and "pip install reasoning-gym" in skipped[
        "ctd_gsm_symbolic"]
    monkeypatch.setattr(ctd.corpora, "load_corpus", lambda *a, **k: without_gsm("gsm-symbolic"))
    with pytest.raises(CtdError, match="no task data written"):
        write_data(tmp_path / "none", max_bytes=500)
