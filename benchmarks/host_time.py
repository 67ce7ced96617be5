"""Host time of one optimizer step on GPT-2 small's 148 parameter tensors, shrunk until compute is negligible.

What a step costs the host (Python, dispatch, bookkeeping) shows when the tensors are tiny: GPT-2
small's shapes divided by 96 (768 -> 8, 3072 -> 32, the 50257-row embedding -> 524 rows), 148 tensors.
Each optimizer's plain (non-refresh) steps are timed interleaved with torch.optim.AdamW(foreach=True),
the baseline, and reported as the ratio of medians measured side by side in one run, and as the median
of each round's ratio (timings on a shared CPU are noisy and often bimodal; ratios of steps taken side
by side much less so). Targets: soap_optim.AdamW <= 1.2x,
SOAP <= 1.5x. SOAP runs twice: at its defaults, where the shrunk embedding (524 rows) gets a factor that
GPT-2 small's 50257-row one does not (real compute, ~1 ms a step), and with max_precond_dim shrunk alike,
which keeps GPT-2 small's factor structure.

    python benchmarks/host_time.py [--steps 200] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import soap_optim


SHRINK = 96


def gpt2_small_shapes(shrink: int = SHRINK):
    """The 148 parameter shapes of GPT-2 small (12 layers, width 768), every axis divided by ``shrink``."""
    d = lambda n: max(1, -(-n // shrink))  # noqa: E731
    shapes = [(d(50257), d(768)), (d(1024), d(768))]
    for _ in range(12):
        shapes += [(d(768),), (d(768),), (d(768), d(2304)), (d(2304),), (d(768), d(768)), (d(768),),
                   (d(768),), (d(768),), (d(768), d(3072)), (d(3072),), (d(3072), d(768)), (d(768),)]
    shapes += [(d(768),), (d(768),)]
    return shapes


OPTIMIZERS = {
    "torch AdamW(foreach=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "soap_optim.AdamW": lambda ps: soap_optim.AdamW(ps, lr=1e-3),
    # no refresh inside the timed window: the plain step's host work
    "soap_optim.SOAP": lambda ps: soap_optim.SOAP(ps, lr=1e-3, precondition_frequency=10**9),
    # the shrink keeps the shapes but not which axes get a factor: GPT-2 small's 50257-row embedding axis is
    # longer than max_precond_dim (10000) and gets none, its 524-row miniature would get a 524 x 524 basis
    # whose products are real compute (~1 ms a step). max_precond_dim shrunk alike (10000 // 96 = 104)
    # keeps GPT-2 small's factor structure, so this arm measures the host work the target is about.
    "soap_optim.SOAP, GPT-2's factors": lambda ps: soap_optim.SOAP(
        ps, lr=1e-3, precondition_frequency=10**9, max_precond_dim=10000 // SHRINK
    ),
}


def measure(steps: int):
    gen = torch.Generator().manual_seed(0)
    shapes = gpt2_small_shapes()
    runs = {}
    for name, make in OPTIMIZERS.items():
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opt = make(params)
        for _ in range(3):  # state creation and the first basis are not the plain step
            opt.step()
        runs[name] = opt
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, opt in runs.items():  # interleaved: drifts of a shared CPU hit all alike
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    baseline = times["torch AdamW(foreach=True)"]
    # the median of each round's ratio as well: on a shared CPU a step's time is often bimodal (other
    # processes come and go), and rounds compare steps taken side by side
    ratios = {name: statistics.median(a / b for a, b in zip(t, baseline)) for name, t in times.items()}
    return {name: statistics.median(t) for name, t in times.items()}, ratios, len(shapes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    medians, ratios, count = measure(args.steps)
    baseline = medians["torch AdamW(foreach=True)"]
    print(f"{count} tensors, median of {args.steps} interleaved plain steps, {args.threads} thread(s)")
    print(f"{'':34s} {'median':>11s}   {'ratio':>6s}   {'median ratio per round':>22s}")
    for name, median in medians.items():
        print(f"{name:34s} {median * 1e3:8.3f} ms   {median / baseline:5.2f}x   {ratios[name]:22.2f}x")


if __name__ == "__main__":
    main()
