"""Suite-wide settings: one torch thread (tiny tensors; a shared 2-core CI box thrashes with more)."""

import importlib.util
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """Import a script of the repository's `tools/` folder (not an installed package) by its path."""
    path = REPO_ROOT / "tools" / f"{name}.py"
    module_name = f"tarflow_tools_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module
