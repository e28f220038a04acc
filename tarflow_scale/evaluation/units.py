"""Resumable evaluation: each finished unit of work (a bits/dim part, a sample chunk, a FID chunk's features, a
reference part's statistics) is saved atomically under OUT/units/<job>-<fingerprint>/, and a re-run of the same
command loads it instead of recomputing.

Units are fixed by the settings, never by the number of workers (sample k depends only on (seed, k)); the
driver assembles them in unit order, so an evaluation resumed after a crash or a lost node gives exactly the
metrics of an uninterrupted run. The fingerprint covers everything a unit's result depends on (weights, data,
settings): a changed setting starts a fresh folder instead of mixing results.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path

UNITS_DIR = "units"


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the weights (names, shapes, dtypes and bytes), independent of the file they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class UnitStore:
    """The finished units of one job under one fingerprint: `name -> dict of arrays`, each an .npz file."""

    def __init__(self, out_dir: str | Path, job: str, plan: dict[str, Any]):
        text = json.dumps(plan, sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.folder = Path(out_dir) / UNITS_DIR / f"{job}-{self.fingerprint}"
        self.folder.mkdir(parents=True, exist_ok=True)
        plan_file = self.folder / "plan.json"
        if not plan_file.is_file():
            from ..atomic import write_text

            write_text(plan_file, json.dumps(plan, indent=1, sort_keys=True, default=str) + "\n")
        self.reused = 0  # units found finished by this run
        self.computed = 0  # units computed by this run

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def done(self, name: str) -> bool:
        return self.path(name).is_file()

    def save(self, name: str, arrays: dict[str, Any]) -> None:
        with atomic_path(self.path(name), suffix=".npz") as tmp:
            np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
        self.computed += 1

    def load(self, name: str) -> dict[str, np.ndarray]:
        with np.load(self.path(name), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def summary(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "reused": self.reused, "computed": self.computed}
