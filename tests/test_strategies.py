"""Exact normalisation under accumulation and DDP (2 CPU processes over gloo), and the real
DeepSpeed ZeRO-2 engine for a few steps on the CPU."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy
from transformers import AutoModelForCausalLM

from ctd.config import DataConfig, OptimConfig
from ctd.data import DistillData
from ctd.losses.objective import DistillObjective, LossSpec
from ctd.strategies import deepspeed_config
from ctd.train import Distiller, distill
from ctd.zoo import load_tokenizer
from tests.tiny import distill_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """TEST ONLY: Lightning's DeepSpeedStrategy refuses non-CUDA devices in
    setup_environment; DeepSpeed's own CPU accelerator runs ZeRO fine (docs/distributed.md)."""

    def __init__(self, **kwargs):
        super().__init__(parallel_devices=[torch.device("cpu", 0)], **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)


class FirstGradient(pl.Callback):
    """Saves the student's (reduced) gradients of the first optimizer step to `path`."""

    def __init__(self, path: Path):
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0 and trainer.is_global_zero:
            torch.save({n: p.grad.clone() for n, p in pl_module.student.named_parameters()
                        if p.grad is not None}, self.path)


class FirstFullGradient(FirstGradient):
    """The same under DeepSpeed, whose ZeRO partitions hold the gradients (not p.grad)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from deepspeed.utils import safe_get_full_grad

        if trainer.global_step != 0:
            return
        try:  # the engine hands gradients out only at the accumulation boundary
            grads = {n: safe_get_full_grad(p).clone()
                     for n, p in pl_module.student.named_parameters()}
        except ValueError:
            return
        torch.save(grads, self.path)


def _first_gradient(root: Path, out: Path, batch: int, accumulate: int = 1,
                    record: type[FirstGradient] = FirstGradient, **trainer) -> dict:
    t_tok, s_tok = load_tokenizer(root / "teacher"), load_tokenizer(root / "student")
    data = DataConfig(corpus=str(root / "corpus.txt"), max_length=48, batch_size=batch,
                      max_documents=16)
    module = Distiller(AutoModelForCausalLM.from_pretrained(root / "student"),
                       AutoModelForCausalLM.from_pretrained(root / "teacher"),
                       DistillObjective([LossSpec("alm"), LossSpec("clm")], t_tok, s_tok),
                       OptimConfig(grad_clip=0.0))
    pl.Trainer(max_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu",
               use_distributed_sampler=False, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
               callbacks=[record(out)], **trainer,
               ).fit(module, datamodule=DistillData(t_tok, s_tok, data, accumulate))
    return torch.load(out)


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_accumulation_gives_the_big_batch_gradient(zoo_dir, tmp_path):
    big = _first_gradient(zoo_dir, tmp_path / "big.pt", batch=4)
    _assert_close(big, _first_gradient(zoo_dir, tmp_path / "acc.pt", batch=2, accumulate=2))


def test_ddp_two_processes_give_the_big_batch_gradient(zoo_dir, tmp_path):
    big = _first_gradient(zoo_dir, tmp_path / "big.pt", batch=4)
    ddp = _first_gradient(zoo_dir, tmp_path / "ddp.pt", batch=2, devices=2,
                          strategy=DDPStrategy(start_method="spawn",
                                               process_group_backend="gloo"))
    _assert_close(big, ddp)


@pytest.fixture
def no_shm_compile(monkeypatch):
    """Skip DeepSpeed's ~100 s shm_comm compile: a single CPU process never uses it."""
    monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op",
                        lambda *a, **k: None)
    for var, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
        monkeypatch.setenv(var, value)


@pytest.mark.parametrize("name", ["zero2.json", "zero2_offload.json", "zero3.json",
                                  "zero3_offload.json"])
def test_deepspeed_configs_validate(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    config = deepspeed_config(CONFIGS / name)
    DeepSpeedConfig({**config, "train_micro_batch_size_per_gpu": 1,
                     "gradient_accumulation_steps": 1})


def test_deepspeed_stage2_trains_and_exports(zoo_dir, tmp_path, no_shm_compile):
    cfg = distill_config(zoo_dir, max_steps=3, accelerator="cpu", checkpoint_every=2)
    strategy = CPUDeepSpeedStrategy(config=deepspeed_config(CONFIGS / "zero2.json"))
    summary = distill(cfg, out=tmp_path / "ds", strategy=strategy)
    assert summary["steps"] == 3 and Path(summary["checkpoint"]).is_dir()
    AutoModelForCausalLM.from_pretrained(summary["export"])


def test_deepspeed_accumulation_gives_the_big_batch_gradient(zoo_dir, tmp_path,
                                                             no_shm_compile):
    """DeepSpeed divides by the accumulation steps once more than plain Lightning does
    (ctd.strategies.loss_scale): the gradient it steps on must still be the big batch's."""
    big = _first_gradient(zoo_dir, tmp_path / "big.pt", batch=4)
    strategy = CPUDeepSpeedStrategy(config=deepspeed_config(CONFIGS / "zero2.json"))
    ds = _first_gradient(zoo_dir, tmp_path / "ds.pt", batch=2, accumulate=2,
                         record=FirstFullGradient, strategy=strategy)
    _assert_close(big, ds)


def test_two_nodes_over_gloo_train_like_one_process(zoo_dir, tmp_path):
    """train.num_nodes as Lightning has it: two single-process "nodes" on localhost, launched
    by torchrun as on two machines, take the same steps as one process with their global batch."""
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    cfg = distill_config(zoo_dir, max_steps=2, accelerator="cpu")
    cfg.data.max_documents = 32
    one = distill(cfg, out=tmp_path / "one")  # batch 4 in one process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--models.teacher", cfg.models.teacher, "--models.student", cfg.models.student,
            "--models.teacher_dtype", "float32", "--data.corpus", cfg.data.corpus,
            "--data.max_length", "48", "--data.batch_size", "2", "--data.max_documents", "32",
            "--data.val_documents", "8", "--losses", "[{name: alm}, {name: clm, weight: 0.1}]",
            "--balance", "fixed", "--optim.lr", "3e-3", "--optim.warmup_steps", "1",
            "--train.max_steps", "2", "--train.val_every", "0", "--train.precision", "32-true",
            "--train.strategy", "ddp", "--train.accelerator", "cpu", "--train.num_nodes", "2",
            "--train.progress", "false", "--train.threads", "1", "--out", str(tmp_path / "two")]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "ctd.cli", "distill", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for rank in (0, 1)]
    for node in nodes:
        assert node.wait(timeout=600) == 0, node.stdout.read()[-3000:]
    a = load_file(Path(one["export"]) / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
