"""Learning-rate schedule and the generated DeepSpeed config."""

from __future__ import annotations

import math

import pytest
import torch

from tarflow_scale.config import load_config
from tarflow_scale.training.deepspeed_config import build_deepspeed_config
from tarflow_scale.training.schedule import make_scheduler, warmup_cosine_factor


def test_warmup_then_cosine_never_climbs_again():
    factors = [warmup_cosine_factor(s, num_steps=100, warmup_steps=10, min_ratio=0.01) for s in range(300)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(factors[9:], factors[10:])), "decay must be monotone after warmup"
    assert factors[55] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(f == pytest.approx(0.01) for f in factors[100:]), "past the end it stays at min_lr"


def test_scheduler_state_round_trips_through_a_checkpoint():
    config = load_config(None, ["optim.lr=1e-3", "optim.warmup_steps=3", "train.num_steps=20"])
    param = torch.nn.Parameter(torch.zeros(1))
    first = make_scheduler(torch.optim.AdamW([param], lr=config.optim.lr), config.optim, config.train.num_steps)
    for _ in range(7):
        first.optimizer.step()
        first.step()
    resumed = make_scheduler(torch.optim.AdamW([param], lr=config.optim.lr), config.optim, config.train.num_steps)
    resumed.load_state_dict(first.state_dict())
    resumed.optimizer.param_groups[0]["lr"] = resumed.get_last_lr()[0]
    for _ in range(5):
        first.step()
        resumed.step()
        assert resumed.get_last_lr() == first.get_last_lr()


def test_deepspeed_config_is_generated_from_the_run_config():
    config = load_config(
        None,
        [
            "train.global_batch_size=64",
            "train.micro_batch_size=8",
            "cluster.num_workers=2",
            "optim.grad_clip=0.5",
            "deepspeed.zero_stage=3",
            "optim.betas=[0.9, 0.95]",
        ],
    )
    ds = build_deepspeed_config(config)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5, "clipping must be explicit (DeepSpeed defaults to 1.0)"
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95] and ds["optimizer"]["params"]["torch_adam"]
    assert ds["bf16"]["enabled"] is False  # never: the bf16 policy is the model's trunk autocast (test_precision)
