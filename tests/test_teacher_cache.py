"""The teacher cache: training from it equals training with the live teacher, a cached run
never loads the teacher, and a cache of anything else is never used."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ctd.train
from ctd.data import DistillData
from ctd.errors import CtdError
from ctd.losses.logprobs import hidden_states, output_head
from ctd.losses.objective import DistillObjective, LossSpec
from ctd.report import run_curves
from ctd.teacher_cache import META, TeacherCache
from ctd.train import build_teacher_cache, distill, last_layer_params
from ctd.zoo import load_tokenizer
from tests.tiny import distill_config as tiny_config


def distill_config(root, **train):
    cfg = tiny_config(root, **train)
    cfg.data.max_documents = 40  # a few steps' worth: building the cache is the slow part
    return cfg


def _cache(cfg, tok, splits=("train", "validation")) -> TeacherCache:
    return TeacherCache(cfg.data.teacher_cache, cfg.models.teacher, torch.float32, tok,
                        lambda: AutoModelForCausalLM.from_pretrained(cfg.models.teacher), splits,
                        rebuild="ctd teacher-cache --config X", show_progress=False)


@pytest.mark.parametrize("balance", ["fixed", "grad_norm"])
def test_cached_and_live_teacher_give_the_same_loss_and_gradients(zoo_dir, tmp_path,
                                                                 monkeypatch, balance):
    monkeypatch.setenv("CTD_CACHE", str(tmp_path))
    cfg = distill_config(zoo_dir)
    t_tok, s_tok = load_tokenizer(cfg.models.teacher), load_tokenizer(cfg.models.student)
    live = DistillData(t_tok, s_tok, cfg.data)
    cached = DistillData(t_tok, s_tok, cfg.data, teacher_rows=_cache(cfg, t_tok))
    live.setup("fit")
    cached.setup("fit")
    b_live = next(iter(live.train_dataloader()))
    b_cached = next(iter(cached.train_dataloader()))
    assert "teacher_logprobs" in b_cached and "teacher_logprobs" not in b_live
    teacher = AutoModelForCausalLM.from_pretrained(cfg.models.teacher)
    student = AutoModelForCausalLM.from_pretrained(cfg.models.student)
    objective = DistillObjective([LossSpec("alm"), LossSpec("clm")], t_tok, s_tok, balance)

    def step(batch, use_teacher: bool):
        student.zero_grad()
        with torch.inference_mode():
            th = hidden_states(teacher, batch["teacher_input_ids"],
                               batch["teacher_attention_mask"]) if use_teacher else None
        sh = hidden_states(student, batch["student_input_ids"], batch["student_attention_mask"])
        out = objective(batch, sh, output_head(student), th,
                        output_head(teacher) if use_teacher else None,
                        int(batch["global_chunks"]), int(batch["global_tokens"]),
                        balance_params=last_layer_params(student))
        out["loss"].backward()
        return out, torch.cat([p.grad.flatten() for p in student.parameters()])

    out_live, g_live = step(b_live, True)
    out_cached, g_cached = step(b_cached, False)
    for key in ("loss", "alm", "clm"):
        torch.testing.assert_close(out_cached[key], out_live[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_cached, g_live, rtol=1e-4, atol=1e-6)
    assert out_live["alm"] > 0


def test_a_cached_run_never_loads_the_teacher(zoo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CTD_CACHE", str(tmp_path / "cache"))
    cfg = distill_config(zoo_dir, max_steps=2, val_every=1)
    paths = build_teacher_cache(cfg)  # as a user would on a big machine
    assert set(paths) == {"train", "validation"} and all((p / META).exists()
                                                         for p in paths.values())
    load = ctd.train.load_model

    def no_teacher(spec, *args, **kwargs):
        assert spec != cfg.models.teacher, "the teacher was loaded"
        return load(spec, *args, **kwargs)

    monkeypatch.setattr(ctd.train, "load_model", no_teacher)
    summary = distill(cfg, tmp_path / "run")
    assert summary["steps"] == 2 and summary["export"]
    for key in ("val/teacher_bpb", "val/agreement"):  # from the cache
        assert run_curves(tmp_path / "run", key), key


def test_a_cache_of_anything_else_is_refused_or_not_used(zoo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CTD_CACHE", str(tmp_path / "cache"))
    where = tmp_path / "teacher-cache"
    cfg = distill_config(zoo_dir)
    cfg.data.teacher_cache = str(where)
    build_teacher_cache(cfg)
    meta = json.loads((where / "train" / META).read_text())

    def refused(other):
        t_tok = load_tokenizer(other.models.teacher_tokenizer or other.models.teacher)
        s_tok = load_tokenizer(other.models.student)
        data = DistillData(t_tok, s_tok, other.data, teacher_rows=_cache(other, t_tok))
        with pytest.raises(CtdError, match="built for another configuration.*rebuild it"):
            data.setup("fit")

    # another length (other windows), another corpus selection, another tokenizer pair
    refused(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=32)))
    refused(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_documents=24)))
    swapped = dataclasses.replace(cfg, models=dataclasses.replace(
        cfg.models, teacher_tokenizer=cfg.models.student))
    # (the student's tokenizer on a teacher with too few rows: refused as another config
    # before the teacher would ever run)
    refused(swapped)
    # another teacher (same rows): its weights differ
    other_teacher = tmp_path / "teacher2"
    model = AutoModelForCausalLM.from_pretrained(cfg.models.teacher)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(2)
    model.save_pretrained(other_teacher)
    load_tokenizer(cfg.models.teacher).save_pretrained(other_teacher)
    refused(dataclasses.replace(cfg, models=dataclasses.replace(cfg.models,
                                                                teacher=str(other_teacher))))
    assert json.loads((where / "train" / META).read_text()) == meta  # nothing overwritten
    # "auto" caches are keyed by everything: another teacher gets its own, nothing is reused
    cfg.data.teacher_cache = "auto"
    a = build_teacher_cache(cfg)
    b = build_teacher_cache(dataclasses.replace(cfg, models=dataclasses.replace(
        cfg.models, teacher=str(other_teacher))))
    assert a["train"] != b["train"]


def test_an_interrupted_build_leaves_nothing_to_reuse(zoo_dir, tmp_path, monkeypatch):
    """A build stopped half-way (here by an error in the teacher) leaves no directory under the
    final name: the next run builds it again instead of reading half a cache."""
    monkeypatch.setenv("CTD_CACHE", str(tmp_path / "cache"))
    cfg = distill_config(zoo_dir)
    cfg.data.teacher_cache = str(tmp_path / "tc")
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr("ctd.teacher_cache.token_logprobs", broken)
    with pytest.raises(RuntimeError, match="mid-build"):
        build_teacher_cache(cfg)
    assert calls and not (tmp_path / "tc" / "train").exists()
    monkeypatch.undo()
    monkeypatch.setenv("CTD_CACHE", str(tmp_path / "cache"))
    assert (build_teacher_cache(cfg)["train"] / META).exists()
