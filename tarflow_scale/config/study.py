"""The config of the tabular likelihood study (tools/study_tnaf.py): T-NAF vs TarFlow (as 1 x 8 x 8 images) vs
MAF on scikit-learn's digits. Loaded with `load_config(path, overrides, cls=TNAFRunConfig)`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .checks import ConfigError
from .models import MAFConfig, TarFlowConfig, TNAFConfig

DIGITS_IMAGE_SIZE = 8  # scikit-learn's digits: 8 x 8 images
DIGITS_NUM_DIMS = DIGITS_IMAGE_SIZE**2


@dataclass
class TabularConfig:
    """Which tabular data set and its held-out split."""

    dataset: Literal["digits"] = "digits"
    val_fraction: float = 0.2
    seed: int = 0  # the split permutation and the held-out split's fixed dequantization noise

    @property
    def num_dims(self) -> int:
        return DIGITS_NUM_DIMS

    def validate(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError("data.val_fraction must be in (0, 1)")


@dataclass
class StudyConfig:
    """The likelihood study: each model trains single-process for the same wall-clock budget with Adam."""

    models: list[Literal["tnaf", "tarflow", "maf"]] = field(default_factory=lambda: ["tnaf", "tarflow", "maf"])
    budget_s: float = 60.0  # wall-clock seconds of training per model (evaluation not included)
    batch_size: int = 128  # images per step; dequantization noise is redrawn for every batch
    lr: float = 1e-3  # peak Adam learning rate, shared by every model
    warmup_steps: int = 20  # linear warmup, then cosine decay to 0 over the wall-clock budget
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # Early stopping: this fraction of the training split is held back and scored every select_every_s seconds
    # of training; each model keeps its best weights there. 0: no selection, the final weights.
    select_fraction: float = 0.1
    select_every_s: float = 5.0
    eval_batch_size: int = 512
    num_threads: int = 1  # torch CPU threads (the machines are shared)
    seed: int = 0  # model init and the training batches / noise

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("study.models is empty (choose from tnaf, tarflow, maf)")
        if self.budget_s <= 0 or self.lr <= 0:
            raise ConfigError("study.budget_s and study.lr must be > 0")
        if not 0 <= self.select_fraction < 1 or self.select_every_s <= 0:
            raise ConfigError("study.select_fraction must be in [0, 1) and study.select_every_s > 0")
        for name in ("batch_size", "eval_batch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"study.{name} must be >= 1")


def _digits_tarflow() -> TarFlowConfig:
    return TarFlowConfig(
        image_size=DIGITS_IMAGE_SIZE,
        in_channels=1,
        patch_size=1,
        channels=64,
        num_blocks=4,
        layers_per_block=1,
        mixer="none",
    )


@dataclass
class TNAFRunConfig:
    """T-NAF vs TarFlow (as 1 x 8 x 8 images) vs MAF on one tabular data set; dumped into run_dir.

    `load_config` layers a YAML section over the defaults below (a `tarflow:` section naming only patch_size keeps
    the 8 x 8 geometry); `validate` checks that every model has the data's dimension.
    """

    run_dir: str = "runs/tnaf_digits"
    data: TabularConfig = field(default_factory=TabularConfig)
    tnaf: TNAFConfig = field(default_factory=TNAFConfig)
    tarflow: TarFlowConfig = field(default_factory=_digits_tarflow)
    maf: MAFConfig = field(default_factory=MAFConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def validate(self) -> TNAFRunConfig:
        for part in (self.data, self.tnaf, self.tarflow, self.maf, self.study):
            part.validate()
        D = self.data.num_dims
        for name, dims in (("tnaf.num_dims", self.tnaf.num_dims), ("maf.num_dims", self.maf.num_dims)):
            if dims != D:
                raise ConfigError(f"{name}={dims} must equal the {self.data.dataset} data's dimension {D}")
        image = (self.tarflow.in_channels, self.tarflow.image_size)
        if image != (1, DIGITS_IMAGE_SIZE):
            raise ConfigError(
                f"tarflow.in_channels={image[0]}, tarflow.image_size={image[1]}: the digits are 1 x "
                f"{DIGITS_IMAGE_SIZE} x {DIGITS_IMAGE_SIZE} images (set both in the tarflow section)"
            )
        if self.tarflow.num_classes:
            raise ConfigError("tarflow.num_classes must be 0: the tabular study is unconditional")
        return self
