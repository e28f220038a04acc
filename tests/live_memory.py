"""Peak memory of torch code on the CPU, as a GPU's allocator would count it: the bytes of live tensor storages.

`torch.cuda.max_memory_allocated` is the sum of live allocations; on the CPU neither tracemalloc (it does not see
torch's allocator) nor the process RSS (libraries, the C allocator's caching) measures that. `LiveTensorBytes` is a
dispatch mode that registers the storage of every tensor an operation returns and drops it when the storage is
freed (a weak reference's callback), so its `peak` is that sum. Tensors created before the mode are not counted:
create the model and the engine under it.

Run as a script, it measures one DeepSpeed ZeRO-2 training step per setting in this process (a one-rank gloo
world on the CPU accelerator) and prints JSON: tests/test_memory.py compares the memory estimate with it.
"""

from __future__ import annotations

import json
import os
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages created under the mode (`current`) and their maximum (`peak`)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:  # views, in-place results and outputs written into given storage
            return

        def freed(_ref, key=key, size=size):
            if self.live.pop(key, None) is not None:
                self.current -= size

        self.live[key] = weakref.ref(storage, freed)
        self.current += size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view of an input (of a tensor made before the mode, too) allocates nothing.
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if _real(t)}
        for value in tree_flatten(out)[0]:
            if _real(value) and value.untyped_storage().data_ptr() not in inputs:
                self._track(value)
        return out


def _real(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "meta"


def measure_deepspeed_steps(settings: list[dict]) -> list[dict]:
    """For each setting (overrides of the run config): the peak of three ZeRO-2 training steps and the live bytes
    after them, less the model's buffers (what remains: weights, fp32 master partition, AdamW moments, and the
    optimizer's scalars)."""
    import deepspeed
    import torch.distributed as dist

    from tarflow_scale.config import load_config
    from tarflow_scale.models.tarflow import TarFlow
    from tarflow_scale.training.deepspeed_config import build_deepspeed_config
    from tarflow_scale.training.trainer import apply_activation_checkpointing, configure_precision, param_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = []
    for overrides in settings:
        config = load_config(None, overrides)
        c = config.model
        x = torch.randn(config.micro_batch_size, c.in_channels, c.image_size, c.image_size)
        tracker = LiveTensorBytes()
        with tracker:
            torch.manual_seed(0)
            model = TarFlow(c)
            configure_precision(model, config, torch.device("cpu"))
            if config.activation_checkpointing:
                apply_activation_checkpointing(model)
            engine, *_ = deepspeed.initialize(
                model=model,
                model_parameters=param_groups(model, config.optim.weight_decay),
                config=build_deepspeed_config(config),
                dist_init_required=False,
            )
            for _ in range(3):  # the first step allocates the optimizer state
                z, log_det = engine(x)
                engine.backward(-(engine.module.prior(z) + log_det).mean())
                engine.step()
                del z, log_det
        buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())
        results.append({"overrides": overrides, "peak": tracker.peak, "after_step": tracker.current - buffers})
        del engine, model
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
    os.environ.setdefault("MASTER_PORT", "29517")
    print(json.dumps(measure_deepspeed_steps(json.loads(sys.argv[1]))))
