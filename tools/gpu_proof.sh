#!/usr/bin/env bash
# The GPU proof in one command of at most 8 minutes: every figure docs/gpu.md lists as "not measured", written to
# $OUT/gpu_proof.md (or gpu_results/gpu_proof.md) the moment it is measured, so a run stopped at a time limit keeps
# what it had. From the repository root:
#
#   bash tools/gpu_proof.sh          # on one GPU (H100/H200), offline: wheels from .whl/ (docs/gpu.md)
#   bash tools/gpu_proof.sh smoke    # every part at toy sizes on the CPU (tests/test_benchmarks.py runs it in CI)
#
# Parts, in order, each under its own cap (python tools/gpu_proof.py PART does the work):
#   1. environment (GPU, memory, driver, torch, CUDA) and the GPU-marked tests, tests/test_gpu.py       <= 90 s
#   2. the real training path: the trainer's per-worker function, one rank, DeepSpeed ZeRO-2 over NCCL, no Ray, on
#      synthetic shards, at the micro-batch the memory estimate derives for this GPU: imagenet64_cond (bf16 trunk)
#      images/s, MFU, peak memory, checkpoint save, export == fp32 master weights; then imagenet64_density
#      (fp32 + TF32): the memory estimate against the measured peak                                       <= 180 s
#   3. sampling, paper model, guided, batch 256, bf16: sequential eager, CUDA graph, Jacobi             <= 120 s
#   4. bits/dim images/s; Tweedie denoise images/s and peak memory at the default denoise batch          <= 60 s
#
# The machine needs Python 3.12 with torch, numpy, PyYAML, PIL, safetensors, tqdm and huggingface_hub. Where
# DeepSpeed or webdataset does not import (an offline machine without them), their wheels and those of their
# dependencies come from .whl/ (git-ignored), prepared where PyPI is reachable with the command in docs/gpu.md
# ("Preparing .whl/"), and are installed here with --no-index into /tmp/site.
set -uo pipefail
mode=${1:-gpu}
case $mode in
gpu | smoke) ;;
*)
    echo "unknown mode '$mode': gpu (the default) or smoke" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
report="$out/gpu_proof.md"
python=$(command -v python3 || command -v python)
if ! "$python" -c "import deepspeed, webdataset" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "DeepSpeed or webdataset is missing and .whl/ holds no wheels: prepare them (docs/gpu.md)" >&2
        exit 2
    fi
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/tarflow_scale/torch_extensions}

commit=${PROOF_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git; set PROOF_COMMIT)")}
{
    echo "# GPU proof ($mode)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit, command: \`bash tools/gpu_proof.sh${1:+ $1}\`"
} >"$report"
failed=0

# run TITLE CAP COMMAND...: one part under its cap; its status is recorded whatever happens.
run() {
    local title=$1 cap=$2
    shift 2
    local start=$SECONDS status
    timeout --kill-after=10 "$cap" "$@"
    status=$?
    case $status in
    0) echo "<!-- $title: done in $((SECONDS - start)) s -->" >>"$report" ;;
    124 | 137) echo -e "\n**$title stopped at its ${cap} s cap**; the rows above were measured." >>"$report" ;;
    *) echo -e "\n**$title failed (exit $status) after $((SECONDS - start)) s**; see the call's output." >>"$report" ;;
    esac
    [ "$status" = 0 ] || failed=1
}
proof() { "$python" tools/gpu_proof.py "$@" --mode "$mode" --report "$report"; }

part1() {
    proof env || return
    {
        echo
        echo '```text'
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
        else
            echo "nvidia-smi: none here"
        fi
        echo '```'
    } >>"$report"
    # -rs lists each skip with its reason (all of them on a CPU).
    "$python" -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tail -n 12 | {
        echo -e "\n\`pytest -m gpu tests/test_gpu.py\`:\n\n\`\`\`text"
        cat
        echo '```'
    } >>"$report"
    return "${PIPESTATUS[0]}"
}
part2() {
    proof train imagenet64_cond
    local cond=$?
    proof train imagenet64_density || return
    return $cond
}
export -f part1 part2 proof
export python mode report

run "part 1 (environment, GPU tests)" 90 bash -c part1
run "part 2 (training)" 180 bash -c part2
run "part 3 (sampling)" 120 "$python" tools/gpu_proof.py sample --mode "$mode" --report "$report"
run "part 4 (evaluation)" 60 "$python" tools/gpu_proof.py eval --mode "$mode" --report "$report"
echo "report: $report"
exit $failed
