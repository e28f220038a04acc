"""The package layout: imports only go down the layers, recipes ship with the package, the wheel has one top level."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tarflow_scale.config import ConfigError, load_config, resolve_config_path, shipped_config_names

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "tarflow_scale"
# For each layer: what it must never import (the package's upper layers, and for the maths, the cluster stack).
FORBIDDEN = {
    # Architecture only: loading, saving and the Hub live in artifacts/.
    "models": {"tarflow_scale.training", "tarflow_scale.evaluation", "tarflow_scale.cli", "tarflow_scale.benchmarks",
               "tarflow_scale.data", "tarflow_scale.artifacts", "tarflow_scale.sampling", "tarflow_scale.interop",
               "ray", "deepspeed", "huggingface_hub"},
    "data": {"tarflow_scale.training", "tarflow_scale.evaluation", "tarflow_scale.cli", "tarflow_scale.benchmarks",
             "tarflow_scale.artifacts", "tarflow_scale.sampling", "tarflow_scale.interop", "ray", "deepspeed"},
    # Weights on disk and back: models, config and atomic (DeepSpeed only inside the consolidation, see below).
    "artifacts": {"tarflow_scale.training", "tarflow_scale.evaluation", "tarflow_scale.cli",
                  "tarflow_scale.benchmarks", "tarflow_scale.data", "tarflow_scale.sampling", "tarflow_scale.interop",
                  "ray"},
    # Above artifacts/: converters of other implementations' checkpoints use models, config and artifacts.
    "interop": {"tarflow_scale.training", "tarflow_scale.evaluation", "tarflow_scale.cli", "tarflow_scale.benchmarks",
                "tarflow_scale.data", "ray", "deepspeed"},
    "training": {"tarflow_scale.evaluation", "tarflow_scale.cli", "tarflow_scale.benchmarks"},
    "evaluation": {"tarflow_scale.training", "tarflow_scale.cli", "tarflow_scale.benchmarks"},
    "benchmarks": {"tarflow_scale.cli"},
}  # fmt: skip
# atomic, sampling and seeding serve every layer (sampling loads models through artifacts/).
ROOT_MODULES_FORBIDDEN = {"tarflow_scale.training", "tarflow_scale.evaluation", "tarflow_scale.cli",
                          "tarflow_scale.benchmarks", "tarflow_scale.interop", "ray"}  # fmt: skip


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = REPO_ROOT) -> set[str]:
    """Every module a file imports (relative imports resolved), at any depth of the file, lazy imports included."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            if node.module is None:  # `from . import fid`: the names are modules
                found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def violations(path: Path, forbidden: set[str], root: Path = REPO_ROOT) -> list[str]:
    return sorted(m for m in imported_modules(path, root) if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_the_import_reader_sees_relative_and_lazy_imports(tmp_path):
    # Guard for the test itself: a violation hidden in a function body or a relative import is found.
    probe = PACKAGE / "models" / "transforms" / "__init__.py"
    assert "tarflow_scale.models.transforms.affine" in imported_modules(probe)
    fake = tmp_path / "tarflow_scale" / "models" / "_probe_for_layout_test.py"  # a copy of the layout, not the tree
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..training.trainer import x\n    import ray\n")
    assert violations(fake, FORBIDDEN["models"], root=tmp_path) == ["ray", "tarflow_scale.training.trainer"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_only_go_down(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"layer {layer} has no modules"
    bad = {module_name(f): violations(f, FORBIDDEN[layer]) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def module_level_imports(path: Path) -> set[str]:
    """The modules a file imports when it is imported (top level, not inside functions)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def test_artifacts_never_import_deepspeed():
    """Loading any artifact needs neither Ray nor DeepSpeed: even a ZeRO checkpoint's weights are read by our own
    weights-only reader (artifacts/zero_weights.py), which runs no DeepSpeed code."""
    files = sorted((PACKAGE / "artifacts").glob("*.py"))
    assert files
    for f in files:
        assert not {m for m in module_level_imports(f) if m.split(".")[0] == "deepspeed"}, f
    users = [f.name for f in files if any(m.startswith("deepspeed") for m in imported_modules(f))]
    assert users == []


def test_root_modules_and_nothing_imports_cli():
    for f in PACKAGE.glob("*.py"):
        assert not violations(f, ROOT_MODULES_FORBIDDEN), f
    for f in PACKAGE.rglob("*.py"):
        if "cli" not in f.relative_to(PACKAGE).parts:
            assert not violations(f, {"tarflow_scale.cli"}), f


def test_public_names_stay_at_the_package_root():
    import tarflow_scale

    for name in tarflow_scale.__all__:
        assert getattr(tarflow_scale, name) is not None
    assert tarflow_scale.TarFlow.__module__ == "tarflow_scale.models.tarflow"


def test_config_by_shipped_name_equals_config_by_path():
    names = shipped_config_names()
    assert {"tiny", "imagenet64_cond", "imagenet64_uncond", "imagenet64_density", "tabular/tnaf_digits"} <= set(names)
    assert load_config("imagenet64_cond") == load_config(REPO_ROOT / "configs" / "imagenet64_cond.yaml")
    # The README's spelling works from any folder: it falls back to the shipped file.
    assert resolve_config_path("configs/imagenet64_uncond.yaml").samefile(
        REPO_ROOT / "configs" / "imagenet64_uncond.yaml"
    )
    assert resolve_config_path("tabular/tnaf_digits").name == "tnaf_digits.yaml"


def test_unknown_config_name_lists_the_shipped_names():
    with pytest.raises(ConfigError, match=r"imagenet64_cond.*shipped names: .*imagenet64_density.*tiny") as e:
        load_config("imagenet64_cond_typo")
    assert "imagenet64_cond_typo" in str(e.value)


@pytest.mark.slow
def test_wheel_holds_one_package_and_every_recipe(tmp_path):
    # Built from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for name in ("configs", "tarflow_scale"):  # tarflow_scale/configs is a link to ../configs: kept a link
        shutil.copytree(REPO_ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path / "dist")],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level = next(n for n in names if n.endswith("top_level.txt"))
        assert z.read(top_level).decode().split() == ["tarflow_scale"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"tarflow_scale"}
    recipes = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "configs").rglob("*.yaml")}
    assert {f"tarflow_scale/{r}" for r in recipes} <= set(names)


@pytest.mark.slow
def test_gpu_benchmarks_and_the_sampler_run_without_ray_or_deepspeed():
    """The GPU benchmarks run on a bare GPU image (torch, no Ray, no DeepSpeed): importing them, and the sampling
    and evaluation-worker code they call, must not need either."""
    modules = [
        "tarflow_scale.cli.bench", "tarflow_scale.benchmarks.gpu", "tarflow_scale.benchmarks.sample",
        "tarflow_scale.benchmarks.eval", "tarflow_scale.sampling", "tarflow_scale.evaluation.generate",
        "tarflow_scale.artifacts", "tarflow_scale.evaluation.worker",
    ]  # fmt: skip
    script = (
        "import importlib, sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'deepspeed'):\n"
        "            raise ImportError(f'{name} imported')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    # The refusal is real: the evaluation's Ray worker pool does need Ray.
    refused = subprocess.run(
        [sys.executable, "-c", script.replace(f"for m in {modules!r}", "for m in ['tarflow_scale.evaluation.pool']")],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert refused.returncode != 0 and "imported" in refused.stderr
