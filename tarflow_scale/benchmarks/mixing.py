"""Time CDFlow's forward, inverse and log-determinant against a dense n x n matrix of the same size.

For each feature size n the table gives the time of one call on a batch of token vectors (B, n), the fastest
block of calls over alternating dense/CDFlow rounds, and the ratio dense / CDFlow (> 1: CDFlow is faster).
Dense baselines:
  * forward:     x @ W^T
  * inverse:     torch.linalg.solve (an LU of W each call, as in training where W changes every step), and
                 x @ inv(W)^T with the inverse precomputed (sampling from a frozen model)
  * log-det:     torch.linalg.slogdet(W), O(n^3)
  * train step:  forward + log-det + backward to x and W (what one training step pays per mixer)
CDFlow pays O(m n log n) for each, with no factorisation to cache. Example:

    tarflow-bench mixing --sizes 48 96 192 768 --tokens 4096 --factors 2
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch.utils import benchmark

from tarflow_scale.benchmarks.common import add_device_option
from tarflow_scale.models.mixing import CirculantDiagonalMixer


def _time(fn, min_run_time: float) -> float:
    """Seconds per call of fn(): the fastest block of calls, the figure least disturbed by other processes."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return min(measurement.times)


def bench_size(
    n: int,
    num_tokens: int,
    num_factors: int,
    device: torch.device,
    dtype: torch.dtype,
    min_run_time: float,
    rounds: int = 3,
) -> dict[str, tuple[float, float]]:
    """{operation: (dense seconds, CDFlow seconds)} for one feature size n."""
    torch.manual_seed(n)
    mixer = CirculantDiagonalMixer(n, num_factors).to(device, dtype)
    with torch.no_grad():  # well-conditioned random factors, so no operation hits a near-singular case
        mixer.log_diag.normal_(0, 0.3)
        mixer.circulant.normal_(0, 0.3 / n**0.5)
    W = mixer.matrix().detach().requires_grad_(True)  # the same map, as a dense (n, n) matrix
    W_inv = torch.linalg.inv(W.detach())
    x = torch.randn(num_tokens, n, device=device, dtype=dtype, requires_grad=True)
    y = x.detach() @ W.detach().T
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        def run():
            fn()
            sync()

        return _time(run, min_run_time / rounds)

    def pair(dense_fn, cdflow_fn):
        """Both sides measured in alternating rounds, so a burst of load elsewhere hits them alike."""
        times = [(timed(dense_fn), timed(cdflow_fn)) for _ in range(rounds)]
        return min(t[0] for t in times), min(t[1] for t in times)

    def dense_step():
        out = x @ W.T
        (out.sum() + num_tokens * torch.linalg.slogdet(W)[1]).backward()

    def cdflow_step():
        out, log_det = mixer(x)
        (out.sum() + log_det.sum()).backward()

    with torch.no_grad():
        results = {
            "forward": pair(lambda: x @ W.T, lambda: mixer(x)),
            "inverse (solve)": pair(lambda: torch.linalg.solve(W, y.T), lambda: mixer.inverse(y)),
            "inverse (cached inv)": pair(lambda: y @ W_inv.T, lambda: mixer.inverse(y)),
            "log-det": pair(lambda: torch.linalg.slogdet(W), mixer.log_abs_det),
        }
    results["train step"] = pair(dense_step, cdflow_step)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tarflow-bench mixing", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 96, 192, 768], help="feature sizes n")
    parser.add_argument("--tokens", type=int, default=4096, help="token vectors per call (B x T)")
    parser.add_argument("--factors", type=int, default=2, help="CDFlow circulant factors m")
    add_device_option(parser)
    parser.add_argument("--dtype", choices=["fp32", "fp64"], default="fp32", help="tensor precision (default fp32)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds of timing per operation and side")
    parser.add_argument("--rounds", type=int, default=3, help="alternating dense/CDFlow rounds per operation")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp64": torch.float64}[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"device: {device} ({name}), {torch.get_num_threads()} CPU threads, dtype {dtype}, torch {torch.__version__}; "
        f"{args.tokens} tokens per call, CDFlow m={args.factors}; fastest time per call, ratio = dense / CDFlow"
    )
    print(f"{'n':>5}  {'operation':<21}{'dense':>12}{'CDFlow':>12}{'ratio':>9}")
    for n in args.sizes:
        for op, (dense, cdflow) in bench_size(
            n, args.tokens, args.factors, device, dtype, args.min_run_time, args.rounds
        ).items():
            print(f"{n:>5}  {op:<21}{dense * 1e6:>10.1f}us{cdflow * 1e6:>10.1f}us{dense / cdflow:>8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
