#!/usr/bin/env bash
# The GPU measurements that docs/gpu.md and docs/sampling.md still list as "not measured", in parts that each fit
# one 10-minute call on a lent GPU machine, written to OUT_DIR as text files (one per part) ready for the tables.
#
#   bash tools/gpu_session.sh PART [OUT_DIR]     (from the repository root; OUT_DIR defaults to $OUT or gpu_results)
#
# PART (in the order to run them; each says its expected time on one H100):
#   check    nvidia-smi, versions, and the GPU-only tests (tests/test_gpu.py)                       ~1 min
#   train    tarflow-bench gpu: bf16 images/s + MFU, peak memory with and without activation
#            checkpointing (imagenet64_uncond), fp32+TF32 images/s (imagenet64_density)              ~3 min
#   sample   tarflow-bench gpu: guided sampling at batch 256 in fp32, bf16 and bf16 + CUDA graph,
#            bits/dim images/s                                                                        ~6 min
#   eval     tarflow-bench eval: per evaluation job, images/s and peak memory of one worker (batch 64) ~4 min
#   decode   tarflow-bench sample: decoding modes on the quickstart model trained in-process
#            (batches 1, 64, 256; the compiled sequential step too)                                   ~5 min
#   decode-paper  tarflow-bench sample: jacobi and gs_jacobi vs sequential on the paper's class-conditional
#            model in fp32, trained in-process for a few steps so the iteration counts are a trained
#            model's (batches 1 and 16)                                                                ~8 min
#   decode-paper-bf16  the same in bf16 (gs_jacobi with the first block sequential, tol 1e-2)        ~5 min
#   smoke    every part above at toy sizes on the CPU (tests/test_layout.py runs it)                 ~1 min
#
# The lent machine is offline and its image has torch, numpy, PyYAML, safetensors, huggingface_hub, tqdm,
# scikit-image and scikit-learn but not webdataset: carry its wheels (pure Python), prepared on a networked
# machine with
#   pip download webdataset braceexpand --no-deps -d .wheels        (.wheels/ is git-ignored)
# and name .wheels in the call's carry list. Nothing else is needed: the benchmarks import neither Ray nor DeepSpeed.
set -euo pipefail
part=${1:?usage: bash tools/gpu_session.sh check|train|sample|eval|decode|decode-paper|decode-paper-bf16|smoke [OUT_DIR]}
case $part in
check | train | sample | eval | decode | decode-paper | decode-paper-bf16 | smoke) ;;
*)
    echo "unknown part '$part': check, train, sample, eval, decode, decode-paper, decode-paper-bf16 or smoke" >&2
    exit 2
    ;;
esac
out=${2:-${OUT:-gpu_results}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python=$(command -v python3 || command -v python)
if ! "$python" -c "import webdataset" 2>/dev/null; then
    "$python" -m pip install --quiet --no-index --no-deps .wheels/*.whl
fi
bench() { "$python" -m tarflow_scale.cli.bench "$@"; }
# Each part's output goes to the console and to OUT_DIR/PART.txt, with the command lines and wall times.
log="$out/$part.txt"
run() {
    echo "\$ tarflow-bench $*" | tee -a "$log"
    local start=$SECONDS
    bench "$@" 2>&1 | tee -a "$log"
    echo "# wall time: $((SECONDS - start)) s" | tee -a "$log"
}
: >"$log"
case $part in
check)
    { nvidia-smi || true; "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } 2>&1 | tee -a "$log"
    "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_decoding.py 2>&1 | tee -a "$log"
    ;;
train)
    run gpu --config imagenet64_uncond --only train,memory
    run gpu --config imagenet64_density --only tf32
    ;;
sample)
    run gpu --config imagenet64_uncond --only sample --sample-batch 256
    run gpu --config imagenet64_density --only bpd --bpd-batch 256
    ;;
eval)
    # Per evaluation job: images/s and peak memory of one worker on the paper's model (eval.denoise_batch_size
    # from the recipe); batch 64 keeps the eight sampling calls inside one call's time.
    run eval --config imagenet64_uncond --no-mid --batch-size 64 --repeats 1
    ;;
decode)
    run sample --train-steps 150 --repeats 2 --batches 1,64,256 --compile --cuda-graph
    ;;
decode-paper)
    # fp32 (exact Jacobi; tol 1e-4) on the paper's conditional model, trained in-process for a few steps so the
    # iteration counts are a trained model's; the block decoded first from noise sequential in gs_jacobi_seq.
    run sample --config imagenet64_cond data.path=bundled --train-steps 100 --repeats 1 --batches 1,16 \
        --modes jacobi,gs_jacobi_seq --segment-size 128 --cuda-graph
    ;;
decode-paper-bf16)
    # bf16 rounds the Transformer's inputs, which puts a floor of ~1e-2 under Jacobi's changes (docs/sampling.md):
    # tol 1e-2, and the images compared with the bf16 sequential sampler's.
    run sample --config imagenet64_cond data.path=bundled --precision bf16 --tol 1e-2 --train-steps 100 \
        --repeats 1 --batches 1,16 --modes gs_jacobi_seq --segment-size 128
    ;;
smoke)
    run gpu --config tiny --only train,memory,tf32,sample,bpd --micro-batch 4 --sample-batch 4 --bpd-batch 4 --steps 1
    run eval --config tiny --no-mid --batch-size 2 --repeats 1
    run sample --config tiny data.path=bundled --train-steps 2 --repeats 1 --batches 2 --modes jacobi
    run sample --config tiny model.num_classes=3 model.num_blocks=2 model.patch_size=8 --precision bf16 --tol 1e-2 \
        --train-steps 0 --repeats 1 --batches 2 --modes gs_jacobi_seq --segment-size 16
    ;;
esac
