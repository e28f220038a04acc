"""The EMA shadow restored on resume lives where the weights do: safetensors loads onto the CPU, and the shadow is
lerped with the live weights at every step (CUDA tensors on a GPU run)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tarflow_scale import TarFlow, TarFlowConfig
from tarflow_scale.artifacts import CheckpointError
from tarflow_scale.training.trainer import EMA

CONFIG = TarFlowConfig(image_size=8, patch_size=2, channels=16, head_dim=8, num_blocks=2, layers_per_block=1)


def saved_shadow(tmp_path, dtype=torch.bfloat16):
    """An EMA file as a checkpoint holds it, written from a CPU model (in another dtype, to see the cast)."""
    torch.manual_seed(1)
    shadow = EMA(TarFlow(CONFIG), decay=0.9).shadow
    path = tmp_path / "ema.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in shadow.items()}, str(path))
    return path, shadow


def test_resumed_shadow_has_each_parameters_device_and_dtype(tmp_path):
    """On the meta device (a stand-in for CUDA on a CPU machine): the loaded CPU tensors must not replace the
    shadow, or the next update would lerp CPU tensors with device weights."""
    path, _ = saved_shadow(tmp_path)
    with torch.device("meta"):
        model = TarFlow(CONFIG)
    ema = EMA(model, decay=0.9)
    ema.load(path)
    parameters = dict(model.named_parameters())
    for key, value in ema.shadow.items():
        if key in parameters:
            assert (value.device, value.dtype) == (parameters[key].device, parameters[key].dtype), key
    ema.update(model)  # lerp_ with the (meta) weights: raises if any shadow tensor is on another device


def test_resumed_shadow_holds_the_saved_values(tmp_path):
    path, saved = saved_shadow(tmp_path, dtype=torch.float32)
    torch.manual_seed(2)
    ema = EMA(TarFlow(CONFIG), decay=0.9)
    assert any(not torch.equal(ema.shadow[k], saved[k]) for k in saved)  # different weights before the load
    ema.load(path)
    for key, value in saved.items():
        assert torch.equal(ema.shadow[key], value), key


def test_an_ema_file_of_another_model_is_refused_naming_it(tmp_path):
    path, _ = saved_shadow(tmp_path)
    other = EMA(TarFlow(TarFlowConfig(**{**CONFIG.__dict__, "channels": 32})), decay=0.9)
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: .* has shape"):
        other.load(path)
    fewer = EMA(TarFlow(TarFlowConfig(**{**CONFIG.__dict__, "num_blocks": 1})), decay=0.9)
    with pytest.raises(CheckpointError, match=r"ema\.safetensors does not match the model: missing \[\], unexpected"):
        fewer.load(path)
