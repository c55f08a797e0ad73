"""Sharded training on the CPU: the FSDP strategy's wrapping (a timm Block per unit, frozen teachers replicated)
and its config. (The two-process DDP fit, stopped and resumed, is in test_multitask.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_encoder
from timm.models.vision_transformer import Block
from torch import nn

from selfsup3d.cli import main
from selfsup3d.distributed import EncoderFSDP, frozen_teachers
from selfsup3d.encoders.teacher import make_teacher

ROOT = Path(__file__).resolve().parents[1]


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = tiny_encoder()
        self.teacher = make_teacher(self.encoder)
        self.head = nn.Linear(self.encoder.embed_dim, 4)


@pytest.fixture
def process_group(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29400 + os.getpid() % 500))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_wraps_every_block_outside_the_teachers_and_replicates_them(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = Student()
    assert frozen_teachers(model) == [model.teacher]
    strategy = EncoderFSDP()
    strategy.parallel_devices = [torch.device("cpu")]
    # what the strategy's _setup_model passes, with a CPU device (Lightning passes the GPU's index)
    wrapped = FSDP(model, device_id=torch.device("cpu"), **strategy.wrap_kwargs(model))
    units = [name for name, m in wrapped.named_modules() if isinstance(m, FSDP)]
    assert units == ["", "_fsdp_wrapped_module.encoder.vit.blocks.0", "_fsdp_wrapped_module.encoder.vit.blocks.1"]
    teacher_blocks = [m for m in model.teacher.modules() if isinstance(m, Block)]
    assert teacher_blocks and not any(isinstance(m, FSDP) for m in model.teacher.modules())  # whole on every rank
    assert strategy.kwargs["use_orig_params"] is True


def test_the_fsdp_config_stacks_on_the_gpu_configs(capsys):
    import yaml

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs/multitask.yaml"), "--config", str(ROOT / "configs/gpu/fsdp.yaml"),
              "--print_config"])  # fmt: skip
    assert exit_.value.code == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["strategy"]["class_path"] == "selfsup3d.distributed.EncoderFSDP"
    assert trainer["precision"] == "bf16-mixed"


def test_the_slurm_requeue_config_stacks_on_any_config(capsys):
    import yaml

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs/demo/masked_view.yaml"), "--config",
              str(ROOT / "configs/gpu/slurm.yaml"), "--print_config"])  # fmt: skip
    assert exit_.value.code == 0
    (plugin,) = yaml.safe_load(capsys.readouterr().out)["trainer"]["plugins"]
    assert plugin["class_path"].endswith("SLURMEnvironment") and plugin["init_args"]["auto_requeue"] is True
