"""Suite-wide settings: one torch thread (tiny tensors; a shared 2-core CI box thrashes with more)."""

import torch

torch.set_num_threads(1)
