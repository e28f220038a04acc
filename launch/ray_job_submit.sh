#!/usr/bin/env bash
# Submit TarFlow training (and, once it finishes, its evaluation) to a running Ray cluster through the Ray Jobs API.
# Needs `pip install 'ray[default]'` where it runs, and tarflow-scale installed on every node of the cluster.
#
#   RAY_ADDRESS=http://HEAD_IP:8265 launch/ray_job_submit.sh imagenet64_cond /shared/runs/c1 16 \
#       data.path=/shared/imagenet64
#
# Arguments: CONFIG (a shipped recipe name or a YAML path), RUN_DIR (shared storage every node sees), the number
# of GPU workers, then any dotted overrides. Re-running the same command resumes from the newest checkpoint.
set -euo pipefail
CONFIG=${1:?usage: launch/ray_job_submit.sh CONFIG RUN_DIR NUM_GPUS [key=value ...]}
RUN_DIR=${2:?usage: launch/ray_job_submit.sh CONFIG RUN_DIR NUM_GPUS [key=value ...]}
NUM_GPUS=${3:?usage: launch/ray_job_submit.sh CONFIG RUN_DIR NUM_GPUS [key=value ...]}
shift 3
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address, e.g. http://HEAD_IP:8265}"

# Validate on the submitting machine first: a config error should not cost a cluster job.
tarflow-train --config "$CONFIG" --dry-run run_dir="$RUN_DIR" cluster.num_workers="$NUM_GPUS" \
    cluster.use_gpu=true "$@" >/dev/null

ray job submit --address "$RAY_ADDRESS" -- \
    tarflow-train --config "$CONFIG" run_dir="$RUN_DIR" cluster.num_workers="$NUM_GPUS" cluster.use_gpu=true "$@"

ray job submit --address "$RAY_ADDRESS" -- \
    tarflow-eval "$RUN_DIR/model.safetensors" --config eval_full cluster.num_workers="$NUM_GPUS" cluster.use_gpu=true
