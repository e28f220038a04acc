"""The maths: TarFlow and its Transformer layers, token transforms, mixers, priors, T-NAF and the MAF baseline.

Nothing here imports ray, deepspeed, or the training, evaluation and cli layers.
"""

from .likelihood import LOG_2, LOG_BIN_WIDTH_8BIT, bits_per_dim
from .priors import GaussianPrior
from .tarflow import NULL_LABEL, FlowBlock, TarFlow, patchify, unpatchify

__all__ = [
    "LOG_2",
    "LOG_BIN_WIDTH_8BIT",
    "NULL_LABEL",
    "FlowBlock",
    "GaussianPrior",
    "TarFlow",
    "bits_per_dim",
    "patchify",
    "unpatchify",
]
