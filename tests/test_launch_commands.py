"""Every `tarflow-train` / `tarflow-eval` command line shown to users (README.md, launch/*, eval/*.md) validates
with `--dry-run` at the worker count it states: multi-line commands (backslash continuations, also inside shell
comments), placeholders (HEAD_IP, CHECKPOINT, paths) and the launch scripts' own variables, filled from the usage
example each script documents."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tarflow_scale.artifacts import save_export
from tarflow_scale.cli.eval import main as eval_main
from tarflow_scale.cli.train import main as train_main
from tarflow_scale.config import RunConfig, TarFlowConfig
from tarflow_scale.models.tarflow import TarFlow

REPO_ROOT = Path(__file__).resolve().parents[1]
# In prose (comments, inline code) a command starts the snippet or follows `-- ` / `&& ` (ray job submit, a chain);
# in code (script lines, fenced blocks) it may follow any launcher words (srun ..., ray job submit ... --).
COMMAND_IN_PROSE = re.compile(r"(?:^|(?<=\s--\s)|(?<=&&\s))(tarflow-(?:train|eval))\b(.*)$")
COMMAND_IN_CODE = re.compile(r"(?:^|(?<=\s))(tarflow-(?:train|eval))\b(.*)$")
SHELL_STOP = {"|", "||", "&&", ";", "&"}


@dataclass
class Command:
    source: str  # file:line
    program: str  # tarflow-train | tarflow-eval
    argv: list[str]


def logical_lines(lines: list[str], comment: str | None) -> list[tuple[int, str, bool]]:
    """(first line, joined text, is code) with backslash continuations joined; with `comment` set, a continued
    comment line continues on the next comment line (a command shown inside a shell/YAML comment)."""
    out, start, parts, code = [], None, [], True
    for number, raw in enumerate(lines, 1):
        text = raw.rstrip()
        is_comment = bool(comment) and text.lstrip().startswith(comment)
        if is_comment:
            text = text.lstrip()[len(comment) :]
        if start is None:
            start, code = number, not is_comment
        if text.endswith("\\"):
            parts.append(text[:-1].strip())
            continue
        parts.append(text.strip())
        out.append((start, " ".join(p for p in parts if p), code))
        start, parts = None, []
    if parts:
        out.append((start, " ".join(parts), code))
    return out


def markdown_snippets(text: str) -> list[tuple[int, str, bool]]:
    """(line, snippet, fenced) for lines of fenced code blocks and for inline code spans outside them."""
    lines, snippets, fence, block, start = text.splitlines(), [], False, [], 0
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            if fence:
                snippets += [(start + n - 1, s, True) for n, s, _ in logical_lines([b for _, b in block], None)]
                block = []
            fence = not fence
            start = number + 1
            continue
        if fence:
            block.append((number, line))
        else:
            snippets += [(number, span, False) for span in re.findall(r"`([^`]+)`", line)]
    return snippets


def commands_in(path: Path, variables: dict[str, str]) -> tuple[list[Command], list[str]]:
    """The commands of one file, with `variables` substituted; also the skipped mentions (with a reason)."""
    text = path.read_text()
    if path.suffix == ".md":
        snippets = markdown_snippets(text)
    else:
        snippets = logical_lines(text.splitlines(), "#")
    found, skipped = [], []
    for number, snippet, fenced in snippets:
        match = (COMMAND_IN_CODE if fenced else COMMAND_IN_PROSE).search(snippet.strip())
        if not match:
            continue
        program, rest = match.group(1), match.group(2)
        where = f"{path.relative_to(REPO_ROOT)}:{number}"
        if not fenced and not rest.strip():
            continue  # a bare name in prose (`tarflow-eval` measures ...) is a mention, not a command line
        if "..." in rest:
            skipped.append(f"{where}: elided ({snippet.strip()})")
            continue
        for name, value in variables.items():
            rest = rest.replace(f'"${name}"', value).replace(f"${{{name}}}", value).replace(f"${name}", value)
        assert "$" not in rest, f"{where}: unknown shell variable in {rest!r}: add it to the test's usage table"
        argv = []
        for token in shlex.split(rest, comments=True):
            if token in SHELL_STOP or token.startswith(">"):
                break
            argv.append(token)
        found.append(Command(where, program, argv))
    return found, skipped


def usage_example(script: Path) -> list[str]:
    """The arguments of the invocation example a launch script documents in its header comment."""
    for _, line, _ in logical_lines(script.read_text().splitlines(), "#"):
        match = re.search(rf"launch/{re.escape(script.name)}\s+(\S.*)$", line)
        if match and "usage" not in line and "CONFIG" not in match.group(1):
            return shlex.split(match.group(1))
    raise AssertionError(f"{script}: no usage example found")


def script_variables() -> dict[str, dict[str, str]]:
    """Each launch script's variables, from its documented example (so the test uses the counts it states)."""
    ray_job = REPO_ROOT / "launch" / "ray_job_submit.sh"
    config, run_dir, gpus, *extra = usage_example(ray_job)
    slurm = REPO_ROOT / "launch" / "slurm.sbatch"
    slurm_text = slurm.read_text()
    header = next(line for line in slurm_text.splitlines() if "sbatch --nodes=" in line)
    nodes = int(re.search(r"--nodes=(\d+)", header).group(1))
    gpus_per_node = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", slurm_text).group(1))
    slurm_args = shlex.split(header.split("launch/slurm.sbatch", 1)[1])
    return {
        "ray_job_submit.sh": {
            "CONFIG": config, "RUN_DIR": run_dir, "NUM_GPUS": gpus, "@": shlex.join(extra),
        },
        "slurm.sbatch": {
            "CONFIG": slurm_args[0], "@": shlex.join(slurm_args[1:]), "num_gpus": str(nodes * gpus_per_node),
            "head_ip": "10.0.0.1", "port": "6379",
        },
    }  # fmt: skip


def all_commands() -> tuple[list[Command], list[str]]:
    variables = script_variables()
    files = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "eval").glob("*.md"))]
    files += sorted(p for p in (REPO_ROOT / "launch").iterdir() if p.is_file())
    commands, skipped = [], []
    for path in files:
        found, skip = commands_in(path, variables.get(path.name, {}))
        commands += found
        skipped += skip
    return commands, skipped


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An export standing in for CHECKPOINT / model.safetensors placeholders."""
    config = RunConfig(model=TarFlowConfig(image_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2))
    torch.manual_seed(0)
    model = TarFlow(config.model)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    return save_export(model.state_dict(), config, path, "test", "step_0", ema=False)


def test_the_scanner_finds_the_documented_commands():
    commands, skipped = all_commands()
    sources = {c.source.split(":")[0] for c in commands}
    assert {"README.md", "eval/README.md", "launch/slurm.sbatch", "launch/kuberay.yaml"} <= sources
    assert "launch/ray_job_submit.sh" in sources
    assert sum(c.program == "tarflow-train" for c in commands) >= 6
    assert sum(c.program == "tarflow-eval" for c in commands) >= 5
    # The multi-line and comment-embedded commands were joined (their worker counts sit on continuation lines).
    kuberay = [c for c in commands if c.source.startswith("launch/kuberay.yaml")]
    assert kuberay and "cluster.num_workers=16" in kuberay[0].argv
    slurm = [c for c in commands if c.source.startswith("launch/slurm.sbatch")]
    assert slurm and "cluster.num_workers=32" in slurm[0].argv  # 4 nodes x 8 GPUs, as its usage line states
    assert all("..." in s for s in skipped)


def test_every_documented_command_validates_with_dry_run(checkpoint, capsys):
    commands, _ = all_commands()
    failures = []
    for command in commands:
        argv = [a for a in command.argv if a != "--dry-run"] + ["--dry-run"]
        if command.program == "tarflow-eval":
            position = next(i for i, a in enumerate(argv) if not a.startswith("-") and "=" not in a)
            argv[position] = str(checkpoint)  # CHECKPOINT, runs/.../model.safetensors, "$RUN_DIR/model..."
            code = eval_main(argv)
        else:
            code = train_main(argv)
        out, err = capsys.readouterr()
        if code != 0:
            failures.append(f"{command.source}: {command.program} {shlex.join(command.argv)}\n    {err.strip()}")
            continue
        stated = [a.split("=", 1)[1] for a in argv if a.startswith("cluster.num_workers=")]
        if stated:  # the dry run resolved the worker count the command states
            assert f"\n  num_workers: {stated[-1]}\n" in out.split("\ncluster:", 1)[1].split("\ntrain:", 1)[0] + "\n"
    assert not failures, "commands that do not validate:\n" + "\n".join(failures)
