"""Sequential decoding makes no tensor from host (Python) data: on a GPU every such tensor is a host-to-device copy,
a synchronisation at each token step in eager mode and an error inside CUDA-graph capture."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tarflow_scale import Guidance, TarFlow, TarFlowConfig
from tarflow_scale.config import TNAFConfig
from tarflow_scale.models.tnaf import TNAF

# What torch.tensor / Tensor.new_tensor / torch.as_tensor on Python data dispatch to: the host data becomes a CPU
# tensor outside the dispatcher, then is lifted into the graph (and copied to the target device, if any).
HOST_DATA_OPS = ("aten.lift_fresh", "aten.lift_fresh_copy", "aten.lift")


class HostDataRecorder(TorchDispatchMode):
    """Counts every operation that makes a tensor out of host data while active."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in HOST_DATA_OPS:
            self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_the_recorder_sees_tensors_made_from_python_data():
    like = torch.zeros(2)
    with HostDataRecorder() as recorder:
        like.new_tensor([[1e-3], [2e-3]])  # what the spline's knots once did at every token step
        torch.tensor([1.0, 2.0])
        like.new_full((2, 1), 1e-3)  # filled on the device: not host data
    assert sum(recorder.calls.values()) == 2


TRANSFORMS = {
    "affine": {},
    "affine_vp": dict(transform="affine_vp", prior="learned"),
    "shift": dict(transform="shift"),
    "spline": dict(transform="spline"),
    "mixture": dict(transform="mixture"),
}


@pytest.mark.parametrize("guidance", [0.0, 1.5], ids=["plain", "guided"])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_sequential_decoding_makes_no_tensor_from_host_data(transform, guidance):
    config = TarFlowConfig(
        image_size=8, patch_size=2, channels=16, head_dim=8, num_blocks=2, layers_per_block=1, num_classes=3,
        mixer="cdflow", **TRANSFORMS[transform],
    )  # fmt: skip
    torch.manual_seed(0)
    model = TarFlow(config)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.05)  # live heads: the transforms do real work
    labels, generator = torch.arange(2) % 3, torch.Generator().manual_seed(0)
    with HostDataRecorder() as recorder:
        images = model.sample(2, labels, guidance=Guidance(guidance), generator=generator)  # sequential
    assert torch.isfinite(images).all()
    assert not recorder.calls, f"tensors made from host data while decoding: {dict(recorder.calls)}"


@pytest.mark.parametrize("transform", ["dsf", "spline", "mixture", "affine"])
def test_tnaf_decoding_makes_no_tensor_from_host_data(transform):
    torch.manual_seed(0)
    model = TNAF(TNAFConfig(num_dims=6, channels=16, head_dim=8, dsf_hidden=4, transform=transform))
    z = torch.randn(3, 6)
    with HostDataRecorder() as recorder, torch.no_grad():
        model.inverse(z)
    assert not recorder.calls, f"tensors made from host data while decoding: {dict(recorder.calls)}"
