"""Suite-wide settings and guards: one torch thread (tiny tensors; a shared 2-core CI box thrashes with more); a
test that starts a process (Ray, a CLI in a child process, pip, a compiler) must be marked `slow`, so that
`pytest -m "not slow"` stays a fast lane; and no test may leave files in the repository."""

import importlib.util
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
# Ray Train's controller polls its workers every 2 s, so a finished or started worker group is noticed up to 2 s
# late; tests launch ~30 short runs. Set before any Ray starts: Ray's processes inherit the driver's environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

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


# -- The fast lane starts no process. Every child process Python starts goes through subprocess.Popen (ray.init
# starts Ray's with it too), which raises this audit event; a test that is not marked slow gets an error instead.
_fast_test: list[str] = []  # the node id of the non-slow test being set up or run


def _refuse_processes_in_fast_tests(event: str, args: tuple) -> None:
    if event == "subprocess.Popen" and _fast_test:
        raise RuntimeError(
            f"{_fast_test[0]} starts a process ({args[1]!r:.200}) but is not marked slow: add @pytest.mark.slow "
            "(the fast lane, pytest -m 'not slow', starts no Ray, subprocess or compiler)"
        )


sys.addaudithook(_refuse_processes_in_fast_tests)


@contextmanager
def _fast_lane(item: pytest.Item):
    if item.get_closest_marker("slow") is None:
        _fast_test.append(item.nodeid)
    try:
        yield
    finally:
        _fast_test.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):  # module- and session-scoped fixtures start here too (a Ray session)
    with _fast_lane(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _fast_lane(item):
        return (yield)


# -- No test writes into the source tree: what git sees (untracked and ignored files included) before and after.
_BEFORE = pytest.StashKey[dict | None]()
# Environments and tool caches, which a developer's tools may touch while the tests run (bytecode is left out too).
_NOT_CHECKED = (".venv", "venv", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".benchmarks")


def _repository_files() -> dict[str, int] | None:
    """Every file git reports (modified, untracked or ignored) -> its mtime; None outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain=v1", "-z", "--untracked-files=all", "--ignored", "--no-renames", "--",
             ".", *(f":(exclude){name}" for name in _NOT_CHECKED)],
            cwd=REPO_ROOT, capture_output=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    files = {}
    for entry in done.stdout.decode(errors="replace").split("\0"):
        path = entry[3:]
        if path and "__pycache__" not in path:
            files[path] = (REPO_ROOT / path).stat().st_mtime_ns if (REPO_ROOT / path).exists() else -1
    return files


def pytest_sessionstart(session):
    session.config.stash[_BEFORE] = _repository_files()


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_BEFORE, None)
    after = _repository_files() if before is not None else None
    if after is None:
        return
    changed = sorted(path for path, mtime in after.items() if before.get(path) != mtime)
    if changed:
        listed = "\n  ".join(changed[:20])
        sys.stderr.write(f"\nfiles under {REPO_ROOT} changed during the tests (use tmp_path):\n  {listed}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
