"""`tarflow-bench [SUITE] ...`: dispatch to one benchmark suite (default `model`); each prints figures."""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "model": "single-process training/sampling images/s and achieved FLOP/s of a config",
    "zero": "ZeRO stages 1/2/3 under Ray Train: images/s and peak memory per rank",
    "data": "WebDataset loader images/s per worker",
    "eval": "evaluation throughput: sampling, denoising and bits/dim images/s",
    "mixing": "CDFlow circulant-diagonal mixing vs a dense matrix",
    "gpu": "the paper's ImageNet64 model on one GPU: bf16 images/s and MFU, peak memory, TF32, sampling, bits/dim",
    "sample": "decoding modes (sequential, jacobi, gs_jacobi) x guidance x batch: images/s, passes, exactness",
    "shards": "sampling to WebDataset shards (tarflow-sample --format shards) at 1 and 2 Ray workers: images/s",
    "sweep": "a FID sweep (eval.sweep) against one tarflow-eval per setting: model loads + generation, the bound",
}


def usage() -> str:
    lines = ["usage: tarflow-bench [SUITE] [options]  (SUITE defaults to 'model')", "", "suites:"]
    lines += [f"  {name:<8} {what}" for name, what in SUITES.items()]
    lines += ["", "tarflow-bench SUITE --help lists a suite's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    suite = argv.pop(0) if argv and argv[0] in SUITES else "model"
    return importlib.import_module(f"tarflow_scale.benchmarks.{suite}").main(argv)


if __name__ == "__main__":
    sys.exit(main())
